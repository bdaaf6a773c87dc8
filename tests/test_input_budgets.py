"""Per-request budgets on image input (issue 10, deliverable 1): what a request may cost is refused
from its header or while unpacking, before the memory, disk or time is spent.

Zip bombs are built here by hand (one deflated block of zeros reused per member), so a 1.9 MiB zip
expanding to ~2 GB costs milliseconds to build; they are read in a child process with its own
temp folder, watched for disk use, so a regression fails the test early instead of filling the disk.
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import io
import json
import math
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from services.api import limits, sources
from services.api.client import UPLOAD, UPLOAD_METHOD, zip_folder
from services.api.convert import expected_bytes, volume_header
from services.api.pb import image_pb2
from services.api.pb import label_estimation_pb2 as pb
from services.api.sources import (
    check_declared_size,
    remove_stale_temp,
    request_temp_dir,
    volume_from_dicomweb,
    volume_from_file,
)
from services.core.errors import InputError
from services.core.io import read_image
from services.core.work_budget import DeadlineExceededError, RequestCancelledError, WorkBudget, scope
from tests.serving_support import REPO_ROOT, estimate_request, small_volume, start_service, wait_serving

MIB = 1 << 20


# -- hand-built zips --------------------------------------------------------------------------------


def _zip(members: list[tuple[bytes, int, int]]) -> bytes:
    """A zip of deflated members ``(compressed, crc32, declared uncompressed size)``, named
    ``00001.dcm``…: written by hand so the sizes may be whatever a hostile client claims."""
    local, central = io.BytesIO(), io.BytesIO()
    for number, (data, crc, size) in enumerate(members, start=1):
        name = f"{number:05d}.dcm".encode()
        offset = local.tell()
        local.write(
            struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 33, crc, len(data), size, len(name), 0)
        )
        local.write(name + data)
        central.write(
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                20,
                20,
                0,
                8,
                0,
                33,
                crc,
                len(data),
                size,
                len(name),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
        )
        central.write(name)
    directory = central.getvalue()
    end = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(directory), local.tell(), 0
    )
    return local.getvalue() + directory + end


def _deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


def _zeros_member(size: int, head: bytes = b"") -> tuple[bytes, int, int]:
    data = head + bytes(size - len(head))
    return _deflate(data), zlib.crc32(data), size


def _meta_only_dicom() -> bytes:
    """A valid DICOM Part 10 start (preamble, DICM, file meta) with no data set: the crafted head a
    bomb would reuse to pass the preamble check."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def temp_root(tmp_path, monkeypatch) -> Path:
    """The temp folder the code under test uses (``tempfile.gettempdir()``), empty at the start."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(root))
    return root


def _files_under(root: Path) -> list[Path]:
    return [Path(folder, name) for folder, _, names in os.walk(root) for name in names]


def _bytes_under(root: Path) -> int:
    """Bytes of the files under ``root`` now (files vanishing meanwhile count as 0)."""
    total = 0
    for path in _files_under(root):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


# -- the zip bomb, through a child process watched for disk -----------------------------------------

_CHILD = """
import json, sys, time
from pathlib import Path
from services.api.sources import volume_from_file
from services.core.errors import InputError
from services.core.io import read_image
data = Path(sys.argv[1]).read_bytes()
started = time.perf_counter()
try:
    volume_from_file("series.zip", data)
    result = {"refused": False}
except InputError as exc:
    result = {"refused": True, "field": exc.field, "message": exc.message}
result["seconds"] = time.perf_counter() - started
print(json.dumps(result))
"""


def _read_in_child(archive: Path, temp: Path, disk_bound: int, time_bound_s: float) -> tuple[dict, int]:
    """Read ``archive`` in a child whose temp folder is ``temp``; (its result, peak temp bytes seen).
    The child is killed as soon as its temp use passes ``disk_bound`` or it runs past ``time_bound_s``."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(archive)],
        cwd=REPO_ROOT,
        env={**os.environ, "TMPDIR": str(temp)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak, deadline = 0, time.monotonic() + time_bound_s
    try:
        while child.poll() is None:
            used = _bytes_under(temp)
            peak = max(peak, used)
            if used > disk_bound or time.monotonic() > deadline:
                pytest.fail(
                    f"the child held {used} bytes of temp files (bounds: {disk_bound} bytes, {time_bound_s} s)"
                )
            time.sleep(0.02)
        out, err = child.communicate(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert child.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1]), peak


