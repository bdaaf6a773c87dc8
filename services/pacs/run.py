"""The PACS round trip as one flow: fetch a series, run a capability, store SEG/SR back, find them.

``wlcad pacs run`` and the Detection service's ``DetectToPacs`` (through the gateway) are this: QIDO-RS size check (a series over the
service's limits is refused before a pixel is fetched) → WADO-RS fetch into a private temp folder →
the same header checks an upload gets → the capability (a CADe task, or label estimation from
prompts) → DICOM SEG and SR TID 1500 built from the fetched instances → STOW-RS into the source's
study → QIDO-RS, by the new series, confirming each stored SOP Instance is found.

Every check on the request (URL, UIDs, task, prompts, cut-off, model) runs before the fetch, so a bad
request costs no transfer. Results carry what DICOM requires of the source (patient and study
modules, references) and nothing more (:mod:`services.core.io.dicom_seg`); the log says counts and
the task, never a UID or a patient attribute.
"""

from __future__ import annotations

import io
import logging
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pydicom

from services.cade.cutoff import Cutoff
from services.cade.tasks import TASKS
from services.core.errors import InputError
from services.core.uids import check_uid
from services.core.volume import Volume
from services.pacs.client import PacsClient
from services.pacs.prompts import PromptSpec

log = logging.getLogger("wlcad.pacs")

LABEL_ESTIMATION = "label-estimation"
#: What ``--task`` accepts: every CADe task, and label estimation (which needs prompts).
PACS_TASKS = (*TASKS, LABEL_ESTIMATION)


@dataclass(frozen=True)
class PacsRunRequest:
    """One round trip. ``prompts`` only (and required) for label estimation; ``threshold`` /
    ``fp_rate`` only for detection (see :class:`services.cade.cutoff.Cutoff`)."""

    url: str
    study: str
    series: str
    task: str
    prompts: tuple[PromptSpec, ...] = ()
    method: str = "unet"
    threshold: float | None = None
    fp_rate: float | None = None
    model_repository: Path | None = None
    inference: str | None = None
    timeout_s: float = 30.0
    total_timeout_s: float = 600.0
    headers: dict[str, str] | None = field(default=None, repr=False)

    def check(self) -> None:
        """Everything that can be refused without the server (errors name the option)."""
        check_uid(self.study, "study")
        check_uid(self.series, "series")
        if self.task not in PACS_TASKS:
            raise InputError(f"{self.task!r}: use one of {', '.join(PACS_TASKS)}", field="task")
        if self.task == LABEL_ESTIMATION:
            from services.label_estimation.pipeline import METHODS

            if not self.prompts:
                raise InputError("label estimation needs lesion prompts (centre + diameter)", field="prompts")
            if self.method not in METHODS:
                raise InputError(f"{self.method!r}: use one of {', '.join(METHODS)}", field="method")
            if self.threshold is not None or self.fp_rate is not None:
                raise InputError("is for detection tasks", field="threshold")
        else:
            if self.prompts:
                raise InputError(f"{self.task} detects without prompts", field="prompts")
            Cutoff(self.threshold, self.fp_rate)


@dataclass(frozen=True)
class StoredObject:
    """One result object sent by STOW-RS; ``found``: QIDO-RS lists it in its series afterwards."""

    kind: str  # "seg" or "sr"
    sop_class_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    found: bool = False


@dataclass(frozen=True)
class PacsRunResult:
    task: str
    instances_fetched: int
    findings: int
    model_version: str
    stored: tuple[StoredObject, ...]

    @property
    def all_found(self) -> bool:
        return bool(self.stored) and all(o.found for o in self.stored)

    def as_dict(self) -> dict:
        return {**asdict(self), "all_found": self.all_found}


@dataclass
class _Outcome:
    """What the capability made: the Part 10 objects to store, how many findings, which model."""

    objects: list[tuple[str, bytes]]
    findings: int
    model_version: str


# -- capabilities ---------------------------------------------------------------------------------


def _open_model(request: PacsRunRequest, stack: ExitStack, bound=None):
    """The task's model, opened before the fetch (a missing model costs no transfer); ``None`` for a
    label-estimation method without one. Closed when ``stack`` closes; ``bound``, a model the caller
    already holds (a service's), is used as it is and left open."""
    if bound is not None:
        return bound
    if request.task != LABEL_ESTIMATION:
        from services.cade.model import CadeModel
        from services.cade.tasks import task_named

        return stack.enter_context(
            CadeModel(task_named(request.task), request.inference, request.model_repository)
        )
    if request.method != "unet":
        return None
    from services.label_estimation.model import UnetModel

    model = UnetModel(request.inference, request.model_repository)
    stack.callback(model.close)
    return model


