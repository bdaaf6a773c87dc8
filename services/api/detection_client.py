"""A client of ``wlcad.v1.Detection`` (the gateway's address or the service's own).

Volumes up to the unary limit travel in one message, bigger ones as a chunked upload; a file (or a
DICOM series folder, zipped) is read by the service. Results come back as the pipeline's own
:class:`services.cade.pipeline.DetectionResult`, on the caller's image grid, so a demo, a test or a
PACS bridge scores them with the same code as ``wlcad detect``'s JSON. ``outputs`` (``DICOM_SR``,
``DICOM_SEG`` of :mod:`services.api.pb.common_pb2`) asks for the run's DICOM objects too; they come back
as Part 10 bytes in the response's ``dicom_sr`` / ``dicom_seg`` (DICOM sources only).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from services.api.client import UNARY_LIMIT_BYTES, channel, zip_folder
from services.api.convert import volume_to_proto
from services.api.pb import common_pb2, detection_pb2, detection_pb2_grpc, image_pb2
from services.api.upload import upload_shape
from services.cade.candidates import DetectionCandidate
from services.cade.pipeline import DetectionResult
from services.core.volume import Volume

UPLOAD_METHOD = "/wlcad.v1.Detection/DetectUpload"
UPLOAD = upload_shape(detection_pb2.DetectUploadMessage.DESCRIPTOR)


def result_from_proto(response: detection_pb2.DetectResponse) -> DetectionResult:
    """The service's answer as the pipeline's result type (candidates strongest first, as sent)."""
    candidates = tuple(
        DetectionCandidate(
            center_mm=tuple(float(v) for v in c.center_mm),
            center_voxel=tuple(int(v) for v in c.center_voxel),
            diameter_mm=float(c.diameter_mm),
            confidence=float(c.confidence),
        )
        for c in response.candidates
    )
    return DetectionResult(response.task, response.model_version, candidates)


class DetectionClient:
    """``Detection`` over one channel; ``threshold`` / ``fp_rate`` as in ``wlcad detect`` (neither:
    the model card's default operating point)."""

    def __init__(self, address: str, token: str | None = None) -> None:
        self._channel = channel(address)
        self._stub = detection_pb2_grpc.DetectionStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._upload = self._channel.stream_unary(
            UPLOAD_METHOD, response_deserializer=detection_pb2.DetectResponse.FromString
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DetectionClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def describe(self, timeout: float = 10.0) -> detection_pb2.DetectionDescription:
        return self._stub.Describe(common_pb2.DescribeRequest(), timeout=timeout, metadata=self._metadata)

    def _request(
        self,
        task: str,
        source: image_pb2.ImageSource,
        threshold: float | None,
        fp_rate: float | None,
        outputs: Sequence[int] = (),
    ) -> detection_pb2.DetectRequest:
        request = detection_pb2.DetectRequest(task=task, image=source, outputs=list(outputs))
        if threshold is not None:
            request.threshold = threshold
        if fp_rate is not None:
            request.fp_rate = fp_rate
        return request

    def detect_volume(
        self,
        task: str,
        volume: Volume,
        *,
        threshold: float | None = None,
        fp_rate: float | None = None,
        outputs: Sequence[int] = (),
        timeout: float = 300.0,
    ) -> detection_pb2.DetectResponse:
        if volume.array.nbytes <= UNARY_LIMIT_BYTES:
            source = image_pb2.ImageSource(volume=volume_to_proto(volume))
            request = self._request(task, source, threshold, fp_rate, outputs)
            return self._stub.Detect(request, timeout=timeout, metadata=self._metadata)
        header = image_pb2.ImageSource(volume=volume_to_proto(volume, with_data=False))
        array = np.ascontiguousarray(volume.array, dtype=volume.array.dtype.newbyteorder("<"))
        return self._send_upload(
            self._request(task, header, threshold, fp_rate, outputs), memoryview(array).cast("B"), timeout
        )

    def detect_file(
        self,
        task: str,
        path: Path,
        *,
        threshold: float | None = None,
        fp_rate: float | None = None,
        outputs: Sequence[int] = (),
        timeout: float = 300.0,
    ) -> detection_pb2.DetectResponse:
        """An image file, or a DICOM series folder sent as a zip: the service reads it."""
        path = Path(path)
        content = zip_folder(path) if path.is_dir() else path.read_bytes()
        filename = f"{path.name}.zip" if path.is_dir() else path.name
        if len(content) <= UNARY_LIMIT_BYTES:
            source = image_pb2.ImageSource(file=image_pb2.ImageFile(filename=filename, content=content))
            request = self._request(task, source, threshold, fp_rate, outputs)
            return self._stub.Detect(request, timeout=timeout, metadata=self._metadata)
        source = image_pb2.ImageSource(file=image_pb2.ImageFile(filename=filename))
        return self._send_upload(self._request(task, source, threshold, fp_rate, outputs), content, timeout)

    def _send_upload(
        self, request: detection_pb2.DetectRequest, data: bytes | memoryview, timeout: float
    ) -> detection_pb2.DetectResponse:
        def messages() -> Iterator[bytes]:
            yield UPLOAD.first_message(request)
            yield from UPLOAD.chunk_messages(data)

        return self._upload(messages(), timeout=timeout, metadata=self._metadata)
