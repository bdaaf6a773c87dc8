"""``wlcad detect --manifest M --out DIR [--shard K/N]``: a task's candidates for every manifest case.

One ``<case_id>.json`` per case in ``DIR`` (what ``wlcad evaluate cade --pred DIR`` reads), each atomic,
so a rerun skips what is done; a case whose input is bad is recorded and the batch goes on.

A shard writes its cases' JSONs and, in ``DIR/summary/`` (a folder: every ``*.json`` directly in
``DIR`` is read as a case's predictions), its ``summary.shard-K-of-N.json``. The merge
(:func:`write_merged`) writes ``DIR/summary/summary.json`` from the per-case JSONs in sorted case
order and, when the manifest has lesions and no case failed, ``DIR/summary/froc.json`` — the bytes
``wlcad evaluate cade --manifest M --pred DIR`` writes into its ``froc.json`` with its defaults.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from services.batch.shards import Shard, batch_lock, manifest_sha256, write_shard_summary
from services.core.atomic import temporary_name_pattern, write_bytes_atomically
from services.core.errors import InputError
from services.core.io import read_image

if TYPE_CHECKING:
    from services.cade.cutoff import Cutoff
    from services.cade.tasks import CadeTask

log = logging.getLogger(__name__)

#: The sub-folder of a detect batch's summaries (shards', merged, FROC).
SUMMARY_FOLDER = "summary"
#: A temporary name :func:`services.core.atomic.atomic_output` gives a target (group 1: the target).
_TEMPORARY = re.compile(temporary_name_pattern("(.+)"))


@dataclass
class BatchSummary:
    """What a batch did: cases detected now, found done (resumed), and failed with their one-line error."""

    detected: int = 0
    resumed: int = 0
    failed: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.detected} detected, {self.resumed} already done, {len(self.failed)} failed"


@dataclass(frozen=True)
class ManifestCases:
    """A manifest as the detect batch sees it: case → image, case → row error, whether it has lesions."""

    images: dict[str, Path]
    errors: dict[str, str]
    has_lesions: bool

    @property
    def case_ids(self) -> set[str]:
        return set(self.images) | set(self.errors)


def manifest_cases(manifest: Path) -> ManifestCases:
    from services.core.manifest import read_manifest

    images: dict[str, Path] = {}
    errors: dict[str, str] = {}
    has_lesions = False
    for row in read_manifest(manifest, check_files=False, strict=False):
        case = row["case_id"]
        if "error" in row:
            errors.setdefault(case, f"line {row['line']}: {row['error']}")
            continue
        images.setdefault(case, Path(row["image"]))
        has_lesions = has_lesions or row["lesion_id"] is not None
    return ManifestCases({c: p for c, p in images.items() if c not in errors}, errors, has_lesions)


def run_detect_batch(
    task: CadeTask,
    cutoff: Cutoff,
    manifest: Path,
    out: Path,
    inference: str | None,
    model_repository: Path | None,
    shard: Shard | None = None,
) -> int:
    """Detect every case (of ``shard``, when given) of ``manifest`` into ``out``; prints what it did
    (and, unsharded, the FROC when the manifest has lesions). Exit status 2 when any case failed."""
    from tqdm import tqdm

    from services.cade.cutoff import detect_at
    from services.cade.model import CadeModel
    from services.label_estimation.outputs import check_writable, write_json

    check_writable(out, "out", folder=True)
    cases = manifest_cases(manifest)
    owned = (lambda case: True) if shard is None else shard.owns
    images = {c: p for c, p in cases.images.items() if owned(c)}
    summary = BatchSummary(failed={c: e for c, e in cases.errors.items() if owned(c)})
    with CadeModel(task, inference, model_repository) as model:
        threshold = cutoff.resolve(model)
        out.mkdir(parents=True, exist_ok=True)
        with batch_lock(out, shard, out / SUMMARY_FOLDER):
            _remove_stale_temporaries(out, {c for c in cases.case_ids if owned(c)}, shard)
            with tqdm(total=len(images), unit="case", file=sys.stderr, disable=None) as bar:
                for case, image_path in images.items():
                    target = out / f"{case}.json"
                    if target.is_file():
                        summary.resumed += 1
                    else:
                        try:
                            kept = detect_at(model, read_image(image_path), threshold)
                        except InputError as exc:
                            summary.failed[case] = str(exc)
                        else:
                            write_json(target, kept.as_dict(model=task.model_name))
                            summary.detected += 1
                    bar.update()
            if shard is not None:
                write_shard_summary(
                    out / SUMMARY_FOLDER,
                    shard,
                    {
                        "command": "detect",
                        "manifest": str(Path(manifest).resolve()),
                        "manifest_sha256": manifest_sha256(manifest),
                        "settings": {
                            "task": task.name,
                            "model": task.model_name,
                            "model_version": model.version,
                            "threshold": threshold,
                        },
                        "cases": sorted(c for c in cases.case_ids if owned(c)),
                        "failed": dict(sorted(summary.failed.items())),
                        "this_run": {"detected": summary.detected, "resumed": summary.resumed},
                    },
                )
    where = "" if shard is None else f" shard {shard}"
    print(f"{task.name} batch{where} at confidence ≥ {threshold:.3g}: {summary} → {out}")
    for case, error in summary.failed.items():
        print(f"  failed {case}: {error}")
    if shard is None and cases.has_lesions:
        if summary.failed:
            print("no FROC: a failed case would count as one without candidates")
        else:
            _print_froc(manifest, out)
    return 2 if summary.failed else 0


def _remove_stale_temporaries(out: Path, cases: set[str], shard: Shard | None) -> int:
    """Delete the temporaries a killed run of this batch (or shard) left: those of its own cases'
    JSONs, and of its own shard summary; never another shard's, which may be writing beside it."""
    targets = {f"{case}.json" for case in cases}
    stale = [out / n for n in os.listdir(out) if (m := _TEMPORARY.fullmatch(n)) and m.group(1) in targets]
    summaries = out / SUMMARY_FOLDER
    if shard is not None and summaries.is_dir():
        own = re.compile(temporary_name_pattern(re.escape(shard.summary_name)))
        stale += [summaries / n for n in os.listdir(summaries) if own.fullmatch(n)]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temporary files left by an interrupted run", len(stale))
    return len(stale)


