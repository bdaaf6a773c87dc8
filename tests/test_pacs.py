"""``wlcad pacs run`` against a real Orthanc with its DICOMweb plugin (issue 14 item 3).

A synthetic chest CT (two nodules at known voxels) with a named patient is stored in a private
Orthanc; the round trip runs as a user would (the CLI in its own process, with ``-v`` so INFO logs
are on) for a detection task with a tiny real ONNX blob-scorer model, and in-process for label
estimation. What was stored is read back by an independent client (``dicomweb-client`` directly, not
wlcad's) and checked: QIDO-RS lists it, highdicom reads it, it references the source series,
``dciodvfy`` finds no error, and it carries the source's patient module but nothing the source had
beyond what DICOM requires. Refusals (oversize series before any fetch, missing series, bad UID,
missing prompts, unreachable PACS) exit 2 or 69 with one line naming the field.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient

from services.cade.dicom_outputs import sphere_label_map
from services.core.errors import InputError
from services.inference.export import register_onnx_model
from services.pacs.client import PacsClient
from services.pacs.prompts import read_prompts
from services.pacs.run import PacsRunRequest, run_pacs
from services.servers.orthanc import LocalOrthanc
from tests.conftest import run_cli
from tests.test_detect_cli import CARD, CT_SPHERES, blob_scorer_onnx, synthetic_ct
from training.data.dicom_export import write_dicom_series

pytestmark = pytest.mark.timeout(300)

PATIENT_NAME, PATIENT_ID = "Doe^Jane", "MRN4711SECRET"
INSTITUTION = "St Unlisted Hospital"  # not required by a SEG/SR: must not be copied into one
SEG_CLASS, SR_CLASS = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = LocalOrthanc(tmp_path_factory.mktemp("orthanc")).start(timeout_s=60)  # readiness: generous
    yield server
    server.stop()


@pytest.fixture(scope="module")
def source(orthanc, tmp_path_factory) -> dict:
    """The synthetic CT as a named patient's DICOM series, stored in Orthanc."""
    paths = write_dicom_series(synthetic_ct(), tmp_path_factory.mktemp("series"), uid_seed="pacs-test")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, "19700101"
        ds.InstitutionName = INSTITUTION
        ds.save_as(path)
    assert orthanc.upload(paths) == len(paths)
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return {
        "study": str(header.StudyInstanceUID),
        "series": str(header.SeriesInstanceUID),
        "count": len(paths),
    }


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    register_onnx_model(
        root, "cade_chest-ct-nodule", blob_scorer_onnx(3, 32), metrics={}, max_batch_size=4, **CARD
    )
    return root


