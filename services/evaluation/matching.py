"""Which detection candidates hit which lesions: the typed inputs of detection scoring and the hit rules.

A detector's output is a list of candidates (a point in world LPS mm and a score); the reference is a
list of lesions (a centre and a diameter in mm — exactly what a weak label holds). A *hit rule* says
when a candidate counts as finding a lesion. Two rules are implemented, each as its challenge's own
evaluation script states it, so numbers stay comparable with published ones:

* :attr:`MatchRule.LUNA16` — lung nodules: the candidate centre lies at a distance **strictly less**
  than ``d/2`` from the lesion centre (``noduleCADEvaluationLUNA16.py``: ``dist < radiusSquared``).
* :attr:`MatchRule.ADAM` — intracranial aneurysms: the candidate centre lies **within or on** the
  aneurysm's maximum radius (ADAM's ``evaluation_detection.py``: ``distance <= radius``). Pass the
  aneurysm's *maximum* diameter (twice ADAM's radius column) as ``Lesion.diameter_mm``.

The rules differ only on the sphere's surface (a candidate at exactly ``d/2``), which is real for
centres on a voxel grid with integer-mm radii. Conventions shared by both scripts, and kept here:

* a lesion is found once, scored by the **highest** score among the candidates that hit it; its other
  hits are neither TP nor FP (ignored), so a detector is not punished for marking a lesion twice;
* a candidate inside **several** lesions' spheres (overlapping annotations) is a hit for **each** of
  them and is no FP. LUNA16's script credits every such lesion (it only prints "This is strange: CAD
  mark … detected two nodules!"); ADAM's loops do the same. (MONAI's label-map FROC differs: the
  sphere painted last overwrites the overlap, so only one lesion is credited.)
* a candidate that hits no lesion is one false positive of its case.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from services.core.errors import InputError

Point3 = tuple[float, float, float]


def _point_mm(value: object, field: str) -> Point3:
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InputError(f"needs 3 numbers (x, y, z in mm), got {value!r}", field=field) from exc
    if arr.shape != (3,):
        raise InputError(f"needs 3 numbers (x, y, z in mm), got {arr.size}", field=field)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"must be finite, got {arr.tolist()}", field=field)
    return (float(arr[0]), float(arr[1]), float(arr[2]))


def _case_id(value: object, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise InputError(f"must be a non-empty string, got {value!r}", field=field)
    return value


def _finite(value: object, field: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"must be a number, got {value!r}", field=field) from exc
    if not math.isfinite(number):
        raise InputError(f"must be finite, got {number}", field=field)
    return number


@dataclass(frozen=True)
class Lesion:
    """One reference lesion: its case, centre (world LPS mm) and diameter (mm).

    The diameter must be positive: a zero-size lesion can never be hit under LUNA16's strict rule, so
    accepting it would silently lower every sensitivity instead of pointing at the bad annotation.
    (LUNA16's script maps negative diameters to 10 mm; wlcad refuses them — a guess is not a label.)
    """

    case_id: str
    center_mm: Point3
    diameter_mm: float

    def __post_init__(self) -> None:
        _case_id(self.case_id, "Lesion.case_id")
        object.__setattr__(self, "center_mm", _point_mm(self.center_mm, "Lesion.center_mm"))
        diameter = _finite(self.diameter_mm, "Lesion.diameter_mm")
        if diameter <= 0:
            raise InputError(f"must be positive, got {diameter}", field="Lesion.diameter_mm")
        object.__setattr__(self, "diameter_mm", diameter)


@dataclass(frozen=True)
class Candidate:
    """One detector output: its case, position (world LPS mm) and score (higher = more suspicious)."""

    case_id: str
    center_mm: Point3
    score: float

    def __post_init__(self) -> None:
        _case_id(self.case_id, "Candidate.case_id")
        object.__setattr__(self, "center_mm", _point_mm(self.center_mm, "Candidate.center_mm"))
        object.__setattr__(self, "score", _finite(self.score, "Candidate.score"))


class MatchRule(Enum):
    """The hit rule, picked per task (LUNA16 for lung nodules, ADAM for aneurysms).

    A strategy enum rather than a free callable: every result records which published rule produced
    it, and a config file or CLI flag can name it (``MatchRule("adam")``).
    """

    LUNA16 = "luna16"
    ADAM = "adam"

    def hits(self, distance_sq_mm2: np.ndarray, diameter_mm: np.ndarray) -> np.ndarray:
        """Boolean hit matrix from squared candidate–lesion distances and lesion diameters (broadcast).

        Each rule compares the way its reference script does (squared distance for LUNA16, distance
        for ADAM), so candidates on the sphere's surface fall on the same side as in the challenge.
        """
        radius = np.asarray(diameter_mm, dtype=np.float64) / 2.0
        if self is MatchRule.LUNA16:
            return distance_sq_mm2 < radius**2
        return np.sqrt(distance_sq_mm2) <= radius


def as_rule(rule: MatchRule | str) -> MatchRule:
    """A :class:`MatchRule` from itself or its name (``"luna16"``, ``"adam"``)."""
    if isinstance(rule, MatchRule):
        return rule
    try:
        return MatchRule(str(rule).lower())
    except ValueError as exc:
        names = ", ".join(r.value for r in MatchRule)
        raise InputError(f"unknown hit rule {rule!r} (one of {names})", field="rule") from exc


@dataclass(frozen=True, eq=False)
class DetectionTable:
    """Lesions and candidates as arrays, cases as indices into ``case_ids`` (built once, reused by the
    point estimate and by every bootstrap resample)."""

    case_ids: tuple[str, ...]
    lesion_case: np.ndarray  # (m,) int
    lesion_center_mm: np.ndarray  # (m, 3)
    lesion_diameter_mm: np.ndarray  # (m,)
    candidate_case: np.ndarray  # (n,) int
    candidate_center_mm: np.ndarray  # (n, 3)
    candidate_score: np.ndarray  # (n,)


def _listed(items: Iterable[object], kind: type, field: str) -> list:
    out = list(items)
    for index, item in enumerate(out):
        if not isinstance(item, kind):
            raise InputError(
                f"must be a {kind.__name__}, got {type(item).__name__}", field=f"{field}[{index}]"
            )
    return out


def tabulate(
    lesions: Iterable[Lesion], candidates: Iterable[Candidate], case_ids: Sequence[str] | None = None
) -> DetectionTable:
    """Validate and tabulate. ``case_ids`` lists **every** evaluated case, including lesion-free and
    candidate-free ones: they are invisible in the lesion and candidate lists yet count in FP/case (a
    quiet normal scan is part of the test set). ``None`` takes the cases that appear in either list.
    """
    lesion_list: list[Lesion] = _listed(lesions, Lesion, "lesions")
    candidate_list: list[Candidate] = _listed(candidates, Candidate, "candidates")
    if case_ids is None:
        ids = tuple(dict.fromkeys([x.case_id for x in lesion_list] + [c.case_id for c in candidate_list]))
    else:
        ids = tuple(_case_id(c, f"case_ids[{i}]") for i, c in enumerate(case_ids))
        if len(set(ids)) != len(ids):
            duplicates = sorted({c for c in ids if ids.count(c) > 1})
            raise InputError(f"case ids repeat: {duplicates[:5]}", field="case_ids")
    if not ids:
        raise InputError("no cases to evaluate", field="case_ids")
    position = {case: i for i, case in enumerate(ids)}

    def index_of(items: list, field: str) -> np.ndarray:
        out = np.empty(len(items), dtype=np.int64)
        for i, item in enumerate(items):
            if item.case_id not in position:
                raise InputError(f"case {item.case_id!r} is not in case_ids", field=f"{field}[{i}].case_id")
            out[i] = position[item.case_id]
        return out

    return DetectionTable(
        case_ids=ids,
        lesion_case=index_of(lesion_list, "lesions"),
        lesion_center_mm=np.array([x.center_mm for x in lesion_list], dtype=np.float64).reshape(-1, 3),
        lesion_diameter_mm=np.array([x.diameter_mm for x in lesion_list], dtype=np.float64),
        candidate_case=index_of(candidate_list, "candidates"),
        candidate_center_mm=np.array([c.center_mm for c in candidate_list], dtype=np.float64).reshape(-1, 3),
        candidate_score=np.array([c.score for c in candidate_list], dtype=np.float64),
    )


@dataclass(frozen=True, eq=False)
class MatchResult:
    """Per-lesion and per-candidate outcome of one hit rule (arrays in input order).

    ``lesion_score`` is the best hitting candidate's score (NaN when missed): the lesion counts as found
    at every threshold up to that score. ``candidate_lesion_hits`` counts the lesions each candidate
    lies in; 0 means false positive, >1 means overlapping annotations.
    """

    rule: MatchRule
    lesion_found: np.ndarray  # (m,) bool
    lesion_score: np.ndarray  # (m,) float, NaN where not found
    candidate_lesion_hits: np.ndarray  # (n,) int

    @property
    def candidate_is_fp(self) -> np.ndarray:
        return self.candidate_lesion_hits == 0


def _case_slices(case_index: np.ndarray, n_cases: int) -> tuple[np.ndarray, np.ndarray]:
    """Stable order grouping items by case, and the start of each case's run in it."""
    order = np.argsort(case_index, kind="stable")
    starts = np.searchsorted(case_index[order], np.arange(n_cases + 1))
    return order, starts


def match_table(table: DetectionTable, rule: MatchRule | str = MatchRule.LUNA16) -> MatchResult:
    """Apply ``rule`` case by case (only candidates and lesions of the same case can match; one case at
    a time keeps the distance matrix small however many cases there are)."""
    rule = as_rule(rule)
    n_cases = len(table.case_ids)
    m, n = len(table.lesion_case), len(table.candidate_case)
    lesion_best = np.full(m, -np.inf)
    hits_per_candidate = np.zeros(n, dtype=np.int64)
    lesion_order, lesion_starts = _case_slices(table.lesion_case, n_cases)
    cand_order, cand_starts = _case_slices(table.candidate_case, n_cases)
    for case in np.unique(table.lesion_case):
        li = lesion_order[lesion_starts[case] : lesion_starts[case + 1]]
        ci = cand_order[cand_starts[case] : cand_starts[case + 1]]
        if ci.size == 0:
            continue
        delta = table.candidate_center_mm[ci, None, :] - table.lesion_center_mm[None, li, :]
        hit = rule.hits((delta**2).sum(axis=-1), table.lesion_diameter_mm[li][None, :])
        hits_per_candidate[ci] = hit.sum(axis=1)
        lesion_best[li] = np.where(hit, table.candidate_score[ci][:, None], -np.inf).max(axis=0)
    found = np.isfinite(lesion_best)
    return MatchResult(
        rule=rule,
        lesion_found=found,
        lesion_score=np.where(found, lesion_best, np.nan),
        candidate_lesion_hits=hits_per_candidate,
    )


def match_candidates(
    lesions: Iterable[Lesion], candidates: Iterable[Candidate], rule: MatchRule | str = MatchRule.LUNA16
) -> MatchResult:
    """Which lesions the candidates find and which candidates are false positives, under ``rule``."""
    return match_table(tabulate(lesions, candidates), rule)