def _detect(request: PacsRunRequest, model, image: Volume, folder: Path) -> _Outcome:
    """CADe: the SR of every candidate (an empty one when none) and, on a 3D image with candidates,
    a SEG of their spheres."""
    from services.cade.cutoff import detect_at
    from services.cade.dicom_outputs import detection_seg_bytes
    from services.core.io.dicom_sr import detection_sr_bytes

    task = model.task
    kept = detect_at(model, image, Cutoff(request.threshold, request.fp_rate).resolve(model))
    objects = [("sr", detection_sr_bytes(kept, image, folder, model_name=task.model_name))]
    if kept.candidates and task.dims == 3:  # a radiograph has no patient space for a SEG: SR only
        objects.insert(0, ("seg", detection_seg_bytes(kept, task, image, folder)))
    return _Outcome(objects, len(kept.candidates), kept.model_version)


def _estimate(request: PacsRunRequest, model, image: Volume, folder: Path) -> _Outcome:
    """Label estimation at the prompts: the SEG of the lesions, and the SR of their measurements."""
    from services.label_estimation.outputs import dicom_seg_bytes, dicom_sr_bytes
    from services.label_estimation.pipeline import LabelEstimator

    prompts = [spec.resolve(image) for spec in request.prompts]
    types = {spec.lesion_id: spec.lesion_type for spec in request.prompts if spec.lesion_type}
    estimates = LabelEstimator(model).estimate(image, prompts, request.method)
    seg = dicom_seg_bytes(image, estimates, folder, types)
    sr = dicom_sr_bytes(image, estimates, folder, seg, types)
    found = sum(1 for e in estimates if e.mask.voxel_count)
    return _Outcome([("seg", seg), ("sr", sr)], found, model.version if model is not None else request.method)


# -- the flow -------------------------------------------------------------------------------------


def _read(data: bytes) -> pydicom.Dataset:
    with warnings.catch_warnings():  # pydicom warnings may quote values (patient names)
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data))


def run_pacs(request: PacsRunRequest, client: PacsClient | None = None, model=None) -> PacsRunResult:
    """The round trip (see the module docstring). ``model``: the task's model when the caller holds
    it bound already (the Detection service does); else it is opened here for this run.

    Raises:
        InputError: the request (naming the option), a series over the limits or not there
            (``series``), a series a SEG/SR cannot reference (``seg``/``sr``).
        PacsUnavailableError: the server failed, timed out, or did not store the results.
    """
    from services.api.sources import check_declared_size, request_temp_dir
    from services.core.io import read_image
    from services.core.io.dicom_seg import check_seg_source
    from services.core.io.dicom_sr import check_sr_source

    request.check()
    client = client or PacsClient(
        request.url,
        timeout_s=request.timeout_s,
        total_timeout_s=request.total_timeout_s,
        headers=request.headers,
    )
    with ExitStack() as stack:
        model = _open_model(request, stack, model)
        size = client.series_size(request.study, request.series)
        client.check_size(size)
        log.info("series: %d instances, %d voxels stated; fetching", size.instances, size.voxels)
        folder = Path(stack.enter_context(request_temp_dir("pacs"))) / "series"
        fetched = client.fetch_series(request.study, request.series, folder)
        check_declared_size(folder, "series")
        image = read_image(folder, series_instance_uid=request.series)
        if request.task == LABEL_ESTIMATION:
            check_seg_source(image)
        else:
            check_sr_source(image)
        run = _estimate if request.task == LABEL_ESTIMATION else _detect
        outcome = run(request, model, image, folder)
    datasets = [(kind, _read(data)) for kind, data in outcome.objects]
    answer = client.store([ds for _, ds in datasets], request.study)
    stored_uids = {s.sop_instance_uid for s in answer.stored}
    stored = []
    for kind, ds in datasets:
        uid, series_uid = str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)
        found = uid in stored_uids and uid in client.instance_uids(request.study, series_uid)
        stored.append(StoredObject(kind, str(ds.SOPClassUID), series_uid, uid, found))
    log.info(
        "%s: %d findings; stored %d objects, %d found again",
        request.task,
        outcome.findings,
        len(stored),
        sum(o.found for o in stored),
    )
    return PacsRunResult(
        request.task, fetched.instances, outcome.findings, outcome.model_version, tuple(stored)
    )
