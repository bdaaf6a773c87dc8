"""The CADe tasks wlcad knows: each task's detector settings (everything but the weights) and its model.

A task fixes what the network was trained to see — working frame, intensity scale, tile, suppression
radius — so serving and training (``training/cade``) read the same :class:`DetectorSpec` from here and
a model can never be run in a frame it was not trained in. The weights live in the model repository
as ``cade_<task>``; a task whose model is absent fails with :class:`TaskNotAvailableError` (an InputError,
exit 2 / INVALID_ARGUMENT), never with an empty candidate list.

* ``chest-ct-nodule`` (3D): 1.5 mm isotropic, CT window −1000..400 HU (lung to soft tissue; HU are
  calibrated, so a fixed window is the same tissue on every scanner), 64³ tiles.
* ``cxr-mass`` (2D): the radiograph resized to a 512-pixel long side (a radiograph often states no
  usable pixel spacing; the frame is defined by the image itself), 0.5–99.5 percentile intensities
  (radiographs have no absolute scale), 256² tiles.
* ``head-mra-aneurysm`` (3D): TOF-MRA at 0.8 mm isotropic (sources are 0.4–0.8 mm in-plane, 0.5–1 mm
  apart: 0.8 mm keeps a 2 mm aneurysm 2.5 voxels across and a whole head under ~10 M voxels),
  0.5–99.9 percentile intensities (MR has no absolute scale; the arteries, the brightest ~0.3 % of a
  TOF slab, saturate near 1), 64³ tiles; hits by the ADAM rule (centre within the maximum radius).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from services.cade.pipeline import DetectorSpec
from services.cade.preprocess import Intensity, WorkingFrame
from services.cade.reranking import RerankSpec
from services.cade.tiling import TilingSpec
from services.core.errors import InputError

__all__ = ["TASKS", "CadeTask", "TaskNotAvailableError", "task_named"]

#: Prefix of a task's model in the repository: ``cade_<task>``.
MODEL_PREFIX = "cade_"


class TaskNotAvailableError(InputError):
    """The task exists but its model is not in the repository (or cannot serve this task)."""

    def __init__(self, message: str, field: str = "model") -> None:
        super().__init__(message, field=field)


@dataclass(frozen=True)
class CadeTask:
    """One detection task: its detector settings and the cut-off used when the caller gives none.

    ``default_fp_rate``: the model card's operating point (FP per case) used by default when the card
    has one; otherwise ``default_threshold`` applies.
    """

    name: str
    spec: DetectorSpec
    default_threshold: float
    default_fp_rate: float
    description: str
    #: The finding its candidates are (SEG segment type; ``services.core.io.dicom_seg`` codes it).
    lesion_type: str
    #: How a candidate hits a lesion in its FROC (``services.evaluation.matching.MatchRule`` values):
    #: LUNA16's ``< r`` for nodules and masses, ADAM's ``≤ r`` of the maximum radius for aneurysms.
    match_rule: Literal["luna16", "adam"] = "luna16"

    @property
    def model_name(self) -> str:
        return f"{MODEL_PREFIX}{self.name}"

    @property
    def dims(self) -> int:
        return self.spec.dims


CHEST_CT_NODULE = CadeTask(
    name="chest-ct-nodule",
    spec=DetectorSpec(
        task="chest-ct-nodule",
        frame=WorkingFrame(dims=3, spacing_mm=1.5),
        intensity=Intensity("window", -1000.0, 400.0),
        # Working intensity 0.05 is −930 HU: a tile with (almost) nothing denser is air outside the body.
        tiling=TilingSpec(
            tile=(64, 64, 64), min_shape=(16, 16, 16), overlap=0.25, max_batch=4, skip_below=0.05
        ),
        floor=0.1,
        nms_radius_mm=10.0,
        # Two stages: U-Net candidates + LoG blobs in the lungs, scored by cade_chest-ct-nodule_fpr.
        rerank=RerankSpec(),
    ),
    default_threshold=0.5,
    default_fp_rate=4.0,
    description="lung nodules on chest CT (3D, trained on sphere labels from centre + diameter)",
    lesion_type="nodule",
)

CXR_MASS = CadeTask(
    name="cxr-mass",
    spec=DetectorSpec(
        task="cxr-mass",
        frame=WorkingFrame(dims=2, long_side=512),
        intensity=Intensity("percentile", 0.5, 99.5),
        tiling=TilingSpec(tile=(256, 256), min_shape=(64, 64), overlap=0.25, max_batch=4),
        floor=0.1,
        nms_radius_pixels=16.0,
    ),
    default_threshold=0.5,
    default_fp_rate=1.0,
    description="masses on chest radiographs (2D, normalised frame, trained on circle labels)",
    lesion_type="mass",
)

HEAD_MRA_ANEURYSM = CadeTask(
    name="head-mra-aneurysm",
    spec=DetectorSpec(
        task="head-mra-aneurysm",
        frame=WorkingFrame(dims=3, spacing_mm=0.8),
        intensity=Intensity("percentile", 0.5, 99.9),
        tiling=TilingSpec(tile=(64, 64, 64), min_shape=(16, 16, 16), overlap=0.25, max_batch=4),
        floor=0.1,
        # Aneurysms of one patient sit at different bifurcations, rarely closer than a few mm.
        nms_radius_mm=4.0,
    ),
    default_threshold=0.5,
    default_fp_rate=1.0,
    description="intracranial aneurysms on TOF-MRA (3D, trained on sphere labels from centre + diameter)",
    lesion_type="aneurysm",
    match_rule="adam",
)

TASKS: dict[str, CadeTask] = {t.name: t for t in (CHEST_CT_NODULE, CXR_MASS, HEAD_MRA_ANEURYSM)}


def task_named(name: str) -> CadeTask:
    """The task called ``name``, or an InputError on ``task`` listing the known ones."""
    if name not in TASKS:
        raise InputError(f"unknown task {name!r} (tasks: {', '.join(TASKS)})", field="task")
    return TASKS[name]
