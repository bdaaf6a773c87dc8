"""Grow a training manifest with reader verdicts: TP → a sphere label, FP → a hard negative.

Per judged candidate of one case (centre in world LPS mm, diameter, confidence):

* **TP** on a lesion the manifest already holds (the centre within that lesion's radius) confirms it:
  no row. Otherwise a new lesion row: the next free ``lesion_id`` of the case, the candidate's centre
  and diameter (a weak sphere label), ``label_source=reader-tp``; the case becomes ``abnormal``.
* **FP** becomes a hard-negative row: empty ``lesion_id`` (so every existing reader of manifests —
  training targets, FROC truth, label estimation — ignores it, as it ignores a lesion-free case's
  row), the candidate's centre and diameter (the region a sampler should show as background),
  ``hard_negative=true``, ``label_source=reader-fp``. An FP inside a labelled lesion contradicts the
  manifest: it is reported as a conflict and not written.
* **skip** writes nothing.

Columns added (docs/manifest.schema.json describes the core ones; these are documented in
docs/feedback.md): ``label_source`` (empty = the original manifest, ``reader-tp``, ``reader-fp``),
``hard_negative`` (``true`` on FP rows), ``feedback_key`` (16 hex digits: sha1 of the case and the
candidate's centre, so a verdict re-ingested finds its own row) and ``candidate_confidence``.

Idempotent: ingesting the same feedback again leaves the file byte for byte the same; a changed
verdict replaces the candidate's earlier row. The output is written atomically and re-read by
:func:`services.core.manifest.read_manifest` before the call returns.
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.core.atomic import atomic_output
from services.core.errors import InputError
from services.core.lesion_prompt import MIN_DIAMETER_MM
from services.core.manifest import COLUMNS, format_float, read_manifest
from services.feedback.candidates import ReviewedCandidate
from services.feedback.verdicts import Verdict, Verdicts

FEEDBACK_COLUMNS = ("label_source", "hard_negative", "feedback_key", "candidate_confidence")
LABEL_SOURCES = ("", "reader-tp", "reader-fp")
_KEY = re.compile(r"^[0-9a-f]{16}$")
MAX_LESION_ID = 65535


@dataclass(frozen=True)
class IngestResult:
    """What one ingest did to one case's rows (counts), and the manifest it wrote."""

    case_id: str
    out: str
    added_lesions: int = 0
    added_hard_negatives: int = 0
    confirmed: int = 0
    conflicts: int = 0
    skipped: int = 0
    unchanged: int = 0
    replaced: int = 0
    rows: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def feedback_key(case_id: str, center_mm: Sequence[float]) -> str:
    text = "|".join([case_id, *(format_float(float(v)) for v in center_mm)])
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _read_raw(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = [dict(row) for row in reader]
        fields = list(reader.fieldnames or [])
    for line, row in enumerate(rows, start=2):
        if None in row:
            raise InputError(f"line {line}: more cells than columns", field="manifest")
        source = row.get("label_source") or ""
        if source not in LABEL_SOURCES:
            raise InputError(
                f"line {line}: {source[:32]!r} is not one of {LABEL_SOURCES}", field="label_source"
            )
        negative = (row.get("hard_negative") or "").strip().lower()
        if negative not in ("", "true", "false"):
            raise InputError(
                f"line {line}: expected true/false, got {negative[:16]!r}", field="hard_negative"
            )
        if negative == "true" and (
            row.get("lesion_id") or row.get("center_x_mm", "") == "" or not row.get("diameter_mm")
        ):
            raise InputError(
                f"line {line}: a hard negative has no lesion_id, and a centre and a diameter",
                field="hard_negative",
            )
        key = row.get("feedback_key") or ""
        if key and not _KEY.match(key):
            raise InputError(f"line {line}: not 16 hex digits", field="feedback_key")
    return fields, rows


def _verdict_of(row: dict[str, str]) -> Verdict | None:
    return {"reader-tp": "TP", "reader-fp": "FP"}.get(row.get("label_source") or "")


def _candidates_judged(
    verdicts: Verdicts, candidates: Sequence[ReviewedCandidate]
) -> list[tuple[Verdict, ReviewedCandidate]]:
    index = {(c.id if verdicts.by == "id" else c.rank): c for c in candidates}
    missing = sorted(set(verdicts.verdicts) - set(index))
    if missing:
        raise InputError(
            f"names candidate {verdicts.by}(s) {missing[:8]} that the candidates file does not hold "
            f"({len(candidates)} candidates)",
            field="feedback",
        )
    pairs = [(verdict, index[key]) for key, verdict in verdicts.verdicts.items()]
    return sorted(pairs, key=lambda pair: pair[1].rank)


def ingest_feedback(
    verdicts: Verdicts,
    candidates: Sequence[ReviewedCandidate],
    manifest: Path,
    case_id: str,
    *,
    out: Path | None = None,
    lesion_type: str | None = None,
) -> IngestResult:
    """Grow ``manifest`` (written to ``out``, default in place) with the verdicts on ``case_id``."""
    manifest = Path(manifest)
    out = Path(out) if out is not None else manifest
    parsed = read_manifest(manifest, check_files=False, strict=True)
    fields, rows = _read_raw(manifest)
    mine = [i for i, row in enumerate(rows) if row["case_id"] == case_id]
    if not mine:
        raise InputError(f"case {case_id[:64]!r} is not in the manifest", field="case")
    judged = _candidates_judged(verdicts, candidates)
    counts: Counter[str] = Counter()
    by_key = {rows[i].get("feedback_key"): i for i in mine if rows[i].get("feedback_key")}
    drop: set[int] = set()
    for verdict, candidate in judged:
        key = feedback_key(case_id, candidate.center_mm)
        if key in by_key:
            if _verdict_of(rows[by_key[key]]) == verdict:
                counts["unchanged"] += 1
                continue
            drop.add(by_key.pop(key))
            counts["replaced"] += 1
    lesions = [
        (np.asarray([p["center_x_mm"], p["center_y_mm"], p["center_z_mm"] or 0.0]), p["diameter_mm"] / 2)
        for i, p in enumerate(parsed)
        if p["case_id"] == case_id and p["lesion_id"] is not None and i not in drop
    ]
    next_id = (
        max((p["lesion_id"] for p in parsed if p["case_id"] == case_id and p["lesion_id"]), default=0) + 1
    )
    template = rows[mine[0]]
    types = Counter(
        p.get("lesion_type") or "" for p in parsed if p["case_id"] == case_id and p["lesion_id"] is not None
    )
    kind = lesion_type or (types.most_common(1)[0][0] if types else "") or "unspecified"
    added: list[dict[str, str]] = []
    for verdict, candidate in judged:
        key = feedback_key(case_id, candidate.center_mm)
        if key in by_key:
            continue  # unchanged
        if verdict == "skip":
            counts["skipped"] += 1
            continue
        centre = np.asarray(candidate.center_mm)
        inside = any(float(np.linalg.norm(centre - c)) <= r for c, r in lesions)
        if verdict == "TP" and inside:
            counts["confirmed"] += 1
            continue
        if verdict == "FP" and inside:
            counts["conflicts"] += 1
            continue
        if not (math.isfinite(candidate.diameter_mm) and candidate.diameter_mm >= MIN_DIAMETER_MM):
            raise InputError(
                f"candidate rank {candidate.rank}: diameter {candidate.diameter_mm} mm < {MIN_DIAMETER_MM} mm",
                field="candidates",
            )
        row = {column: "" for column in fields}
        row.update(
            case_id=case_id,
            image=template["image"],
            mask=template.get("mask") or "",
            center_x_mm=format_float(candidate.center_mm[0]),
            center_y_mm=format_float(candidate.center_mm[1]),
            center_z_mm=format_float(candidate.center_mm[2]),
            diameter_mm=format_float(candidate.diameter_mm),
            feedback_key=key,
            candidate_confidence=f"{candidate.confidence:.4f}",
        )
        if verdict == "TP":
            if next_id > MAX_LESION_ID:
                raise InputError(
                    f"case {case_id!r} would need lesion id {next_id} > {MAX_LESION_ID}", field="lesion_id"
                )
            row.update(lesion_id=str(next_id), lesion_type=kind, abnormal="true", label_source="reader-tp")
            lesions.append((centre, candidate.diameter_mm / 2))
            next_id += 1
            counts["added_lesions"] += 1
        else:
            row.update(
                lesion_id="",
                lesion_type="normal",
                abnormal=template.get("abnormal") or "",
                label_source="reader-fp",
                hard_negative="true",
            )
            counts["added_hard_negatives"] += 1
        added.append(row)
    kept = [row for i, row in enumerate(rows) if i not in drop]
    if any(r.get("lesion_id") for r in kept + added if r["case_id"] == case_id):
        for row in kept + added:
            if row["case_id"] == case_id:
                row["abnormal"] = "true"
    columns = fields + [c for c in (*COLUMNS, *FEEDBACK_COLUMNS) if c not in fields]
    result = kept + added
    _write(result, columns, out, manifest)
    read_manifest(out, check_files=False, strict=True)
    return IngestResult(case_id, str(out), rows=len(result), **counts)


def _write(rows: list[dict[str, str]], columns: list[str], out: Path, source: Path) -> None:
    if out.resolve().parent != source.resolve().parent:
        # paths in a manifest are relative to it: a grown copy elsewhere would point at nothing
        raise InputError(
            "must sit in the manifest's folder (its image paths are relative to it)", field="out"
        )
    with atomic_output(out) as temporary, temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c) or "" for c in columns})


def phantom_verdicts(candidates: Sequence[ReviewedCandidate], truth: Path, case_id: str) -> dict[str, str]:
    """A simulated reader for phantoms: TP when a candidate's centre lies within a true lesion's radius
    of ``truth`` (the phantom's full manifest), else FP; keyed by rank (the plain form)."""
    lesions = [
        (np.asarray([p["center_x_mm"], p["center_y_mm"], p["center_z_mm"] or 0.0]), p["diameter_mm"] / 2)
        for p in read_manifest(truth, check_files=False, strict=True)
        if p["case_id"] == case_id and p["lesion_id"] is not None
    ]
    return {
        str(c.rank): "TP"
        if any(float(np.linalg.norm(np.asarray(c.center_mm) - x)) <= r for x, r in lesions)
        else "FP"
        for c in candidates
    }
