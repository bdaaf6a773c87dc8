"""Calibration against normals: where a score falls among the scores of a normal validation set.

A raw flow score (bits/dim, or a posterior in bits/dim) means nothing to a reader; "more abnormal
than 97 % of normals" and a z-score do. The validation normals' scores are stored in the model
card (``extra.calibration``), so the numbers travel with the model version that produced them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.core.errors import InputError


@dataclass(frozen=True)
class Calibration:
    """Sorted scores of ``n`` normal validation cases (phantom seed ``seed``)."""

    normal_scores: tuple[float, ...]
    seed: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        scores = np.asarray(self.normal_scores, dtype=np.float64)
        if scores.ndim != 1 or scores.size < 2:
            raise InputError("needs at least two normal scores", field="calibration.normal_scores")
        if not np.all(np.isfinite(scores)):
            raise InputError("must be finite", field="calibration.normal_scores")
        object.__setattr__(self, "normal_scores", tuple(float(v) for v in np.sort(scores)))

    @classmethod
    def from_scores(cls, scores, seed: int | None = None, description: str = "") -> Calibration:
        return cls(tuple(float(v) for v in np.asarray(scores, dtype=np.float64).ravel()), seed, description)

    @property
    def mean(self) -> float:
        return float(np.mean(self.normal_scores))

    @property
    def sd(self) -> float:
        return float(np.std(self.normal_scores, ddof=1))

    def percentile(self, score: float) -> float:
        """Percent of normals scoring below ``score`` (ties count half): 50 is a typical normal,
        100 above every normal seen."""
        s = np.asarray(self.normal_scores)
        below = np.searchsorted(s, score, side="left")
        at_or_below = np.searchsorted(s, score, side="right")
        return float(100.0 * (below + 0.5 * (at_or_below - below)) / s.size)

    def z(self, score: float) -> float:
        """(score − mean of normals) / sd of normals; 0 when the normals' sd is 0."""
        sd = self.sd
        return float((score - self.mean) / sd) if sd > 0 and math.isfinite(sd) else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "normal_scores": [round(v, 6) for v in self.normal_scores],
            "n": len(self.normal_scores),
            "mean": round(self.mean, 6),
            "sd": round(self.sd, 6),
            "seed": self.seed,
            "description": self.description,
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "calibration") -> Calibration:
        if not isinstance(data, dict) or not isinstance(data.get("normal_scores"), list):
            raise InputError("must be an object with a 'normal_scores' list", field=where)
        try:
            scores = tuple(float(v) for v in data["normal_scores"])
        except (TypeError, ValueError) as exc:
            raise InputError("normal_scores must be numbers", field=where) from exc
        seed = data.get("seed")
        return cls(scores, int(seed) if isinstance(seed, int) else None, str(data.get("description", "")))
