"""Case-level ROC curve and AUC for anomaly detection (one score per case, truth normal/abnormal).

The AUC is the Mann–Whitney probability that an abnormal case outscores a normal one, ties counting
one half — equal to the trapezoid area under the ROC curve with ties drawn as diagonal segments
(scikit-learn's ``roc_auc_score``). It is computed from per-score-group counts so that the bootstrap
(:mod:`services.evaluation.bootstrap`) evaluates all resamples as one matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.core.errors import InputError

_MAX_CELLS = 4_000_000


@dataclass(frozen=True, eq=False)
class RocResult:
    """ROC vertices (thresholds descending from ``inf``: a case is called abnormal when score ≥ t)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auc: float
    n_positive: int
    n_negative: int


def check_scores_truth(
    scores: Sequence[float] | np.ndarray, truth: Sequence[bool | int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(scores float64, truth bool)``; both classes must be present, as AUC compares them."""
    try:
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InputError("must be numbers", field="scores") from exc
    t_raw = np.asarray(truth).reshape(-1)
    if s.shape != t_raw.shape:
        raise InputError(f"{s.size} scores but {t_raw.size} truth values", field="truth")
    if not np.all(np.isfinite(s)):
        raise InputError("must be finite", field="scores")
    if t_raw.dtype != bool:
        try:
            numeric = t_raw.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError("must be 0/1 or booleans", field="truth") from exc
        if not np.all((numeric == 0) | (numeric == 1)):
            raise InputError("must be 0/1 or booleans", field="truth")
        t = numeric == 1
    else:
        t = t_raw
    if not t.any():
        raise InputError("no positive (abnormal) case: AUC is undefined", field="truth")
    if t.all():
        raise InputError("no negative (normal) case: AUC is undefined", field="truth")
    return s, t


@dataclass(frozen=True, eq=False)
class AucGroups:
    """Scores grouped into distinct values (ascending); ``group`` maps each case to its value."""

    group: np.ndarray  # (n,) int
    n_groups: int
    truth: np.ndarray  # (n,) bool

    @classmethod
    def of(cls, scores: np.ndarray, truth: np.ndarray) -> AucGroups:
        values, group = np.unique(scores, return_inverse=True)
        return cls(group=group.reshape(-1), n_groups=len(values), truth=truth)

    def auc(self, weights: np.ndarray) -> np.ndarray:
        """AUC for each row of case ``weights`` (B, n); NaN where a row lacks a class."""
        weights = np.asarray(weights, dtype=np.float64)
        rows, n = weights.shape
        out = np.empty(rows)
        block = max(1, _MAX_CELLS // max(1, max(n, self.n_groups)))
        for start in range(0, rows, block):
            w = weights[start : start + block]
            b = w.shape[0]
            index = (self.group[None, :] + self.n_groups * np.arange(b)[:, None]).ravel()
            size = b * self.n_groups
            pos = np.bincount(index, weights=(w * self.truth).ravel(), minlength=size).reshape(b, -1)
            neg = np.bincount(index, weights=(w * ~self.truth).ravel(), minlength=size).reshape(b, -1)
            below = np.cumsum(neg, axis=1) - neg  # negatives strictly below each score value
            wins = (pos * (below + 0.5 * neg)).sum(axis=1)
            pairs = pos.sum(axis=1) * neg.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[start : start + b] = np.where(pairs > 0, wins / pairs, np.nan)
        return out


def roc_auc(scores: Sequence[float] | np.ndarray, truth: Sequence[bool | int] | np.ndarray) -> float:
    """Area under the ROC curve (ties count one half)."""
    s, t = check_scores_truth(scores, truth)
    return float(AucGroups.of(s, t).auc(np.ones((1, len(s))))[0])


def roc_curve(scores: Sequence[float] | np.ndarray, truth: Sequence[bool | int] | np.ndarray) -> RocResult:
    """Every ROC vertex (one per distinct score, none dropped) and the AUC.

    All vertices are kept, unlike scikit-learn's default ``drop_intermediate=True``: collinear points
    do not change the area, and keeping them lets a caller read the threshold of any operating point.
    """
    s, t = check_scores_truth(scores, truth)
    order = np.argsort(-s, kind="stable")
    s_sorted, t_sorted = s[order], t[order]
    ends = np.flatnonzero(np.append(s_sorted[1:] != s_sorted[:-1], True))
    tp = np.concatenate([[0], np.cumsum(t_sorted)[ends]])
    fp = np.concatenate([[0], np.cumsum(~t_sorted)[ends]])
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    fpr, tpr = fp / n_neg, tp / n_pos
    thresholds = np.concatenate([[np.inf], s_sorted[ends]])
    for array in (fpr, tpr, thresholds):
        array.setflags(write=False)
    auc = float(AucGroups.of(s, t).auc(np.ones((1, len(s))))[0])
    return RocResult(fpr=fpr, tpr=tpr, thresholds=thresholds, auc=auc, n_positive=n_pos, n_negative=n_neg)
