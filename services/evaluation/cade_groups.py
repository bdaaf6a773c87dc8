"""CPM per lesion group (e.g. shape family), on the whole system's FP axis, with bootstrap CIs.

:mod:`services.evaluation.cade_report` breaks sensitivity down by size and kind at 1/2/4 FP/case; the
sphere-vs-painted experiment needs a different number per group: the **CPM** (LUNA16's seven
operating points), so that "how many cases do spheres need to match painted labels" can be asked of
simple shapes (sphere/ellipsoid) and irregular ones (lobulated/spiculated/irregular) separately.
The rule is the report's: a group's FROC ranks its own lesions against **all** false positives, and a
candidate that only hits a lesion of another group is neither a hit nor an FP. Every group resamples
the same cases with the same seed, so group intervals come from the same bootstrap draws as the
overall one — and two detectors evaluated on the same cases with the same seed get the same draws, so
their per-resample CPMs (:attr:`GroupCpm.samples`) pair up into a CI of their difference
(:func:`paired_difference`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from services.core.errors import InputError
from services.core.manifest import read_manifest
from services.evaluation.bootstrap import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    ConfidenceInterval,
    bootstrap_froc,
    case_weights,
    percentile_interval,
    resample_cases,
)
from services.evaluation.cade_report import Truth, read_truth
from services.evaluation.froc import LUNA16_FP_RATES, interpolate_rows, rank
from services.evaluation.matching import Candidate, Lesion, MatchRule, as_rule, match_candidates, tabulate


@dataclass(frozen=True)
class GroupCpm:
    """One lesion group's CPM and its CI; ``cpm`` and ``ci`` are None when the group has no lesion
    (an absent group has no sensitivity, and 0 would read as a detector that misses everything)."""

    name: str
    n_lesions: int
    n_found: int
    cpm: float | None
    ci: ConfidenceInterval | None
    #: The CPM of each bootstrap resample (NaN where a resample drew none of the group's lesions).
    samples: np.ndarray | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        ci = None if self.ci is None else {"low": self.ci.low, "high": self.ci.high, "level": self.ci.level}
        return {
            "name": self.name,
            "n_lesions": self.n_lesions,
            "n_found": self.n_found,
            "cpm": self.cpm,
            "cpm_ci": ci,
        }


def lesion_column(manifest: str | os.PathLike[str], column: str) -> tuple[str, ...]:
    """``column`` of every lesion row of ``manifest``, in :func:`read_truth`'s lesion order (empty
    strings where the column is missing or blank)."""
    rows = read_manifest(manifest, check_files=False, strict=True)
    return tuple((row.get(column) or "").strip() for row in rows if row["lesion_id"] is not None)


def group_of(values: Sequence[str], groups: Mapping[str, Sequence[str]], field: str) -> tuple[str, ...]:
    """The group name of each value (``groups``: group → the values it holds).

    Raises:
        InputError: naming ``field`` when a value belongs to no group — a lesion left out of every
            group would silently vanish from the breakdown.
    """
    lookup = {value: name for name, members in groups.items() for value in members}
    unknown = sorted({v for v in values if v not in lookup})
    if unknown:
        raise InputError(
            f"{', '.join(repr(v) for v in unknown)} belong to no group ({', '.join(groups)})", field=field
        )
    return tuple(lookup[v] for v in values)


def group_cpms(
    truth: Truth,
    lesion_groups: Sequence[str],
    candidates: Sequence[Candidate],
    group_names: Sequence[str],
    *,
    rule: MatchRule | str = MatchRule.LUNA16,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> tuple[GroupCpm, ...]:
    """The CPM of each of ``group_names`` (``lesion_groups[i]`` is the group of ``truth.lesions[i]``)."""
    if len(lesion_groups) != len(truth.lesions):
        raise InputError(
            f"{len(lesion_groups)} group labels for {len(truth.lesions)} lesions", field="lesion_groups"
        )
    rule = as_rule(rule)
    lesions = [t.lesion for t in truth.lesions]
    candidates = list(candidates)
    hits_any = match_candidates(lesions, candidates, rule).candidate_lesion_hits if lesions else None
    out = []
    for name in group_names:
        own = [lesion for lesion, group in zip(lesions, lesion_groups, strict=True) if group == name]
        if not own:
            out.append(GroupCpm(name, 0, 0, None, None))
            continue
        hits_own = match_candidates(own, candidates, rule).candidate_lesion_hits
        kept = [
            c for c, any_, mine in zip(candidates, hits_any, hits_own, strict=True) if any_ == 0 or mine > 0
        ]
        boot = bootstrap_froc(
            own, kept, truth.case_ids, rule=rule, fp_rates=LUNA16_FP_RATES,
            n_resamples=n_resamples, seed=seed, level=level,
        )  # fmt: skip
        samples = cpm_samples(own, kept, truth.case_ids, rule=rule, n_resamples=n_resamples, seed=seed)
        out.append(
            GroupCpm(name, len(own), boot.estimate.n_found, float(boot.estimate.cpm), boot.cpm, samples)
        )
    return tuple(out)


def cpm_samples(
    lesions: Sequence[Lesion],
    candidates: Sequence[Candidate],
    case_ids: Sequence[str],
    *,
    rule: MatchRule | str = MatchRule.LUNA16,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> np.ndarray:
    """The CPM on each case resample (the draws :func:`bootstrap_froc` makes with the same seed)."""
    ranking = rank(tabulate(lesions, candidates, case_ids), as_rule(rule))
    weights = case_weights(resample_cases(ranking.n_cases, n_resamples, seed), ranking.n_cases)
    fps, sens = ranking.curves(weights)
    return interpolate_rows(np.asarray(LUNA16_FP_RATES), fps, sens).mean(axis=1)


def paired_difference(
    a: np.ndarray, b: np.ndarray, level: float = DEFAULT_LEVEL
) -> ConfidenceInterval | None:
    """Percentile CI of ``a − b`` over paired resamples (None when no resample defines both)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"{a.shape} and {b.shape} resamples do not pair", field="samples")
    difference = a - b
    if not np.any(np.isfinite(difference)):
        return None
    return percentile_interval(difference, level)


def manifest_group_cpms(
    manifest: str | os.PathLike[str],
    candidates: Sequence[Candidate],
    column: str,
    groups: Mapping[str, Sequence[str]],
    **settings,
) -> tuple[GroupCpm, ...]:
    """:func:`group_cpms` with the truth and each lesion's group read from ``manifest``'s ``column``."""
    truth = read_truth(manifest)
    labels = group_of(lesion_column(manifest, column), groups, column)
    return group_cpms(truth, labels, candidates, list(groups), **settings)


__all__ = [
    "GroupCpm",
    "cpm_samples",
    "group_cpms",
    "group_of",
    "lesion_column",
    "manifest_group_cpms",
    "paired_difference",
]
