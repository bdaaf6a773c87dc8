"""DICOM SEG and SR in service answers (``outputs`` on DetectRequest and EstimateRequest).

A SEG or an SR must reference the instances the image was read from, and carry their patient and
study modules, so it can only be made when the request's image came as DICOM. What can be refused
from the request alone is refused before any byte of an upload arrives (:func:`check_request`);
what needs the image (a DICOM file without instance UIDs) before computing (:func:`check_image`).

The writers (:mod:`services.core.io.dicom_seg`, :mod:`services.core.io.dicom_sr`) read the source
headers from a folder, and :mod:`services.api.sources` removes its temporary folder once the
Volume is read. So the headers are taken again from what the request brought, pixels left out:
the unary request's own file bytes, an upload's bytes teed to a private temporary file while the
scaffold receives them (:class:`DicomOutputsServicer`), or a DICOMweb series' WADO-RS ``metadata``
(JSON, no pixels: the series is not fetched twice). They are kept as minimal copies (what DICOM
requires of a derived object, nothing more) and written header-only into a request folder when the
objects are built.

The answer with its objects is refused whole when it would exceed the message limit: a client gets
everything it asked for, or INVALID_ARGUMENT naming ``outputs``, never the candidates without them.
"""

from __future__ import annotations

import contextlib
import io
import json
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, TypeVar

import pydicom
from google.protobuf.message import Message
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from services.api import limits
from services.api.pb import common_pb2, image_pb2
from services.api.sources import request_temp_dir
from services.api.upload import UploadShape
from services.core.errors import InputError
from services.core.io.dicom_seg import check_seg_source, minimal_source_copy
from services.core.io.dicom_sr import check_sr_source
from services.core.volume import Volume
from services.core.work_budget import checkpoint, remaining_s
from services.servers.scaffold import CapabilityServicer

FIELD = "outputs"
#: The suffixes of a file upload that is DICOM (one file, or a zip of one series).
DICOM_SUFFIXES = (".dcm", ".zip")
#: The most bytes of a DICOMweb series' metadata read (JSON of every instance's header; a 2000-slice
#: CT's is ~20 MiB): past it the request is refused rather than the service parsing without bound.
MAX_METADATA_BYTES = 256 * 1024 * 1024
_DICOM_HEAD_BYTES = 132
_READ_BYTES = 1 << 20
P = TypeVar("P")


@dataclass(frozen=True)
class Outputs:
    """Which DICOM objects a request asked for."""

    seg: bool = False
    sr: bool = False

    @property
    def any(self) -> bool:
        return self.seg or self.sr


#: A request asking for none.
NO_OUTPUTS = Outputs()


def requested_outputs(values: Sequence[int]) -> Outputs:
    """The request's ``outputs`` (repeated OutputKind); an unknown or unspecified kind is refused."""
    known = (common_pb2.DICOM_SEG, common_pb2.DICOM_SR)
    for index, value in enumerate(values):
        if value not in known:
            raise InputError(
                f"unknown output kind {value}; use DICOM_SEG or DICOM_SR", field=f"{FIELD}[{index}]"
            )
    return Outputs(seg=common_pb2.DICOM_SEG in values, sr=common_pb2.DICOM_SR in values)


def check_request(outputs: Outputs, source: image_pb2.ImageSource) -> None:
    """Refuse DICOM outputs for an image that is not DICOM, from the request alone (voxels, NIfTI,
    NRRD, MetaImage): before an upload's first chunk, so the caller sends nothing in vain."""
    if not outputs.any:
        return
    kind = source.WhichOneof("source")
    if kind is None or kind == "dicomweb":
        return  # no image: the image field's own refusal says so
    if kind == "file" and Path(source.file.filename.replace("\\", "/")).name.lower().endswith(DICOM_SUFFIXES):
        return
    what = "voxels" if kind == "volume" else "an image file that is not DICOM"
    raise InputError(
        f"DICOM SEG and SR reference the source images, so they need a DICOM image (a .dcm file, a zip of "
        f"a DICOM series, or a DICOMweb series); this request sends {what}",
        field=FIELD,
    )


def check_image(outputs: Outputs, image: Volume) -> None:
    """Refuse, before computing, an image the asked-for objects cannot reference (a DICOM file that
    kept no instance UIDs, a radiograph for a SEG)."""
    try:
        if outputs.seg:
            check_seg_source(image)
        if outputs.sr:
            check_sr_source(image)
    except InputError as exc:
        raise InputError(exc.message, field=FIELD) from None


