"""The one label-estimation pipeline behind the CLI, the batch runner and the gRPC service.

``LabelEstimator.estimate(image, prompts, method)`` checks that the prompts fit the image, runs the
method (``services.label_estimation.methods``) near each lesion, and returns one
:class:`LesionEstimate` per prompt with its mask (a box on the input grid), measurements and QC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from services.core.errors import InputError
from services.core.lesion_mask import LesionMask
from services.core.lesion_measurements import Measurements, measure_mask
from services.core.lesion_prompt import LesionPrompt, validated_prompt
from services.core.version import software_version
from services.core.volume import Volume
from services.core.work_budget import checkpoint
from services.label_estimation.methods import METHODS, Method, SegmentationModel, method_named

__all__ = ["METHODS", "LabelEstimator", "LesionEstimate", "QualityCheck", "label_map"]

#: A mask whose maximum diameter differs from the stated one by more than this factor is flagged.
DIAMETER_AGREEMENT_LIMIT = 1.5


@dataclass(frozen=True)
class QualityCheck:
    """How far to trust a mask: its size against the stated diameter, its centre against the prompt.
    ``diameter_ratio`` and ``center_offset_mm`` are ``None`` for an empty mask; ``mean_probability_inside``
    only for learned methods."""

    passed: bool
    empty: bool
    diameter_ratio: float | None = None
    center_offset_mm: float | None = None
    mean_probability_inside: float | None = None


@dataclass(frozen=True)
class LesionEstimate:
    lesion_id: int
    method: str
    prompt: LesionPrompt
    mask: LesionMask
    qc: QualityCheck
    measurements: Measurements
    model_version: str | None = None

    def report(self) -> dict:
        """The per-lesion JSON: what was asked, what was found, how much to trust it."""
        tight = self.mask.tight()
        return {
            "lesion_id": self.lesion_id,
            "method": self.method,
            "model_version": self.model_version,
            "software_version": software_version(),
            "prompt": {"center_mm": list(self.prompt.center_mm), "diameter_mm": self.prompt.diameter_mm},
            "measurements": asdict(self.measurements),
            "qc": asdict(self.qc),
            "box": {"start_voxel": list(tight.start_xyz), "size_voxel": list(tight.size_xyz)},
        }


def results_of_report(report: dict) -> tuple[Measurements, QualityCheck]:
    """The typed results of a report written by :meth:`LesionEstimate.report` (a resumed batch reads
    them back); unknown or missing keys raise ``TypeError`` rather than reading as 0."""
    values = dict(report["measurements"])
    if values.get("center_mm") is not None:
        values["center_mm"] = tuple(values["center_mm"])
    return Measurements(**values), QualityCheck(**report["qc"])


def quality_check(
    prompt: LesionPrompt, measurements: Measurements, mean_probability_inside: float | None = None
) -> QualityCheck:
    if measurements.voxels == 0 or measurements.center_mm is None:
        return QualityCheck(passed=False, empty=True, mean_probability_inside=mean_probability_inside)
    ratio = measurements.max_diameter_mm / prompt.diameter_mm
    offset = float(np.linalg.norm(np.subtract(measurements.center_mm, prompt.center_mm)))
    return QualityCheck(
        passed=bool(1 / DIAMETER_AGREEMENT_LIMIT <= ratio <= DIAMETER_AGREEMENT_LIMIT),
        empty=False,
        diameter_ratio=round(ratio, 4),
        center_offset_mm=round(offset, 3),
        mean_probability_inside=mean_probability_inside,
    )


class LabelEstimator:
    """Runs one method over the prompts of one image. ``model`` is needed only by model methods."""

    def __init__(self, model: SegmentationModel | None = None) -> None:
        self._model = model

    def estimate(
        self, image: Volume, prompts: Sequence[LesionPrompt], method: Method | str
    ) -> list[LesionEstimate]:
        method = method if isinstance(method, Method) else method_named(method)
        ids = [p.lesion_id for p in prompts]
        if len(set(ids)) != len(ids):
            raise InputError(f"lesion ids must be unique within an image, got {ids}", field="lesion_id")
        if method.volumetric and image.array.shape[0] == 1:
            raise InputError(
                f"{method.name} is a 3D segmenter and this image has one slice (a radiograph); "
                "use sphere, threshold or random-walker",
                field="method",
            )
        prompts = [validated_prompt(image, p) for p in prompts]
        masks = method.masks(image, prompts, self._model)
        model_version = (self._model.version or method.model) if method.model and self._model else None
        estimates = []
        for prompt, result in zip(prompts, masks, strict=True):
            checkpoint("measuring the lesions")
            tight = result.mask.tight()
            measurements = measure_mask(tight.mask_zyx, tuple(tight.start_xyz[::-1]), image)
            qc = quality_check(prompt, measurements, result.mean_probability_inside)
            estimates.append(
                LesionEstimate(
                    prompt.lesion_id, method.name, prompt, result.mask, qc, measurements, model_version
                )
            )
        return estimates


def label_map(image: Volume, estimates: Sequence[LesionEstimate]) -> np.ndarray:
    """All lesions on the input grid: voxel = lesion_id; where two overlap, the later one wins."""
    dtype = np.uint8 if max((e.lesion_id for e in estimates), default=0) < 256 else np.uint16
    out = np.zeros(image.array.shape, dtype=dtype)
    for estimate in estimates:
        x0, y0, z0 = estimate.mask.start_xyz
        sz, sy, sx = estimate.mask.mask_zyx.shape
        out[z0 : z0 + sz, y0 : y0 + sy, x0 : x0 + sx][estimate.mask.mask_zyx] = estimate.lesion_id
    return out
