"""Turn an ``ImageSource`` (voxels, an image file, or a DICOMweb reference) into a Volume.

Files are written into a private temporary folder under fixed names (never the client's), zips are
extracted flat with member-count and size limits, and DICOMweb is fetched only from servers the
service was configured with — so a request can neither write outside its folder nor make the service
fetch arbitrary URLs.

What a request may cost is bounded before it is spent: zip members and their bytes are counted
while extracting (the zip's headers may lie), every DICOM file must show the Part 10 preamble
before any parser sees it, the temporary disk a request writes has a budget, and the request's
deadline (:mod:`services.core.work_budget`) is checked between members, chunks and files. Request
folders live under one folder per process (``wlcad-<pid>-<start>``), so what a killed process left
behind can be found and removed at the next start (:func:`remove_stale_temp`).
"""

from __future__ import annotations

import atexit
import io
import logging
import math
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.api import limits
from services.api.convert import volume_from_proto
from services.api.multipart import split_parts
from services.api.pb import image_pb2
from services.core.errors import InputError
from services.core.io import read_image
from services.core.io.itk_formats import header_fields
from services.core.uids import check_uid
from services.core.volume import Volume
from services.core.work_budget import DeadlineExceededError, RequestCancelledError, checkpoint, remaining_s

log = logging.getLogger("wlcad.serving")

#: Suffix → what the file is; the service names its copy ``image<suffix>``.
FILE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm", ".zip")
#: Errors that end a request's work: never turned into "unreadable input".
_STOPPED = (RequestCancelledError, DeadlineExceededError)
#: DICOM Part 10: a 128-byte preamble, "DICM", then the file meta group (0002,xxxx) in explicit
#: VR little endian. The repository's readers (pydicom without ``force``) read nothing else, so a
#: file without them is refused before any parser sees it.
_DICOM_HEAD_BYTES = 138
_VR = re.compile(rb"^[A-Z]{2}$")
_CHUNK_BYTES = 1 << 20
#: A request folder root: ``wlcad-<pid>-<process start in clock ticks>`` under the temp folder.
_ROOT_NAME = re.compile(r"^wlcad-([0-9]+)-([0-9]+)$")
_PROC = Path("/proc")