def check_size(response: Message) -> Message:
    """The whole answer, or INVALID_ARGUMENT naming ``outputs`` when it would pass the message limit."""
    size = response.ByteSize()
    if size > limits.MAX_MESSAGE_BYTES:
        raise InputError(
            f"the answer with its DICOM objects would be {size} bytes, over the {limits.MAX_MESSAGE_BYTES}-byte "
            "message limit; ask for fewer outputs",
            field=FIELD,
        )
    return response


@contextlib.contextmanager
def remapped() -> Iterator[None]:
    """A writer's refusal (field ``seg``/``sr``/``lesion_id``) as a refusal of ``outputs``."""
    try:
        yield
    except InputError as exc:
        raise InputError(exc.message, field=FIELD) from None


# -- source headers --------------------------------------------------------------------------------


def _header(stream: BinaryIO) -> pydicom.Dataset:
    with warnings.catch_warnings():  # pydicom warnings may quote values (patient names)
        warnings.simplefilter("ignore")
        dataset = pydicom.dcmread(stream, stop_before_pixels=True)
    kept = minimal_source_copy(dataset)
    kept.file_meta = _file_meta(dataset, getattr(dataset, "file_meta", None))
    return kept


def _file_meta(dataset: pydicom.Dataset, original: FileMetaDataset | None) -> FileMetaDataset:
    """The file meta of a header-only copy: explicit VR little endian whatever the source's pixels
    were encoded in (the copy has no pixels), the SOP identity from the data set or its own meta.

    Raises:
        InputError: naming ``outputs``: an instance without SOP Class or Instance UID (nothing a
            derived object could reference).
    """
    meta = FileMetaDataset()
    for keyword, meta_keyword in (
        ("SOPClassUID", "MediaStorageSOPClassUID"),
        ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
    ):
        value = dataset.get(keyword) or (original.get(meta_keyword) if original is not None else None)
        if not value:
            raise InputError(f"a source instance has no {keyword} to reference", field=FIELD)
        setattr(meta, meta_keyword, value)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _is_dicom(head: bytes) -> bool:
    return len(head) >= _DICOM_HEAD_BYTES and head[128:132] == b"DICM"


def headers_from_file(filename: str, content: bytes | bytearray | memoryview | Path) -> list[pydicom.Dataset]:
    """The headers of an uploaded ``.dcm`` or DICOM ``.zip`` (bytes or a file holding them). Runs after
    :mod:`services.api.sources` has read the same bytes as an image, so the zip's limits held."""
    suffix = ".zip" if filename.lower().endswith(".zip") else ".dcm"
    source: BinaryIO = content.open("rb") if isinstance(content, Path) else io.BytesIO(content)
    with source:
        if suffix == ".dcm":
            return [_header(source)]
        headers = []
        with zipfile.ZipFile(source) as zipped:
            for member in zipped.infolist():
                checkpoint("reading the source headers")
                if member.is_dir():
                    continue
                with zipped.open(member) as item:
                    if not _is_dicom(item.read(_DICOM_HEAD_BYTES)):
                        continue  # README, viewer files: skipped as the reader skipped them
                    item.seek(0)
                    headers.append(_header(item))
    return headers


def headers_from_dicomweb(
    reference: image_pb2.DicomWebReference, timeout_s: float = 60.0
) -> list[pydicom.Dataset]:
    """WADO-RS ``.../series/{uid}/metadata``: the series' headers as DICOM JSON, without its pixels.
    Called after the series was fetched from the same (allowed) server, so URL and UIDs are checked."""
    base = reference.base_url.rstrip("/")
    url = f"{base}/studies/{reference.study_instance_uid}/series/{reference.series_instance_uid}/metadata"
    request = urllib.request.Request(url, headers={"Accept": "application/dicom+json"})
    body = bytearray()
    try:
        with urllib.request.urlopen(request, timeout=remaining_s(timeout_s)) as response:
            while len(body) <= MAX_METADATA_BYTES:
                checkpoint("fetching the series metadata")
                chunk = response.read(_READ_BYTES)
                if not chunk:
                    break
                body += chunk
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        checkpoint("fetching the series metadata")
        raise ConnectionError(f"DICOMweb metadata unavailable ({type(exc).__name__})") from exc
    if len(body) > MAX_METADATA_BYTES:
        raise InputError(f"the series metadata exceeds {MAX_METADATA_BYTES} bytes", field=FIELD)
    try:
        items = json.loads(bytes(body))
        headers = []
        for item in items:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dataset = pydicom.Dataset.from_json(item, bulk_data_uri_handler=lambda tag, vr, uri: b"")
            kept = minimal_source_copy(dataset)
            kept.file_meta = _file_meta(dataset, None)
            headers.append(kept)
    except InputError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConnectionError(f"DICOMweb metadata unreadable ({type(exc).__name__})") from None
    return headers


