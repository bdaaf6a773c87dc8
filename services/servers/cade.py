"""The Detection gRPC service (CADe): a thin adapter from ``wlcad.v1`` messages to the pipeline.

Slots, uploads, deadlines, error mapping and metrics come from the scaffold
(:mod:`services.servers.scaffold`); the cut-off is resolved by :mod:`services.cade.cutoff`, as
``wlcad detect`` resolves it, so the service and the CLI answer the same candidates.

A task's model ``cade_<task>`` is bound on first use and kept. A task whose model the repository
lacks (or holds in a form that cannot serve the task) leaves the service running: ``Describe`` lists
the task as unavailable with the reason, and ``Detect`` answers FAILED_PRECONDITION naming the task —
looked up again on every request, so a model registered later is served without a restart.

``outputs`` adds the run's DICOM SR (TID 1500) and, on a 3D task, a SEG of the candidates' spheres,
made as ``wlcad pacs run`` makes them (:mod:`services.servers.dicom_outputs`). ``DetectToPacs`` is
``wlcad pacs run`` itself on a series of one of the service's configured DICOMweb servers: fetch,
detect, STOW-RS of the SEG/SR into the source's study, QIDO-RS to find them; never retried.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
import pydicom

from services.api.convert import volume_to_proto
from services.api.pb import common_pb2, pacs_pb2
from services.api.pb import detection_pb2 as pb
from services.api.status import PreconditionError
from services.api.upload import upload_shape
from services.cade.cutoff import Cutoff, detect_at
from services.cade.model import CadeModel
from services.cade.pipeline import DetectionResult
from services.cade.tasks import TASKS, CadeTask, task_named
from services.core.errors import InputError
from services.core.version import software_version
from services.core.volume import Volume
from services.servers import dicom_outputs, pacs_calls
from services.servers.dicom_outputs import NO_OUTPUTS, DicomOutputsServicer, Outputs
from services.servers.observability import INFERENCE
from services.servers.scaffold import MethodStatus, ServiceSettings

UPLOAD = upload_shape(pb.DetectUploadMessage.DESCRIPTOR)


@dataclass(frozen=True)
class _Prepared:
    """A Detect request checked before its image: the task, its bound model, the cut-off, the DICOM
    objects asked for and (an upload asking for them) the source headers."""

    request: pb.DetectRequest
    task: CadeTask
    model: CadeModel
    threshold: float
    outputs: Outputs = NO_OUTPUTS
    headers: list[pydicom.Dataset] | None = None


class DetectionServicer(DicomOutputsServicer):
    """Serves :class:`services.cade.pipeline.Detector` for every task of :data:`services.cade.tasks.TASKS`."""

    component = "cade"

    def __init__(self, settings: ServiceSettings | None = None) -> None:
        super().__init__(settings or ServiceSettings())
        self._models_lock = threading.Lock()
        self._models: dict[str, CadeModel] = {}

    # -- the RPCs ---------------------------------------------------------------------------------
    def Detect(self, request: pb.DetectRequest, context: grpc.ServicerContext) -> pb.DetectResponse:  # noqa: N802 - gRPC names
        return self.handle("Detect", context, lambda: self._detect(self._prepare(request), None))

    def DetectUpload(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> pb.DetectResponse:  # noqa: N802 - gRPC names
        return self.handle_upload("DetectUpload", context, messages, UPLOAD, self._prepare, self._detect)

    def DetectToPacs(  # noqa: N802 - gRPC names
        self, request: pb.PacsDetectRequest, context: grpc.ServicerContext
    ) -> pacs_pb2.PacsStoreResponse:
        return self.handle("DetectToPacs", context, lambda: self._to_pacs(request))

    def methods(self) -> Sequence[MethodStatus]:
        return [self._status(task) for task in TASKS.values()]

    def describe(self) -> pb.DetectionDescription:
        """The scaffold's description (tasks as methods) plus each task's model, dimensionality,
        operating points and default cut-off."""
        tasks = [self._task_info(task) for task in TASKS.values()]
        return pb.DetectionDescription(
            methods=[
                common_pb2.MethodInfo(
                    name=t.name, available=t.available, reason=t.reason, model_version=t.model_version
                )
                for t in tasks
            ],
            software_version=software_version(),
            inference_backend=self.settings.inference_setting or "embedded",
            tasks=tasks,
        )

    def close(self) -> None:
        with self._models_lock:
            for model in self._models.values():
                model.close()
            self._models.clear()

    # -- implementations --------------------------------------------------------------------------
    def _prepare(self, request: pb.DetectRequest) -> _Prepared:
        """Task, cut-off and model, checked once before the image (an upload is refused before any
        byte of it arrives)."""
        task = task_named(request.task)
        cutoff = Cutoff(
            request.threshold if request.HasField("threshold") else None,
            request.fp_rate if request.HasField("fp_rate") else None,
        )
        outputs = dicom_outputs.requested_outputs(request.outputs)
        if outputs.seg and task.dims == 2:
            raise InputError(
                f"{task.name} works on radiographs, which have no patient space for a DICOM SEG; ask for "
                "DICOM_SR",
                field=dicom_outputs.FIELD,
            )
        dicom_outputs.check_request(outputs, request.image)
        model = self._model(task)
        return _Prepared(request, task, model, cutoff.resolve(model), outputs)

    def _model(self, task: CadeTask) -> CadeModel:
        """The task's bound model; PreconditionError (naming the task) when it cannot be served."""
        with self._models_lock:
            if task.name not in self._models:
                status = self.model_status(task.name, task.model_name)
                if not status.available:
                    raise PreconditionError(
                        f"the {task.name} task needs model {task.model_name} in the model repository, "
                        "which does not hold it yet"
                    )
                try:
                    model = CadeModel(task, self.settings.inference_setting, self.repository)
                except InputError as exc:  # the model cannot serve the task, or its card is unreadable
                    raise PreconditionError(f"the {task.name} task cannot be served: {exc.message}") from None
                self._models[task.name] = model
            return self._models[task.name]

    def _status(self, task: CadeTask) -> MethodStatus:
        try:
            model = self._model(task)
        except PreconditionError as exc:
            return MethodStatus(task.name, available=False, reason=str(exc))
        return MethodStatus(task.name, model_version=model.version)

    def _task_info(self, task: CadeTask) -> pb.DetectionTask:
        status = self._status(task)
        info = pb.DetectionTask(
            name=task.name,
            available=status.available,
            reason=status.reason,
            dims=task.dims,
            description=task.description,
            model=task.model_name,
            model_version=status.model_version,
            default_threshold=task.default_threshold,
        )
        if status.available:
            model = self._model(task)
            info.operating_points.extend(
                pb.OperatingPoint(fp_per_case=rate, threshold=threshold)
                for rate, threshold in model.operating_points.items()
            )
            info.default_threshold = model.default_threshold()
        return info

    def _to_pacs(self, request: pb.PacsDetectRequest) -> pacs_pb2.PacsStoreResponse:
        """``wlcad pacs run`` for one of the configured DICOMweb servers, on this service's bound
        model; everything checked (server, UIDs, task, cut-off, model) before a byte is fetched."""
        from services.pacs.run import PacsRunRequest, run_pacs

        base, study, series = pacs_calls.checked_series(request.series, self.settings.dicomweb_servers)
        task = task_named(request.task)
        run = PacsRunRequest(
            url=base,
            study=study,
            series=series,
            task=task.name,
            threshold=request.threshold if request.HasField("threshold") else None,
            fp_rate=request.fp_rate if request.HasField("fp_rate") else None,
            **pacs_calls.call_timeouts(),
        )
        run.check()
        return pacs_calls.store_response(run_pacs(run, model=self._model(task)))

    def _detect(self, prepared: _Prepared, image: Volume | None) -> pb.DetectResponse:
        headers = prepared.headers
        if image is None:
            image = self.image(prepared.request.image)
            if prepared.outputs.any:  # refused before the model runs; headers read once
                dicom_outputs.check_image(prepared.outputs, image)
                headers = dicom_outputs.source_headers(prepared.request.image, None)
        started = time.perf_counter()
        result = detect_at(prepared.model, image, prepared.threshold)
        INFERENCE.labels(prepared.task.name, result.model_version).observe(time.perf_counter() - started)
        response = result_to_proto(result, prepared.task, prepared.threshold, image)
        if prepared.outputs.any:
            _add_outputs(response, prepared, result, image, headers or [])
            dicom_outputs.check_size(response)
        return response