@pytest.mark.parametrize(
    ("members", "refusal"),
    [
        (124, "expands beyond"),  # 1.94 GiB: the bomb, refused from the zip's directory
        (60, "none of the zip's 60 files is DICOM"),  # 0.94 GiB, under the size limit: by the preamble
    ],
)
def test_zip_bomb_of_zeros_is_refused_fast_without_filling_the_disk(tmp_path, members, refusal):
    member = _zeros_member(16 * MIB)
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(_zip([member] * members))
    assert archive.stat().st_size < 2 * MIB and members * 16 * MIB > 900 * MIB
    temp = tmp_path / "tmp"
    temp.mkdir()
    result, peak = _read_in_child(archive, temp, disk_bound=64 * MIB, time_bound_s=120)
    assert result["refused"], result
    assert result["field"] == "image.file.content" and refusal in result["message"]
    assert _files_under(temp) == []
    print(f"refused in {result['seconds']:.3f} s, peak temp {peak} bytes")  # the figure in the report


def test_a_zip_whose_directory_understates_sizes_is_refused(temp_root):
    """Members claiming 1 KiB each while holding 16 MiB (behind a valid DICOM head): never more is
    unpacked than the directory says, and the mismatch is the input's fault."""
    data, crc, _ = _zeros_member(16 * MIB, head=_meta_only_dicom())
    with pytest.raises(InputError, match="not a readable zip") as refused:
        volume_from_file("series.zip", _zip([(data, crc, 1024)] * 3))
    assert refused.value.field == "image.file.content"
    assert _files_under(temp_root) == []


def test_the_request_temp_disk_budget_is_no_smaller_than_what_it_must_hold():
    assert limits.MAX_ZIP_UNCOMPRESSED_BYTES <= limits.MAX_REQUEST_TEMP_BYTES
    assert limits.MAX_UPLOAD_BYTES + limits.MAX_ZIP_UNCOMPRESSED_BYTES <= limits.MAX_REQUEST_TEMP_BYTES
    assert limits.MAX_VOXELS * 2 <= limits.MAX_ZIP_UNCOMPRESSED_BYTES  # the largest int16 series fits


def test_the_temp_disk_budget_is_enforced_while_unpacking(temp_root, monkeypatch):
    monkeypatch.setattr(limits, "MAX_REQUEST_TEMP_BYTES", 20 * MIB)
    member = _zeros_member(8 * MIB, head=_meta_only_dicom())
    with pytest.raises(InputError, match="temporary disk") as refused:
        volume_from_file("series.zip", _zip([member] * 3))
    assert refused.value.field == "image.file.content"
    assert _files_under(temp_root) == []


# -- the DICOM preamble check -----------------------------------------------------------------------


@pytest.fixture
def dcmread_calls(monkeypatch) -> list:
    """Every ``pydicom.dcmread`` call made while the test runs."""
    calls: list = []
    real = pydicom.dcmread

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", spy)
    return calls


def test_zip_members_without_the_dicom_head_are_skipped_before_any_parse(sample, temp_root, dcmread_calls):
    """A CD export's notes beside its instances are skipped (never parsed or unpacked); a zip with
    no DICOM member at all is refused, naming no member (member names may be patient names)."""
    series = sorted(sample("ct-dicom-series").iterdir())
    notes = b"Patient DOE^JANE, not an image\n" * 200
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.write(series[0], "DOE^JANE/slice-1.dcm")
        zipped.writestr("DOE^JANE/notes.dcm", notes)
    volume = volume_from_file("series.zip", buffer.getvalue())
    assert volume.shape_xyz[2] == 1
    assert all(Path(call).name == "00000.dcm" for call in dcmread_calls if isinstance(call, str | Path))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("DOE^JANE/notes.dcm", notes)
        zipped.writestr("DOE^JANE/README.txt", notes)
    dcmread_calls.clear()
    with pytest.raises(InputError) as refused:
        volume_from_file("series.zip", buffer.getvalue())
    assert refused.value.field == "image.file.content"
    assert "none of the zip's 2 files is DICOM" in refused.value.message
    assert "DOE" not in refused.value.message
    assert dcmread_calls == []
    assert _files_under(temp_root) == []