def source_headers(
    source: image_pb2.ImageSource, received: list[pydicom.Dataset] | None
) -> list[pydicom.Dataset]:
    """The headers of the request's image: those teed from its upload (``received``), else read from
    the request's file bytes or its DICOMweb server."""
    if received is not None:
        return received
    kind = source.WhichOneof("source")
    if kind == "file":
        return headers_from_file(source.file.filename, source.file.content)
    if kind == "dicomweb":
        return headers_from_dicomweb(source.dicomweb)
    raise InputError("DICOM outputs need a DICOM image", field=FIELD)


@contextlib.contextmanager
def header_folder(headers: Sequence[pydicom.Dataset]) -> Iterator[Path]:
    """The headers written header-only into a request folder (what the writers read), removed after."""
    with request_temp_dir("dicom-outputs") as work:
        folder = Path(work)
        for number, dataset in enumerate(headers):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dataset.save_as(folder / f"{number:05d}.dcm", enforce_file_format=True)
        yield folder


# -- uploads -----------------------------------------------------------------------------------------


class _UploadTee:
    """The file bytes of an upload that asked for DICOM outputs, copied to a private temporary file
    as the scaffold receives them (disk, not a second copy in memory); nothing for other uploads."""

    def __init__(self, shape: UploadShape) -> None:
        self._shape = shape
        self._folder: contextlib.ExitStack | None = None
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self._filename = ""

    @property
    def active(self) -> bool:
        return self._path is not None

    def begin(self, outputs: Outputs, source: image_pb2.ImageSource) -> None:
        if not outputs.any or source.WhichOneof("source") != "file":
            return
        self._folder = contextlib.ExitStack()
        work = Path(self._folder.enter_context(request_temp_dir("upload-headers")))
        self._filename = source.file.filename
        self._path = work / ("upload.zip" if self._filename.lower().endswith(".zip") else "upload.dcm")
        self._file = self._path.open("wb")

    def wrap(self, messages: Iterator[bytes]) -> Iterator[bytes]:
        for number, message in enumerate(messages):
            if number and self._file is not None:
                data = self._shape.chunk_data(message)
                if data is not None:  # else the scaffold parses it (and refuses what is no chunk)
                    self._file.write(data)
                else:
                    self._write_parsed(message)
            yield message

    def _write_parsed(self, message: bytes) -> None:
        try:
            parsed = self._shape.message_class.FromString(message)
        except Exception:  # the scaffold refuses it with its own message
            return
        field = self._shape.chunk_field
        if parsed.WhichOneof(field.containing_oneof.name) == field.name and self._file is not None:
            self._file.write(getattr(parsed, field.name).data)

    def headers(self) -> list[pydicom.Dataset]:
        assert self._file is not None and self._path is not None
        self._file.close()
        return headers_from_file(self._filename, self._path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._folder is not None:
            self._folder.close()


class DicomOutputsServicer(CapabilityServicer):
    """A servicer whose prepared requests carry ``outputs`` (:class:`Outputs`) and ``headers``
    (dataclass fields): an upload asking for DICOM outputs keeps its source headers."""

    def receive_upload(
        self, messages: Iterator[bytes], shape: UploadShape, prepare: Callable[[Message], P]
    ) -> tuple[P, Volume]:
        tee = _UploadTee(shape)

        def noting(request: Message) -> P:
            prepared = prepare(request)
            tee.begin(prepared.outputs, getattr(request, shape.image_field.name))
            return prepared

        try:
            prepared, image = super().receive_upload(tee.wrap(messages), shape, noting)
            if tee.active:
                check_image(prepared.outputs, image)
                prepared = replace(prepared, headers=tee.headers())
            return prepared, image
        finally:
            tee.close()