def _add_outputs(
    response: pb.DetectResponse,
    prepared: _Prepared,
    result: DetectionResult,
    image: Volume,
    headers: list[pydicom.Dataset],
) -> None:
    """The SR of the run and, when asked on a 3D task with candidates, the SEG of their spheres (the
    SEG and the SR of ``wlcad pacs run``; no SEG without a candidate: a SEG needs a segment)."""
    from services.cade.dicom_outputs import detection_seg_bytes
    from services.core.io.dicom_sr import detection_sr_bytes

    task = prepared.task
    with dicom_outputs.remapped(), dicom_outputs.header_folder(headers) as folder:
        if prepared.outputs.sr:
            response.dicom_sr = detection_sr_bytes(result, image, folder, model_name=task.model_name)
        if prepared.outputs.seg and result.candidates:
            response.dicom_seg = detection_seg_bytes(result, task, image, folder)


def result_to_proto(
    result: DetectionResult, task: CadeTask, threshold: float, image: Volume
) -> pb.DetectResponse:
    """The response: ``wlcad detect``'s JSON fields, the cut-off applied and the input grid."""
    return pb.DetectResponse(
        task=result.task,
        model=task.model_name,
        model_version=result.model_version,
        candidates=[
            pb.DetectionCandidate(
                center_mm=list(c.center_mm),
                center_voxel=[int(v) for v in c.center_voxel],
                diameter_mm=float(c.diameter_mm),
                confidence=float(c.confidence),
            )
            for c in result.candidates
        ],
        threshold=threshold,
        software_version=software_version(),
        grid=volume_to_proto(image, with_data=False),
    )
