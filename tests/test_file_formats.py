"""NIfTI (RAS→LPS), NRRD/MHA and the CIRCUS CS input folder, against SimpleITK and round trips."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from services.core.errors import InputError
from services.core.io import read_image, write_image
from services.core.volume import Volume


@pytest.mark.parametrize("name", ["brain-t1-nifti", "chest-ct-nifti", "mr-nifti", "ct-dicom-labels"])
def test_nifti_geometry_and_values_match_simpleitk(sample, name: str) -> None:
    path = sample(name)
    volume = read_image(path)
    reference = sitk.ReadImage(str(path))
    np.testing.assert_allclose(volume.shape_xyz, reference.GetSize())
    np.testing.assert_allclose(volume.spacing, reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(volume.origin, reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(volume.direction.ravel(), reference.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(reference))


def test_nifti_ras_to_lps_puts_the_left_hemisphere_at_positive_x(sample) -> None:
    """Colin27 in MNI space: LPS x grows to the patient's left; the brain is roughly centred on 0."""
    brain = read_image(sample("brain-t1-nifti"))
    ras_affine = nib.load(str(sample("brain-t1-nifti"))).affine
    ras_of_first_voxel = ras_affine[:3, 3]
    np.testing.assert_allclose(
        brain.origin, [-ras_of_first_voxel[0], -ras_of_first_voxel[1], ras_of_first_voxel[2]]
    )
    tissue = np.argwhere(brain.array > 60)[:, ::-1]  # (i, j, k)
    centre_mm = brain.index_to_world(tissue.mean(axis=0))
    assert np.all(np.abs(centre_mm[:2]) < 25)


def _oblique_test_volume(dtype=np.int16) -> Volume:
    rng = np.random.default_rng(7)
    direction = Rotation.from_euler("zyx", [25, -10, 5], degrees=True).as_matrix()
    direction[:, 0] *= -1  # a left-handed grid must survive too
    return Volume(
        rng.integers(-1000, 2000, (6, 7, 8)).astype(dtype), (0.6, 0.8, 3.0), (12.5, -40.0, 7.25), direction
    )


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_write_then_read_round_trip_keeps_grid_and_values(tmp_path: Path, suffix: str) -> None:
    volume = _oblique_test_volume()
    path = write_image(volume, tmp_path / f"image{suffix}")
    back = read_image(path)
    assert back.same_grid(volume, tolerance_mm=1e-4)
    np.testing.assert_allclose(back.direction, volume.direction, atol=1e-5)
    np.testing.assert_array_equal(back.array, volume.array)
    # An independent reader sees the same geometry.
    reference = sitk.ReadImage(str(path))
    np.testing.assert_allclose(reference.GetOrigin(), volume.origin, atol=1e-4)
    np.testing.assert_allclose(reference.GetDirection(), volume.direction.ravel(), atol=1e-5)


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot write"):
        write_image(_oblique_test_volume(), tmp_path / "mask.png")
    bad = Volume(np.full((2, 2, 2), None, dtype=object), (1, 1, 1))  # no codec can store this
    with pytest.raises(Exception):  # noqa: B017 - whatever the codec raises, nothing is left behind
        write_image(bad, tmp_path / "complex.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_truncated_nifti_and_unknown_format_are_clear_errors(sample, tmp_path: Path) -> None:
    data = sample("brain-t1-nifti").read_bytes()
    truncated = tmp_path / "brain.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"brain\.nii\.gz"):
        read_image(truncated)
    unknown = tmp_path / "image.xyz"
    unknown.write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match="unrecognised format"):
        read_image(unknown)
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "nope.nii.gz")


# A fuzzer-found input: DICOM bytes (an OA element declaring 0xFFFFFCFF bytes) in a file named .nrrd.
# ITK used to probe every ImageIO and hand it to GDCM, which tried to allocate 4 GiB.
_DICOM_BYTES_DECLARING_4_GIB = (
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABAAAAAAAAAAkAAAAAAAAAAAAAAAAAAAAAAAAAAABESUNNAgABAE9B////////"
    "/AE="
)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_a_file_named_for_an_itk_format_is_read_as_that_format_only(
    sample, tmp_path: Path, suffix: str
) -> None:
    from services.api.sources import check_declared_size

    series = sample("ct-dicom-series")
    disguised = tmp_path / f"image{suffix}"
    disguised.write_bytes(next(p for p in sorted(series.iterdir()) if p.is_file()).read_bytes())
    with pytest.raises(InputError, match=rf"image\{suffix}"):
        read_image(disguised)
    with pytest.raises(InputError, match="unreadable header"):
        check_declared_size(disguised, "image")
    disguised.write_bytes(base64.b64decode(_DICOM_BYTES_DECLARING_4_GIB))
    with pytest.raises(InputError):
        read_image(disguised)


