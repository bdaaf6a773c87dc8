"""Batch label estimation over a weak-label manifest: resumable, atomic, one summary row per lesion.

The manifest has the columns of docs/manifest.schema.json (``case_id, image, lesion_id,
center_{x,y,z}_mm, diameter_mm``, optionally ``mask`` = the exact label map, used to score Dice).
Per lesion the runner writes ``<out>/<case_id>/lesion-<id>.nii.gz`` (mask on the input grid) and
``lesion-<id>.json`` (report) — the JSON last, so its presence means "done" and a rerun skips it.
A lesion that fails (bad centre, unreadable image) is recorded with its error and the run goes on.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from pathlib import Path

from services.core.errors import InputError
from services.core.io import read_image
from services.core.lesion_measurements import Measurements
from services.core.manifest import ManifestLesion, read_lesions
from services.core.volume import Volume
from services.evaluation import dice
from services.label_estimation.outputs import write_json, write_mask
from services.label_estimation.pipeline import LabelEstimator, LesionEstimate, QualityCheck, results_of_report

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = (
    "case_id",
    "lesion_id",
    "lesion_type",
    "status",
    "error",
    "voxels",
    "volume_mm3",
    "max_diameter_mm",
    "diameter_ratio",
    "qc_passed",
    "dice",
)


def _row_id(lesion: ManifestLesion) -> str:
    return str(lesion.prompt.lesion_id) if lesion.prompt else (lesion.raw_lesion_id or "invalid")


def run_batch(
    manifest: Path,
    out: Path,
    method: str,
    estimator: LabelEstimator,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Estimate every lesion of the manifest into ``out``; returns the summary CSV's path."""
    lesions = read_lesions(manifest)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    images: dict[Path, Volume | Exception] = {}
    truths: dict[Path, Volume | Exception] = {}
    for lesion in lesions:
        folder = out / lesion.case_id
        row = {"case_id": lesion.case_id, "lesion_id": _row_id(lesion), "lesion_type": lesion.lesion_type}
        report_path = folder / f"lesion-{_row_id(lesion)}.json"
        try:
            if lesion.error:
                raise InputError(lesion.error)
            finished = _finished(report_path)
            if finished is not None:  # finished in an earlier run
                measurements, qc, score = finished
                row.update(_summary(measurements, qc, score, status="skipped"))
            else:
                if lesion.image not in images:
                    images.clear()  # one image in memory at a time; manifests are grouped by case
                    try:
                        images[lesion.image] = read_image(lesion.image)
                    except InputError as exc:
                        images[lesion.image] = exc
                image = images[lesion.image]
                if isinstance(image, Exception):
                    raise image
                estimate = estimator.estimate(image, [lesion.prompt], method)[0]
                report = estimate.report()
                report["case_id"] = lesion.case_id
                score = None
                if lesion.truth is not None:
                    score = report["dice"] = round(_dice_against_truth(image, estimate, lesion, truths), 4)
                write_mask(image, [estimate], folder / f"lesion-{estimate.lesion_id}.nii.gz")
                write_json(report_path, report)
                row.update(_summary(estimate.measurements, estimate.qc, score, status="ok"))
        except InputError as exc:
            row.update({"status": "error", "error": str(exc)})
            log.warning("case %s lesion %s: %s", lesion.case_id, row["lesion_id"], exc)
        rows.append(row)
        if progress:
            progress(1)
    summary = out / "summary.csv"
    with summary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return summary


def _dice_against_truth(
    image: Volume, estimate: LesionEstimate, lesion: ManifestLesion, cache: dict
) -> float:
    if lesion.truth not in cache:
        cache.clear()
        cache[lesion.truth] = read_image(lesion.truth)
    truth = cache[lesion.truth]
    if not truth.same_grid(image, tolerance_mm=0.01):
        raise InputError("the mask is not on the image's grid", field="mask")
    return dice(estimate.mask.full(), truth.array == lesion.prompt.lesion_id)


def _finished(report_path: Path) -> tuple[Measurements, QualityCheck, float | None] | None:
    """The results of a lesion an earlier run finished; ``None`` when there is no report or it is not
    one this version wrote (then the lesion is estimated again and the report replaced)."""
    if not report_path.is_file():
        return None
    try:
        report = json.loads(report_path.read_text())
        measurements, qc = results_of_report(report)
    except (ValueError, TypeError, KeyError):
        return None
    return measurements, qc, report.get("dice")


def _summary(measurements: Measurements, qc: QualityCheck, dice_score: float | None, status: str) -> dict:
    """One summary-CSV row from the typed results (a field that does not exist is an error, not 0)."""
    return {
        "status": status,
        "error": "",
        "voxels": measurements.voxels,
        "volume_mm3": measurements.volume_mm3 if measurements.voxels else None,
        "max_diameter_mm": measurements.max_diameter_mm if measurements.voxels else None,
        "diameter_ratio": qc.diameter_ratio,
        "qc_passed": qc.passed,
        "dice": dice_score,
    }
