"""The CADe evaluation report: a detector's candidates against a manifest's lesions.

Everything is computed by :mod:`services.evaluation.froc` and :mod:`services.evaluation.bootstrap`
(LUNA16's FROC and CPM, case-resampling bootstrap); this module reads the inputs, groups the lesions
and turns the results into one typed report (and its JSON). What it adds, and why:

* **Predictions** are the ``wlcad detect`` JSON (``{"task", "model", "model_version", "candidates":
  [{"center_mm", "center_voxel", "diameter_mm", "confidence"}]}``), one ``<case_id>.json`` per case in
  a folder, or one file holding a list of such objects (each with ``case_id``). A manifest case with no
  predictions is evaluated as a case with no candidates — it still counts in FP/case and its lesions
  as missed — and the report says how many there were, so a half-finished batch cannot pass unseen.
  Predictions for a case the manifest does not list are refused: they would be dropped silently or
  inflate FP/case with cases that have no truth.
* **Subgroups** (lesion size, lesion kind) keep the whole system's FP/case axis: a subgroup's FROC
  ranks its own lesions against **all** false positives, and a candidate that only hits a lesion of
  another subgroup is ignored (neither hit nor FP), the way LUNA16 treats candidates on excluded
  nodules. So "sensitivity for solid nodules at 2 FP/case" means the detector run at its 2-FP setting.
* **Operating points** are the deployable cut-offs: the lowest confidence threshold whose FP/case does
  not exceed 1, 2, 4, with the sensitivity and FP/case actually obtained there (which can sit below
  LUNA16's interpolated sensitivity at the same rate). The model card takes its default cut-off here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.core.atomic import write_bytes_atomically
from services.core.errors import InputError
from services.core.manifest import read_manifest
from services.core.work_budget import checkpoint
from services.evaluation.bootstrap import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    ConfidenceInterval,
    FrocBootstrap,
    bootstrap_froc,
)
from services.evaluation.froc import LUNA16_FP_RATES, FrocResult
from services.evaluation.matching import Candidate, Lesion, MatchRule, as_rule, match_candidates

#: FP/case rates of the subgroup breakdowns and of the operating points (the model card's cut-offs).
BREAKDOWN_FP_RATES: tuple[float, ...] = (1.0, 2.0, 4.0)

#: Size bins (mm, maximum diameter): lower bound inclusive, upper exclusive, so 6.0 mm is "6–10 mm".
SIZE_BINS: tuple[tuple[str, float, float], ...] = (
    ("< 6 mm", 0.0, 6.0),
    ("6–10 mm", 6.0, 10.0),
    ("10–20 mm", 10.0, 20.0),
    ("≥ 20 mm", 20.0, math.inf),
)
#: Extra size group of the acceptance criterion ("nodules ≥ 6 mm").
AT_LEAST_6_MM = ("≥ 6 mm", 6.0, math.inf)

UNSPECIFIED_KIND = "unspecified"


# ---------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class TruthLesion:
    """One manifest lesion: what the FROC matches (``lesion``) and what the breakdowns group by."""

    lesion: Lesion
    lesion_type: str


@dataclass(frozen=True)
class Truth:
    """Every case of the manifest (lesion-free ones included: they count in FP/case) and its lesions."""

    case_ids: tuple[str, ...]
    lesions: tuple[TruthLesion, ...]


@dataclass(frozen=True)
class Predictions:
    """A detector's candidates for the cases it ran on (``case_ids``; a case may have none)."""

    task: str
    model: str
    model_version: str
    case_ids: tuple[str, ...]
    candidates: tuple[Candidate, ...]