def _pacs(orthanc, source, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(
        "-v", "pacs", "run", "--url", orthanc.dicomweb_url, "--study", source["study"],
        "--series", source["series"], *extra, timeout=240,
    )  # fmt: skip


def _retrieve(orthanc, study: str, item: dict) -> pydicom.Dataset:
    """One stored object, fetched by an independent client (not wlcad's)."""
    client = DICOMwebClient(orthanc.dicomweb_url, timeout=30)
    return client.retrieve_instance(study, item["series_instance_uid"], item["sop_instance_uid"])


def _check_derived(ds: pydicom.Dataset, source: dict, tmp_path: Path) -> None:
    """What a stored SEG/SR must carry of its source, and what it must not."""
    assert str(ds.StudyInstanceUID) == source["study"]
    assert str(ds.PatientID) == PATIENT_ID  # the patient module is required: a PACS files by it
    assert str(ds.SeriesInstanceUID) != source["series"]
    assert "InstitutionName" not in ds
    if shutil.which("dciodvfy"):
        path = tmp_path / f"{ds.Modality}.dcm"
        ds.save_as(path, enforce_file_format=True)
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert errors == []


def test_detection_round_trip_stores_seg_and_sr_that_qido_finds(orthanc, source, repository, tmp_path):
    report = tmp_path / "result.json"
    done = _pacs(
        orthanc, source, "--task", "chest-ct-nodule", "--model-repository", str(repository),
        "--threshold", "0.5", "--report", str(report),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_text())
    assert result["all_found"] is True
    assert result["instances_fetched"] == source["count"]
    assert result["model_version"] == "cade_chest-ct-nodule/1"
    assert result["findings"] == len(CT_SPHERES)
    kinds = {item["kind"]: item for item in result["stored"]}
    assert set(kinds) == {"seg", "sr"}
    assert {kinds["seg"]["sop_class_uid"], kinds["sr"]["sop_class_uid"]} == {SEG_CLASS, SR_CLASS}
    logs = done.stdout + done.stderr
    assert "INFO wlcad.pacs" in logs  # the log was on, and still names no patient
    assert PATIENT_ID not in logs and "Doe" not in logs and "19700101" not in logs

    # QIDO-RS by an independent client: the study now holds the source, the SEG and the SR series
    client = DICOMwebClient(orthanc.dicomweb_url, timeout=30)
    modalities = {
        item["00080060"]["Value"][0]
        for item in client.search_for_series(source["study"], fields=["Modality"])
    }
    assert {"CT", "SEG", "SR"} <= modalities

    seg = hd.seg.Segmentation.from_dataset(_retrieve(orthanc, source["study"], kinds["seg"]))
    _check_derived(seg, source, tmp_path)
    assert seg.get_segment_numbers() == [1, 2]
    assert seg.get_segment_description(1).SegmentAlgorithmName == "wlcad cade chest-ct-nodule"
    assert seg.get_source_image_uids()[0][1] == source["series"]
    masks = seg.get_volume(combine_segments=True).array
    assert set(np.unique(masks)) == {0, 1, 2}

    sr = hd.sr.Comprehensive3DSR.from_dataset(_retrieve(orthanc, source["study"], kinds["sr"]))
    _check_derived(sr, source, tmp_path)
    content = hd.sr.MeasurementReport.from_sequence([sr])
    assert len(content.get_volumetric_roi_measurement_groups()) == len(CT_SPHERES)


def test_label_estimation_round_trip_from_prompts(orthanc, source, tmp_path, caplog):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(
        json.dumps(
            [
                {"center_voxel": [30, 41, 12], "diameter_mm": 14, "lesion_type": "solid", "lesion_id": 3},
                {"center_voxel": [80, 60, 27], "diameter_mm": 12, "lesion_id": 5},
            ]
        )
    )
    request = PacsRunRequest(
        orthanc.dicomweb_url, source["study"], source["series"], "label-estimation",
        prompts=tuple(read_prompts(prompts)), method="threshold",
    )  # fmt: skip
    with caplog.at_level(logging.DEBUG):
        result = run_pacs(request)
    assert result.all_found and result.findings == 2 and result.model_version == "threshold"
    assert PATIENT_ID not in caplog.text and "Doe" not in caplog.text
    by_kind = {o.kind: o for o in result.stored}
    seg = hd.seg.Segmentation.from_dataset(
        _retrieve(orthanc, source["study"], {"series_instance_uid": by_kind["seg"].series_instance_uid,
                                             "sop_instance_uid": by_kind["seg"].sop_instance_uid})
    )  # fmt: skip
    _check_derived(seg, source, tmp_path)
    labels = [seg.get_segment_description(n).SegmentLabel for n in seg.get_segment_numbers()]
    assert labels == ["lesion 3", "lesion 5"]
    assert seg.get_segment_description(1).SegmentDescription == "solid"
    assert by_kind["sr"].found


def test_a_series_over_the_limits_is_refused_before_any_fetch(orthanc, source, monkeypatch, tmp_path):
    def no_fetch(*args, **kwargs):
        raise AssertionError("fetched a series the size check should have refused")

    monkeypatch.setattr(PacsClient, "fetch_series", no_fetch)
    request = PacsRunRequest(orthanc.dicomweb_url, source["study"], source["series"], "label-estimation",
                             prompts=tuple(read_prompts(_prompt_file(tmp_path))),
                             method="threshold")  # fmt: skip
    client = PacsClient(orthanc.dicomweb_url, max_voxels=100_000)
    with pytest.raises(InputError) as error:
        run_pacs(request, client)
    assert error.value.field == "series" and "422400 voxels" in error.value.message
    with pytest.raises(InputError, match="instances"):
        run_pacs(request, PacsClient(orthanc.dicomweb_url, max_instances=10))


def test_the_fetch_stops_at_the_byte_limit_whatever_the_search_said(orthanc, source, tmp_path):
    client = PacsClient(orthanc.dicomweb_url, max_fetch_bytes=100_000)
    with pytest.raises(InputError, match="sent more than 100000 bytes"):
        client.fetch_series(source["study"], source["series"], tmp_path / "fetched")
    assert len(list((tmp_path / "fetched").iterdir())) < source["count"]


def test_bad_requests_exit_2_naming_the_field(orthanc, source, repository, tmp_path):
    missing = _pacs(orthanc, {**source, "series": "1.2.3.4"}, "--task", "chest-ct-nodule",
                    "--model-repository", str(repository))  # fmt: skip
    assert missing.returncode == 2 and "series: no such study/series" in missing.stderr
    bad_uid = _pacs(orthanc, {**source, "study": "1.2.x"}, "--task", "chest-ct-nodule")
    assert bad_uid.returncode == 2 and "study: must be a DICOM UID" in bad_uid.stderr
    no_prompts = _pacs(orthanc, source, "--task", "label-estimation")
    assert no_prompts.returncode == 2 and "prompts:" in no_prompts.stderr
    unknown = _pacs(orthanc, source, "--task", "liver-tumour")
    assert unknown.returncode == 2 and "task:" in unknown.stderr
    no_model = _pacs(orthanc, source, "--task", "chest-ct-nodule", "--model-repository", str(tmp_path))
    assert no_model.returncode == 2
    for case in (missing, bad_uid, no_prompts, unknown, no_model):
        assert "Traceback" not in case.stderr and len(case.stderr.strip().splitlines()) == 1


def test_an_unreachable_pacs_exits_69(source, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    done = run_cli(
        "pacs", "run", "--url", f"http://127.0.0.1:{port}/dicom-web", "--study", source["study"],
        "--series", source["series"], "--task", "label-estimation", "--method", "threshold",
        "--prompts", str(_prompt_file(tmp_path)), "--timeout-s", "5",
    )  # fmt: skip
    assert done.returncode == 69 and "PACS: the DICOMweb server is unreachable" in done.stderr


def _prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"lesions": [{"center_mm": [0, 0, 0], "diameter_mm": 5}]}))
    return path


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("[]", "non-empty list"),
        ("{not json", "not JSON"),
        ('[{"center_mm": [0, 0], "diameter_mm": 5}]', "lesion 1 center_mm needs 3 finite numbers"),
        ('[{"center_mm": [0, 0, 0], "center_voxel": [1, 1, 1], "diameter_mm": 5}]', "exactly one"),
        ('[{"center_mm": [0, 0, 0], "diameter_mm": -1}]', "diameter_mm"),
        ('[{"center_mm": [0, 0, 0], "diameter_mm": 5, "lesion_id": 2}, '
         '{"center_mm": [1, 1, 1], "diameter_mm": 5, "lesion_id": 2}]', "repeat"),
        ('[{"center_mm": [0, 0, 0], "diameter_mm": 5, "colour": "red"}]', "unknown keys"),
    ],
)  # fmt: skip
def test_bad_prompt_files_are_refused_naming_prompts(tmp_path, payload, message):
    path = tmp_path / "prompts.json"
    path.write_text(payload)
    with pytest.raises(InputError, match=message) as error:
        read_prompts(path)
    assert error.value.field == "prompts"


