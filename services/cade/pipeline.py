"""The one detection pipeline behind the CLI, the batch runner and the gRPC service.

``Detector(spec, infer, model_version).detect(image)`` checks the image against the detector (its
dimensionality, finite voxels, a size it can tile), moves it to the task's working frame and
intensity scale (:mod:`services.cade.preprocess`), runs the network over the whole image
(:mod:`services.cade.tiling`), turns the probability map into candidates
(:mod:`services.cade.candidates`) — or, for a two-stage task whose classifier is present, proposes
candidates from the map and from blobs and lets the classifier score them
(:mod:`services.cade.reranking`) — and reports them on the **original** image: world LPS mm and that
image's voxel indices. An image without lesions gives a valid, empty candidate list; a failure is
always an exception, never an empty list.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from services.cade.candidates import DetectionCandidate, find_candidates
from services.cade.preprocess import Intensity, WorkingFrame, to_working
from services.cade.reranking import Reranker, RerankSpec
from services.cade.tiling import InferFunction, TilingSpec, check_image, sliding_window
from services.core.errors import InputError
from services.core.volume import Volume
from services.core.work_budget import checkpoint
from services.evaluation.matching import Candidate

__all__ = ["DetectionResult", "Detector", "DetectorSpec"]


@dataclass(frozen=True)
class DetectorSpec:
    """Everything about a task's detector except its weights: what the model card fixes.

    ``nms_radius_mm``: candidates closer than this keep the stronger (for a 2D detector in the
    normalised frame, give it in working pixels times the working spacing: see :meth:`nms_radius_for`);
    ``floor``: the least confidence reported (the operating point is chosen later, on these);
    ``rerank``: the false-positive-reduction stage, used when the task's classifier is in the repository.
    """

    task: str
    frame: WorkingFrame
    intensity: Intensity
    tiling: TilingSpec
    floor: float = 0.1
    nms_radius_mm: float | None = None
    nms_radius_pixels: float | None = None
    max_candidates: int = 100
    rerank: RerankSpec | None = None

    def __post_init__(self) -> None:
        if not self.task:
            raise InputError("must name the task", field="task")
        if self.frame.dims != self.tiling.dims:
            raise InputError(
                f"a {self.frame.dims}D frame with {self.tiling.dims}D tiles", field="tiling.tile"
            )
        if (self.nms_radius_mm is None) == (self.nms_radius_pixels is None):
            raise InputError("give exactly one of nms_radius_mm or nms_radius_pixels", field="nms_radius")

    @property
    def dims(self) -> int:
        return self.frame.dims

    def nms_radius_for(self, working: Volume) -> float:
        """The suppression radius in mm on ``working``: fixed mm, or pixels of the normalised frame
        (so a radiograph's suppression does not depend on its stated pixel spacing)."""
        if self.nms_radius_mm is not None:
            return float(self.nms_radius_mm)
        return float(self.nms_radius_pixels) * float(min(working.spacing[:2]))


@dataclass(frozen=True)
class DetectionResult:
    """The candidates of one image, strongest first, on the image's own grid."""

    task: str
    model_version: str
    candidates: tuple[DetectionCandidate, ...]

    def froc_candidates(self, case_id: str) -> list[Candidate]:
        """The FROC inputs of this image as case ``case_id``."""
        return [c.to_candidate(case_id) for c in self.candidates]

    def as_dict(self, model: str | None = None) -> dict:
        """The JSON of ``wlcad detect`` (``model`` defaults to the task's model name)."""
        return {
            "task": self.task,
            "model": model or f"cade_{self.task}",
            "model_version": self.model_version,
            "candidates": [c.as_dict() for c in self.candidates],
        }


class Detector:
    """A task's detector bound to a network: ``infer`` runs one batch of tiles (see :mod:`tiling`);
    ``reranker``, when given, is the second stage (its spec must be the task's ``rerank``)."""

    def __init__(
        self, spec: DetectorSpec, infer: InferFunction, model_version: str, reranker: Reranker | None = None
    ) -> None:
        if reranker is not None and spec.rerank is None:
            raise InputError(f"{spec.task} has no second stage to bind a classifier to", field="model")
        self.spec = spec
        self._infer = infer
        self._reranker = reranker
        self.model_version = (
            model_version if reranker is None else f"{model_version}+{reranker.model_version}"
        )

    @property
    def reranker(self) -> Reranker | None:
        """The second stage, when bound."""
        return self._reranker

    @property
    def two_stage(self) -> bool:
        return self._reranker is not None

    def _check_input(self, image: Volume) -> None:
        """Dimensionality and finite voxels on the original image, where the caller can see them."""
        if self.spec.dims == 3 and image.shape_xyz[2] == 1:
            raise InputError(
                f"is a single slice (a 2D image) but {self.spec.task} is a 3D detector", field="image"
            )
        if self.spec.dims == 2 and image.shape_xyz[2] != 1:
            raise InputError(
                f"has {image.shape_xyz[2]} slices but {self.spec.task} is a 2D detector (one slice)",
                field="image",
            )
        array = np.asarray(image.array)
        if not np.issubdtype(array.dtype, np.floating):
            return  # integer voxels (most CT, MR, radiographs) are always finite
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InputError(f"holds {bad} non-finite voxels", field="image")

    def working_and_probability(self, image: Volume) -> tuple[Volume, Volume]:
        """The image on the working grid and the network's probability map there."""
        self._check_input(image)
        checkpoint("detection preprocessing")
        working = to_working(image, self.spec.frame, self.spec.intensity)
        check_image(working.array, self.spec.tiling)  # too small to tile → InputError on "image"
        logits = sliding_window(working.array, self._infer, self.spec.tiling)
        return working, working.with_array(expit(logits).astype(np.float32))

    def probability(self, image: Volume) -> Volume:
        """The detector's probability map on its working grid (for overlays and debugging)."""
        return self.working_and_probability(image)[1]

    def detect(self, image: Volume) -> DetectionResult:
        working, probability = self.working_and_probability(image)
        checkpoint("detection candidates")
        if self._reranker is not None:
            candidates = self._reranker.candidates(
                working,
                probability,
                image.grid,
                floor=self._reranker.spec.floor,
                nms_radius_mm=self.spec.nms_radius_for(probability),
                max_count=self.spec.max_candidates,
            )
            return DetectionResult(self.spec.task, self.model_version, tuple(candidates))
        candidates = find_candidates(
            probability.array,
            probability.grid,
            floor=self.spec.floor,
            nms_radius_mm=self.spec.nms_radius_for(probability),
            max_count=self.spec.max_candidates,
            report_grid=image.grid,
        )
        return DetectionResult(self.spec.task, self.model_version, tuple(candidates))
