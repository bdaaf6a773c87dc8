"""Generate N cases of a task and write images, masks, weak-label manifest (and extras) to disk.

Case i of seed S always gets the i-th child of ``SeedSequence(S)``, so a case does not change when
N does, and the same (task, seed) is byte-identical on every run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from services.core.errors import InputError
from services.core.io import write_image
from services.core.manifest import format_float, write_manifest
from training.data import brain_mr, chest_ct, cxr, head_ct, head_mra, hybrid, liver_mr
from training.data.case import PhantomCase
from training.data.weak_labels import weak_labels_from_mask

log = logging.getLogger(__name__)

Generator = Callable[[np.random.Generator, tuple[int, int, int] | None], PhantomCase]

TASKS: dict[str, Generator] = {
    chest_ct.TASK: chest_ct.generate,
    head_mra.TASK: head_mra.generate,
    brain_mr.TASK: brain_mr.generate,
    liver_mr.TASK: liver_mr.generate,
    "cxr-mass": partial(cxr.generate, task="cxr-mass"),
    "cxr-anomaly": partial(cxr.generate, task="cxr-anomaly"),
    head_ct.TASK: head_ct.generate,
}
FORMATS = ("nifti", "dicom")
MAX_CASES = 100_000


def validate(task: str, n: int, seed: int, hybrid_mode: bool, formats: tuple[str, ...], size_xyz) -> None:
    """Refuse bad requests up front, naming the option, before anything is written."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; known: {', '.join(TASKS)}", field="task")
    if not 1 <= n <= MAX_CASES:
        raise InputError(f"must be between 1 and {MAX_CASES}, got {n}", field="n")
    if seed < 0:
        raise InputError(f"must be ≥ 0, got {seed}", field="seed")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise InputError(f"unknown {', '.join(unknown)}; known: {', '.join(FORMATS)}", field="format")
    if hybrid_mode and task not in hybrid.HYBRID_SAMPLES:
        raise InputError(f"available for {', '.join(hybrid.HYBRID_SAMPLES)} only, not {task}", field="hybrid")
    if size_xyz is not None:
        if len(size_xyz) != 3 or any(int(s) < 1 or int(s) > 2048 for s in size_xyz):
            raise InputError(f"needs 3 sizes in 1..2048, got {list(size_xyz)}", field="size")
        if task.startswith("cxr") and int(size_xyz[2]) != 1:
            raise InputError("a radiograph has one slice: the third size must be 1", field="size")


def generate_case(
    task: str, seed: int, index: int, *, hybrid_mode: bool = False, size_xyz=None
) -> PhantomCase:
    """Case ``index`` of (task, seed): independent of how many cases are generated."""
    child = np.random.SeedSequence(seed).spawn(index + 1)[index]
    rng = np.random.default_rng(child)
    if hybrid_mode:
        return hybrid.generate(task, rng)
    return TASKS[task](rng, tuple(int(s) for s in size_xyz) if size_xyz else None)


def case_rows(
    case: PhantomCase, case_id: str, image_rel: str, mask_rel: str, extra_paths: dict[str, str]
) -> list[dict[str, Any]]:
    """Manifest rows for one case: weak labels measured from the exact mask."""
    labels = {w.lesion_id: w for w in weak_labels_from_mask(case.mask)}
    base = {
        "case_id": case_id,
        "image": image_rel,
        "mask": mask_rel,
        "abnormal": "true" if case.abnormal else "false",
        **extra_paths,
    }
    rows = []
    for record in case.lesions:
        w = labels.get(record.lesion_id)
        if w is None:
            continue
        treated = record.extra.get("treated")
        rows.append({
            **base,
            "lesion_id": str(record.lesion_id),
            "center_x_mm": format_float(w.center_mm[0]),
            "center_y_mm": format_float(w.center_mm[1]),
            "center_z_mm": format_float(w.center_mm[2]),
            "diameter_mm": format_float(w.diameter_mm),
            "lesion_type": record.lesion_type,
            "axial_long_mm": format_float(w.axial_long_mm),
            "axial_short_mm": format_float(w.axial_short_mm),
            "volume_mm3": format_float(w.volume_mm3),
            "shape_family": record.shape.family,
            "contrast_sd": format_float(record.contrast_sd),
            "treated": "" if treated is None else ("true" if treated else "false"),
        })  # fmt: skip
    if not rows:
        rows.append({**base, "lesion_id": "", "lesion_type": "normal" if not case.abnormal else ""})
    return rows


def write_dataset(
    task: str,
    n: int,
    seed: int,
    out_dir: str | Path,
    *,
    hybrid_mode: bool = False,
    preview: bool = False,
    formats: tuple[str, ...] = ("nifti",),
    size_xyz: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """Write the dataset; returns a summary (paths, counts, seconds per case)."""
    validate(task, n, seed, hybrid_mode, formats, size_xyz)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    cases_info: dict[str, Any] = {}
    kept: list[PhantomCase] = []
    started = time.perf_counter()
    for index in range(n):
        case = generate_case(task, seed, index, hybrid_mode=hybrid_mode, size_xyz=size_xyz)
        case_id = f"{task}-s{seed}-{index:04d}" + ("-hybrid" if hybrid_mode else "")
        image_rel, mask_rel = f"images/{case_id}.nii.gz", f"masks/{case_id}.nii.gz"
        write_image(case.image, out / image_rel)
        write_image(case.mask, out / mask_rel)
        extra_paths: dict[str, str] = {}
        if "dose" in case.extras:
            from training.data.rtdose import write_rtdose

            extra_paths["dose"] = f"dose/{case_id}_dose.nii.gz"
            extra_paths["rtdose"] = f"dose/{case_id}_rtdose.dcm"
            write_image(case.extras["dose"], out / extra_paths["dose"])
            write_rtdose(case.extras["dose"], out / extra_paths["rtdose"], uid_seed=case_id)
        if "dicom" in formats:
            from training.data.dicom_export import write_dicom_series

            write_dicom_series(case.image, out / "dicom" / case_id, uid_seed=case_id)
        rows += case_rows(case, case_id, image_rel, mask_rel, extra_paths)
        cases_info[case_id] = {
            "task": task,
            "seed": seed,
            "index": index,
            "abnormal": case.abnormal,
            "shape_xyz": list(case.image.shape_xyz),
            "spacing_mm": [round(s, 6) for s in case.image.spacing],
            **{k: v for k, v in case.info.items() if isinstance(v, str | int | float | bool | list | dict)},
        }
        if preview and len(kept) < 16:
            kept.append(case)
        log.info("case %d/%d written", index + 1, n)
    manifest = write_manifest(rows, out / "manifest.csv")
    (out / "cases.json").write_text(json.dumps(cases_info, indent=1, sort_keys=True) + "\n")
    summary: dict[str, Any] = {
        "task": task,
        "cases": n,
        "lesions": sum(1 for r in rows if r["lesion_id"]),
        "manifest": str(manifest),
        "seconds_per_case": round((time.perf_counter() - started) / n, 3),
    }
    if preview:
        from training.data.preview import write_contact_sheet

        summary["preview"] = str(write_contact_sheet(kept, out / "preview.png"))
    return summary
