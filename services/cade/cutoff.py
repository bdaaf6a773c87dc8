"""The confidence cut-off of a detection request, resolved the same way for the CLI and the service.

A caller gives a threshold, or an FP rate whose threshold the model card records (an operating
point measured by ``wlcad evaluate cade``), or neither (the card's operating point at the task's
default FP rate, else the task's default threshold). One definition, so ``wlcad detect`` and the
Detection service return the same candidates for the same image and request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.cade.pipeline import DetectionResult
from services.core.errors import InputError
from services.core.volume import Volume

if TYPE_CHECKING:
    from services.cade.model import CadeModel

__all__ = ["Cutoff", "detect_at"]


@dataclass(frozen=True)
class Cutoff:
    """What the caller asked for: ``threshold`` or ``fp_rate`` or neither; checked on creation, so a
    bad cut-off is refused before an image is read or received (errors name ``threshold`` /
    ``fp_rate``, the CLI option and the request field alike)."""

    threshold: float | None = None
    fp_rate: float | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and self.fp_rate is not None:
            raise InputError("give threshold or fp_rate, not both", field="threshold")
        if self.threshold is not None and not (
            math.isfinite(self.threshold) and 0.0 <= self.threshold <= 1.0
        ):
            raise InputError(f"must lie in [0, 1], got {self.threshold}", field="threshold")
        if self.fp_rate is not None and not (math.isfinite(self.fp_rate) and self.fp_rate > 0):
            raise InputError(f"must be a number > 0, got {self.fp_rate}", field="fp_rate")

    def resolve(self, model: CadeModel) -> float:
        """The threshold itself, the card's operating point at ``fp_rate``, or the model's default."""
        if self.fp_rate is not None:
            return model.threshold_for(self.fp_rate)
        return self.threshold if self.threshold is not None else model.default_threshold()


def detect_at(model: CadeModel, image: Volume, threshold: float) -> DetectionResult:
    """Candidates at confidence ≥ ``threshold``; the detector's floor follows it, so a cut-off below
    the task's floor loses no candidate and one above it costs no work on weaker peaks."""
    result = model.detector(floor=min(max(threshold, 0.0), 1.0)).detect(image)
    kept = tuple(c for c in result.candidates if c.confidence >= threshold)
    return DetectionResult(result.task, result.model_version, kept)
