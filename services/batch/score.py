"""``wlcad score --manifest M --out DIR [--shard K/N]``: every manifest case's anomaly score, and a
worklist of the cases ranked most-abnormal first.

One ``<case_id>.json`` per case in ``DIR`` (what ``wlcad evaluate anomaly --scores DIR`` reads; the
same document ``wlcad score --image`` writes), each atomic, so a rerun skips what is done; a case
whose input is bad (a constant image, a volume to the radiograph model) is recorded and the batch
goes on. A run that finds every manifest case scored writes ``DIR/worklist.csv``: the scored cases by
descending score, then the cases that could not be scored, so that none drops silently off a
reader's list; and the same as ``DIR/worklist.html`` with a thumbnail per case
(``DIR/thumbnails/<case_id>.jpg``, written before the case's JSON). A shard writes its cases' JSONs and its ``DIR/summary/summary.shard-K-of-N.json``;
once all shards are done, one unsharded rerun (every case resumes) writes the worklist.

Also the one rule every entry point (CLI, batch, service) uses for which model scores a task
(:func:`resolve_model`) and what a score looks like as JSON (:func:`score_document`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.batch.shards import Shard, batch_lock, manifest_sha256, write_shard_summary
from services.batch.worklist_page import PAGE, THUMBNAILS, write_page, write_thumbnail
from services.core.atomic import temporary_name_pattern, write_bytes_atomically
from services.core.errors import InputError

if TYPE_CHECKING:
    from services.anomaly.scoring import AnomalyScore, AnomalyScorer
    from services.anomaly.tasks import AnomalyTask

log = logging.getLogger(__name__)

#: Served model families, best first: an empty ``--model`` takes the first the repository holds.
SERVED_MODELS = ("two-flow", "glow", "gan")
SUMMARY_FOLDER = "summary"
WORKLIST = "worklist.csv"
WORKLIST_COLUMNS = (
    "rank", "case_id", "status", "score", "percentile_among_normals", "z", "model_version", "image", "error",
)  # fmt: skip
_TEMPORARY = re.compile(temporary_name_pattern("(.+)"))


def model_versions(task: AnomalyTask, model: str, repository: Path) -> list[int]:
    """Versions of ``anomaly_<task>_<model>`` in the repository (none when it is absent)."""
    from services.inference.repository import ModelRepository

    try:
        return ModelRepository(repository).versions(task.model_name(model))
    except (InputError, OSError):
        return []


def resolve_model(task: AnomalyTask, model: str | None, repository: Path) -> str:
    """``model`` checked (one of :data:`SERVED_MODELS`), or, when empty, the best family the
    repository holds for ``task`` (two-flow, then glow, then gan). Raises InputError naming ``model``."""
    if model:
        if model not in SERVED_MODELS:
            raise InputError(f"unknown model {model!r}; served: {', '.join(SERVED_MODELS)}", field="model")
        return model
    for candidate in SERVED_MODELS:
        if model_versions(task, candidate, repository):
            return candidate
    return "glow"  # none there: the caller's availability check names the model that is missing


def open_scorer(
    task: AnomalyTask, model: str | None, repository: Path | None = None, setting: str | None = None
) -> AnomalyScorer:
    """The scorer of ``model`` (or the task's default, :func:`resolve_model`) from ``repository``
    (default: the configured one), refused with an InputError naming ``model`` when it is absent."""
    from services.anomaly.scoring import AnomalyScorer
    from services.inference.factory import default_repository

    root = repository if repository is not None else default_repository()
    chosen = resolve_model(task, model, root)
    if not model_versions(task, chosen, root):
        raise InputError(f"{task.model_name(chosen)} is not in the model repository {root}", field="model")
    return AnomalyScorer(task.name, chosen, repository=root, setting=setting)


def model_version_name(task: AnomalyTask, model: str, version: int) -> str:
    return f"{task.model_name(model)}/{version}"


def score_document(result: AnomalyScore, task: AnomalyTask) -> dict[str, Any]:
    """The JSON of one score (``wlcad score``, a batch case, the service's fields by the same names)."""
    return {
        "task": result.task,
        "model": result.model,
        "model_version": model_version_name(task, result.model, result.model_version),
        "score": round(result.score, 6),
        "units": result.units,
        "percentile_among_normals": round(result.percentile_among_normals, 4),
        "z": round(result.z, 4),
        "components": {k: round(v, 6) for k, v in result.components.items()},
    }


@dataclass
class ScoreSummary:
    """What a batch did: cases scored now, found done (resumed), and failed with their one-line error."""

    scored: int = 0
    resumed: int = 0
    failed: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.scored} scored, {self.resumed} already done, {len(self.failed)} failed"


def run_score_batch(
    scorer: AnomalyScorer,
    manifest: Path,
    out: Path,
    shard: Shard | None = None,
) -> int:
    """Score every case (of ``shard``) of ``manifest`` into ``out`` with the bound ``scorer``; prints
    what it did. Exit status 2 when any case failed."""
    from tqdm import tqdm

    from services.batch.detect import manifest_cases
    from services.core.io import read_image
    from services.label_estimation.outputs import check_writable

    check_writable(out, "out", folder=True)
    cases = manifest_cases(manifest)
    owned = (lambda case: True) if shard is None else shard.owns
    images = {c: p for c, p in cases.images.items() if owned(c)}
    summary = ScoreSummary(failed={c: e for c, e in cases.errors.items() if owned(c)})
    task = scorer.task
    expected = model_version_name(task, scorer.model, scorer.version)
    out.mkdir(parents=True, exist_ok=True)
    with batch_lock(out, shard, out / SUMMARY_FOLDER):
        _remove_stale_temporaries(out, {c for c in cases.case_ids if owned(c)})
        with tqdm(total=len(images), unit="case", file=sys.stderr, disable=None) as bar:
            for case, image_path in images.items():
                target = out / f"{case}.json"
                if _done_by(target, expected):
                    summary.resumed += 1
                else:
                    try:
                        image = read_image(image_path)
                        result, score_map = scorer.score_with_map(image)
                    except InputError as exc:
                        summary.failed[case] = str(exc)
                    else:
                        write_thumbnail(out, case, image, score_map, task.name)  # before the JSON
                        document = score_document(result, task)
                        write_bytes_atomically(target, (json.dumps(document, indent=2) + "\n").encode())
                        summary.scored += 1
                bar.update()
        if shard is not None:
            write_shard_summary(
                out / SUMMARY_FOLDER,
                shard,
                {
                    "command": "score",
                    "manifest": str(Path(manifest).resolve()),
                    "manifest_sha256": manifest_sha256(manifest),
                    "settings": {"task": task.name, "model": scorer.model, "model_version": expected},
                    "cases": sorted(c for c in cases.case_ids if owned(c)),
                    "failed": dict(sorted(summary.failed.items())),
                    "this_run": {"scored": summary.scored, "resumed": summary.resumed},
                },
            )
            worklist = None
        else:
            worklist = write_worklist(
                out, cases.images, summary.failed, expected, len(scorer.calibration.normal_scores)
            )
    where = "" if shard is None else f" shard {shard}"
    print(f"{task.name} batch{where} with {expected}: {summary} → {out}")
    for case, error in summary.failed.items():
        print(f"  failed {case}: {error}")
    if worklist is not None:
        print(f"worklist (most abnormal first): {worklist} and {worklist.with_name(PAGE)}")
    return 2 if summary.failed else 0


def _done_by(target: Path, model_version: str) -> bool:
    """A case is done when its JSON exists and was made by this model version; another version's
    (or an unreadable) JSON is scored again, as a worklist must not mix two models' scales."""
    if not target.is_file():
        return False
    try:
        return json.loads(target.read_text(encoding="utf-8")).get("model_version") == model_version
    except (OSError, ValueError, AttributeError):
        return False


def _remove_stale_temporaries(out: Path, cases: set[str]) -> None:
    """Delete the temporaries a killed run of this batch (or shard) left: its own cases' JSONs and
    thumbnails, and (unsharded) the worklist's; never another shard's."""
    targets = {f"{case}.json" for case in cases} | {WORKLIST, PAGE}
    stale = [out / n for n in os.listdir(out) if (m := _TEMPORARY.fullmatch(n)) and m.group(1) in targets]
    thumbnails = out / THUMBNAILS
    if thumbnails.is_dir():
        own = {f"{case}.jpg" for case in cases}
        stale += [
            thumbnails / n
            for n in os.listdir(thumbnails)
            if (m := _TEMPORARY.fullmatch(n)) and m.group(1) in own
        ]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temporary files left by an interrupted run", len(stale))


def write_worklist(
    out: Path,
    images: dict[str, Path],
    failed: dict[str, str],
    model_version: str,
    n_normals: int | None = None,
) -> Path:
    """``out/worklist.csv``: scored cases by descending score (ties by case id), rank 1 the most
    abnormal; then every failed case (status ``failed`` with its error, no rank). Also the same list
    as ``out/worklist.html`` with thumbnails (:mod:`services.batch.worklist_page`)."""
    scored = []
    for case in images:
        if case in failed:
            continue
        document = json.loads((out / f"{case}.json").read_text(encoding="utf-8"))
        if document.get("model_version") != model_version or not math.isfinite(document["score"]):
            raise InputError(f"{case}.json: not a finite score of {model_version}", field="out")
        scored.append((case, document))
    scored.sort(key=lambda item: (-item[1]["score"], item[0]))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(WORKLIST_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for rank, (case, document) in enumerate(scored, start=1):
        writer.writerow(
            {
                "rank": rank,
                "case_id": case,
                "status": "scored",
                "score": f"{document['score']:.6f}",
                "percentile_among_normals": f"{document['percentile_among_normals']:.2f}",
                "z": f"{document['z']:.3f}",
                "model_version": model_version,
                "image": str(images[case]),
                "error": "",
            }
        )
    for case in sorted(failed):
        writer.writerow(
            {
                "case_id": case,
                "status": "failed",
                "model_version": model_version,
                "image": str(images.get(case, "")),
                "error": failed[case],
            }
        )
    task = scored[0][1]["task"] if scored else model_version
    write_page(
        out,
        f"wlcad worklist · {task} · {model_version}",
        [{"case_id": case, **document} for case, document in scored],
        failed,
        n_normals,
    )
    return write_bytes_atomically(out / WORKLIST, text.getvalue().encode())
