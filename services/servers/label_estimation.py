"""The LabelEstimation gRPC service: a thin adapter from ``wlcad.v1`` messages to the pipeline.

Slots, uploads, deadlines, error mapping, metrics and ``Describe`` come from the scaffold
(:mod:`services.servers.scaffold`); this module only says what each RPC computes. ``outputs`` adds
the lesions' DICOM SEG and their measurements' SR (TID 1500), as ``wlcad estimate --seg --sr`` writes
them (:mod:`services.servers.dicom_outputs`), each lesion typed by its prompt's ``lesion_type``.
``EstimateToPacs`` is ``wlcad pacs run --task label-estimation`` itself on a series of one of the
service's configured DICOMweb servers (:mod:`services.servers.pacs_calls`): fetch, estimate at the
prompts, STOW-RS of the SEG/SR into the source's study, QIDO-RS to find them; never retried.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pydicom
from scipy import ndimage

from services.api.convert import measurements_to_proto, pack_mask, volume_to_proto
from services.api.pb import label_estimation_pb2 as pb
from services.api.pb import pacs_pb2
from services.api.sources import request_temp_dir
from services.api.status import PreconditionError
from services.api.upload import upload_shape
from services.core.errors import InputError
from services.core.lesion_measurements import measure_mask
from services.core.lesion_prompt import LesionPrompt
from services.core.version import software_version
from services.core.volume import Volume
from services.core.work_budget import checkpoint
from services.label_estimation.dose import Isodose, dose_labels, read_rtdose
from services.label_estimation.methods import METHODS, Method, method_named
from services.label_estimation.pipeline import LabelEstimator, LesionEstimate
from services.label_estimation.wire import estimate_to_proto, lesion_types, prompts_from_proto
from services.servers import dicom_outputs, pacs_calls
from services.servers.dicom_outputs import NO_OUTPUTS, DicomOutputsServicer, Outputs
from services.servers.observability import INFERENCE
from services.servers.scaffold import MethodStatus, ServiceSettings

UPLOAD = upload_shape(pb.EstimateUploadMessage.DESCRIPTOR)


@dataclass(frozen=True)
class _Prepared:
    """An Estimate request checked before its image: the method, its estimator, the prompts, the
    DICOM objects asked for and (an upload asking for them) the source headers."""

    request: pb.EstimateRequest
    method: Method
    estimator: LabelEstimator
    prompts: list[LesionPrompt]
    outputs: Outputs = NO_OUTPUTS
    headers: list[pydicom.Dataset] | None = None
    #: lesion id → the prompt's lesion type (checked with the prompts, before any image arrives).
    types: dict[int, str] = field(default_factory=dict)


class LabelEstimationServicer(DicomOutputsServicer):
    """Serves the pipeline; a method's model is loaded on its first request and kept."""

    component = "label-estimation"

    def __init__(self, settings: ServiceSettings | None = None) -> None:
        super().__init__(settings or ServiceSettings())
        self._models_lock = threading.Lock()
        self._models: dict[str, object] = {}

    # -- the RPCs ---------------------------------------------------------------------------------
    def Estimate(self, request: pb.EstimateRequest, context: grpc.ServicerContext) -> pb.EstimateResponse:  # noqa: N802 - gRPC names
        return self.handle("Estimate", context, lambda: self._estimate(self._prepare(request), None))

    def EstimateUpload(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> pb.EstimateResponse:  # noqa: N802 - gRPC names
        return self.handle_upload("EstimateUpload", context, messages, UPLOAD, self._prepare, self._estimate)

    def EstimateToPacs(  # noqa: N802 - gRPC names
        self, request: pb.PacsEstimateRequest, context: grpc.ServicerContext
    ) -> pacs_pb2.PacsStoreResponse:
        return self.handle("EstimateToPacs", context, lambda: self._to_pacs(request))

    def EstimateDose(self, request: pb.DoseRequest, context: grpc.ServicerContext) -> pb.DoseResponse:  # noqa: N802 - gRPC names
        return self.handle("EstimateDose", context, lambda: self._dose(request))

    def methods(self) -> Sequence[MethodStatus]:
        return [
            self.model_status(m.name, m.model) if m.model else MethodStatus(m.name) for m in METHODS.values()
        ]

    def close(self) -> None:
        with self._models_lock:
            for model in self._models.values():
                model.close()
            self._models.clear()

    # -- implementations --------------------------------------------------------------------------
    def _prepare(self, request: pb.EstimateRequest) -> _Prepared:
        """Everything about a request that is known before its image, checked once (an upload is
        refused before any voxel arrives)."""
        method = method_named(request.method)
        prompts = prompts_from_proto(request.lesions)
        outputs = dicom_outputs.requested_outputs(request.outputs)
        if outputs.sr and not outputs.seg:
            raise InputError(
                "the estimation SR reports each lesion on its SEG segment; ask for DICOM_SEG with DICOM_SR",
                field=dicom_outputs.FIELD,
            )
        dicom_outputs.check_request(outputs, request.image)
        types = lesion_types(request.lesions)
        return _Prepared(request, method, self._estimator(method), prompts, outputs, types=types)

    def _estimator(self, method: Method) -> LabelEstimator:
        return LabelEstimator(self._bound_model(method))

    def _bound_model(self, method: Method):
        """The method's model, loaded on first use and kept; None for a rule-based method."""
        if method.model is None:
            return None
        with self._models_lock:
            if method.model not in self._models:
                status = self.model_status(method.name, method.model)
                if not status.available:
                    raise PreconditionError(status.reason)
                from services.label_estimation.model import UnetModel

                self._models[method.model] = UnetModel(self.settings.inference_setting, self.repository)
            return self._models[method.model]

    def _to_pacs(self, request: pb.PacsEstimateRequest) -> pacs_pb2.PacsStoreResponse:
        """``wlcad pacs run --task label-estimation`` for one of the configured DICOMweb servers, on
        this service's bound model; server, UIDs, method, prompts and model checked before a byte is
        fetched."""
        from services.pacs.prompts import PromptSpec
        from services.pacs.run import LABEL_ESTIMATION, PacsRunRequest, run_pacs

        base, study, series = pacs_calls.checked_series(request.series, self.settings.dicomweb_servers)
        method = method_named(request.method)
        prompts = prompts_from_proto(request.lesions)
        types = lesion_types(request.lesions)
        for index, prompt in enumerate(prompts):
            if prompt.axes_mm is not None:
                raise InputError(
                    "is not taken by EstimateToPacs (sphere diameters only)",
                    field=f"lesions[{index}].axes_mm",
                )
        specs = tuple(
            PromptSpec(
                p.lesion_id, p.diameter_mm, center_mm=p.center_mm, lesion_type=types.get(p.lesion_id, "")
            )
            for p in prompts
        )
        run = PacsRunRequest(
            url=base,
            study=study,
            series=series,
            task=LABEL_ESTIMATION,
            prompts=specs,
            method=method.name,
            **pacs_calls.call_timeouts(),
        )
        run.check()
        return pacs_calls.store_response(run_pacs(run, model=self._bound_model(method)))

    def _estimate(self, prepared: _Prepared, image: Volume | None) -> pb.EstimateResponse:
        headers = prepared.headers
        if image is None:
            image = self.image(prepared.request.image)
            if prepared.outputs.any:  # refused before computing; headers read once
                dicom_outputs.check_image(prepared.outputs, image)
                headers = dicom_outputs.source_headers(prepared.request.image, None)
        started = time.perf_counter()
        estimates = prepared.estimator.estimate(image, prepared.prompts, prepared.method)
        version = next((e.model_version for e in estimates if e.model_version), None) or software_version()
        INFERENCE.labels(prepared.method.name, version).observe(time.perf_counter() - started)
        response = pb.EstimateResponse(
            lesions=[estimate_to_proto(e) for e in estimates],
            software_version=software_version(),
            grid=volume_to_proto(image, with_data=False),
        )
        if prepared.outputs.any:
            _add_outputs(response, prepared.outputs, estimates, image, headers or [], prepared.types)
            dicom_outputs.check_size(response)
        return response

    def _dose(self, request: pb.DoseRequest) -> pb.DoseResponse:
        if not request.rtdose_dicom:
            raise InputError("give the RT Dose DICOM file's bytes", field="rtdose_dicom")
        isodose = Isodose.parse(request.isodose[:32])
        image = self.image(request.image)
        with request_temp_dir("dose") as work:
            path = Path(work) / "rtdose.dcm"
            path.write_bytes(request.rtdose_dicom)
            try:
                dose = read_rtdose(path)
            except InputError as exc:
                raise InputError(exc.message.replace(path.name, "the file"), field="rtdose_dicom") from exc
            except MemoryError:
                raise
            except Exception as exc:
                raise InputError(
                    f"not a readable RT Dose ({type(exc).__name__})", field="rtdose_dicom"
                ) from exc
        checkpoint("reading the RT Dose")
        try:
            labels, targets = dose_labels(image, dose, isodose)
        except InputError as exc:
            raise InputError(exc.message, field="rtdose_dicom") from exc
        boxes = ndimage.find_objects(labels)
        results = []
        for target in targets:
            box = boxes[target["label"] - 1]
            region = labels[box] == target["label"]
            start_zyx = tuple(int(s.start) for s in box)
            results.append(
                pb.DoseTarget(
                    label=target["label"],
                    mask=pack_mask(start_zyx[::-1], region),
                    measurements=measurements_to_proto(measure_mask(region, start_zyx, image)),
                    max_dose_gy=float(target["peak_dose_gy"]),
                    threshold_gy=float(target["isodose_gy"]),
                )
            )
        return pb.DoseResponse(
            targets=results, software_version=software_version(), grid=volume_to_proto(image, with_data=False)
        )


def _add_outputs(
    response: pb.EstimateResponse,
    outputs: Outputs,
    estimates: list[LesionEstimate],
    image: Volume,
    headers: list[pydicom.Dataset],
    types: dict[int, str],
) -> None:
    """The SEG of the non-empty lesions and, when asked, the SR of their measurements on it; both
    left empty when every lesion came out empty (a SEG needs a segment; each lesion's QC says so)."""
    from services.label_estimation.outputs import dicom_seg_bytes, dicom_sr_bytes

    if not any(e.mask.voxel_count for e in estimates):
        return
    with dicom_outputs.remapped(), dicom_outputs.header_folder(headers) as folder:
        seg = dicom_seg_bytes(image, estimates, folder, types)
        response.dicom_seg = seg
        if outputs.sr:
            response.dicom_sr = dicom_sr_bytes(image, estimates, folder, seg, types)
