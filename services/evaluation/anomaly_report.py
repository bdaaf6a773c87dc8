"""``wlcad evaluate anomaly``: how well one score per case separates a manifest's abnormal cases from
its normals — ROC-AUC with a case-bootstrap 95 % CI, the ROC curve, sensitivity at 95 % specificity
(with its CI and the score threshold giving it), and the same per abnormality type.

Truth is presence-only: a case is abnormal when any of its manifest rows says ``abnormal`` (or has a
lesion), and its types are its rows' ``lesion_type`` values (``normal`` and empty are not types). A
type's AUC is that type's cases against **all** normals (a case with two types counts in both), so
each type answers "would a reader find this kind of case on the worklist", not "can the score tell
types apart". Scores come from ``wlcad score --manifest M --out DIR`` (its ``<case_id>.json`` files
or ``worklist.csv``). A manifest case without a score has no neutral value to stand in for it, so it
is an error unless ``allow_missing``, and then it is left out and listed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.core.atomic import write_bytes_atomically
from services.core.errors import InputError
from services.evaluation.bootstrap import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    ConfidenceInterval,
    bootstrap_auc,
    percentile_interval,
    resample_cases,
)
from services.evaluation.roc import RocResult, check_scores_truth, roc_curve

#: The specificity the issue asks sensitivity at.
SPECIFICITY = 0.95
NOT_A_TYPE = ("", "normal")
_SHOWN = 5


@dataclass(frozen=True)
class AnomalyTruth:
    """Per case (manifest order): abnormal or not, and its abnormality types."""

    case_ids: tuple[str, ...]
    abnormal: dict[str, bool]
    types: dict[str, frozenset[str]]


@dataclass(frozen=True)
class Scores:
    """One score per case, and what produced them (all cases by the same model version)."""

    task: str
    model: str
    model_version: str
    by_case: dict[str, float]


@dataclass(frozen=True)
class OperatingPoint:
    """The most sensitive threshold with specificity ≥ ``target_specificity`` (score ≥ threshold is
    called abnormal); ``sensitivity_ci`` by case bootstrap."""

    target_specificity: float
    threshold: float
    specificity: float
    sensitivity: float
    sensitivity_ci: ConfidenceInterval | None


@dataclass(frozen=True)
class Separation:
    """ROC-AUC, its CI and the operating point of one comparison (all abnormals, or one type)."""

    name: str
    n_abnormal: int
    n_normal: int
    auc: float
    auc_ci: ConfidenceInterval | None
    operating_point: OperatingPoint
    roc: RocResult


@dataclass(frozen=True)
class AnomalyReport:
    task: str
    model: str
    model_version: str
    overall: Separation
    by_type: tuple[Separation, ...]
    missing: tuple[str, ...]
    extra_scores: int
    n_resamples: int
    seed: int


def read_truth(manifest: str | os.PathLike[str]) -> AnomalyTruth:
    """Cases of a manifest with their presence-only truth (strict: a bad row is an error)."""
    from services.core.manifest import read_manifest

    rows = read_manifest(manifest, check_files=False, strict=True)
    case_ids = tuple(dict.fromkeys(row["case_id"] for row in rows))
    abnormal = dict.fromkeys(case_ids, False)
    types: dict[str, set[str]] = {case: set() for case in case_ids}
    for row in rows:
        kind = (row.get("lesion_type") or "").strip()
        abnormal[row["case_id"]] |= bool(row["abnormal"]) or row["lesion_id"] is not None
        if kind.lower() not in NOT_A_TYPE:
            types[row["case_id"]].add(kind)
    for case in case_ids:
        if types[case] and not abnormal[case]:
            raise InputError(f"case {case!r} has a lesion_type but is not abnormal", field="abnormal")
    return AnomalyTruth(case_ids, abnormal, {c: frozenset(t) for c, t in types.items()})


def _document_score(document: Any, where: str) -> tuple[float, tuple[str, str, str]]:
    if not isinstance(document, dict):
        raise InputError(f"{where}: not a wlcad score JSON object", field="scores")
    score = document.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise InputError(f"{where}: 'score' must be a finite number, got {score!r}", field="scores")
    made_by = tuple(str(document.get(k, "")) for k in ("task", "model", "model_version"))
    return float(score), made_by  # type: ignore[return-value]


def _from_version(model_version: str) -> tuple[str, str, str]:
    """(task, model, model_version) from ``anomaly_<task>_<model>/<version>`` (a worklist's column)."""
    match = re.fullmatch(r"anomaly_(.+)_([a-z-]+)/[0-9]+", model_version)
    return (match.group(1), match.group(2), model_version) if match else ("", "", model_version)


def read_scores(path: str | os.PathLike[str]) -> Scores:
    """A folder of ``<case_id>.json`` (``wlcad score --manifest``'s outputs) or a CSV with ``case_id``
    and ``score`` columns (its ``worklist.csv``; rows whose ``status`` is not ``scored`` are skipped)."""
    path = Path(path)
    by_case: dict[str, float] = {}
    made_by: set[tuple[str, str, str]] = set()
    if path.is_dir():
        for file in sorted(path.glob("*.json")):
            try:
                document = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise InputError(f"{file.name}: not readable JSON ({exc})", field="scores") from None
            by_case[file.stem], producer = _document_score(document, file.name)
            made_by.add(producer)
    elif path.is_file() and path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            if not {"case_id", "score"} <= set(reader.fieldnames or ()):
                raise InputError(f"{path.name}: needs case_id and score columns", field="scores")
            for line, row in enumerate(reader, start=2):
                if row.get("status", "scored") != "scored":
                    continue
                try:
                    value = float(row["score"])
                except ValueError:
                    raise InputError(
                        f"{path.name} line {line}: score {row['score']!r}", field="scores"
                    ) from None
                by_case[row["case_id"]], _ = _document_score({"score": value}, f"{path.name} line {line}")
                made_by.add(_from_version(row.get("model_version", "")))
    else:
        raise InputError(f"{path}: give a folder of <case_id>.json or a worklist CSV", field="scores")
    if not by_case:
        raise InputError(f"{path}: no scores found", field="scores")
    if len(made_by) > 1:
        versions = sorted({m[2] or "?" for m in made_by})
        raise InputError(f"scores of several models mixed: {', '.join(versions)}", field="scores")
    task, model, version = made_by.pop()
    return Scores(task, model, version, by_case)


def operating_point(
    scores: np.ndarray,
    truth: np.ndarray,
    specificity: float = SPECIFICITY,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> OperatingPoint:
    """The ROC vertex of highest sensitivity whose false-positive rate is ≤ 1 − ``specificity``."""
    curve = roc_curve(scores, truth)
    allowed = curve.fpr <= 1.0 - specificity + 1e-12
    best = int(np.flatnonzero(allowed)[np.argmax(curve.tpr[allowed])])
    ci = None
    if n_resamples:
        samples = []
        for draw in resample_cases(len(scores), n_resamples, seed):
            t = truth[draw]
            if t.all() or not t.any():
                samples.append(np.nan)
                continue
            c = roc_curve(scores[draw], t)
            samples.append(float(c.tpr[c.fpr <= 1.0 - specificity + 1e-12].max()))
        ci = percentile_interval(np.asarray(samples), level)
    return OperatingPoint(
        target_specificity=specificity,
        threshold=float(curve.thresholds[best]),
        specificity=float(1.0 - curve.fpr[best]),
        sensitivity=float(curve.tpr[best]),
        sensitivity_ci=ci,
    )


def separation(
    name: str, scores: np.ndarray, truth: np.ndarray, *, n_resamples: int, seed: int
) -> Separation:
    s, t = check_scores_truth(scores, truth)
    curve = roc_curve(s, t)
    ci = bootstrap_auc(s, t, n_resamples=n_resamples, seed=seed) if n_resamples else None
    return Separation(
        name=name,
        n_abnormal=curve.n_positive,
        n_normal=curve.n_negative,
        auc=curve.auc,
        auc_ci=ci,
        operating_point=operating_point(s, t, n_resamples=n_resamples, seed=seed),
        roc=curve,
    )


def _listed(cases: list[str]) -> str:
    return ", ".join(cases[:_SHOWN]) + (f" and {len(cases) - _SHOWN} more" if len(cases) > _SHOWN else "")


def evaluate_anomaly(
    truth: AnomalyTruth,
    scores: Scores,
    *,
    allow_missing: bool = False,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> AnomalyReport:
    missing = [c for c in truth.case_ids if c not in scores.by_case]
    if missing and not allow_missing:
        raise InputError(
            f"{len(missing)} manifest case(s) have no score ({_listed(missing)}); score them, or pass "
            "--allow-missing to leave them out",
            field="scores",
        )
    cases = [c for c in truth.case_ids if c in scores.by_case]
    values = np.array([scores.by_case[c] for c in cases], dtype=np.float64)
    abnormal = np.array([truth.abnormal[c] for c in cases], dtype=bool)
    overall = separation("all abnormal", values, abnormal, n_resamples=n_resamples, seed=seed)
    by_type = []
    for kind in sorted({k for c in cases for k in truth.types[c]}):
        chosen = np.array([not truth.abnormal[c] or kind in truth.types[c] for c in cases])
        by_type.append(separation(kind, values[chosen], abnormal[chosen], n_resamples=n_resamples, seed=seed))
    return AnomalyReport(
        task=scores.task,
        model=scores.model,
        model_version=scores.model_version,
        overall=overall,
        by_type=tuple(by_type),
        missing=tuple(missing),
        extra_scores=len(set(scores.by_case) - set(truth.case_ids)),
        n_resamples=n_resamples,
        seed=seed,
    )


def _ci(ci: ConfidenceInterval | None) -> dict[str, Any] | None:
    if ci is None:
        return None
    return {
        "low": round(ci.low, 4),
        "high": round(ci.high, 4),
        "level": ci.level,
        "n_resamples": ci.n_resamples,
    }


def _separation_json(item: Separation) -> dict[str, Any]:
    point = item.operating_point
    return {
        "name": item.name,
        "n_abnormal": item.n_abnormal,
        "n_normal": item.n_normal,
        "auc": round(item.auc, 4),
        "auc_ci": _ci(item.auc_ci),
        f"sensitivity_at_{round(point.target_specificity * 100)}_specificity": {
            "sensitivity": round(point.sensitivity, 4),
            "sensitivity_ci": _ci(point.sensitivity_ci),
            "specificity": round(point.specificity, 4),
            "threshold": None if not math.isfinite(point.threshold) else round(point.threshold, 6),
        },
    }


def report_json(report: AnomalyReport) -> dict[str, Any]:
    overall = report.overall
    return {
        "task": report.task,
        "model": report.model,
        "model_version": report.model_version,
        "n_cases": overall.n_abnormal + overall.n_normal,
        "bootstrap": {"n_resamples": report.n_resamples, "seed": report.seed, "level": DEFAULT_LEVEL},
        **{k: v for k, v in _separation_json(overall).items() if k != "name"},
        "by_type": [_separation_json(s) for s in report.by_type],
        "cases_without_scores": list(report.missing),
        "scores_not_in_manifest": report.extra_scores,
        "roc": {
            "fpr": [round(float(v), 6) for v in overall.roc.fpr],
            "tpr": [round(float(v), 6) for v in overall.roc.tpr],
        },
    }


def write_report(report: AnomalyReport, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``<out>/anomaly.json`` and ``<out>/roc.png`` (both atomic); matplotlib is imported only here."""
    from services.evaluation.plots import plot_roc

    out = Path(out_dir)
    json_path = write_bytes_atomically(
        out / "anomaly.json", (json.dumps(report_json(report), indent=2) + "\n").encode()
    )
    label = report.model_version or report.model or "anomaly score"
    title = f"ROC: {report.task or 'anomaly'} ({report.overall.n_abnormal} abnormal, {report.overall.n_normal} normal)"
    png_path = plot_roc(
        report.overall.roc, out / "roc.png", auc_ci=report.overall.auc_ci, label=label, title=title
    )
    return json_path, png_path


def summary(report: AnomalyReport) -> str:
    """The short table printed after the files are written."""

    def row(item: Separation) -> str:
        ci = f"[{item.auc_ci.low:.3f}, {item.auc_ci.high:.3f}]" if item.auc_ci else ""
        point = item.operating_point
        sens_ci = point.sensitivity_ci
        sens = f"{point.sensitivity:.3f}" + (f" [{sens_ci.low:.3f}, {sens_ci.high:.3f}]" if sens_ci else "")
        return (
            f"  {item.name:<16} {item.n_abnormal:5d} vs {item.n_normal:<5d} {item.auc:.3f} {ci:<16}  {sens}"
        )

    lines = [
        f"{report.task} · {report.model} · {report.model_version}",
        f"{report.overall.n_abnormal + report.overall.n_normal} cases"
        + (f" ({len(report.missing)} without a score, left out)" if report.missing else "")
        + f"; bootstrap {report.n_resamples} case resamples, seed {report.seed}",
        f"  {'':<16} abnormal/normal  AUC   95% CI            sens @ 95% spec [95% CI]",
        row(report.overall),
        *(row(item) for item in report.by_type),
    ]
    return "\n".join(lines)
