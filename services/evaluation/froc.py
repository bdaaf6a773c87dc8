"""FROC analysis and the competition performance metric (CPM), computed the way LUNA16 computes them.

Procedure (``noduleCADEvaluationLUNA16.py``, whose numbers nnDetection and MONAI report):

1. match candidates to lesions with a hit rule (:mod:`services.evaluation.matching`);
2. each found lesion becomes one positive scored by its best hit; each candidate that hits no lesion
   becomes one negative; missed lesions and extra hits on a found lesion drop out of the ranking;
3. sweep the threshold down through every distinct score: sensitivity = found lesions scoring ≥ t over
   **all** lesions (missed ones included), FP/case = negatives scoring ≥ t over **all** cases
   (lesion-free and candidate-free cases included — they are part of the test set);
4. read the sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 FP/case by **linear interpolation** between
   the curve's vertices (``numpy.interp``), and average the seven into the CPM.

Two consequences of step 4 that LUNA16 has and wlcad keeps, so CPMs compare with published ones:
tied scores give a diagonal segment (not a staircase), and beyond the last vertex the sensitivity is
held at its final value (a system that stops at 2 FP/case is credited its 2-FP sensitivity at 4 and 8).
At a rate where the curve rises vertically, the top of the rise is read.

Everything is computed from per-case counts so that the bootstrap (:mod:`services.evaluation.bootstrap`)
can evaluate a thousand case resamples as one matrix: a resample is the same ranking with each case
weighted by how often it was drawn.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from services.core.errors import InputError
from services.evaluation.matching import (
    Candidate,
    DetectionTable,
    Lesion,
    MatchResult,
    MatchRule,
    as_rule,
    match_table,
    tabulate,
)

LUNA16_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""FP/case at which LUNA16 reads sensitivities; their mean sensitivity is the CPM."""

_MAX_CELLS = 4_000_000  # resample rows × ranked events per block: bounds memory at ~32 MB per array


@dataclass(frozen=True)
class OperatingPoint:
    """The sensitivity at one FP/case rate, and the score threshold to deploy for it.

    ``sensitivity`` is LUNA16's interpolated value. ``threshold`` is the lowest score cut whose FP/case
    does not exceed ``fp_per_case`` (keep candidates scoring ≥ threshold; ``inf`` = even the top
    candidate costs more): the setting a CADe product would ship, whose own sensitivity can be a
    little below the interpolated one.
    """

    fp_per_case: float
    sensitivity: float
    threshold: float