# --------------------------------------------------------------------------- CIRCUS CS input
def _circus_folder_from_series(series: Path, folder: Path, *, head_first: bool) -> Volume:
    """Write the series as CIRCUS CS does: a bare MHD (no origin), raw voxels and a JSON tag dump."""
    reference = read_image(series)
    datasets = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in series.iterdir()),
        key=lambda d: float(d.ImagePositionPatient[2]),
    )
    array = reference.array
    spacing_z = reference.spacing[2]
    if head_first:  # stored superior → inferior, flagged by a negative z spacing
        array = array[::-1]
        datasets = datasets[::-1]
        spacing_z = -spacing_z
    folder.mkdir()
    (folder / "0.mhd").write_text(
        f"DimSize = {array.shape[2]} {array.shape[1]} {array.shape[0]}\n"
        "ElementType = MET_SHORT\n"
        f"ElementSpacing = {reference.spacing[0]} {reference.spacing[1]} {spacing_z}\n"
    )
    np.ascontiguousarray(array).astype("<i2").tofile(folder / "0.raw")
    common = {
        "Modality": "CT",
        "ImageOrientationPatient": [float(v) for v in datasets[0].ImageOrientationPatient],
    }
    unique = [{"ImagePositionPatient": [float(v) for v in d.ImagePositionPatient]} for d in datasets]
    (folder / "0.json").write_text(json.dumps({"common": common, "unique": unique}))
    return reference


@pytest.mark.parametrize("head_first", [False, True])
def test_circus_input_folder_lands_on_the_dicom_world_grid(sample, tmp_path: Path, head_first: bool) -> None:
    reference = _circus_folder_from_series(sample("ct-dicom-series"), tmp_path / "in", head_first=head_first)
    volume = read_image(tmp_path / "in")
    assert volume.metadata["source_format"] == "circus"
    assert volume.metadata["modality"] == "CT"
    assert volume.spacing[2] > 0
    # Same world point → same value, whichever way the slices were stored.
    on_reference = volume.resample(reference=reference, interpolation="nearest")
    np.testing.assert_array_equal(on_reference.array, reference.array)
    assert read_image(tmp_path / "in" / "0.mhd").same_grid(volume)


def test_circus_without_positions_uses_the_sign_of_z_spacing(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "0.mhd").write_text("DimSize = 4 3 2\nElementType = MET_UCHAR\nElementSpacing = 0.5 0.5 -2.0\n")
    np.arange(24, dtype=np.uint8).tofile(folder / "0.raw")
    (folder / "0.json").write_text(json.dumps({"common": {}, "unique": []}))
    volume = read_image(folder)
    assert volume.spacing == (0.5, 0.5, 2.0)
    np.testing.assert_allclose(volume.direction[:, 2], [0, 0, -1])
    assert volume.metadata["origin_known"] is False


def test_circus_size_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "0.mhd").write_text("DimSize = 4 3 2\nElementType = MET_SHORT\nElementSpacing = 1 1 1\n")
    (folder / "0.raw").write_bytes(b"\x00" * 10)
    (folder / "0.json").write_text("{}")
    with pytest.raises(InputError, match="holds 10 bytes"):
        read_image(folder)


@pytest.mark.parametrize("ndims", ["-3", "99999999999999999999", "0", "three"])
def test_a_metaimage_ndims_itk_cannot_parse_is_refused_before_it_hangs(tmp_path: Path, ndims: str) -> None:
    """ITK's MetaIO never returned from ``NDims =-3`` or an overflowing NDims (a 94-byte file found by
    the fuzzer held the reader for good). Run in a child process so a regression fails, not hangs:
    the 60 s bound is for an endless loop, the read itself takes milliseconds."""
    import subprocess
    import sys

    (tmp_path / "image.mhd").write_text(
        f"ObjectType = Image\nNDims = {ndims}\nDimSize = 2 2 2\nElementType = MET_SHORT\nElementDataFile = image.raw\n"
    )
    (tmp_path / "image.raw").write_bytes(bytes(16))
    code = (
        "import sys; from pathlib import Path; from services.core.io import read_image\n"
        "from services.core.errors import InputError\n"
        "try: read_image(Path(sys.argv[1]))\n"
        "except InputError as e: print(e.field, e.message)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "image.mhd")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("image ") and "NDims must be 1..4" in done.stdout, done.stdout
