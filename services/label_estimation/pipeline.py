"""The one label-estimation pipeline behind the CLI, the batch runner and the gRPC service.

``LabelEstimator.estimate(image, prompts, method)`` validates the prompts, runs the chosen method
near each lesion, and returns one :class:`LesionEstimate` per prompt with its mask (as a box on the
input grid), measurements and QC.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from services.core.errors import InputError
from services.core.lesion_mask import LesionMask
from services.core.lesion_measurements import measure_lesion
from services.core.lesion_prompt import LesionPrompt, validated_prompt
from services.core.volume import Volume
from services.label_estimation.random_walker import random_walker_mask
from services.label_estimation.shapes import prompt_ellipsoid_mask, sphere_mask
from services.label_estimation.threshold import threshold_mask
from services.label_estimation.unet import MODEL_NAME, InferFunction, unet_masks

METHODS = ("sphere", "ellipsoid", "threshold", "random-walker", "unet")
#: A mask whose maximum diameter differs from the stated one by more than this factor is flagged.
DIAMETER_AGREEMENT_LIMIT = 1.5


def software_version() -> str:
    try:
        return importlib.metadata.version("wlcad")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+source"


@dataclass
class LesionEstimate:
    lesion_id: int
    method: str
    prompt: LesionPrompt
    mask: LesionMask
    qc: dict = field(default_factory=dict)
    measurements: dict = field(default_factory=dict)
    model_version: str | None = None

    def report(self) -> dict:
        """The per-lesion JSON: what was asked, what was found, how much to trust it."""
        return {
            "lesion_id": self.lesion_id,
            "method": self.method,
            "model_version": self.model_version,
            "software_version": software_version(),
            "prompt": {"center_mm": list(self.prompt.center_mm), "diameter_mm": self.prompt.diameter_mm},
            "measurements": self.measurements,
            "qc": self.qc,
            "box": {
                "start_voxel": list(self.mask.tight().start_xyz),
                "size_voxel": list(self.mask.tight().size_xyz),
            },
        }


class LabelEstimator:
    """Runs one method over the prompts of one image. ``infer`` is needed only by ``unet``."""

    def __init__(
        self, infer: InferFunction | None = None, model_version: str | None = None, max_batch: int = 8
    ) -> None:
        self._infer = infer
        self._model_version = model_version
        self._max_batch = max_batch

    def estimate(self, image: Volume, prompts: Sequence[LesionPrompt], method: str) -> list[LesionEstimate]:
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}", field="method")
        ids = [p.lesion_id for p in prompts]
        if len(set(ids)) != len(ids):
            raise InputError(f"lesion ids must be unique within an image, got {ids}", field="lesion_id")
        prompts = [validated_prompt(image, p) for p in prompts]
        model_version = None
        extra_qc: list[dict] = [{} for _ in prompts]
        if method == "unet":
            if image.array.shape[0] == 1:
                raise InputError(
                    "unet is a 3D segmenter and this image has one slice (a radiograph); "
                    "use sphere, threshold or random-walker",
                    field="method",
                )
            if self._infer is None:
                raise InputError("the unet method needs an inference backend", field="method")
            results = unet_masks(image, prompts, self._infer, self._max_batch)
            masks = [r.mask for r in results]
            extra_qc = [{"mean_probability_inside": round(r.mean_probability_inside, 4)} for r in results]
            model_version = self._model_version or MODEL_NAME
        elif method == "sphere":
            masks = [sphere_mask(image, p) for p in prompts]
        elif method == "ellipsoid":
            masks = [prompt_ellipsoid_mask(image, p) for p in prompts]
        elif method == "threshold":
            masks = [threshold_mask(image, p) for p in prompts]
        else:
            masks = [random_walker_mask(image, p) for p in prompts]
        return [
            self._finish(image, prompt, mask, method, qc, model_version)
            for prompt, mask, qc in zip(prompts, masks, extra_qc, strict=True)
        ]

    @staticmethod
    def _finish(
        image: Volume,
        prompt: LesionPrompt,
        mask: LesionMask,
        method: str,
        qc: dict,
        model_version: str | None,
    ) -> LesionEstimate:
        measurements: dict = {"voxels": mask.voxel_count}
        qc = dict(qc)
        if mask.voxel_count == 0:
            qc.update({"empty": True, "passed": False})
        else:
            tight = mask.tight()
            label = measure_lesion(tight.mask_zyx, tuple(tight.start_xyz[::-1]), image, prompt.lesion_id)
            measurements.update(
                {
                    "volume_mm3": round(label.volume_mm3, 3),
                    "center_mm": [round(v, 3) for v in label.center_mm],
                    "max_diameter_mm": round(label.diameter_mm, 3),
                    "axial_long_mm": round(label.axial_long_mm, 3),
                    "axial_short_mm": round(label.axial_short_mm, 3),
                }
            )
            ratio = label.diameter_mm / prompt.diameter_mm
            qc.update(
                {
                    "empty": False,
                    "diameter_ratio": round(ratio, 4),
                    "center_offset_mm": round(
                        float(np.linalg.norm(np.subtract(label.center_mm, prompt.center_mm))), 3
                    ),
                    "passed": bool(1 / DIAMETER_AGREEMENT_LIMIT <= ratio <= DIAMETER_AGREEMENT_LIMIT),
                }
            )
        return LesionEstimate(prompt.lesion_id, method, prompt, mask, qc, measurements, model_version)


def label_map(image: Volume, estimates: Sequence[LesionEstimate]) -> np.ndarray:
    """All lesions on the input grid: voxel = lesion_id; where two overlap, the later one wins."""
    dtype = np.uint8 if max((e.lesion_id for e in estimates), default=0) < 256 else np.uint16
    out = np.zeros(image.array.shape, dtype=dtype)
    for estimate in estimates:
        x0, y0, z0 = estimate.mask.start_xyz
        sz, sy, sx = estimate.mask.mask_zyx.shape
        out[z0 : z0 + sz, y0 : y0 + sy, x0 : x0 + sx][estimate.mask.mask_zyx] = estimate.lesion_id
    return out
