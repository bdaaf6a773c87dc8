"""The LabelEstimation gRPC service: a thin adapter from ``wlcad.v1`` messages to the pipeline.

Everything the pipeline needs is validated on the way in (``services.api.convert``/``sources``),
every failure leaves through :func:`services.api.status.grpc_status`, and compute runs in a fixed
number of slots so a burst of requests queues (visible as ``wlcad_queue_depth``) instead of
thrashing two cores.
"""

from __future__ import annotations

import logging
import mmap
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import grpc
from scipy import ndimage

from services.api import limits
from services.api.chunks import chunk_data
from services.api.convert import (
    expected_bytes,
    pack_mask,
    prompts_from_proto,
    volume_from_proto,
    volume_to_proto,
)
from services.api.pb import label_estimation_pb2 as pb
from services.api.pb import label_estimation_pb2_grpc as pb_grpc
from services.api.sources import volume_from_file, volume_from_source
from services.api.status import PreconditionError, grpc_status
from services.core.errors import InputError
from services.core.lesion_measurements import measure_lesion
from services.core.volume import Volume
from services.inference.factory import default_repository
from services.inference.repository import ModelRepository
from services.label_estimation.dose import Isodose, dose_labels, read_rtdose
from services.label_estimation.pipeline import METHODS, LabelEstimator, LesionEstimate, software_version
from services.label_estimation.unet import MODEL_NAME
from services.servers.grpc_server import parse_request
from services.servers.observability import IN_FLIGHT, INFERENCE, QUEUE_DEPTH, observe

COMPONENT = "label-estimation"
log = logging.getLogger("wlcad.label_estimation")
T = TypeVar("T")


def _measurements(values: dict) -> pb.Measurements:
    return pb.Measurements(
        voxels=int(values.get("voxels", 0)),
        volume_mm3=float(values.get("volume_mm3", 0.0)),
        center_mm=[float(v) for v in values.get("center_mm", [])],
        max_diameter_mm=float(values.get("max_diameter_mm", 0.0)),
        axial_long_mm=float(values.get("axial_long_mm", 0.0)),
        axial_short_mm=float(values.get("axial_short_mm", 0.0)),
    )


def lesion_result(estimate: LesionEstimate) -> pb.LesionResult:
    tight = estimate.mask.tight()
    qc = estimate.qc
    check = pb.QualityCheck(
        passed=bool(qc.get("passed", False)),
        empty=bool(qc.get("empty", False)),
        diameter_ratio=float(qc.get("diameter_ratio", 0.0)),
        center_offset_mm=float(qc.get("center_offset_mm", 0.0)),
    )
    if "mean_probability_inside" in qc:
        check.mean_probability_inside = float(qc["mean_probability_inside"])
    return pb.LesionResult(
        lesion_id=estimate.lesion_id,
        method=estimate.method,
        mask=pack_mask(tight.start_xyz, tight.mask_zyx),
        measurements=_measurements(estimate.measurements),
        qc=check,
        model_version=estimate.model_version or "",
    )


