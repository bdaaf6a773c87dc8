"""Batch label estimation over a weak-label manifest: resumable, atomic, one summary row per lesion.

The manifest has the columns of docs/manifest.schema.json (``case_id, image, lesion_id,
center_{x,y,z}_mm, diameter_mm``, optionally ``mask`` = the exact label map, used to score Dice).
Per lesion the runner writes ``<out>/<case_id>/lesion-<id>.nii.gz`` (mask on the input grid) and
``lesion-<id>.json`` (report) — the JSON last, so its presence means "done". A rerun skips a lesion
only when its report holds the same *resume key* (method, model version, the whole prompt, which
image and mask): a rerun with another ``--method`` or a corrected diameter recomputes.
A lesion that fails (bad centre, unreadable image) is recorded with its error and the run goes on.

Before any work the runner refuses an ``--out`` it cannot write (exit 2, not an internal error after
the compute), takes an exclusive lock on it (two batches into one folder would overwrite each other's
files and delete each other's temporaries), and removes the temporary files a killed run left there.

Sharded (``--shard K/N``, :mod:`services.batch.shards`): the runner estimates only the lesions of the
cases its shard owns, holds the folder shared (shards run side by side) and its shard exclusively,
cleans only its own cases' temporaries, and writes ``summary.shard-K-of-N.json`` (its rows with their
manifest positions) instead of ``summary.csv``; ``wlcad batch merge`` then writes the ``summary.csv``
an unsharded run would have written (:func:`write_merged_summary`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from services.batch.shards import Shard, batch_lock, manifest_sha256, write_shard_summary
from services.core.atomic import atomic_output, temporary_name_pattern
from services.core.errors import InputError
from services.core.io import read_image
from services.core.lesion_measurements import Measurements
from services.core.manifest import ManifestLesion
from services.core.volume import Volume
from services.evaluation import dice
from services.label_estimation.outputs import check_writable, write_json, write_mask
from services.label_estimation.pipeline import LabelEstimator, LesionEstimate, QualityCheck, results_of_report

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.csv"
#: The temporary names ``services.core.atomic`` gives this runner's outputs while writing them
#: (``.<target name>.<12 hex digits><suffix>``); a SIGKILL between create and rename leaves them.
#: Exact, so that nothing but wlcad's own leftovers is ever deleted.
_STALE_IN_OUT = re.compile(temporary_name_pattern(re.escape(SUMMARY_NAME)))
_STALE_IN_CASE = re.compile(
    temporary_name_pattern(r"lesion-[0-9]+\.nii\.gz", ".nii.gz")
    + "|"
    + temporary_name_pattern(r"lesion-[0-9]+\.json")
)

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
    lesions: list[ManifestLesion],
    out: Path,
    method: str,
    estimator: LabelEstimator,
    *,
    model_version: str | None = None,
    progress: Callable[[int], None] | None = None,
    shard: Shard | None = None,
    manifest: Path | None = None,
) -> Path:
    """Estimate every lesion (from :func:`~services.core.manifest.read_lesions`, which has refused
    unsafe case ids) into ``out``; returns the summary's path (``summary.csv``, or with ``shard`` the
    shard's summary). ``model_version`` is the version of the estimator's model (``None`` without
    one): part of the resume key. ``shard`` needs the ``manifest`` the lesions came from (its digest
    and path go into the shard summary, for the merge).

    Raises:
        InputError: naming ``out`` when it cannot be written or another batch is writing into it,
            ``shard`` when the folder holds a run in another number of shards.
    """
    out = Path(out)
    positions = list(range(len(lesions)))
    if shard is not None:
        if manifest is None:
            raise ValueError("a sharded batch needs its manifest")
        positions = [i for i in positions if shard.owns(lesions[i].case_id)]
        lesions = [lesions[i] for i in positions]
    check_writable(out, "out", folder=True)
    out.mkdir(parents=True, exist_ok=True)
    case_ids = sorted({lesion.case_id for lesion in lesions} - {""})
    for case_id in case_ids:
        if (out / case_id).exists():
            check_writable(out / case_id, "out", folder=True)
    with batch_lock(out, shard):
        _remove_stale_temporaries(out, None if shard is None else case_ids, shard)
        rows = _estimate_all(lesions, out, method, estimator, model_version, progress)
        if shard is None:
            return _write_summary(out, rows)
        assert manifest is not None
        return write_shard_summary(
            out,
            shard,
            {
                "command": "estimate",
                "manifest": str(Path(manifest).resolve()),
                "manifest_sha256": manifest_sha256(manifest),
                "settings": {"method": method, "model_version": model_version},
                "cases": sorted({lesion.case_id for lesion in lesions}),
                "rows": [{"position": p, **row} for p, row in zip(positions, rows, strict=True)],
            },
        )


def _write_summary(out: Path, rows: list[dict]) -> Path:
    summary = out / SUMMARY_NAME
    with atomic_output(summary) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return summary


def write_merged_summary(out: Path, shard_documents: list[dict]) -> Path:
    """``summary.csv`` of a sharded run, byte-identical to the one a fresh unsharded run writes: the
    shards' rows in manifest order, each finished lesion ``ok``. ("skipped", that a lesion was found
    done by a rerun, is a fact of one run, not of the result; it stays in the shard summaries.)"""
    rows = sorted((row for doc in shard_documents for row in doc["rows"]), key=lambda row: row["position"])
    for doc in shard_documents:
        for row in doc["rows"]:
            report = out / row["case_id"] / f"lesion-{row['lesion_id']}.json"
            if row["status"] != "error" and not report.is_file():
                raise InputError(
                    f"case {row['case_id']!r} lesion {row['lesion_id']} has no report; rerun --shard "
                    f"{doc['shard']}/{doc['shards']}",
                    field="dir",
                )
    return _write_summary(
        out, [{**row, "status": "ok" if row["status"] == "skipped" else row["status"]} for row in rows]
    )


def _estimate_all(
    lesions: list[ManifestLesion],
    out: Path,
    method: str,
    estimator: LabelEstimator,
    model_version: str | None,
    progress: Callable[[int], None] | None,
) -> list[dict]:
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
            key = resume_key(lesion, method, model_version)
            finished = _finished(report_path, key)
            if finished is not None:  # finished in an earlier run, with the same key
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
                report["resume_key"] = key
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
    return rows


def resume_key(lesion: ManifestLesion, method: str, model_version: str | None) -> dict:
    """What a lesion's stored result depends on; a report is reused only when its key is equal.

    The image and mask paths enter as digests: reports are shared with colleagues, and a path may
    hold a patient's name. A moved dataset therefore recomputes, the safe direction. The key is
    JSON-shaped (lists, not tuples) so it compares equal to the one read back from a report.
    """
    return json.loads(
        json.dumps(
            {
                "method": method,
                "model_version": model_version,
                "prompt": asdict(lesion.prompt),
                "image_sha256": _path_digest(lesion.image),
                "mask_sha256": _path_digest(lesion.truth),
            }
        )
    )


def _path_digest(path: Path | None) -> str | None:
    return None if path is None else hashlib.sha256(os.fsencode(Path(path).resolve())).hexdigest()


def _remove_stale_temporaries(
    out: Path, case_ids: list[str] | None = None, shard: Shard | None = None
) -> int:
    """Delete the temporaries a killed run left in ``out`` and its case folders (one level, links not
    followed); safe under the batch lock, as no other batch is writing there. A shard cleans only its
    own ``case_ids``' folders and its own summary's temporaries: the other shards are writing beside
    it. Returns the count."""
    top = (
        _STALE_IN_OUT if shard is None else re.compile(temporary_name_pattern(re.escape(shard.summary_name)))
    )
    stale = [out / name for name in os.listdir(out) if top.fullmatch(name)]
    if case_ids is None:
        with os.scandir(out) as entries:
            folders = [Path(entry.path) for entry in entries if entry.is_dir(follow_symlinks=False)]
    else:
        folders = [
            out / case_id
            for case_id in case_ids
            if (out / case_id).is_dir() and not (out / case_id).is_symlink()
        ]
    for folder in folders:
        try:
            stale += [folder / name for name in os.listdir(folder) if _STALE_IN_CASE.fullmatch(name)]
        except OSError:  # a folder this user cannot read is not one this batch writes into
            continue
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temporary files left by an interrupted run", len(stale))
    return len(stale)


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


def _finished(report_path: Path, key: dict) -> tuple[Measurements, QualityCheck, float | None] | None:
    """The results of a lesion an earlier run finished with the same resume ``key``; ``None`` when
    there is no report, it was made from other inputs (method, prompt, model, image) or it is not one
    this version wrote (then the lesion is estimated again and the report replaced)."""
    if not report_path.is_file():
        return None
    try:
        report = json.loads(report_path.read_text())
        if report.get("resume_key") != key:
            return None
        measurements, qc = results_of_report(report)
    except (ValueError, TypeError, KeyError, AttributeError):
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