@pytest.mark.parametrize(
    "content",
    [
        bytes(64 * 1024),
        b"\0" * 128 + b"DICM" + bytes(4096),
        b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + bytes(4096),
    ],
    ids=["zeros", "DICM-then-zeros", "no-preamble-implicit-start"],
)
def test_a_dcm_file_without_the_part10_head_is_refused_before_any_parse(content, temp_root, dcmread_calls):
    with pytest.raises(InputError, match="not a DICOM file") as refused:
        volume_from_file("image.dcm", content)
    assert refused.value.field == "image.file.content"
    assert dcmread_calls == []


@pytest.mark.parametrize(
    "name", ["ct-dicom-series", "brain-mr-dicom-series", "dicom-transfer-syntaxes", "chest-xray"]
)
def test_the_real_dicom_samples_pass_the_check(sample, name):
    path = sample(name)
    files = _files_under(path) if path.is_dir() else [path]
    files = [p for p in files if not p.name.startswith(".")]
    assert files and all(sources._is_dicom(p.read_bytes()[:200]) for p in files)


def test_a_real_zipped_series_still_reads_and_leaves_no_temp_files(sample, temp_root):
    volume = volume_from_file("series.zip", zip_folder(sample("ct-dicom-series")))
    assert volume.shape_xyz == (512, 512, 20)
    assert _files_under(temp_root) == []


# -- the float64 header -----------------------------------------------------------------------------


def _header(dtype: str, shape: list[int]) -> image_pb2.Volume:
    return image_pb2.Volume(dtype=dtype, shape_xyz=shape, spacing_mm=[1, 1, 1])


def test_a_header_asking_for_more_bytes_than_an_upload_is_refused():
    header = _header("float64", [512, 512, 2048])  # MAX_VOXELS exactly: 4 GiB of float64
    assert math.prod(header.shape_xyz) <= limits.MAX_VOXELS and len(header.SerializeToString()) < 100
    for check in (volume_header, expected_bytes):
        with pytest.raises(InputError, match="bytes, above the limit") as refused:
            check(header, "request.image.volume")
        assert refused.value.field == "request.image.volume.shape_xyz"
    assert expected_bytes(_header("int16", [512, 512, 2048])) == limits.MAX_UPLOAD_BYTES  # the largest CT


def test_a_file_header_asking_for_more_bytes_than_an_upload_is_refused(tmp_path):
    import nibabel

    image = nibabel.Nifti1Image(np.zeros((2, 2, 2), np.float64), np.eye(4))
    image.header.set_data_shape((512, 512, 1100))  # 2.2 GiB of float64 from a 352-byte header
    path = tmp_path / "image.nii"
    path.write_bytes(image.header.binaryblock)
    with pytest.raises(InputError, match="bytes of voxels") as refused:
        check_declared_size(path, "image.file.content")
    assert refused.value.field == "image.file.content"


SECRET = b"token=not-for-clients-0123456789abcdef"