class LabelEstimationServicer(pb_grpc.LabelEstimationServicer):
    """Serves the pipeline; ``compute_slots`` bounds how many requests compute at once."""

    #: Uploads receive the messages' bytes: voxel chunks are copied straight into the volume.
    RAW_REQUEST_STREAMS = ("EstimateUpload",)

    def __init__(
        self,
        dicomweb_servers: Sequence[str] = (),
        compute_slots: int = 2,
        inference_setting: str | None = None,
        model_repository: Path | None = None,
    ) -> None:
        self._dicomweb = tuple(dicomweb_servers)
        self._slots = threading.BoundedSemaphore(max(1, compute_slots))
        self._inference_setting = inference_setting
        self._repository = Path(model_repository) if model_repository else default_repository()
        self._unet_lock = threading.Lock()
        self._unet = None

    # -- the RPCs ---------------------------------------------------------------------------------
    def Estimate(self, request: pb.EstimateRequest, context: grpc.ServicerContext) -> pb.EstimateResponse:  # noqa: N802 - gRPC names
        return self._handle("Estimate", context, lambda: self._estimate(request, None))

    def EstimateUpload(  # noqa: N802 - gRPC names
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> pb.EstimateResponse:
        """``request_iterator`` yields serialised ``EstimateUploadMessage``s (see RAW_REQUEST_STREAMS)."""
        return self._handle(
            "EstimateUpload", context, lambda: self._upload(request_iterator), compute_after=True
        )

    def EstimateDose(self, request: pb.DoseRequest, context: grpc.ServicerContext) -> pb.DoseResponse:  # noqa: N802 - gRPC names
        return self._handle("EstimateDose", context, lambda: self._dose(request))

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.ServiceDescription:  # noqa: N802 - gRPC names
        return self._handle("Describe", context, self._describe, use_slot=False)

    # -- one place for admission, metrics, logging and error mapping -------------------------------
    def _handle(
        self,
        method: str,
        context: grpc.ServicerContext,
        work: Callable[[], T],
        use_slot: bool = True,
        compute_after: bool = False,
    ) -> T:
        started = time.perf_counter()
        IN_FLIGHT.labels(COMPONENT).inc()
        code, message = grpc.StatusCode.OK, ""
        try:
            if use_slot and not compute_after:
                with self._slot(context):
                    return work()
            return work()
        except Exception as exc:
            code, message, incident = grpc_status(exc)
            if incident:
                log.error("%s failed: %s (incident %s)", method, type(exc).__name__, incident, exc_info=False)
            elif isinstance(exc, InputError):
                log.info("%s refused: invalid field %s", method, exc.field)
        finally:
            IN_FLIGHT.labels(COMPONENT).dec()
            observe(COMPONENT, method, code.name, started)
        context.abort(code, message)
        raise AssertionError("unreachable")  # context.abort raises

    class _SlotContext:
        def __init__(self, outer: LabelEstimationServicer, context: grpc.ServicerContext | None) -> None:
            self._outer, self._context = outer, context

        def __enter__(self) -> None:
            QUEUE_DEPTH.labels(COMPONENT).inc()
            try:
                timeout = self._context.time_remaining() if self._context is not None else None
                if not self._outer._slots.acquire(timeout=timeout):
                    raise _DeadlineError()
            finally:
                QUEUE_DEPTH.labels(COMPONENT).dec()

        def __exit__(self, *exc_info) -> None:
            self._outer._slots.release()

    def _slot(self, context: grpc.ServicerContext | None) -> LabelEstimationServicer._SlotContext:
        return self._SlotContext(self, context)

    # -- implementations --------------------------------------------------------------------------
    def _estimator(self, method: str) -> LabelEstimator:
        if method not in METHODS:
            raise InputError(
                f"unknown method {method[:32]!r}; choose one of {', '.join(METHODS)}", field="method"
            )
        if method != "unet":
            return LabelEstimator()
        with self._unet_lock:
            if self._unet is None:
                reason = self._unet_unavailable_reason()
                if reason:
                    raise PreconditionError(reason)
                from services.label_estimation.model import UnetModel

                self._unet = UnetModel(self._inference_setting, self._repository)
            return LabelEstimator(self._unet.infer, self._unet.version, self._unet.max_batch)

    def _unet_unavailable_reason(self) -> str:
        try:
            versions = ModelRepository(self._repository).versions(MODEL_NAME)
        except (InputError, OSError):
            versions = []
        if versions:
            return ""
        return f"the unet method needs model {MODEL_NAME} in the model repository, which does not hold it yet"

    def _estimate(self, request: pb.EstimateRequest, image: Volume | None) -> pb.EstimateResponse:
        estimator = self._estimator(request.method)
        prompts = prompts_from_proto(request.lesions)
        if image is None:
            image = volume_from_source(request.image, self._dicomweb)
        started = time.perf_counter()
        estimates = estimator.estimate(image, prompts, request.method)
        version = next((e.model_version for e in estimates if e.model_version), None) or software_version()
        INFERENCE.labels(request.method, version).observe(time.perf_counter() - started)
        return pb.EstimateResponse(
            lesions=[lesion_result(e) for e in estimates],
            software_version=software_version(),
            grid=volume_to_proto(image, with_data=False),
        )

    def _upload(self, messages: Iterator[bytes]) -> pb.EstimateResponse:
        data = next(messages, None)
        first = None if data is None else parse_request(pb.EstimateUploadMessage, data)
        if first is None or first.WhichOneof("part") != "request":
            raise InputError("the first message of an upload must carry the request", field="request")
        request = first.request
        self._estimator(request.method)  # refuse an unknown/unavailable method before receiving voxels
        prompts_from_proto(request.lesions)
        kind = request.image.WhichOneof("source")
        if kind == "volume":
            if request.image.volume.data:
                raise InputError(
                    "must be empty in an upload; send voxels in chunks", field="request.image.volume.data"
                )
            buffer = _volume_buffer(expected_bytes(request.image.volume, "request.image.volume"))
        elif kind == "file":
            if request.image.file.content:
                raise InputError(
                    "must be empty in an upload; send bytes in chunks", field="request.image.file.content"
                )
            buffer = bytearray()
        else:
            raise InputError("an upload carries a volume or a file", field="request.image")
        received = _receive_chunks(messages, buffer, fixed=kind == "volume")
        if kind == "volume":
            if received != len(buffer):
                raise InputError(
                    f"the stream ended after {received} of {len(buffer)} bytes", field="chunk.data"
                )
            image = volume_from_proto(request.image.volume, data=buffer, field="request.image.volume")
        else:
            image = volume_from_file(request.image.file.filename, buffer, "request.image.file")
        with self._slot(None):
            return self._estimate(request, image)

    def _dose(self, request: pb.DoseRequest) -> pb.DoseResponse:
        if not request.rtdose_dicom:
            raise InputError("give the RT Dose DICOM file's bytes", field="rtdose_dicom")
        isodose = Isodose.parse(request.isodose[:32])
        image = volume_from_source(request.image, self._dicomweb)
        with tempfile.TemporaryDirectory(prefix="wlcad-dose-") as work:
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
            weak = measure_lesion(region, start_zyx, image, target["label"])
            results.append(
                pb.DoseTarget(
                    label=target["label"],
                    mask=pack_mask(start_zyx[::-1], region),
                    measurements=pb.Measurements(
                        voxels=int(region.sum()),
                        volume_mm3=float(weak.volume_mm3),
                        center_mm=[float(v) for v in weak.center_mm],
                        max_diameter_mm=float(weak.diameter_mm),
                        axial_long_mm=float(weak.axial_long_mm),
                        axial_short_mm=float(weak.axial_short_mm),
                    ),
                    max_dose_gy=float(target["peak_dose_gy"]),
                    threshold_gy=float(target["isodose_gy"]),
                )
            )
        return pb.DoseResponse(
            targets=results, software_version=software_version(), grid=volume_to_proto(image, with_data=False)
        )

    def _describe(self) -> pb.ServiceDescription:
        methods = []
        for name in METHODS:
            reason = self._unet_unavailable_reason() if name == "unet" else ""
            version = ""
            if name == "unet" and not reason:
                versions = ModelRepository(self._repository).versions(MODEL_NAME)
                version = f"{MODEL_NAME}/{versions[-1]}"
            methods.append(
                pb.MethodInfo(name=name, available=not reason, reason=reason, model_version=version)
            )
        return pb.ServiceDescription(
            methods=methods,
            software_version=software_version(),
            inference_backend=self._inference_setting or "embedded",
        )

    def close(self) -> None:
        with self._unet_lock:
            if self._unet is not None:
                self._unet.close()
                self._unet = None


class _DeadlineError(TimeoutError):
    """The caller's deadline passed while its request waited for a compute slot."""


def _volume_buffer(size: int) -> bytearray | memoryview:
    """A byte buffer for an upload's voxels, its pages mapped up front (``MAP_POPULATE``).

    ``bytearray(size)`` zero-fills page by page, one page fault each: ~0.15 s per 150 MiB in this
    VM, a third of the upload. Populating the mapping in one call costs ~0.08 s, steadily; numpy's
    transparent huge pages were faster when free huge pages existed but stalled 0.3-0.7 s on memory
    compaction when not. Every byte is written before use, or the upload is refused."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if not populate or size == 0:
        return bytearray(size)
    return memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate))


def _chunk_bytes(message: bytes, number: int) -> bytes | memoryview:
    """A chunk's data: a view into the message in the usual encoding, else decoded by protobuf."""
    data = chunk_data(message)
    if data is not None:
        return data
    parsed = parse_request(pb.EstimateUploadMessage, message)
    if parsed.WhichOneof("part") != "chunk":
        raise InputError(f"message {number}: only chunks may follow the request", field="request")
    return parsed.chunk.data


def _receive_chunks(messages: Iterator[bytes], buffer: bytearray | memoryview, fixed: bool) -> int:
    """Copy chunk bytes into ``buffer`` (pre-sized when ``fixed``); returns the bytes received."""
    view = memoryview(buffer) if fixed else None
    received = 0
    for number, message in enumerate(messages, start=1):
        data = _chunk_bytes(message, number)
        if len(data) > limits.MAX_CHUNK_BYTES:
            raise InputError(
                f"message {number}: chunks are at most {limits.MAX_CHUNK_BYTES} bytes", field="chunk.data"
            )
        if fixed:
            if received + len(data) > len(buffer):
                raise InputError(f"more bytes than the volume's {len(buffer)}", field="chunk.data")
            view[received : received + len(data)] = data
        else:
            if received + len(data) > limits.MAX_UPLOAD_BYTES:
                raise InputError(f"the file exceeds {limits.MAX_UPLOAD_BYTES} bytes", field="chunk.data")
            buffer += data
        received += len(data)
    return received


def serve(
    address: str,
    metrics_address: str | None,
    dicomweb_servers: Sequence[str] = (),
    compute_slots: int = 2,
    inference_setting: str | None = None,
) -> int:
    """Run the service process until SIGTERM."""
    from services.servers.grpc_server import run_service, servicer_handler

    servicer = LabelEstimationServicer(dicomweb_servers, compute_slots, inference_setting)
    service = pb.DESCRIPTOR.services_by_name["LabelEstimation"]
    return run_service(
        service.full_name,
        lambda server: server.add_generic_rpc_handlers((servicer_handler(servicer, service),)),
        address,
        metrics_address,
        on_stop=servicer.close,
    )