def _froc_report(manifest: Path, folder: Path):
    from services.evaluation.cade_report import evaluate_cade, read_predictions, read_truth

    return evaluate_cade(read_truth(manifest), read_predictions(folder))


def _print_froc(manifest: Path, folder: Path) -> None:
    """FROC of the batch against the manifest's lesions (what ``wlcad evaluate cade`` reports in full)."""
    from services.cli.evaluate_cmd import summary

    print(summary(_froc_report(manifest, folder)))


def write_merged(out: Path, manifest: Path, documents: list[dict]) -> tuple[list[Path], int]:
    """The merged ``summary.json`` (and ``froc.json``) of a sharded detect run whose shard summaries
    (``documents``) the caller has checked; returns the paths written and the exit status (2 when a
    case failed, as for an unsharded run).

    ``summary.json`` holds only what the result depends on (task, model, version, cut-off, each case's
    candidate count or error), none of a run's history, so any split into shards writes the same bytes.
    """
    from services.evaluation.cade_report import report_json

    settings = documents[0]["settings"]
    failed = {case: error for doc in documents for case, error in doc["failed"].items()}
    done = sorted(case for doc in documents for case in doc["cases"] if case not in failed)
    per_case: dict[str, dict] = {}
    for case in sorted([*done, *failed]):
        if case in failed:
            per_case[case] = {"status": "error", "error": failed[case]}
            continue
        path = out / f"{case}.json"
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise InputError(
                f"{path.name}: case {case!r} has no readable output; rerun its shard", field="dir"
            ) from None
        if [document.get(k) for k in ("task", "model", "model_version")] != [
            settings[k] for k in ("task", "model", "model_version")
        ]:
            raise InputError(f"{path.name}: made by another task or model than the shards'", field="dir")
        per_case[case] = {"status": "ok", "n_candidates": len(document["candidates"])}
    folder = out / SUMMARY_FOLDER
    merged = {
        "command": "detect",
        **settings,
        "n_cases": len(per_case),
        "n_failed": len(failed),
        "cases": per_case,
    }
    written = [
        write_bytes_atomically(folder / "summary.json", (json.dumps(merged, indent=2) + "\n").encode())
    ]
    print(f"{settings['task']}: {len(per_case)} cases, {len(failed)} failed → {written[0]}")
    if manifest_cases(manifest).has_lesions:
        if failed:
            print("no FROC: a failed case would count as one without candidates")
        else:
            from services.cli.evaluate_cmd import summary

            report = _froc_report(manifest, out)
            froc = (json.dumps(report_json(report), indent=2) + "\n").encode()  # as write_report does
            written.append(write_bytes_atomically(folder / "froc.json", froc))
            print(summary(report))
    return written, 2 if failed else 0