def read_truth(manifest: str | os.PathLike[str]) -> Truth:
    """Cases and lesions of a manifest (strict: a bad row is an error, not a skipped lesion — a skipped
    lesion would raise every sensitivity)."""
    rows = read_manifest(manifest, check_files=False, strict=True)
    case_ids = tuple(dict.fromkeys(row["case_id"] for row in rows))
    lesions = []
    for row in rows:
        if row["lesion_id"] is None:
            continue
        if row["center_y_mm"] is None:
            raise InputError(f"case {row['case_id']!r}: a lesion needs a centre", field="center_y_mm")
        if row["diameter_mm"] <= 0:
            raise InputError(
                f"case {row['case_id']!r}: must be > 0, got {row['diameter_mm']}", field="diameter_mm"
            )
        # A radiograph's lesion may have no z: 2D detectors report z = 0 too.
        centre = (row["center_x_mm"], row["center_y_mm"], row["center_z_mm"] or 0.0)
        lesion = Lesion(row["case_id"], centre, row["diameter_mm"])
        lesions.append(TruthLesion(lesion, (row.get("lesion_type") or "").strip() or UNSPECIFIED_KIND))
    return Truth(case_ids=case_ids, lesions=tuple(lesions))


def _string(document: dict, key: str, where: str) -> str:
    value = document.get(key)
    if not isinstance(value, str) or not value:
        raise InputError(f"{where}: must be a non-empty string, got {value!r}", field=key)
    return value


def _numbers(value: object, count: int, field: str, where: str) -> tuple[float, ...]:
    ok = isinstance(value, list) and len(value) == count
    ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    if not ok or not all(math.isfinite(v) for v in value):
        raise InputError(f"{where}: needs {count} finite numbers, got {value!r}", field=field)
    return tuple(float(v) for v in value)


