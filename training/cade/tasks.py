"""What a CADe task fixes for training and serving alike: frame, intensity scale, tile, data seeds.

Torch-free, so serving can read the same definition. Every phantom seed a task's model touches is
listed here, once, per split: a case is ``(task, seed, index)`` (see
:func:`training.data.dataset.generate_case`), so splits with different seeds never share a case, and
test sets come from seeds never used for training or model selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from services.cade.pipeline import DetectorSpec
from services.cade.preprocess import Intensity, WorkingFrame
from services.cade.tiling import TilingSpec
from services.core.errors import InputError

Split = Literal["train", "validation", "test", "hybrid-test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test", "hybrid-test")


@dataclass(frozen=True)
class DataSeeds:
    """The phantom seed of each split (``hybrid-test``: lesions inserted into the real sample)."""

    train: int
    validation: int
    test: int
    hybrid_test: int

    def of(self, split: Split) -> int:
        return getattr(self, split.replace("-", "_"))

    def __post_init__(self) -> None:
        seeds = [self.train, self.validation, self.test, self.hybrid_test]
        if len(set(seeds)) != len(seeds):
            raise InputError(f"splits must not share a seed, got {seeds}", field="seeds")


@dataclass(frozen=True)
class CadeTask:
    """A detection task: ``label`` is the weak target drawn from each lesion's centre and max diameter
    (a sphere in 3D, a circle in 2D); ``tile`` is the network's patch in array order (z, y, x)."""

    name: str
    frame: WorkingFrame
    intensity: Intensity
    tile: tuple[int, ...]
    seeds: DataSeeds
    nms_radius_mm: float | None = None
    nms_radius_pixels: float | None = None

    @property
    def dims(self) -> int:
        return self.frame.dims

    @property
    def model_name(self) -> str:
        return f"cade_{self.name}"

    def tiling(self) -> TilingSpec:
        """Serving's tiling of this task's network; images are refused below a quarter tile per axis."""
        return TilingSpec(tile=self.tile, min_shape=tuple(max(1, t // 4) for t in self.tile))

    def detector_spec(self) -> DetectorSpec:
        return DetectorSpec(
            task=self.name,
            frame=self.frame,
            intensity=self.intensity,
            tiling=self.tiling(),
            nms_radius_mm=self.nms_radius_mm,
            nms_radius_pixels=self.nms_radius_pixels,
        )


TASKS: dict[str, CadeTask] = {
    "chest-ct-nodule": CadeTask(
        name="chest-ct-nodule",
        # 2 mm isotropic: a 3 mm nodule is still 1–2 voxels, and a whole chest CT is ~5 M voxels on CPU.
        frame=WorkingFrame(dims=3, spacing_mm=2.0),
        # Lung window, calibrated HU: air 0, soft tissue ≈ 0.75, bone saturates.
        intensity=Intensity("window", -1000.0, 400.0),
        tile=(48, 48, 48),
        seeds=DataSeeds(train=1101, validation=1102, test=1103, hybrid_test=1104),
        nms_radius_mm=8.0,
    ),
}


def get_task(name: str) -> CadeTask:
    if name not in TASKS:
        raise InputError(f"unknown CADe task {name!r}; trainable: {', '.join(TASKS)}", field="task")
    return TASKS[name]