def file_suffix(filename: str, field: str = "image.file.filename") -> str:
    name = Path(filename.replace("\\", "/")).name.lower()
    suffix = next((s for s in FILE_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        raise InputError(f"{name[:64]!r}: use one of {', '.join(FILE_SUFFIXES)}", field=field)
    return suffix


# -- request temporary folders -------------------------------------------------------------------


def _start_ticks(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None when it does not
    exist: a pid alone may be reused (a container's service restarts as the same pid), the pair not.
    Without /proc only existence is known ("0")."""
    if not _PROC.is_dir():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "0"
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


_OWN_ROOTS: set[Path] = set()


def _process_root() -> Path:
    """This process's folder for request temp folders, created on first use (mode 0700) and removed
    at a clean exit; after a SIGKILL :func:`remove_stale_temp` removes it at the next start."""
    pid = os.getpid()
    root = Path(tempfile.gettempdir()) / f"wlcad-{pid}-{_start_ticks(pid) or 0}"
    if root not in _OWN_ROOTS:
        root.mkdir(mode=0o700, exist_ok=True)
        _OWN_ROOTS.add(root)
        atexit.register(shutil.rmtree, root, True)
    return root


def request_temp_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A request's private temporary folder (removed when its ``with`` ends, failures included)."""
    return tempfile.TemporaryDirectory(prefix=f"{kind}-", dir=_process_root())


def remove_stale_temp() -> list[Path]:
    """Remove the request folders of wlcad processes that no longer run (killed ones never cleaned
    up: the issue saw 3.1 GB stay after a SIGKILL); returns what was removed. Call at service start."""
    removed = []
    for entry in Path(tempfile.gettempdir()).iterdir():
        match = _ROOT_NAME.match(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink():
            continue
        if _start_ticks(int(match[1])) == match[2]:
            continue  # its process still runs
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
    if removed:
        log.info("removed %d request temp folders of processes that no longer run", len(removed))
    return removed


@dataclass
class _TempDisk:
    """The temporary disk one request has written, refused past ``MAX_REQUEST_TEMP_BYTES``."""

    field: str
    used: int = 0

    def charge(self, size: int) -> None:
        self.used += size
        if self.used > limits.MAX_REQUEST_TEMP_BYTES:
            raise InputError(
                f"needs more than {limits.MAX_REQUEST_TEMP_BYTES} bytes of temporary disk", field=self.field
            )


# -- DICOM and header checks ----------------------------------------------------------------------


def _is_dicom(head: bytes | bytearray | memoryview) -> bool:
    """The cheap test every DICOM file passes before a parser sees it (see ``_DICOM_HEAD_BYTES``):
    a gigabyte of zeros costs 138 bytes of reading, not minutes of pydicom."""
    head = bytes(head[:_DICOM_HEAD_BYTES])
    return head[128:134] == b"DICM\x02\x00" and _VR.match(head[136:138]) is not None


class _BudgetedFile(io.FileIO):
    """A file whose reads stop at the request's deadline or cancel, every MiB read.

    pydicom parses a header element by element (~0.3-0.6 s per MiB of small elements), inside one
    call; reading through this lets a crafted header (valid preamble, then a gigabyte of tiny
    elements) end with its request instead of holding a compute slot for minutes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "rb")
        self._since_check = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self._since_check += len(data)
        if self._since_check >= _CHUNK_BYTES:
            self._since_check = 0
            checkpoint("reading a DICOM header")
        return data


_SITK_BITS = re.compile(r"([0-9]+)-bit")
#: The most a deflate stream (gzip, zlib) expands: RFC 1951's longest match, 258 bytes, costs at
#: least 2 bits, so one compressed byte yields at most 1032.
_DEFLATE_MAX_RATIO = 1032
_NRRD_DATA_FILE_KEYS = ("data file", "datafile")


def _external_data_file(path: Path) -> str | None:
    """The data file an NRRD or MetaImage header points to outside itself, or ``None``.

    Both formats may keep their voxels elsewhere (NRRD ``data file:``, MetaImage
    ``ElementDataFile =``), by absolute path too: a client's ``.nrrd`` naming ``/etc/passwd`` made
    the service read that file as voxels. A ``.nrrd`` or ``.mha`` must hold its own data; a ``.mhd``
    (local and CIRCUS CS folders only) may name a file beside it, never a path."""
    fields = header_fields(path)
    name = path.name.lower()
    if name.endswith(".nrrd"):
        named = [fields[key] for key in _NRRD_DATA_FILE_KEYS if key in fields]
        return (named[0] or "(empty)") if named else None
    target = fields.get("elementdatafile")
    if target is None or target.upper() == "LOCAL":
        return None
    plain_name = target == Path(target).name and "\\" not in target and target.upper() != "LIST"
    return None if name.endswith(".mhd") and plain_name and "%" not in target else target


def _declared_size(path: Path) -> tuple[int, int]:
    """(voxels, bytes) a file's header declares, read without its pixels ((0, 0) when none says)."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel

        header = nibabel.load(str(path)).header
        voxels = math.prod(int(v) for v in header.get_data_shape())
        declared = voxels * header.get_data_dtype().itemsize
        if name.endswith(".nii"):
            _fits_in_file(declared, path)
        else:
            _fits_in_file(declared, path, expansion=_DEFLATE_MAX_RATIO, how="gzip-compressed ")
        return voxels, declared
    if name.endswith((".nrrd", ".mha", ".mhd")):
        import SimpleITK as sitk

        if _external_data_file(path) is not None:
            raise InputError("the header names a data file outside itself; send the image as one file")

        from services.core.io.itk_formats import itk_reader

        reader = itk_reader(path)
        reader.ReadImageInformation()
        voxels = math.prod(reader.GetSize()) * reader.GetNumberOfComponents()
        kind = sitk.GetPixelIDValueAsString(reader.GetPixelID())
        bits = _SITK_BITS.search(kind)
        factor = (2 if "complex" in kind else 1) * (int(bits[1]) // 8 if bits else 8)
        _fits_in_payload(voxels, voxels * factor, path)
        return voxels, voxels * factor
    import pydicom

    with _BudgetedFile(path) as handle:
        header = pydicom.dcmread(handle, stop_before_pixels=True)
    voxels = (
        int(header.get("Rows", 0) or 0)
        * int(header.get("Columns", 0) or 0)
        * int(header.get("NumberOfFrames", 1) or 1)
    )
    per_voxel = int(header.get("SamplesPerPixel", 1) or 1) * -(-int(header.get("BitsAllocated", 8) or 8) // 8)
    syntax = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and not syntax.is_compressed:  # bits packed as stored (a SEG has 1 bit a voxel)
        bits = int(header.get("BitsAllocated", 8) or 8) * int(header.get("SamplesPerPixel", 1) or 1)
        _fits_in_file(-(-voxels * bits // 8), path)
    return voxels, voxels * per_voxel


def _fits_in_file(declared_bytes: int, path: Path, *, expansion: float = 1.0, how: str = "") -> None:
    """An uncompressed file cannot hold more voxel bytes than its own size, nor a compressed one more
    than its size times its codec's largest expansion: a header that says so would make a reader
    allocate for data that is not there (refused before it does). ITK even returned a 1 GiB volume of
    zeros for a 100-byte zlib MetaImage whose header declared it."""
    size = path.stat().st_size
    if declared_bytes > size * expansion:
        raise InputError(
            f"the header declares {declared_bytes} bytes of voxels; the {how}file holds {size} bytes"
            + (f", which expand to at most {int(size * expansion)}" if expansion != 1.0 else "")
        )


def _fits_in_payload(voxels: int, declared_bytes: int, path: Path) -> None:
    """:func:`_fits_in_file` for NRRD and MetaImage, by the encoding the header names: raw (one file
    byte per voxel byte), gzip/zlib (deflate expands at most 1032:1), hex (two characters per byte),
    text (a digit and a separator per voxel). The data sits in the file itself, or for a ``.mhd``
    in the file beside it that the header names (:func:`_external_data_file` allows nothing else)."""
    fields = header_fields(path)
    if path.name.lower().endswith(".nrrd"):
        encoding = fields.get("encoding", "raw").lower()
        if encoding in ("gzip", "gz"):
            _fits_in_file(declared_bytes, path, expansion=_DEFLATE_MAX_RATIO, how="gzip-compressed ")
        elif encoding == "hex":
            _fits_in_file(declared_bytes, path, expansion=0.5, how="hex-encoded ")
        elif encoding in ("ascii", "text", "txt"):
            _fits_in_file(voxels, path, expansion=0.5, how="text-encoded ")
        elif encoding == "raw":
            _fits_in_file(declared_bytes, path)
        return  # any other encoding: the reader refuses it without allocating (bzip2 is not built in)
    target = fields.get("elementdatafile", "LOCAL")
    data = path if target.upper() == "LOCAL" else path.parent / target
    if not data.is_file():
        raise InputError(f"the data file the header names ({target[:64]!r}) is missing")
    if fields.get("compresseddata", "false").lower() == "true":
        _fits_in_file(declared_bytes, data, expansion=_DEFLATE_MAX_RATIO, how="zlib-compressed ")
    else:
        _fits_in_file(declared_bytes, data)


def check_declared_size(path: Path, field: str) -> None:
    """Refuse a file whose header asks for more voxels or bytes than the service accepts, before a
    reader allocates them: a 150-byte upload must not make the service try to allocate gigabytes.
    DICOM files without the Part 10 preamble are refused before any parse."""
    paths = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    voxels = size = 0
    for number, item in enumerate(paths, start=1):
        checkpoint("reading image headers")
        if not item.name.lower().endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")):
            with item.open("rb") as handle:
                if not _is_dicom(handle.read(_DICOM_HEAD_BYTES)):
                    raise InputError(_not_dicom("file", number, len(paths)), field=field)
        try:
            more_voxels, more_bytes = _declared_size(item)
        except InputError as exc:
            raise InputError(exc.message, field=field) from exc
        except (MemoryError, *_STOPPED):
            raise
        except Exception as exc:
            raise InputError(f"unreadable header ({type(exc).__name__})", field=field) from exc
        voxels, size = voxels + more_voxels, size + more_bytes
        if voxels > limits.MAX_VOXELS:
            raise InputError(f"declares more than {limits.MAX_VOXELS} voxels", field=field)
        if size > limits.MAX_UPLOAD_BYTES:
            raise InputError(f"declares more than {limits.MAX_UPLOAD_BYTES} bytes of voxels", field=field)


def _not_dicom(what: str, number: int, count: int) -> str:
    """The refusal of a non-DICOM file, naming it by its number only (client names may hold
    patient names)."""
    where = f"{what} {number} of {count}" if count > 1 else f"the {what}"
    return f"{where} is not a DICOM file (no 128-byte preamble, 'DICM' and file meta group)"


def _read_guarded(path: Path, what: str, field: str) -> Volume:
    """Any reader failure on client bytes is the input's fault: one InputError, no internals."""
    check_declared_size(path, field)
    checkpoint("reading the image")
    try:
        return read_image(path)
    except InputError as exc:
        raise InputError(exc.message, field=field) from exc
    except (MemoryError, *_STOPPED):
        raise
    except Exception as exc:
        raise InputError(f"could not be read as {what} ({type(exc).__name__})", field=field) from exc


# -- zips -----------------------------------------------------------------------------------------


def _zip_members(zipped: zipfile.ZipFile, field: str) -> list[zipfile.ZipInfo]:
    """The files of a zip, refused early when its directory already says it is too big (the sizes
    are checked again against the bytes actually unpacked)."""
    members = [m for m in zipped.infolist() if not m.is_dir()]
    if not members:
        raise InputError("the zip holds no files", field=field)
    if len(members) > limits.MAX_ZIP_MEMBERS:
        raise InputError(f"the zip holds more than {limits.MAX_ZIP_MEMBERS} files", field=field)
    if sum(m.file_size for m in members) > limits.MAX_ZIP_UNCOMPRESSED_BYTES:
        raise InputError(_too_big(), field=field)
    return members


def _too_big() -> str:
    return f"the zip expands beyond {limits.MAX_ZIP_UNCOMPRESSED_BYTES} bytes"


def _unpack_member(
    zipped: zipfile.ZipFile,
    number: int,
    members: list[zipfile.ZipInfo],
    folder: Path,
    unpacked: int,
    disk: _TempDisk,
) -> int:
    """Write member ``number`` into ``folder`` when its first bytes are DICOM's, every chunk counted
    against the zip's and the request's limits; returns the zip's unpacked bytes so far.

    A member that is not DICOM is skipped unread beyond its head: a CD or PACS export holds README,
    HTML viewer and index files beside the instances, and a zip of anything else is refused by the
    caller when no member was DICOM — in either case without parsing or unpacking the rest."""
    with zipped.open(members[number]) as source:
        chunk = source.read(_DICOM_HEAD_BYTES)
        if not _is_dicom(chunk):
            return unpacked
        with open(folder / f"{number:05d}.dcm", "wb") as out:
            while chunk:
                unpacked += len(chunk)
                if unpacked > limits.MAX_ZIP_UNCOMPRESSED_BYTES:
                    raise InputError(_too_big(), field=disk.field)
                disk.charge(len(chunk))
                out.write(chunk)
                checkpoint("unpacking the zip")
                chunk = source.read(_CHUNK_BYTES)
    return unpacked


def _extract_zip(archive: Path, folder: Path, disk: _TempDisk) -> None:
    """Unpack a DICOM zip flat into ``folder`` under fixed names, stopping at the first limit hit."""
    field = disk.field
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = _zip_members(zipped, field)
            unpacked = 0
            for number in range(len(members)):
                checkpoint("unpacking the zip")
                unpacked = _unpack_member(zipped, number, members, folder, unpacked, disk)
            if not any(folder.iterdir()):
                raise InputError(
                    f"none of the zip's {len(members)} files is DICOM (a 128-byte preamble, 'DICM' and "
                    "a file meta group)",
                    field=field,
                )
    except (InputError, MemoryError, *_STOPPED):
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError) as exc:
        raise InputError(f"not a readable zip ({type(exc).__name__})", field=field) from exc
    except OSError as exc:  # zlib/CRC errors surface as OSError subclasses
        raise InputError(f"not a readable zip ({type(exc).__name__})", field=field) from exc


# -- sources --------------------------------------------------------------------------------------


def volume_from_file(
    filename: str, content: bytes | bytearray | memoryview, field: str = "image.file"
) -> Volume:
    suffix = file_suffix(filename, f"{field}.filename")
    if not content:
        raise InputError("is empty", field=f"{field}.content")
    if suffix == ".dcm" and not _is_dicom(content[:_DICOM_HEAD_BYTES]):
        raise InputError(_not_dicom("file", 1, 1), field=f"{field}.content")
    disk = _TempDisk(f"{field}.content")
    checkpoint("writing the upload")
    with request_temp_dir("image") as work:
        path = Path(work) / f"image{suffix}"
        disk.charge(len(content))
        path.write_bytes(content)
        if suffix == ".zip":
            series = Path(work) / "series"
            series.mkdir()
            _extract_zip(path, series, disk)
            path.unlink()
            return _read_guarded(series, "a DICOM series", f"{field}.content")
        return _read_guarded(path, suffix.lstrip("."), f"{field}.content")


def _fetch(url: str, timeout_s: float) -> tuple[str, bytearray]:
    """GET ``url`` (Content-Type, body), the body read in chunks with the deadline checked between
    them and at most ``MAX_UPLOAD_BYTES + 1`` kept; a timeout once the deadline passed is the
    deadline's, not the server's."""
    # transfer-syntax=*: the instances as stored. Without it Orthanc must transcode to Explicit VR
    # Little Endian and cannot for JPEG 2000 (HTTP 500); the readers decode every stored syntax.
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    request = urllib.request.Request(url, headers={"Accept": accept})
    body = bytearray()
    try:
        with urllib.request.urlopen(request, timeout=remaining_s(timeout_s)) as response:
            content_type = response.headers.get("Content-Type", "")
            while len(body) <= limits.MAX_UPLOAD_BYTES:
                checkpoint("fetching from DICOMweb")
                chunk = response.read(min(_CHUNK_BYTES, limits.MAX_UPLOAD_BYTES + 1 - len(body)))
                if not chunk:
                    break
                body += chunk
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise InputError("no such study/series on the DICOMweb server", field="image.dicomweb") from exc
        raise ConnectionError(f"DICOMweb server answered HTTP {exc.code}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        if isinstance(exc, _STOPPED):
            raise
        checkpoint("fetching from DICOMweb")  # the deadline's timeout, not the server's fault
        raise ConnectionError(f"DICOMweb server unreachable ({type(exc).__name__})") from exc
    return content_type, body


def configured_dicomweb_server(base_url: str, servers: Sequence[str], field: str) -> str:
    """``base_url`` without its trailing slash when it is one of ``servers``, else an InputError on
    ``field``: a request may name a server, never make the service talk to one it was not given."""
    base = base_url.rstrip("/")
    if base not in [s.rstrip("/") for s in servers]:
        raise InputError(
            "is not one of this service's DICOMweb servers" + ("" if servers else " (none configured)"),
            field=field,
        )
    return base


def volume_from_dicomweb(
    reference: image_pb2.DicomWebReference, servers: Sequence[str], timeout_s: float = 60.0
) -> Volume:
    """WADO-RS: fetch one series as multipart/related application/dicom, then read it as a folder.
    Waits at most ``timeout_s``, and never past the request's deadline."""
    field = "image.dicomweb"
    base = configured_dicomweb_server(reference.base_url, servers, f"{field}.base_url")
    for name in ("study_instance_uid", "series_instance_uid"):
        check_uid(getattr(reference, name), f"{field}.{name}")
    url = f"{base}/studies/{reference.study_instance_uid}/series/{reference.series_instance_uid}"
    content_type, body = _fetch(url, timeout_s)
    if len(body) > limits.MAX_UPLOAD_BYTES:
        raise InputError("the series is larger than the upload limit", field=field)
    parts = split_parts(body, content_type)  # views into body: written out without copies
    del body
    if not parts:
        raise InputError("the series holds no instances", field=field)
    with request_temp_dir("dicomweb") as work:
        for number, part in enumerate(parts):
            checkpoint("writing DICOMweb instances")
            if not _is_dicom(part[:_DICOM_HEAD_BYTES]):
                raise InputError(_not_dicom("instance", number + 1, len(parts)), field=field)
            (Path(work) / f"{number:05d}.dcm").write_bytes(part)
        del parts
        return _read_guarded(Path(work), "a DICOM series", field)


def volume_from_source(
    source: image_pb2.ImageSource, dicomweb_servers: Sequence[str] = (), field: str = "image"
) -> Volume:
    kind = source.WhichOneof("source")
    if kind == "volume":
        return volume_from_proto(source.volume, field=f"{field}.volume")
    if kind == "file":
        return volume_from_file(source.file.filename, source.file.content, f"{field}.file")
    if kind == "dicomweb":
        return volume_from_dicomweb(source.dicomweb, dicomweb_servers)
    raise InputError("give volume, file or dicomweb", field=field)
