"""Training cases of a CADe task: phantoms brought to the detector's working frame, with their targets.

The image goes through :func:`services.cade.preprocess.to_working` — the function serving calls — so
the network trains on exactly the grid and intensity scale it will be served on. The target is the
weak label: the union of one sphere per lesion from the manifest's centre and maximum diameter
(:func:`services.label_estimation.shapes.sphere_mask`, exact in world mm on any grid). Behind
``target="painted"`` it is the exact painted mask instead, for the sphere-vs-painted experiment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from services.cade.preprocess import to_working
from services.core.errors import InputError
from services.core.io import read_image
from services.core.lesion_prompt import LesionPrompt
from services.core.manifest import read_manifest
from services.core.volume import Volume
from services.label_estimation.shapes import sphere_mask
from training.cade.tasks import CadeTask, Split
from training.data.dataset import write_dataset

Target = Literal["sphere", "painted"]
TARGETS: tuple[Target, ...] = ("sphere", "painted")


@dataclass(frozen=True)
class WorkingCase:
    """One case on the working grid: ``image`` float32 in [0, 1] and ``label`` uint8, both (1, *spatial):
    (1, z, y, x) for a 3D task, (1, y, x) for a 2D one (a radiograph's single slice dropped)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    #: Flat indices (into the spatial array) of voxels inside the case's hard negatives: places a
    #: reader called a false positive, where the sampler centres extra lesion-free patches.
    hard_negative: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


@dataclass(frozen=True)
class CaseRows:
    """A manifest's case: its image and exact mask files and the weak labels of its lesions."""

    case_id: str
    image: Path
    mask: Path | None
    prompts: tuple[LesionPrompt, ...]
    #: ``hard_negative=true`` rows (centre + diameter of a rejected candidate; no lesion id).
    hard_negatives: tuple[LesionPrompt, ...] = ()


def phantom_split(
    task: CadeTask,
    split: Split,
    cases: int,
    out_dir: Path,
    size_xyz: tuple[int, int, int] | None = None,
) -> Path:
    """Write (or reuse) ``cases`` phantoms of ``split`` under ``out_dir/<split>``; returns the manifest.

    A folder already holding the same seed and count is reused: a case is a pure function of
    (task, seed, index, size), so regenerating it would write the same bytes."""
    folder = Path(out_dir) / split
    marker = folder / "split.txt"
    key = f"{task.name} seed={task.seeds.of(split)} cases={cases} size={size_xyz}\n"
    if marker.is_file() and marker.read_text() == key and (folder / "manifest.csv").is_file():
        return folder / "manifest.csv"
    write_dataset(
        task.name,
        cases,
        task.seeds.of(split),
        folder,
        hybrid_mode=split.startswith("hybrid"),
        size_xyz=None if split.startswith("hybrid") else size_xyz,
    )
    marker.write_text(key)
    return folder / "manifest.csv"


def manifest_cases(manifest: Path) -> list[CaseRows]:
    """Every case of ``manifest`` (lesion-free ones too: they teach the network what is not a lesion),
    with its ``hard_negative`` rows (columns of ``services.feedback.ingest``) as hard negatives."""
    cases: dict[str, CaseRows] = {}
    for row in read_manifest(manifest, check_files=True, strict=True):
        known = cases.get(row["case_id"])
        prompts = known.prompts if known else ()
        negatives = known.hard_negatives if known else ()
        centre = (row["center_x_mm"], row["center_y_mm"], row["center_z_mm"] or 0.0)
        if row["lesion_id"] is not None:
            prompts += (LesionPrompt(centre, row["diameter_mm"], row["lesion_id"]),)
        elif str(row.get("hard_negative") or "").strip().lower() == "true":
            negatives += (LesionPrompt(centre, row["diameter_mm"], len(negatives) + 1),)
        cases[row["case_id"]] = CaseRows(row["case_id"], row["image"], row.get("mask"), prompts, negatives)
    return list(cases.values())


def sphere_target(working: Volume, prompts: tuple[LesionPrompt, ...]) -> np.ndarray:
    """The union of the lesions' spheres (centre + max diameter) on the working grid."""
    label = np.zeros(working.grid.shape, dtype=np.uint8)
    for prompt in prompts:
        label |= sphere_mask(working, prompt).full().astype(np.uint8)
    return label


def painted_target(working: Volume, mask_path: Path | None, case_id: str) -> np.ndarray:
    """The exact painted mask (any lesion) on the working grid: ≥ half a voxel of lesion counts."""
    if mask_path is None:
        raise InputError(f"case {case_id!r} has no exact mask for painted targets", field="mask")
    mask = read_image(mask_path)
    lesion = mask.with_array((np.asarray(mask.array) > 0).astype(np.float32))
    on_working = lesion.resample(reference=working.grid, interpolation="linear", output_dtype=np.float32)
    return (np.asarray(on_working.array) >= 0.5).astype(np.uint8)


def working_case(task: CadeTask, case: CaseRows, target: Target = "sphere") -> WorkingCase:
    """``case`` on ``task``'s working frame with its ``target``."""
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}", field="target")
    working = to_working(read_image(case.image), task.frame, task.intensity)
    if target == "sphere":
        label = sphere_target(working, case.prompts)
    else:
        label = painted_target(working, case.mask, case.case_id)
    negatives = sphere_target(working, case.hard_negatives) & (label == 0)
    image = np.asarray(working.array, dtype=np.float32)
    if task.dims == 2:
        image, label, negatives = image[0], label[0], negatives[0]
    return WorkingCase(case.case_id, image[None], label[None], np.flatnonzero(negatives))


def working_cases(task: CadeTask, manifest: Path, target: Target = "sphere") -> list[WorkingCase]:
    return [working_case(task, case, target) for case in manifest_cases(manifest)]