def _number(value: object, field: str, where: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{where}: must be a finite number, got {value!r}", field=field)
    if positive and value <= 0:
        raise InputError(f"{where}: must be > 0, got {value!r}", field=field)
    return float(value)


def _candidates(document: dict, case_id: str, where: str) -> list[Candidate]:
    items = document.get("candidates")
    if not isinstance(items, list):
        raise InputError(f"{where}: must be a list, got {type(items).__name__}", field="candidates")
    out = []
    for index, item in enumerate(items):
        field = f"candidates[{index}]"
        if not isinstance(item, dict):
            raise InputError(f"{where}: must be an object, got {type(item).__name__}", field=field)
        centre = _numbers(item.get("center_mm"), 3, f"{field}.center_mm", where)
        if "center_voxel" in item:
            _numbers(item["center_voxel"], 3, f"{field}.center_voxel", where)
        if "diameter_mm" in item:
            _number(item["diameter_mm"], f"{field}.diameter_mm", where, positive=True)
        score = _number(item.get("confidence"), f"{field}.confidence", where)
        out.append(Candidate(case_id, centre, score))
    return out


def _documents(path: Path) -> list[tuple[dict, str | None, str]]:
    """(document, case id implied by the file name or None, where) for a folder or a list file."""
    if path.is_dir():
        files = sorted(p for p in path.glob("*.json") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise InputError(f"{path}: no <case_id>.json files in this folder", field="--pred")
        return [(_load(file), file.stem, file.name) for file in files]
    if not path.is_file():
        raise InputError(f"{path} does not exist", field="--pred")
    loaded = _load(path)
    if isinstance(loaded, dict):
        loaded = [loaded]
    if not isinstance(loaded, list):
        raise InputError(f"{path.name}: must hold a detection object or a list of them", field="--pred")
    return [(doc, None, f"{path.name}[{i}]") for i, doc in enumerate(loaded)]


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path.name}: not valid JSON ({exc})", field="--pred") from None


def read_predictions(path: str | os.PathLike[str]) -> Predictions:
    """Read and validate ``wlcad detect`` output (a folder of ``<case_id>.json`` or one list file).

    Raises:
        InputError: naming the file (or list entry) and the field; also when one case is predicted
            twice or the files mix tasks, models or model versions (one report = one model).
    """
    documents = _documents(Path(path))
    if not documents:
        raise InputError(f"{Path(path).name}: the list holds no detection object", field="--pred")
    identity: tuple[str, str, str] | None = None
    case_ids: list[str] = []
    candidates: list[Candidate] = []
    for document, stem, where in documents:
        if not isinstance(document, dict):
            raise InputError(f"{where}: must be a JSON object", field="--pred")
        this = tuple(_string(document, key, where) for key in ("task", "model", "model_version"))
        if identity is None:
            identity = this  # type: ignore[assignment]
        elif this != identity:
            raise InputError(f"{where}: {this} differs from {identity} in the other files", field="model")
        case_id = document.get("case_id", stem)
        if stem is not None and case_id != stem:
            raise InputError(f"{where}: {case_id!r} differs from the file name {stem!r}", field="case_id")
        case_id = _string({"case_id": case_id}, "case_id", where)
        if case_id in case_ids:
            raise InputError(f"{where}: case {case_id!r} is predicted twice", field="case_id")
        case_ids.append(case_id)
        candidates.extend(_candidates(document, case_id, where))
    assert identity is not None  # documents is not empty
    return Predictions(*identity, case_ids=tuple(case_ids), candidates=tuple(candidates))


# --------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RateSensitivity:
    """LUNA16's interpolated sensitivity at one FP/case rate, with its bootstrap CI."""

    fp_per_case: float
    sensitivity: float
    ci: ConfidenceInterval


@dataclass(frozen=True)
class SubgroupSensitivity:
    """A lesion group's sensitivities at :data:`BREAKDOWN_FP_RATES` (empty when it has no lesions)."""

    name: str
    n_lesions: int
    n_found: int
    at_rates: tuple[RateSensitivity, ...]


@dataclass(frozen=True)
class OperatingThreshold:
    """The confidence cut-off for at most ``max_fp_per_case`` (keep candidates ≥ ``threshold``), and
    what it really gives on this test set. ``threshold`` is ``inf`` when even the top candidate costs
    more FPs (then nothing is kept)."""

    max_fp_per_case: float
    threshold: float
    fp_per_case: float
    sensitivity: float
    n_true_positives: int
    n_false_positives: int


@dataclass(frozen=True, eq=False)
class CadeReport:
    """Every number of one CADe evaluation (:func:`report_json` turns it into JSON)."""

    task: str
    model: str
    model_version: str
    rule: MatchRule
    n_cases: int
    n_lesions: int
    n_candidates: int
    cases_without_predictions: tuple[str, ...]
    froc: FrocBootstrap
    sensitivities: tuple[RateSensitivity, ...]
    by_size: tuple[SubgroupSensitivity, ...]
    by_kind: tuple[SubgroupSensitivity, ...]
    operating_points: tuple[OperatingThreshold, ...]
    n_resamples: int
    seed: int
    level: float

    @property
    def estimate(self) -> FrocResult:
        return self.froc.estimate

    @property
    def cpm(self) -> float:
        return self.froc.estimate.cpm

    @property
    def cpm_ci(self) -> ConfidenceInterval:
        return self.froc.cpm


# ------------------------------------------------------------------------------------------ evaluation


def _check_cases(truth: Truth, predictions: Predictions) -> tuple[str, ...]:
    """Cases without predictions (allowed, reported); predicted cases outside the manifest are refused."""
    known = set(truth.case_ids)
    unknown = [case for case in predictions.case_ids if case not in known]
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise InputError(
            f"{len(unknown)} predicted case(s) are not in the manifest: {shown}", field="case_id"
        )
    predicted = set(predictions.case_ids)
    return tuple(case for case in truth.case_ids if case not in predicted)


def _rates(boot: FrocBootstrap) -> tuple[RateSensitivity, ...]:
    return tuple(
        RateSensitivity(p.fp_per_case, p.sensitivity, ci)
        for p, ci in zip(boot.estimate.operating_points, boot.sensitivity, strict=True)
    )


def _subgroup(
    name: str,
    members: Sequence[bool],
    truth: Truth,
    candidates: Sequence[Candidate],
    hits_any: np.ndarray,
    settings: dict[str, Any],
) -> SubgroupSensitivity:
    """FROC of one lesion group on the whole system's FP axis (see the module docstring)."""
    checkpoint(f"evaluating the {name} lesions")  # each group is one bootstrap: stop between them
    lesions = [t.lesion for t, member in zip(truth.lesions, members, strict=True) if member]
    if not lesions:
        return SubgroupSensitivity(name, 0, 0, ())
    hits_own = match_candidates(lesions, candidates, settings["rule"]).candidate_lesion_hits
    kept = [c for c, any_, own in zip(candidates, hits_any, hits_own, strict=True) if any_ == 0 or own > 0]
    boot = bootstrap_froc(lesions, kept, truth.case_ids, fp_rates=BREAKDOWN_FP_RATES, **settings)
    return SubgroupSensitivity(name, len(lesions), boot.estimate.n_found, _rates(boot))


def _operating_points(result: FrocResult) -> tuple[OperatingThreshold, ...]:
    """The cut-offs for ≤ 1, 2, 4 FP/case, read at the curve's own vertices (no interpolation)."""
    points = []
    for rate in BREAKDOWN_FP_RATES:
        vertex = int(np.searchsorted(result.fp_per_case, rate, side="right")) - 1
        fp, sens = float(result.fp_per_case[vertex]), float(result.sensitivity[vertex])
        points.append(
            OperatingThreshold(
                max_fp_per_case=rate,
                threshold=float(result.thresholds[vertex]),
                fp_per_case=fp,
                sensitivity=sens,
                n_true_positives=round(sens * result.n_lesions),
                n_false_positives=round(fp * result.n_cases),
            )
        )
    return tuple(points)


def _size_groups(truth: Truth) -> list[tuple[str, list[bool]]]:
    diameters = [t.lesion.diameter_mm for t in truth.lesions]
    return [(name, [low <= d < high for d in diameters]) for name, low, high in (*SIZE_BINS, AT_LEAST_6_MM)]


def _kind_groups(truth: Truth) -> list[tuple[str, list[bool]]]:
    kinds = sorted({t.lesion_type for t in truth.lesions})
    return [(kind, [t.lesion_type == kind for t in truth.lesions]) for kind in kinds]


def task_rule(task: str) -> MatchRule:
    """The hit rule a CADe task is evaluated by (``CadeTask.match_rule``); LUNA16 for a task wlcad does
    not know (a foreign detector's predictions)."""
    from services.cade.tasks import TASKS  # lazy: the task table imports the pipeline

    known = TASKS.get(task)
    return as_rule(known.match_rule) if known is not None else MatchRule.LUNA16


def evaluate_cade(
    truth: Truth,
    predictions: Predictions,
    *,
    rule: MatchRule | str | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> CadeReport:
    """FROC, CPM and sensitivities with bootstrap CIs, breakdowns by size and kind, operating points.

    ``rule`` None: the hit rule of the predictions' task (:func:`task_rule`: ADAM for aneurysms, LUNA16
    otherwise), so a detector is scored by its own task's rule wherever it is evaluated.

    Every FROC of the report resamples the same cases (same ``seed``, same case list), so the overall
    and subgroup intervals come from the same bootstrap draws.
    """
    missing = _check_cases(truth, predictions)
    lesions = [t.lesion for t in truth.lesions]
    if not lesions:
        raise InputError("the manifest holds no lesion: sensitivity is undefined", field="manifest")
    candidates = list(predictions.candidates)
    settings: dict[str, Any] = {
        "rule": task_rule(predictions.task) if rule is None else as_rule(rule),
        "n_resamples": n_resamples,
        "seed": seed,
        "level": level,
    }
    boot = bootstrap_froc(lesions, candidates, truth.case_ids, fp_rates=LUNA16_FP_RATES, **settings)
    hits_any = match_candidates(lesions, candidates, settings["rule"]).candidate_lesion_hits
    groups = {
        key: tuple(_subgroup(n, m, truth, candidates, hits_any, settings) for n, m in make(truth))
        for key, make in (("size", _size_groups), ("kind", _kind_groups))
    }
    return CadeReport(
        task=predictions.task,
        model=predictions.model,
        model_version=predictions.model_version,
        rule=settings["rule"],
        n_cases=len(truth.case_ids),
        n_lesions=len(lesions),
        n_candidates=len(candidates),
        cases_without_predictions=missing,
        froc=boot,
        sensitivities=_rates(boot),
        by_size=groups["size"],
        by_kind=groups["kind"],
        operating_points=_operating_points(boot.estimate),
        n_resamples=n_resamples,
        seed=seed,
        level=level,
    )


# ----------------------------------------------------------------------------------------------- JSON


def _finite_or_none(value: float) -> float | None:
    """JSON has no infinity: an unreachable threshold (``inf``) is written as null."""
    return float(value) if math.isfinite(value) else None


def _ci(ci: ConfidenceInterval) -> dict[str, Any]:
    return {"low": ci.low, "high": ci.high, "level": ci.level, "n_resamples": ci.n_resamples}


def _rate_json(r: RateSensitivity) -> dict[str, Any]:
    return {"fp_per_case": r.fp_per_case, "sensitivity": r.sensitivity, "ci": _ci(r.ci)}


def _group_json(g: SubgroupSensitivity) -> dict[str, Any]:
    return {
        "name": g.name,
        "n_lesions": g.n_lesions,
        "n_found": g.n_found,
        "sensitivities": [_rate_json(r) for r in g.at_rates],
    }


def report_json(report: CadeReport) -> dict[str, Any]:
    """The report as plain JSON types; infinite thresholds become null."""
    estimate, boot = report.estimate, report.froc
    return {
        "task": report.task,
        "model": report.model,
        "model_version": report.model_version,
        "rule": report.rule.value,
        "n_cases": report.n_cases,
        "n_lesions": report.n_lesions,
        "n_candidates": report.n_candidates,
        "n_found": estimate.n_found,
        "n_false_positives": estimate.n_false_positives,
        "n_cases_without_predictions": len(report.cases_without_predictions),
        "cases_without_predictions": list(report.cases_without_predictions),
        "bootstrap": {"n_resamples": report.n_resamples, "seed": report.seed, "level": report.level},
        "cpm": estimate.cpm,
        "cpm_ci": _ci(boot.cpm),
        "sensitivities": [_rate_json(r) for r in report.sensitivities],
        "operating_points": [
            {
                "max_fp_per_case": p.max_fp_per_case,
                "threshold": _finite_or_none(p.threshold),
                "fp_per_case": p.fp_per_case,
                "sensitivity": p.sensitivity,
                "n_true_positives": p.n_true_positives,
                "n_false_positives": p.n_false_positives,
            }
            for p in report.operating_points
        ],
        "by_size": [_group_json(g) for g in report.by_size],
        "by_kind": [_group_json(g) for g in report.by_kind],
        "curve": {
            "fp_per_case": estimate.fp_per_case.tolist(),
            "sensitivity": estimate.sensitivity.tolist(),
            "thresholds": [_finite_or_none(t) for t in estimate.thresholds.tolist()],
        },
        "band": {
            "fp_per_case": boot.band_fp_per_case.tolist(),
            "low": boot.band_low.tolist(),
            "high": boot.band_high.tolist(),
        },
    }


def write_report(report: CadeReport, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``<out>/froc.json`` and ``<out>/froc.png`` (both atomic). matplotlib is imported only here."""
    from services.evaluation.plots import plot_froc

    out = Path(out_dir)
    json_path = write_bytes_atomically(
        out / "froc.json", (json.dumps(report_json(report), indent=2) + "\n").encode()
    )
    label = f"{report.model} {report.model_version}"
    png_path = plot_froc(
        report.estimate, out / "froc.png", ci=report.froc, label=label, title=f"FROC: {report.task}"
    )
    return json_path, png_path