@pytest.mark.parametrize(
    ("filename", "header"),
    [
        (
            "image.nrrd",
            "NRRD0004\ntype: uint8\ndimension: 2\nsizes: 8 4\nencoding: raw\ndata file: {secret}\n\n",
        ),
        (
            "image.nrrd",
            "NRRD0004\ntype: uint8\ndimension: 2\nsizes: 8 4\nencoding: raw\ndatafile: {secret}\n\n",
        ),
        (
            "image.mha",
            "ObjectType = Image\nNDims = 2\nDimSize = 8 4\nElementType = MET_UCHAR\nElementDataFile = {secret}\n",
        ),
    ],
)
def test_an_upload_naming_a_server_file_as_its_data_is_refused_unread(tmp_path, filename, header):
    """NRRD and MetaImage may keep their voxels in another file, by absolute path: the service read
    whatever server file a client's header named. The refusal names the field and leaks nothing."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    with pytest.raises(InputError, match="data file outside itself") as refused:
        volume_from_file(filename, header.format(secret=secret).encode())
    assert refused.value.field == "image.file.content"
    assert "not-for-clients" not in str(refused.value)


def test_an_nrrd_and_an_mha_holding_their_own_data_still_read(tmp_path):
    raw = bytes(range(32))
    nrrd = b"NRRD0004\ntype: uint8\ndimension: 2\nsizes: 8 4\nencoding: raw\n\n" + raw
    mha = (
        b"ObjectType = Image\nNDims = 2\nDimSize = 8 4\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n"
        + raw
    )
    for filename, content in (("image.nrrd", nrrd), ("image.mha", mha)):
        volume = volume_from_file(filename, content)
        assert sorted(int(v) for v in volume.array.ravel()) == list(range(32))


def _vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_float64_upload_header_does_not_make_the_service_allocate(tmp_path):
    """A real service: the header alone (512×512×513 float64, just over 1 GiB) is refused before
    the scaffold sizes its buffer, while the client still holds the stream open. The client is
    released once the service logged its refusal (gRPC reports the status only when the client's
    stream ends), or after 20 s, or as soon as the service's RSS jumped."""
    service, address, _ = start_service(tmp_path)
    try:
        wait_serving(address)
        request = estimate_request(small_volume())
        request.image.volume.CopyFrom(_header("float64", [512, 512, 513]))
        release = threading.Event()

        def messages():
            yield UPLOAD.first_message(request)
            release.wait(60)

        refused_line = "invalid field request.image.volume.shape_xyz"
        before = _vm_rss(service.pid)
        with grpc.insecure_channel(address) as channel:
            upload = channel.stream_unary(UPLOAD_METHOD, response_deserializer=pb.EstimateResponse.FromString)
            call = upload.future(messages(), timeout=90)
            peak, until = before, time.monotonic() + 20
            while refused_line not in service.log.read_text() and time.monotonic() < until:
                peak = max(peak, _vm_rss(service.pid))
                if peak - before > 256 * MIB:
                    break
                time.sleep(0.05)
            peak = max(peak, _vm_rss(service.pid))
            release.set()
            with pytest.raises(grpc.RpcError) as refused:
                call.result(timeout=30)
        assert peak - before < 256 * MIB, f"service RSS grew {(peak - before) / MIB:.0f} MiB"
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "shape_xyz" in refused.value.details()
        assert service.alive()
        print(f"service RSS {before / MIB:.0f} -> peak {peak / MIB:.0f} MiB")
    finally:
        service.stop()


# -- deadlines and cancellation ---------------------------------------------------------------------


def test_an_expired_budget_stops_extraction(sample, temp_root):
    content = zip_folder(sample("ct-dicom-series"))
    with scope(WorkBudget.from_timeout(0)), pytest.raises(DeadlineExceededError):
        volume_from_file("series.zip", content)
    assert _files_under(temp_root) == []


def test_a_cancel_stops_a_crafted_header_inside_the_dicom_parse(tmp_path):
    """A valid DICOM head followed by 4 MiB of tiny elements (seconds of pydicom): the parse itself
    reads through the budget, so a cancel ends it at the next MiB (deterministic: the caller is
    "gone" from the second look on, which is inside the parse)."""
    path = tmp_path / "00000.dcm"
    path.write_bytes(_meta_only_dicom() + bytes(4 * MIB))
    looks = []

    def is_active() -> bool:
        looks.append(1)
        return len(looks) < 2

    with scope(WorkBudget(None, is_active)), pytest.raises(RequestCancelledError):
        check_declared_size(path, "image.file.content")
    assert len(looks) == 2


class _SilentHandler(http.server.BaseHTTPRequestHandler):
    """A DICOMweb server that accepts and never answers."""

    def do_GET(self):
        time.sleep(30)

    def log_message(self, *args):
        pass


def test_dicomweb_waits_no_longer_than_the_request_deadline():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SilentHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}/dicomweb"
    reference = image_pb2.DicomWebReference(
        base_url=base, study_instance_uid="1.2", series_instance_uid="1.2.3"
    )
    try:
        started = time.monotonic()
        with scope(WorkBudget.from_timeout(1.0)), pytest.raises(DeadlineExceededError):
            volume_from_dicomweb(reference, [base])
        print(f"DICOMweb wait ended after {time.monotonic() - started:.2f} s")
        with scope(WorkBudget.from_timeout(0)), pytest.raises(DeadlineExceededError):
            volume_from_dicomweb(reference, [base])
    finally:
        server.shutdown()
        server.server_close()


# -- stale temp folders after SIGKILL ---------------------------------------------------------------

_HOLDER = """
import sys, time
from pathlib import Path
from services.api.sources import request_temp_dir
work = request_temp_dir("image")
(Path(work.name) / "image.zip").write_bytes(b"x" * 4096)
print(work.name, flush=True)
time.sleep(120)
"""


