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
from services.cade.tasks import CadeTask as ServingTask
from services.cade.tasks import task_named
from services.cade.tiling import TilingSpec
from services.core.errors import InputError

Split = Literal["train", "validation", "test", "hybrid-test", "hybrid-train", "feedback"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test", "hybrid-test", "hybrid-train", "feedback")


@dataclass(frozen=True)
class DataSeeds:
    """The phantom seed of each split (``hybrid-*``: lesions inserted into the real sample).

    ``hybrid_train`` cases teach the false-positive-reduction stage what the real background's vessels
    and walls look like; they share the one real background with ``hybrid_test`` but never a lesion
    placement (another seed), so the hybrid test measures unseen lesions, not an unseen patient.
    ``feedback`` cases stand for the archive a reader reviews (the reader-feedback loop): no model is
    trained or selected on them before the reader has judged its candidates."""

    train: int
    validation: int
    test: int
    hybrid_test: int
    hybrid_train: int
    feedback: int

    def of(self, split: Split) -> int:
        return getattr(self, split.replace("-", "_"))

    def __post_init__(self) -> None:
        seeds = [self.train, self.validation, self.test, self.hybrid_test, self.hybrid_train, self.feedback]
        if len(set(seeds)) != len(seeds):
            raise InputError(f"splits must not share a seed, got {seeds}", field="seeds")


@dataclass(frozen=True)
class CadeTask:
    """A detection task as training sees it: the serving task (:mod:`services.cade.tasks`, which fixes
    frame, intensity scale, tile and suppression — one definition, so a model is served exactly as it
    was trained) and the phantom seeds of each split. The weak target is drawn from each lesion's
    centre and max diameter (a sphere in 3D, a circle in 2D)."""

    serving: ServingTask
    seeds: DataSeeds

    @property
    def name(self) -> str:
        return self.serving.name

    @property
    def frame(self) -> WorkingFrame:
        return self.serving.spec.frame

    @property
    def intensity(self) -> Intensity:
        return self.serving.spec.intensity

    @property
    def tile(self) -> tuple[int, ...]:
        """The network's patch in array order (z, y, x), the serving tile."""
        return self.serving.spec.tiling.tile

    @property
    def dims(self) -> int:
        return self.serving.dims

    @property
    def model_name(self) -> str:
        return self.serving.model_name

    def tiling(self) -> TilingSpec:
        return self.serving.spec.tiling

    def detector_spec(self) -> DetectorSpec:
        return self.serving.spec


TASKS: dict[str, CadeTask] = {
    "chest-ct-nodule": CadeTask(
        serving=task_named("chest-ct-nodule"),
        seeds=DataSeeds(
            train=1101, validation=1102, test=1103, hybrid_test=1104, hybrid_train=1105, feedback=1106
        ),
    ),
    "cxr-mass": CadeTask(
        serving=task_named("cxr-mass"),
        seeds=DataSeeds(
            train=1201, validation=1202, test=1203, hybrid_test=1204, hybrid_train=1205, feedback=1206
        ),
    ),
    # 13xx and 14xx are the anomaly tasks' (training/anomaly/tasks.py).
    "head-mra-aneurysm": CadeTask(
        serving=task_named("head-mra-aneurysm"),
        seeds=DataSeeds(
            train=1501, validation=1502, test=1503, hybrid_test=1504, hybrid_train=1505, feedback=1506
        ),
    ),
}


def get_task(name: str) -> CadeTask:
    if name not in TASKS:
        raise InputError(f"unknown CADe task {name!r}; trainable: {', '.join(TASKS)}", field="task")
    return TASKS[name]