def test_candidate_spheres_keep_the_stronger_candidate_where_they_overlap():
    from services.cade.candidates import DetectionCandidate

    image = synthetic_ct()
    first = DetectionCandidate(tuple(image.index_to_world([30, 40, 12])), (30, 40, 12), 10.0, 0.9)
    second = DetectionCandidate(tuple(image.index_to_world([33, 40, 12])), (33, 40, 12), 10.0, 0.8)
    labels = sphere_label_map(image, [first, second])
    assert labels[12, 40, 30] == 1 and labels[12, 40, 33] == 1  # inside both: the stronger's
    assert labels[12, 40, 38] == 2  # 6.4 mm from the first (radius 5), 4.0 mm from the second
    world = image.index_to_world(np.argwhere(labels == 1)[:, ::-1].astype(float))
    assert np.linalg.norm(world - np.asarray(first.center_mm), axis=-1).max() <= 5.0


@pytest.mark.parametrize("name", ["ct-3slice-dicom", "brain-mr-dicom-series"])
def test_a_real_series_round_trips_with_its_geometry(orthanc, sample, name, tmp_path, caplog):
    """Real scanner series, a 3-slice CT (dcmqi) and the oblique brain MR whose header states a wrong
    slice spacing and whose files hold Command Set elements (the TotalSegmentator CT lacks its
    Study/Series UIDs: no PACS stores it): the SEG stored in Orthanc and read back by highdicom lies
    where the prompt was, on the source's slice spacing, and the SR is found too."""
    from services.core.io import read_image

    folder = sample(name)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert orthanc.upload(files) == len(files)
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    volume = read_image(folder)
    centre_voxel = [float(n // 2) for n in volume.shape_xyz]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"center_voxel": centre_voxel, "diameter_mm": 12.0}]))
    request = PacsRunRequest(
        orthanc.dicomweb_url, str(header.StudyInstanceUID), str(header.SeriesInstanceUID),
        "label-estimation", prompts=tuple(read_prompts(prompts)), method="sphere",
    )  # fmt: skip
    with caplog.at_level(logging.DEBUG):
        result = run_pacs(request)
    assert result.all_found and result.instances_fetched == len(files)
    for value in (str(header.get("PatientName", "")), str(header.get("PatientID", ""))):
        if len(value) >= 4:
            assert value not in caplog.text
    seg_item = next(o for o in result.stored if o.kind == "seg")
    seg = hd.seg.Segmentation.from_dataset(
        DICOMwebClient(orthanc.dicomweb_url, timeout=30).retrieve_instance(
            str(header.StudyInstanceUID), seg_item.series_instance_uid, seg_item.sop_instance_uid
        )
    )
    assert "InstitutionName" not in seg
    mask = seg.get_volume(combine_segments=True)
    assert np.allclose(mask.spacing, tuple(volume.spacing)[::-1], atol=1e-3)  # (z, y, x) vs (x, y, z)
    inside = np.argwhere(mask.array > 0)
    assert len(inside) > 0
    world = (mask.affine @ np.c_[inside, np.ones(len(inside))].T)[:3].T
    centre_mm = volume.index_to_world(centre_voxel)
    assert np.linalg.norm(world.mean(axis=0) - centre_mm) <= max(volume.spacing)


def test_a_radiograph_task_stores_an_sr_only(orthanc, sample, tmp_path):
    """cxr-mass on the real chest radiograph (CR, no frame of reference: no SEG is possible): the SR
    holds one planar ROI group per candidate and QIDO-RS finds it."""
    radiograph = sample("chest-xray")
    assert orthanc.upload([radiograph]) == 1
    header = pydicom.dcmread(radiograph, stop_before_pixels=True)
    models = tmp_path / "models"
    register_onnx_model(
        models, "cade_cxr-mass", blob_scorer_onnx(2, None), metrics={}, max_batch_size=2, **CARD
    )
    report = tmp_path / "result.json"
    done = _pacs(
        orthanc, {"study": str(header.StudyInstanceUID), "series": str(header.SeriesInstanceUID)},
        "--task", "cxr-mass", "--model-repository", str(models), "--threshold", "0.5", "--report", str(report),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_text())
    assert result["all_found"] and [item["kind"] for item in result["stored"]] == ["sr"]
    sr = hd.sr.Comprehensive3DSR.from_dataset(
        _retrieve(orthanc, str(header.StudyInstanceUID), result["stored"][0])
    )
    groups = hd.sr.MeasurementReport.from_sequence([sr]).get_planar_roi_measurement_groups()
    assert len(groups) == result["findings"] >= 1
