"""95 % confidence intervals by bootstrap resampling of **cases** (the protocol: 1,000 resamples).

Cases, not candidates or lesions, are resampled because cases are the independent units: the lesions
and candidates of one scan are correlated (same scanner, same anatomy, same detector failure), and
LUNA16's own ``computeFROC_bootstrap`` draws whole scans too. A resample that draws case *c* k times
is the original data with case *c* weighted k, so each statistic is evaluated on a (resamples × cases)
weight matrix in one vectorised pass instead of rebuilding a thousand data sets.

The interval is the percentile interval of the resampled statistic (``numpy.percentile``, linear):
no normality assumption, bounded by the metric's range (a sensitivity CI never passes 1). Resamples
on which the statistic is undefined (no lesion drawn for FROC; one class only for AUC) are left
out, and ``ConfidenceInterval.n_resamples`` says how many were used.

Randomness comes only from a ``numpy.random.Generator`` built from ``seed`` (default 0), so a report
is reproducible; pass a Generator to draw from a stream you manage (its state advances).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from services.core.errors import InputError
from services.evaluation.froc import (
    LUNA16_FP_RATES,
    FrocResult,
    froc_from_ranking,
    interpolate_rows,
    rank,
)
from services.evaluation.matching import Candidate, Lesion, MatchRule, as_rule, tabulate
from services.evaluation.roc import AucGroups, check_scores_truth

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class ConfidenceInterval:
    """``[low, high]`` at ``level`` (0.95 = 95 %), from ``n_resamples`` usable resamples."""

    low: float
    high: float
    level: float
    n_resamples: int

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def width(self) -> float:
        return self.high - self.low


@dataclass(frozen=True, eq=False)
class FrocBootstrap:
    """The FROC point estimate with CIs for its CPM and each operating point, and a pointwise band
    (``band_*`` at ``band_fp_per_case``, log-spaced over the rates) for plotting."""

    estimate: FrocResult
    cpm: ConfidenceInterval
    sensitivity: tuple[ConfidenceInterval, ...]
    band_fp_per_case: np.ndarray
    band_low: np.ndarray
    band_high: np.ndarray


def _check(n_resamples: int, level: float) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int | np.integer) or n_resamples < 1:
        raise InputError(f"must be a positive integer, got {n_resamples!r}", field="n_resamples")
    if not 0.0 < float(level) < 1.0:
        raise InputError(f"must lie strictly between 0 and 1, got {level!r}", field="level")


def resample_cases(n_cases: int, n_resamples: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Indices of the cases drawn with replacement, shape (n_resamples, n_cases)."""
    if n_cases < 1:
        raise InputError("no cases to resample", field="case_ids")
    return np.random.default_rng(seed).integers(0, n_cases, size=(int(n_resamples), int(n_cases)))


def case_weights(indices: np.ndarray, n_cases: int) -> np.ndarray:
    """How often each case was drawn in each resample, shape (n_resamples, n_cases)."""
    rows = indices.shape[0]
    offset = indices + n_cases * np.arange(rows)[:, None]
    return np.bincount(offset.ravel(), minlength=rows * n_cases).reshape(rows, n_cases).astype(np.float64)


def percentile_interval(samples: np.ndarray, level: float = DEFAULT_LEVEL) -> ConfidenceInterval:
    """Percentile interval of one statistic's resampled values (NaNs = undefined resamples, skipped)."""
    values = np.asarray(samples, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise InputError("the statistic is undefined on every resample", field="n_resamples")
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return ConfidenceInterval(
        low=float(low), high=float(high), level=float(level), n_resamples=int(values.size)
    )


def _weights(n_cases: int, n_resamples: int, seed: int | np.random.Generator) -> np.ndarray:
    return case_weights(resample_cases(n_cases, n_resamples, seed), n_cases)


def bootstrap_froc(
    lesions: Iterable[Lesion],
    candidates: Iterable[Candidate],
    case_ids: Sequence[str],
    *,
    rule: MatchRule | str = MatchRule.LUNA16,
    fp_rates: Sequence[float] = LUNA16_FP_RATES,
    n_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int | np.random.Generator = 0,
    band_points: int = 200,
) -> FrocBootstrap:
    """FROC with percentile CIs for the CPM and for each sensitivity at ``fp_rates``.

    Matching runs once: a candidate's hit status does not depend on which other cases were drawn.
    """
    _check(n_resamples, level)
    ranking = rank(tabulate(lesions, candidates, case_ids), as_rule(rule))
    estimate = froc_from_ranking(ranking, fp_rates)
    rates = np.array([p.fp_per_case for p in estimate.operating_points])
    band_x = np.geomspace(rates[0], rates[-1], max(2, int(band_points)))
    fps, sens = ranking.curves(_weights(ranking.n_cases, n_resamples, seed))
    read = interpolate_rows(np.concatenate([rates, band_x]), fps, sens)
    at_rates, band = read[:, : len(rates)], read[:, len(rates) :]
    valid = np.all(np.isfinite(at_rates), axis=1)
    at_rates, band = at_rates[valid], band[valid]
    if not len(at_rates):
        raise InputError("no resample drew a lesion", field="lesions")
    tail = (1.0 - level) / 2.0 * 100.0
    band_low, band_high = np.percentile(band, [tail, 100.0 - tail], axis=0)
    return FrocBootstrap(
        estimate=estimate,
        cpm=percentile_interval(at_rates.mean(axis=1), level),
        sensitivity=tuple(percentile_interval(at_rates[:, k], level) for k in range(len(rates))),
        band_fp_per_case=band_x,
        band_low=band_low,
        band_high=band_high,
    )


def bootstrap_auc(
    scores: Sequence[float] | np.ndarray,
    truth: Sequence[bool | int] | np.ndarray,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int | np.random.Generator = 0,
) -> ConfidenceInterval:
    """Percentile CI of the case-level ROC-AUC (one score and one truth per case)."""
    _check(n_resamples, level)
    s, t = check_scores_truth(scores, truth)
    return percentile_interval(AucGroups.of(s, t).auc(_weights(len(s), n_resamples, seed)), level)


def bootstrap_mean_dice(
    dice_values: Sequence[float] | np.ndarray,
    case_ids: Sequence[str] | None = None,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int | np.random.Generator = 0,
) -> ConfidenceInterval:
    """Percentile CI of the mean Dice over lesions.

    With ``case_ids`` (one per Dice value) the lesions of a case are drawn together, as cases are the
    independent units; without, every value is its own case.
    """
    _check(n_resamples, level)
    values = np.asarray(dice_values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise InputError("no Dice values", field="dice_values")
    if not np.all(np.isfinite(values)) or np.any((values < 0) | (values > 1)):
        raise InputError("Dice values must lie in [0, 1]", field="dice_values")
    if case_ids is None:
        group = np.arange(values.size)
    else:
        ids = list(case_ids)
        if len(ids) != values.size:
            raise InputError(f"{len(ids)} case ids for {values.size} Dice values", field="case_ids")
        _, group = np.unique(np.asarray(ids, dtype=object).astype(str), return_inverse=True)
        group = group.reshape(-1)
    n_cases = int(group.max()) + 1
    sums = np.bincount(group, weights=values, minlength=n_cases)
    counts = np.bincount(group, minlength=n_cases).astype(np.float64)
    weights = _weights(n_cases, n_resamples, seed)
    return percentile_interval((weights @ sums) / (weights @ counts), level)
