"""Turn an ``ImageSource`` (voxels, an image file, or a DICOMweb reference) into a Volume.

Files are written into a private temporary folder under fixed names (never the client's), zips are
extracted flat with member-count and size limits, and DICOMweb is fetched only from servers the
service was configured with — so a request can neither write outside its folder nor make the service
fetch arbitrary URLs.
"""

from __future__ import annotations

import math
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

from services.api import limits
from services.api.convert import volume_from_proto
from services.api.multipart import split_parts
from services.api.pb import image_pb2
from services.core.errors import InputError
from services.core.io import read_image
from services.core.volume import Volume

#: Suffix → what the file is; the service names its copy ``image<suffix>``.
FILE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm", ".zip")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def file_suffix(filename: str, field: str = "image.file.filename") -> str:
    name = Path(filename.replace("\\", "/")).name.lower()
    suffix = next((s for s in FILE_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        raise InputError(f"{name[:64]!r}: use one of {', '.join(FILE_SUFFIXES)}", field=field)
    return suffix


def _declared_voxels(path: Path) -> int:
    """Voxels a file's header declares, read without its pixels (0 when no header says)."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel

        return math.prod(int(v) for v in nibabel.load(str(path)).header.get_data_shape())
    if name.endswith((".nrrd", ".mha", ".mhd")):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return math.prod(reader.GetSize()) * reader.GetNumberOfComponents()
    import pydicom

    header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    return (
        int(header.get("Rows", 0) or 0)
        * int(header.get("Columns", 0) or 0)
        * int(header.get("NumberOfFrames", 1) or 1)
    )


def check_declared_size(path: Path, field: str) -> None:
    """Refuse a file whose header asks for more voxels than the service accepts, before a reader
    allocates them: a 150-byte upload must not make the service try to allocate gigabytes."""
    paths = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    total = 0
    for item in paths:
        try:
            total += _declared_voxels(item)
        except MemoryError:
            raise
        except Exception as exc:
            raise InputError(f"unreadable header ({type(exc).__name__})", field=field) from exc
        if total > limits.MAX_VOXELS:
            raise InputError(f"declares more than {limits.MAX_VOXELS} voxels", field=field)


def _read_guarded(path: Path, what: str, field: str) -> Volume:
    """Any reader failure on client bytes is the input's fault: one InputError, no internals."""
    check_declared_size(path, field)
    try:
        return read_image(path)
    except InputError as exc:
        raise InputError(exc.message, field=field) from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise InputError(f"could not be read as {what} ({type(exc).__name__})", field=field) from exc


def _extract_zip(archive: Path, folder: Path, field: str) -> None:
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [m for m in zipped.infolist() if not m.is_dir()]
            if not members:
                raise InputError("the zip holds no files", field=field)
            if len(members) > limits.MAX_ZIP_MEMBERS:
                raise InputError(f"the zip holds more than {limits.MAX_ZIP_MEMBERS} files", field=field)
            if sum(m.file_size for m in members) > limits.MAX_ZIP_UNCOMPRESSED_BYTES:
                raise InputError("the zip expands beyond the size limit", field=field)
            for number, member in enumerate(members):
                with zipped.open(member) as source, open(folder / f"{number:05d}.dcm", "wb") as target:
                    remaining = member.file_size + 1
                    while chunk := source.read(1 << 20):
                        remaining -= len(chunk)
                        if remaining < 0:  # the header lied about the size
                            raise InputError("a zip member is larger than its header says", field=field)
                        target.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError) as exc:
        raise InputError(f"not a readable zip ({type(exc).__name__})", field=field) from exc
    except OSError as exc:  # zlib/CRC errors surface as OSError subclasses
        raise InputError(f"not a readable zip ({type(exc).__name__})", field=field) from exc


def volume_from_file(
    filename: str, content: bytes | bytearray | memoryview, field: str = "image.file"
) -> Volume:
    suffix = file_suffix(filename, f"{field}.filename")
    if not content:
        raise InputError("is empty", field=f"{field}.content")
    with tempfile.TemporaryDirectory(prefix="wlcad-image-") as work:
        path = Path(work) / f"image{suffix}"
        path.write_bytes(content)
        if suffix == ".zip":
            series = Path(work) / "series"
            series.mkdir()
            _extract_zip(path, series, f"{field}.content")
            path.unlink()
            return _read_guarded(series, "a DICOM series", f"{field}.content")
        return _read_guarded(path, suffix.lstrip("."), f"{field}.content")


def volume_from_dicomweb(
    reference: image_pb2.DicomWebReference, servers: Sequence[str], timeout_s: float = 60.0
) -> Volume:
    """WADO-RS: fetch one series as multipart/related application/dicom, then read it as a folder."""
    field = "image.dicomweb"
    base = reference.base_url.rstrip("/")
    if base not in [s.rstrip("/") for s in servers]:
        raise InputError(
            "is not one of this service's DICOMweb servers" + ("" if servers else " (none configured)"),
            field=f"{field}.base_url",
        )
    for name in ("study_instance_uid", "series_instance_uid"):
        uid = getattr(reference, name)
        if not (0 < len(uid) <= 64 and _UID.match(uid)):
            raise InputError("must be a DICOM UID (digits and dots, ≤ 64)", field=f"{field}.{name}")
    url = f"{base}/studies/{reference.study_instance_uid}/series/{reference.series_instance_uid}"
    request = urllib.request.Request(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            content_type = response.headers.get("Content-Type", "")
            body = response.read(limits.MAX_UPLOAD_BYTES + 1)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise InputError("no such study/series on the DICOMweb server", field=field) from exc
        raise ConnectionError(f"DICOMweb server answered HTTP {exc.code}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise ConnectionError(f"DICOMweb server unreachable ({type(exc).__name__})") from exc
    if len(body) > limits.MAX_UPLOAD_BYTES:
        raise InputError("the series is larger than the upload limit", field=field)
    parts = split_parts(body, content_type)  # views into body: written out without copies
    del body
    if not parts:
        raise InputError("the series holds no instances", field=field)
    with tempfile.TemporaryDirectory(prefix="wlcad-dicomweb-") as work:
        for number, part in enumerate(parts):
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
