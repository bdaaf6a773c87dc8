"""The services return DICOM SEG and SR bytes when asked (issue 14, item 1): ``outputs`` on
DetectRequest and EstimateRequest, through real ``wlcad serve cade`` / ``wlcad serve
label-estimation`` processes and a real gateway (gRPC and HTTP), on the real TotalSegmentator CT
series (its blanked Study/Series UIDs restored, as a PACS would hold it) sent as a zip: unary,
chunked gRPC upload, multipart HTTP upload, JSON HTTP, and by DICOMweb reference to a real Orthanc.

Every object returned is checked by dciodvfy and read back by highdicom: the SR's candidates equal
the JSON/proto candidates (centre, diameter, confidence, the slice each references), the SEG's
segments equal the returned masks on the image grid, the estimation SR's measurements equal the
returned ones and reference the returned SEG. Refusals (a NIfTI or voxels asking for a SEG, an SR
of an estimation without its SEG, a SEG of a radiograph task, an unknown kind, an answer over the
message limit) name ``outputs`` and come before any work.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import grpc
import highdicom as hd
import numpy as np
import pydicom
import pytest
from google.protobuf import json_format
from pydicom.sr.codedict import codes

from services.api.client import LabelEstimationClient, channel, zip_folder
from services.api.convert import unpack_mask
from services.api.detection_client import DetectionClient
from services.api.pb import common_pb2, image_pb2
from services.api.pb import detection_pb2 as dpb
from services.api.pb import label_estimation_pb2 as lpb
from services.cade.candidates import DetectionCandidate
from services.cade.dicom_outputs import sphere_label_map
from services.core.errors import InputError
from services.core.io import read_image, write_image
from services.core.lesion_prompt import LesionPrompt
from services.inference.export import register_onnx_model
from services.servers import dicom_outputs
from services.servers.orthanc import LocalOrthanc
from tests.dicom_checks import (
    dciodvfy_errors,
    dicom_files,
    needs_dciodvfy,
    seg_on_grid,
    source_uids,
)
from tests.serving_support import Process, free_port, wait_serving
from tests.test_detect_cli import CARD, blob_scorer_onnx

pytestmark = [pytest.mark.timeout(600), needs_dciodvfy]
CT = "chest-ct-nodule"
SEG, SR = common_pb2.DICOM_SEG, common_pb2.DICOM_SR
THRESHOLD = 0.9


@pytest.fixture(scope="module")
def ct_image(ct_series):
    return read_image(ct_series)


@pytest.fixture(scope="module")
def inherited(ct_series) -> set[str]:
    return source_uids(dicom_files(ct_series))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = LocalOrthanc(tmp_path_factory.mktemp("orthanc")).start(timeout_s=60)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, orthanc, ct_series):
    """(cade address, label-estimation address, gateway gRPC address, gateway HTTP URL)."""
    root = tmp_path_factory.mktemp("models")
    register_onnx_model(
        root, "cade_chest-ct-nodule", blob_scorer_onnx(3, 32), metrics={}, max_batch_size=4, **CARD
    )
    register_onnx_model(
        root, "cade_cxr-mass", blob_scorer_onnx(2, None), metrics={}, max_batch_size=2, **CARD
    )
    logs = tmp_path_factory.mktemp("logs")
    cade, labels = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    grpc_address, http_port = f"127.0.0.1:{free_port()}", free_port()
    no_metrics = ["--metrics-listen", ""]
    dicomweb = ["--dicomweb", orthanc.dicomweb_url]
    processes = [
        Process(
            ["serve", "cade", "--listen", cade, *no_metrics, "--compute-slots", "1", *dicomweb],
            logs / "cade.log",
            {"WLCAD_MODEL_REPOSITORY": str(root)},
        ).start(),
        Process(
            ["serve", "label-estimation", "--listen", labels, *no_metrics, "--compute-slots", "1", *dicomweb],
            logs / "labels.log",
        ).start(),
    ]
    routes = ["--route", f"cade={cade}", "--route", f"label-estimation={labels}"]
    listen = ["--grpc-listen", grpc_address, "--http-listen", f"127.0.0.1:{http_port}"]
    processes.append(Process(["serve", "gateway", *listen, *routes], logs / "gateway.log").start())
    try:
        wait_serving(cade)
        wait_serving(labels)
        wait_serving(grpc_address, service="wlcad.v1.Detection")
        yield cade, labels, grpc_address, f"http://127.0.0.1:{http_port}"
    finally:
        for process in reversed(processes):
            process.stop()
    texts = {name: (logs / name).read_text() for name in ("cade.log", "labels.log", "gateway.log")}
    for text in texts.values():
        assert "Traceback" not in text
    patient = pydicom.dcmread(dicom_files(ct_series)[0], stop_before_pixels=True)
    identifiers = [str(patient.get(k) or "") for k in ("PatientName", "PatientID", "StudyInstanceUID")]
    for text in texts.values():  # no patient identifier (nor the study's UID) in any log line
        for value in identifiers:
            if len(value) > 3:
                assert value not in text


# -- checks -----------------------------------------------------------------------------------------


def _saved(data: bytes, tmp_path: Path, name: str) -> Path:
    assert data[128:132] == b"DICM"
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _assert_sr_equals_candidates(path: Path, candidates: list[dict], image) -> None:
    """The SR read by highdicom: one volumetric group per candidate, in rank order, equal to them."""
    sr = hd.sr.srread(path)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(candidates)
    uids = list(image.metadata["sop_instance_uids"])
    for rank, (group, cand) in enumerate(zip(groups, candidates, strict=True), start=1):
        assert group.tracking_identifier == f"candidate-{rank}"
        np.testing.assert_allclose(group.roi.graphic_data[0], cand["center_mm"], atol=1e-3)
        (diameter,) = group.get_measurements(name=codes.SCT.Diameter)
        assert diameter.value == pytest.approx(cand["diameter_mm"], rel=1e-6)
        (confidence,) = group.get_measurements(name=codes.DCM.CertaintyOfFinding)
        assert confidence.value == pytest.approx(cand["confidence"], rel=1e-6)
        referenced = {str(r.ReferencedSOPInstanceUID) for r in _references(group)}
        assert referenced == {uids[int(cand["center_voxel"][2])]}  # the slice the centre lies on


def _references(node):
    """Every ReferencedSOPSequence item under a content item or template (a list of items)."""
    children = node.get("ContentSequence", []) if isinstance(node, pydicom.Dataset) else list(node)
    for item in children:
        yield from item.get("ReferencedSOPSequence", [])
        yield from _references(item)


def _candidates_of(response: dpb.DetectResponse) -> list[dict]:
    return [
        {
            "center_mm": list(c.center_mm),
            "center_voxel": list(c.center_voxel),
            "diameter_mm": c.diameter_mm,
            "confidence": c.confidence,
        }
        for c in response.candidates
    ]


def _label_map(response: lpb.EstimateResponse, image) -> np.ndarray:
    """The returned masks on the image grid, voxel = segment number (non-empty lesions in order)."""
    labels = np.zeros(image.array.shape, np.uint16)
    number = 0
    for lesion in response.lesions:
        if not lesion.measurements.voxels:
            continue
        number += 1
        start, inside = unpack_mask(lesion.mask)
        x, y, z = start
        box = labels[z : z + inside.shape[0], y : y + inside.shape[1], x : x + inside.shape[2]]
        box[inside] = number
    return labels


def _assert_estimation_outputs(response: lpb.EstimateResponse, image, inherited, tmp_path: Path) -> None:
    seg_path = _saved(response.dicom_seg, tmp_path, "seg.dcm")
    sr_path = _saved(response.dicom_sr, tmp_path, "sr.dcm")
    assert dciodvfy_errors(seg_path, inherited) == []
    assert dciodvfy_errors(sr_path, inherited) == []
    expected = _label_map(response, image)
    assert expected.any()
    np.testing.assert_array_equal(seg_on_grid(hd.seg.segread(seg_path), image), expected)
    seg = pydicom.dcmread(seg_path)
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    reported = [lesion for lesion in response.lesions if lesion.measurements.voxels]
    assert len(groups) == len(reported) >= 1
    for number, (group, lesion) in enumerate(zip(groups, reported, strict=True), start=1):
        assert group.tracking_identifier == f"lesion-{lesion.lesion_id}"
        refs = list(_references(group))
        assert [int(r.ReferencedSegmentNumber) for r in refs] == [number]
        assert {str(r.ReferencedSOPInstanceUID) for r in refs} == {str(seg.SOPInstanceUID)}
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.value == pytest.approx(lesion.measurements.volume_mm3, rel=1e-6)
        (diameter,) = group.get_measurements(name=codes.SCT.Diameter)
        assert diameter.value == pytest.approx(lesion.measurements.max_diameter_mm, rel=1e-6)
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for s in pydicom.dcmread(sr_path).CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    assert str(seg.SOPInstanceUID) in evidence


def _refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def _post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, body, {"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _multipart(request: dict, filename: str, content: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="request"\r\n'
        f"Content-Type: application/json\r\n\r\n{json.dumps(request)}\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + content + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _prompts(image) -> list[LesionPrompt]:
    """Two lesions inside the CT's body (centres on slices 8 and 12, 20 and 14 mm)."""
    nx, ny, _ = image.shape_xyz
    return [
        LesionPrompt(tuple(float(v) for v in image.index_to_world([nx // 2, ny // 2, 8])), 20.0, 1),
        LesionPrompt(tuple(float(v) for v in image.index_to_world([nx // 3, ny // 2, 12])), 14.0, 2),
    ]


# -- detection ----------------------------------------------------------------------------------------


def test_detect_returns_an_sr_equal_to_its_candidates_over_grpc(
    stack, ct_series, ct_image, inherited, tmp_path
):
    cade, _, grpc_address, _ = stack
    with DetectionClient(cade) as client:
        plain = client.detect_file(CT, ct_series, threshold=THRESHOLD)
        asked = client.detect_file(CT, ct_series, threshold=THRESHOLD, outputs=[SR])
    assert not plain.dicom_sr and not plain.dicom_seg  # nothing unasked
    assert asked.candidates, "the blob scorer finds bright regions in the CT at 0.9"
    assert list(asked.candidates) == list(plain.candidates)
    assert not asked.dicom_seg
    path = _saved(asked.dicom_sr, tmp_path, "sr.dcm")
    assert dciodvfy_errors(path, inherited) == []
    _assert_sr_equals_candidates(path, _candidates_of(asked), ct_image)
    sr = pydicom.dcmread(path)
    source = pydicom.dcmread(dicom_files(ct_series)[0], stop_before_pixels=True)
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    with DetectionClient(grpc_address) as client:  # the gateway's gRPC side passes the bytes on
        via_gateway = client.detect_file(CT, ct_series, threshold=THRESHOLD, outputs=[SR])
    assert list(via_gateway.candidates) == list(asked.candidates) and via_gateway.dicom_sr[:132] == sr_head(
        asked
    )


def sr_head(response) -> bytes:
    return response.dicom_sr[:132]


def test_detect_upload_over_http_returns_sr_and_seg_equal_to_the_json(
    stack, ct_series, ct_image, inherited, tmp_path
):
    """The multipart route streams the zip as a DetectUpload: the service tees it to read headers."""
    *_, http_url = stack
    body, content_type = _multipart(
        {"task": CT, "threshold": THRESHOLD, "outputs": ["DICOM_SR", "DICOM_SEG"]},
        "series.zip",
        zip_folder(ct_series),
    )
    status, answer = _post(f"{http_url}/v1/detections:upload", body, content_type)
    assert status == 200, answer
    assert answer["candidates"]
    sr_path = _saved(base64.b64decode(answer["dicom_sr"]), tmp_path, "sr.dcm")
    seg_path = _saved(base64.b64decode(answer["dicom_seg"]), tmp_path, "seg.dcm")
    assert dciodvfy_errors(sr_path, inherited) == []
    assert dciodvfy_errors(seg_path, inherited) == []
    _assert_sr_equals_candidates(sr_path, answer["candidates"], ct_image)
    # The SEG read back by highdicom is each candidate's equivalent sphere (label = rank), as
    # ``wlcad pacs run`` makes it, recomputed here from the JSON candidates.
    seg = hd.seg.segread(seg_path)
    numbers = seg_on_grid(seg, ct_image)
    rank_of = np.zeros(len(seg.SegmentSequence) + 1, np.int64)
    for item in seg.SegmentSequence:
        rank_of[int(item.SegmentNumber)] = int(str(item.SegmentLabel).removeprefix("lesion "))
    candidates = [DetectionCandidate(tuple(c["center_mm"]), tuple(c["center_voxel"]), c["diameter_mm"],
                                     c["confidence"]) for c in answer["candidates"]]  # fmt: skip
    np.testing.assert_array_equal(rank_of[numbers], sphere_label_map(ct_image, candidates))


def test_detect_by_dicomweb_reference_returns_the_sr(stack, orthanc, ct_series, inherited, tmp_path):
    """A series in a real Orthanc, stored as it is (JPEG 2000): headers come from its WADO-RS
    metadata, not a second fetch."""
    cade, *_ = stack
    folder = ct_series
    files = dicom_files(folder)
    assert orthanc.upload(files) == len(files)
    image = read_image(folder)
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    reference = image_pb2.DicomWebReference(
        base_url=orthanc.dicomweb_url,
        study_instance_uid=str(header.StudyInstanceUID),
        series_instance_uid=str(header.SeriesInstanceUID),
    )
    request = dpb.DetectRequest(
        task=CT, image=image_pb2.ImageSource(dicomweb=reference), threshold=THRESHOLD, outputs=[SR]
    )
    from services.api.pb import detection_pb2_grpc

    response = detection_pb2_grpc.DetectionStub(channel(cade)).Detect(request, timeout=300)
    path = _saved(response.dicom_sr, tmp_path, "sr.dcm")
    assert dciodvfy_errors(path, inherited) == []
    assert response.candidates
    _assert_sr_equals_candidates(path, _candidates_of(response), image)


def test_detect_on_a_radiograph_returns_a_planar_sr(stack, sample, tmp_path):
    """cxr-mass on the real CR (one .dcm; the reader keeps no instance UID for a radiograph, so the SR
    references the file's own header): one planar circle per candidate, equal to the candidates."""
    cade, *_ = stack
    xray = sample("chest-xray")
    with DetectionClient(cade) as client:
        response = client.detect_file("cxr-mass", xray, threshold=THRESHOLD, outputs=[SR])
    assert response.candidates and not response.dicom_seg
    path = _saved(response.dicom_sr, tmp_path, "sr.dcm")
    assert dciodvfy_errors(path) == []
    groups = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    assert len(groups) == len(response.candidates)
    source_uid = str(pydicom.dcmread(xray, stop_before_pixels=True).SOPInstanceUID)
    for group, cand in zip(groups, response.candidates, strict=True):
        centre, _ = np.asarray(group.roi.value, dtype=float)
        np.testing.assert_allclose(centre, np.asarray(cand.center_mm[:2]) + 0.5, atol=1e-3)  # 1 mm pixels
        (confidence,) = group.get_measurements(name=codes.DCM.CertaintyOfFinding)
        assert confidence.value == pytest.approx(cand.confidence, rel=1e-6)
        assert {str(r.ReferencedSOPInstanceUID) for r in _references(group)} == {source_uid}


# -- label estimation -----------------------------------------------------------------------------------


def test_estimate_returns_seg_and_sr_over_a_grpc_upload(stack, ct_series, ct_image, inherited, tmp_path):
    _, labels, _, _ = stack
    prompts = _prompts(ct_image)
    with LabelEstimationClient(labels) as client:
        source = image_pb2.ImageSource(file=image_pb2.ImageFile(filename="series.zip"))
        from services.label_estimation.wire import prompts_to_proto

        request = lpb.EstimateRequest(
            image=source, lesions=prompts_to_proto(prompts), method="sphere", outputs=[SEG, SR]
        )
        response = client.upload(request, zip_folder(ct_series), timeout=300)  # a chunked EstimateUpload
        unary = client.estimate_file(ct_series, prompts, "sphere", timeout=300, outputs=[SEG, SR])
    _assert_estimation_outputs(response, ct_image, inherited, tmp_path)
    assert [m.SerializeToString() for m in unary.lesions] == [m.SerializeToString() for m in response.lesions]
    assert unary.dicom_seg and unary.dicom_sr


def test_estimate_over_http_json_returns_seg_and_sr(stack, ct_series, ct_image, inherited, tmp_path):
    *_, http_url = stack
    nx, ny, _ = ct_image.shape_xyz
    center = [float(v) for v in ct_image.index_to_world([nx // 2, ny // 2, 10])]
    payload = {
        "image": {
            "file": {"filename": "ct.zip", "content": base64.b64encode(zip_folder(ct_series)).decode()}
        },
        "lesions": [{"lesion_id": 3, "center_mm": center, "diameter_mm": 18.0, "lesion_type": "part-solid"}],
        "method": "sphere",
        "outputs": ["DICOM_SEG", "DICOM_SR"],
    }
    status, answer = _post(f"{http_url}/v1/labels:estimate", json.dumps(payload).encode(), "application/json")
    assert status == 200, answer
    response = json_format.ParseDict(answer, lpb.EstimateResponse())
    _assert_estimation_outputs(response, ct_image, inherited, tmp_path)
    seg = pydicom.dcmread(io.BytesIO(response.dicom_seg))
    assert [s.SegmentDescription for s in seg.SegmentSequence] == ["part-solid"]  # the prompt's type


def test_estimate_upload_of_one_multiframe_file_over_http_returns_seg_and_sr(stack, sample, tmp_path):
    """One enhanced multi-frame .dcm through the multipart route (the service tees the single file):
    the SEG's frames reference the source frames, read back equal to the returned mask."""
    *_, http_url = stack
    source = sample("ct-3slice-dicom").parent / "24x38x3" / "multiframe" / "mf.dcm"
    image = read_image(source)
    center = [float(v) for v in image.index_to_world([12, 19, 1])]
    request = {
        "lesions": [{"lesion_id": 1, "center_mm": center, "diameter_mm": 6.0}],
        "method": "sphere",
        "outputs": ["DICOM_SEG", "DICOM_SR"],
    }
    body, content_type = _multipart(request, "mf.dcm", source.read_bytes())
    status, answer = _post(f"{http_url}/v1/labels:upload", body, content_type)
    assert status == 200, answer
    response = json_format.ParseDict(answer, lpb.EstimateResponse())
    _assert_estimation_outputs(response, image, source_uids([source]), tmp_path)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    frames = {
        int(s.ReferencedFrameNumber)
        for item in seg.PerFrameFunctionalGroupsSequence
        for s in item.DerivationImageSequence[0].SourceImageSequence
    }
    assert frames and frames <= {1, 2, 3}


# -- refusals --------------------------------------------------------------------------------------------


def test_a_nifti_asking_for_a_seg_is_refused_naming_outputs_before_its_bytes(stack, ct_image, tmp_path):
    _, labels, _, http_url = stack
    nifti = write_image(ct_image, tmp_path / "ct.nii.gz")
    prompts = _prompts(ct_image)
    from services.label_estimation.wire import prompts_to_proto

    wire = channel(labels)
    upload = wire.stream_unary(
        "/wlcad.v1.LabelEstimation/EstimateUpload", response_deserializer=lpb.EstimateResponse.FromString
    )
    from services.api.client import UPLOAD

    request = lpb.EstimateRequest(
        image=image_pb2.ImageSource(file=image_pb2.ImageFile(filename="ct.nii.gz")),
        lesions=prompts_to_proto(prompts),
        method="sphere",
        outputs=[SEG],
    )

    # Only the first message is ever sent: the refusal must not wait for the file.
    error = _refusal(lambda: upload(iter([UPLOAD.first_message(request)]), timeout=60))
    wire.close()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("outputs")
    with LabelEstimationClient(labels) as client:
        error = _refusal(lambda: client.estimate_file(nifti, prompts, "sphere", outputs=[SEG]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("outputs")
        error = _refusal(lambda: client.estimate_volume(ct_image, prompts, "sphere", outputs=[SEG]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "voxels" in error.details()
        plain = client.estimate_file(nifti, prompts, "sphere")  # the same request without outputs works
        assert plain.lesions and not plain.dicom_seg
    body, content_type = _multipart(
        {"lesions": [{"lesion_id": 1, "center_mm": list(prompts[0].center_mm), "diameter_mm": 20.0}],
         "method": "sphere", "outputs": ["DICOM_SEG"]},
        "ct.nii.gz",
        nifti.read_bytes(),
    )  # fmt: skip
    status, answer = _post(f"{http_url}/v1/labels:upload", body, content_type)
    assert status == 400 and "outputs" in json.dumps(answer), answer


def test_other_refusals_name_outputs(stack, ct_series, ct_image):
    cade, labels, _, _ = stack
    prompts = _prompts(ct_image)
    with LabelEstimationClient(labels) as client:
        error = _refusal(lambda: client.estimate_file(ct_series, prompts, "sphere", outputs=[SR]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("outputs")
        assert "DICOM_SEG" in error.details()
    with DetectionClient(cade) as client:
        error = _refusal(lambda: client.detect_file("cxr-mass", ct_series, outputs=[SEG]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("outputs")
        error = _refusal(lambda: client.detect_file(CT, ct_series, outputs=[7]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("outputs[0]")
        error = _refusal(lambda: client.detect_volume(CT, ct_image, outputs=[SR]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("outputs")


def test_an_answer_over_the_message_limit_is_refused_whole() -> None:
    from services.api import limits

    response = dpb.DetectResponse(task=CT, dicom_sr=b"\0" * (limits.MAX_MESSAGE_BYTES + 1))
    with pytest.raises(InputError) as error:
        dicom_outputs.check_size(response)
    assert error.value.field == "outputs"
    small = dpb.DetectResponse(task=CT, dicom_sr=b"\0" * 1024)
    assert dicom_outputs.check_size(small) is small


def test_headers_from_a_zip_skip_other_files_and_keep_only_what_dicom_requires(ct_series) -> None:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr("README.TXT", "not dicom")
        for path in dicom_files(ct_series)[:3]:
            zipped.write(path, path.name)
    headers = dicom_outputs.headers_from_file("export.zip", buffer.getvalue())
    assert len(headers) == 3
    for header in headers:
        assert "PixelData" not in header
        assert not any(element.tag.is_private for element in header)
        assert header.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