@dataclass(frozen=True, eq=False)
class FrocResult:
    """The FROC curve (vertices, thresholds descending from ``inf``), its operating points and CPM."""

    fp_per_case: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    operating_points: tuple[OperatingPoint, ...]
    cpm: float
    n_cases: int
    n_lesions: int
    n_found: int
    n_false_positives: int
    rule: MatchRule

    def sensitivity_at(self, fp_per_case: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """Sensitivity interpolated at any FP/case rate(s), with the same convention as the CPM."""
        return np.interp(np.asarray(fp_per_case, dtype=np.float64), self.fp_per_case, self.sensitivity)


@dataclass(frozen=True, eq=False)
class FrocRanking:
    """The ranked positives and negatives of one matching (descending score, stable).

    ``group_end`` holds the last position of each run of equal scores: only there is the curve
    defined, since a threshold cannot separate tied candidates.
    """

    score: np.ndarray  # (E,)
    is_tp: np.ndarray  # (E,) bool
    case: np.ndarray  # (E,) int
    group_end: np.ndarray  # (G,)
    lesions_per_case: np.ndarray  # (n_cases,)
    n_cases: int
    match: MatchResult

    @property
    def thresholds(self) -> np.ndarray:
        return np.concatenate([[np.inf], self.score[self.group_end]])

    def curves(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """FP/case and sensitivity at every curve vertex for each row of case ``weights`` (B, n_cases).

        Rows whose weighted lesion count is zero get NaN sensitivities (undefined, not zero).
        """
        weights = np.asarray(weights, dtype=np.float64)
        rows = weights.shape[0]
        fps = np.zeros((rows, len(self.group_end) + 1))
        sens = np.zeros((rows, len(self.group_end) + 1))
        n_lesions = weights @ self.lesions_per_case.astype(np.float64)
        # FP/case divides by the number of cases drawn (the resample's size), LUNA16's totalNumberOfImages.
        n_cases = weights.sum(axis=1)
        block = max(1, _MAX_CELLS // max(1, len(self.score)))
        for start in range(0, rows, block):
            w = weights[start : start + block][:, self.case]
            tp = np.cumsum(w * self.is_tp, axis=1)[:, self.group_end]
            fp = np.cumsum(w * ~self.is_tp, axis=1)[:, self.group_end]
            fps[start : start + block, 1:] = fp / n_cases[start : start + block, None]
            sens[start : start + block, 1:] = tp
        with np.errstate(invalid="ignore", divide="ignore"):
            sens = np.where(n_lesions[:, None] > 0, sens / n_lesions[:, None], np.nan)
        return fps, sens


def rank(table: DetectionTable, rule: MatchRule | str = MatchRule.LUNA16) -> FrocRanking:
    """Match, then rank found lesions (positives) and false-positive candidates (negatives)."""
    match = match_table(table, rule)
    fp = match.candidate_is_fp
    score = np.concatenate([match.lesion_score[match.lesion_found], table.candidate_score[fp]])
    is_tp = np.concatenate([np.ones(int(match.lesion_found.sum()), bool), np.zeros(int(fp.sum()), bool)])
    case = np.concatenate([table.lesion_case[match.lesion_found], table.candidate_case[fp]])
    order = np.argsort(-score, kind="stable")
    score, is_tp, case = score[order], is_tp[order], case[order]
    group_end = np.flatnonzero(np.append(score[1:] != score[:-1], True)) if len(score) else np.zeros(0, int)
    n_cases = len(table.case_ids)
    return FrocRanking(
        score=score,
        is_tp=is_tp,
        case=case,
        group_end=group_end,
        lesions_per_case=np.bincount(table.lesion_case, minlength=n_cases),
        n_cases=n_cases,
        match=match,
    )


def check_fp_rates(fp_rates: Sequence[float]) -> tuple[float, ...]:
    rates = np.asarray(fp_rates, dtype=np.float64).reshape(-1)
    if rates.size == 0 or not np.all(np.isfinite(rates)) or np.any(rates <= 0) or np.any(np.diff(rates) <= 0):
        raise InputError(f"must be positive, finite and increasing, got {rates.tolist()}", field="fp_rates")
    return tuple(float(r) for r in rates)


def interpolate_rows(x: np.ndarray, fps: np.ndarray, sens: np.ndarray) -> np.ndarray:
    """LUNA16's read-out (``numpy.interp``) applied to each curve row; NaN rows stay NaN."""
    out = np.empty((fps.shape[0], len(x)))
    for row in range(fps.shape[0]):
        out[row] = np.interp(x, fps[row], sens[row])
    return out


def froc_from_ranking(ranking: FrocRanking, fp_rates: Sequence[float] = LUNA16_FP_RATES) -> FrocResult:
    rates = check_fp_rates(fp_rates)
    n_lesions = int(ranking.lesions_per_case.sum())
    if n_lesions == 0:
        raise InputError("FROC needs at least one lesion (sensitivity is undefined)", field="lesions")
    fps, sens = ranking.curves(np.ones((1, ranking.n_cases)))
    fps, sens, thresholds = fps[0], sens[0], ranking.thresholds
    at_rates = np.interp(rates, fps, sens)
    last_within = np.searchsorted(fps, rates, side="right") - 1
    points = tuple(
        OperatingPoint(fp_per_case=r, sensitivity=float(s), threshold=float(thresholds[j]))
        for r, s, j in zip(rates, at_rates, last_within, strict=True)
    )
    for array in (fps, sens, thresholds):
        array.setflags(write=False)
    return FrocResult(
        fp_per_case=fps,
        sensitivity=sens,
        thresholds=thresholds,
        operating_points=points,
        cpm=float(np.mean(at_rates)),
        n_cases=ranking.n_cases,
        n_lesions=n_lesions,
        n_found=int(ranking.match.lesion_found.sum()),
        n_false_positives=int(ranking.match.candidate_is_fp.sum()),
        rule=ranking.match.rule,
    )


def froc(
    lesions: Iterable[Lesion],
    candidates: Iterable[Candidate],
    case_ids: Sequence[str],
    *,
    rule: MatchRule | str = MatchRule.LUNA16,
    fp_rates: Sequence[float] = LUNA16_FP_RATES,
) -> FrocResult:
    """FROC curve, sensitivities at ``fp_rates`` and their mean (the CPM at LUNA16's default rates).

    ``case_ids`` must list every evaluated case — see :func:`services.evaluation.matching.tabulate`.
    """
    return froc_from_ranking(rank(tabulate(lesions, candidates, case_ids), as_rule(rule)), fp_rates)
