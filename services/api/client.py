"""A small synchronous client of the wlcad.v1 API (used by ``wlcad demo``, the tests and the bench).

Volumes up to :data:`UNARY_LIMIT_BYTES` go in one ``Estimate`` message; bigger ones, and image
files, are streamed with ``EstimateUpload`` in chunks of at most 4 MiB, so the client never holds a
second copy of a big volume. ``outputs`` (``DICOM_SEG``, ``DICOM_SR`` of :mod:`services.api.pb.common_pb2`)
asks for the lesions' DICOM SEG and SR too, returned as Part 10 bytes in ``dicom_seg`` / ``dicom_sr``
(DICOM sources only; the SR needs the SEG).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np

from services.api import limits
from services.api.convert import volume_to_proto
from services.api.pb import common_pb2, image_pb2
from services.api.pb import label_estimation_pb2 as pb
from services.api.pb import label_estimation_pb2_grpc as pb_grpc
from services.api.upload import upload_shape
from services.core.lesion_prompt import LesionPrompt
from services.core.volume import Volume
from services.label_estimation.wire import prompts_to_proto

UNARY_LIMIT_BYTES = 16 * 1024 * 1024
UPLOAD_METHOD = "/wlcad.v1.LabelEstimation/EstimateUpload"
UPLOAD = upload_shape(pb.EstimateUploadMessage.DESCRIPTOR)


def channel(
    address: str, root_ca: bytes | None = None, client_cert: tuple[bytes, bytes] | None = None
) -> grpc.Channel:
    options = [
        ("grpc.max_receive_message_length", limits.MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", limits.MAX_MESSAGE_BYTES),
    ]
    if root_ca is None:
        return grpc.insecure_channel(address, options=options)
    key, cert = client_cert if client_cert else (None, None)
    credentials = grpc.ssl_channel_credentials(root_ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(address, credentials, options=options)


def zip_folder(folder: Path) -> bytes:
    """A DICOM series folder as an in-memory zip (stored, DICOM pixels are often compressed already)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zipped:
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            zipped.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


class LabelEstimationClient:
    """``LabelEstimation`` over one channel (the gateway's or a service's address)."""

    def __init__(self, address: str, token: str | None = None, channel_: grpc.Channel | None = None) -> None:
        self._channel = channel_ or channel(address)
        self._stub = pb_grpc.LabelEstimationStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        # Uploads send pre-serialised messages (bytes pass through unchanged without a serializer).
        self._upload = self._channel.stream_unary(
            UPLOAD_METHOD, response_deserializer=pb.EstimateResponse.FromString
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LabelEstimationClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def describe(self, timeout: float = 10.0) -> common_pb2.ServiceDescription:
        return self._stub.Describe(common_pb2.DescribeRequest(), timeout=timeout, metadata=self._metadata)

    def estimate_request(self, request: pb.EstimateRequest, timeout: float = 120.0) -> pb.EstimateResponse:
        return self._stub.Estimate(request, timeout=timeout, metadata=self._metadata)

    def estimate_volume(
        self,
        volume: Volume,
        prompts: Sequence[LesionPrompt],
        method: str,
        timeout: float = 120.0,
        outputs: Sequence[int] = (),
    ) -> pb.EstimateResponse:
        """Unary for small volumes, a chunked upload for big ones."""
        lesions = prompts_to_proto(prompts)
        if volume.array.nbytes <= UNARY_LIMIT_BYTES:
            source = image_pb2.ImageSource(volume=volume_to_proto(volume))
            return self.estimate_request(
                pb.EstimateRequest(image=source, lesions=lesions, method=method, outputs=list(outputs)),
                timeout,
            )
        header = volume_to_proto(volume, with_data=False)
        request = pb.EstimateRequest(
            image=image_pb2.ImageSource(volume=header), lesions=lesions, method=method, outputs=list(outputs)
        )
        array = np.ascontiguousarray(volume.array, dtype=volume.array.dtype.newbyteorder("<"))
        return self.upload(request, memoryview(array).cast("B"), timeout)

    def estimate_file(
        self,
        path: Path,
        prompts: Sequence[LesionPrompt],
        method: str,
        timeout: float = 120.0,
        outputs: Sequence[int] = (),
    ) -> pb.EstimateResponse:
        """An image file (or a DICOM series folder, sent as a zip): the service reads it."""
        path = Path(path)
        content = zip_folder(path) if path.is_dir() else path.read_bytes()
        filename = f"{path.name}.zip" if path.is_dir() else path.name
        lesions = prompts_to_proto(prompts)
        if len(content) <= UNARY_LIMIT_BYTES:
            source = image_pb2.ImageSource(file=image_pb2.ImageFile(filename=filename, content=content))
            return self.estimate_request(
                pb.EstimateRequest(image=source, lesions=lesions, method=method, outputs=list(outputs)),
                timeout,
            )
        source = image_pb2.ImageSource(file=image_pb2.ImageFile(filename=filename))
        request = pb.EstimateRequest(image=source, lesions=lesions, method=method, outputs=list(outputs))
        return self.upload(request, content, timeout)

    def upload(
        self, request: pb.EstimateRequest, data: bytes | memoryview, timeout: float = 120.0
    ) -> pb.EstimateResponse:
        def messages() -> Iterator[bytes]:
            yield UPLOAD.first_message(request)
            yield from UPLOAD.chunk_messages(data)

        return self._upload(messages(), timeout=timeout, metadata=self._metadata)

    def estimate_dose(
        self, volume: Volume, rtdose: bytes, isodose: str, timeout: float = 120.0
    ) -> pb.DoseResponse:
        request = pb.DoseRequest(
            image=image_pb2.ImageSource(volume=volume_to_proto(volume)), rtdose_dicom=rtdose, isodose=isodose
        )
        return self._stub.EstimateDose(request, timeout=timeout, metadata=self._metadata)