def test_stale_request_folders_of_killed_processes_are_removed(temp_root):
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER],
        cwd=REPO_ROOT,
        env={**os.environ, "TMPDIR": str(temp_root)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        left = Path(child.stdout.readline().strip())
        assert left.is_file() or left.is_dir()
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    stale_root = left.parent
    assert stale_root.parent == temp_root and stale_root.name.startswith(f"wlcad-{child.pid}-")
    with request_temp_dir("image") as mine:  # this process's own folder: alive, kept
        other = temp_root / "wlcad-triton-abc"  # another wlcad temp folder: not ours to judge
        other.mkdir()
        removed = remove_stale_temp()
        assert removed == [stale_root] and not stale_root.exists()
        assert Path(mine).is_dir() and other.is_dir()
    assert remove_stale_temp() == []


def test_an_uncompressed_header_declaring_more_than_its_file_holds_is_refused(tmp_path):
    """A 352-byte .nii (or native DICOM) whose header asks for hundreds of MiB: the data cannot be in
    the file, so no reader is let allocate for it."""
    import nibabel

    image = nibabel.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    image.header.set_data_shape((512, 512, 256))
    path = tmp_path / "image.nii"
    path.write_bytes(image.header.binaryblock + bytes(4) + bytes(32))  # header, no extension, 32 bytes
    with pytest.raises(InputError, match="declares 268435456 bytes of voxels; the file holds") as refused:
        sources.check_declared_size(path, "image.file.content")
    assert refused.value.field == "image.file.content"


_CT_SIZES = b"512 512 2048"  # MAX_VOXELS of int16: exactly the 1 GiB upload limit


def _nrrd(encoding: str, data: bytes) -> bytes:
    return (
        b"NRRD0004\ntype: short\ndimension: 3\nsizes: "
        + _CT_SIZES
        + f"\nencoding: {encoding}\n".encode()
        + b"endian: little\n\n"
        + data
    )


def _metaimage(lines: bytes) -> bytes:
    return b"ObjectType = Image\nNDims = 3\nDimSize = " + _CT_SIZES + b"\nElementType = MET_SHORT\n" + lines


@pytest.mark.parametrize(
    ("filename", "content", "refusal"),
    [
        ("image.nrrd", _nrrd("raw", bytes(100)), "the file holds"),
        ("image.nrrd", _nrrd("gzip", gzip.compress(bytes(1000))), "the gzip-compressed file holds"),
        ("image.nrrd", _nrrd("ascii", b"0 " * 50), "the text-encoded file holds"),
        (
            "image.mha",
            _metaimage(b"CompressedData = True\nElementDataFile = LOCAL\n" + bytes(100)),
            "the zlib-compressed file holds",
        ),
        ("image.mhd", _metaimage(b"ElementDataFile = image.raw\n"), "the file holds 100 bytes"),
    ],
)
def test_a_header_declaring_more_than_its_data_can_hold_is_refused_before_any_reader(
    tmp_path, filename, content, refusal
):
    """Found by the atheris pass (an out-of-memory at 3.6 GB): a header of a few hundred bytes may
    declare the largest CT the service accepts, and ITK and Teem allocate the 1 GiB before they find
    the data short (ITK even returned a 1 GiB volume of zeros for the 100-byte zlib MetaImage). The
    data bound is the file's size, times 1032 for deflate (its largest expansion), halved for text."""
    path = tmp_path / filename
    path.write_bytes(content)
    (tmp_path / "image.raw").write_bytes(bytes(100))
    with pytest.raises(InputError, match=refusal) as refused:
        sources.check_declared_size(path, "image.file.content")
    assert refused.value.field == "image.file.content"


def test_compressed_and_text_encodings_that_hold_their_data_still_read(tmp_path):
    values = np.arange(64, dtype="<i2").reshape(4, 4, 4)
    head = b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nendian: little\nencoding: "
    files = {
        "gzip.nrrd": head + b"gzip\n\n" + gzip.compress(values.tobytes()),
        "text.nrrd": head + b"ascii\n\n" + " ".join(str(v) for v in values.ravel()).encode(),
        "zlib.mha": b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\n"
        b"CompressedData = True\nCompressedDataSize = "
        + str(len(zlib.compress(values.tobytes()))).encode()
        + b"\nElementDataFile = LOCAL\n"
        + zlib.compress(values.tobytes()),
    }
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        sources.check_declared_size(path, "image.file.content")
        assert sorted(int(v) for v in read_image(path).array.ravel()) == list(range(64)), name
