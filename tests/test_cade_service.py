"""The Detection service (capability ``cade``) as a real ``wlcad serve cade`` process behind a real
gateway on 127.0.0.1: Detect by voxels and by file, DetectUpload over gRPC and multipart HTTP,
``POST /v1/detections:detect``, Describe, the cut-off (threshold, the card's operating points, the
default), and every refusal naming its field. The model repository is a temporary one holding the
tiny real ONNX blob scorer of ``tests/test_detect_cli.py`` for ``chest-ct-nodule``; ``cxr-mass`` has
no model at first (the service must start and say so) and is registered while the service runs.
``wlcad serve all`` is shown to start the service too."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from services.api import http_client
from services.api.client import channel
from services.api.convert import volume_to_proto
from services.api.pb import common_pb2, image_pb2
from services.api.pb import detection_pb2 as pb
from services.api.pb import detection_pb2_grpc as pb_grpc
from services.api.upload import upload_shape
from services.cade.tasks import TASKS
from services.cli.main import main as wlcad
from services.core.io import write_image
from services.core.volume import Volume
from services.inference.export import register_onnx_model
from tests.serving_support import REPO_ROOT, Process, free_port, wait_serving
from tests.test_detect_cli import (
    CARD,
    CT_GRID,
    CT_SPHERES,
    add_operating_points,
    blob_scorer_onnx,
    synthetic_ct,
    synthetic_radiograph,
)

pytestmark = pytest.mark.timeout(300)
UPLOAD = upload_shape(pb.DetectUploadMessage.DESCRIPTOR)
CT, CXR = "chest-ct-nodule", "cxr-mass"


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    """cade_chest-ct-nodule (fixed 32³ tiles) with operating points 1 → 0.99 and 4 → 0.7; no cxr-mass."""
    root = tmp_path_factory.mktemp("models")
    register_onnx_model(
        root, "cade_chest-ct-nodule", blob_scorer_onnx(3, 32), metrics={}, max_batch_size=4, **CARD
    )
    add_operating_points(root, "cade_chest-ct-nodule", {"1": 0.99, "4": 0.7})
    return root


@pytest.fixture(scope="module")
def stack(repository, tmp_path_factory):
    """(service address, gateway gRPC address, gateway HTTP URL): ``wlcad serve cade`` and a gateway."""
    logs = tmp_path_factory.mktemp("cade-logs")
    service_address = f"127.0.0.1:{free_port()}"
    grpc_address, http_port = f"127.0.0.1:{free_port()}", free_port()
    env = {"WLCAD_MODEL_REPOSITORY": str(repository)}
    service = Process(
        ["serve", "cade", "--listen", service_address, "--metrics-listen", "", "--compute-slots", "1"],
        logs / "cade.log",
        env,
    ).start()
    listen = ["--grpc-listen", grpc_address, "--http-listen", f"127.0.0.1:{http_port}"]
    gateway = Process(
        ["serve", "gateway", *listen, "--route", f"cade={service_address}"], logs / "gateway.log"
    ).start()
    try:
        wait_serving(service_address)
        wait_serving(grpc_address, service="wlcad.v1.Detection")
        yield service_address, grpc_address, f"http://127.0.0.1:{http_port}"
    finally:
        gateway.stop()
        service.stop()
    assert "Traceback" not in (logs / "cade.log").read_text()


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory) -> Path:
    return write_image(synthetic_ct(), tmp_path_factory.mktemp("ct") / "ct.mha")


def _stub(address: str) -> pb_grpc.DetectionStub:
    return pb_grpc.DetectionStub(channel(address))


def _volume_request(volume: Volume, task: str = CT, **cutoff: float) -> pb.DetectRequest:
    return pb.DetectRequest(task=task, image=image_pb2.ImageSource(volume=volume_to_proto(volume)), **cutoff)


def _refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def _upload(address: str, request: pb.DetectRequest, data: bytes, chunk: int) -> pb.DetectResponse:
    wire = channel(address)
    try:
        upload = wire.stream_unary(
            "/wlcad.v1.Detection/DetectUpload", response_deserializer=pb.DetectResponse.FromString
        )
        return upload(
            iter([UPLOAD.first_message(request), *UPLOAD.chunk_messages(data, size=chunk)]), timeout=60
        )
    finally:
        wire.close()


def _post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, body, {"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_detect_over_grpc_finds_the_nodules_and_equals_the_cli(stack, repository, ct_file, tmp_path):
    service_address, grpc_address, _ = stack
    request = pb.DetectRequest(
        task=CT,
        image=image_pb2.ImageSource(
            file=image_pb2.ImageFile(filename=ct_file.name, content=ct_file.read_bytes())
        ),
        threshold=0.3,
    )
    via_gateway = _stub(grpc_address).Detect(request, timeout=60)
    assert (
        via_gateway.SerializeToString()
        == _stub(service_address).Detect(request, timeout=60).SerializeToString()
    )
    assert (via_gateway.task, via_gateway.model, via_gateway.model_version) == (
        CT,
        "cade_chest-ct-nodule",
        "cade_chest-ct-nodule/1",
    )
    assert via_gateway.threshold == pytest.approx(0.3)
    assert list(via_gateway.grid.shape_xyz) == list(CT_GRID.shape[::-1]) and not via_gateway.grid.data
    assert len(via_gateway.candidates) == 2
    for cand, (index, diameter, _) in zip(via_gateway.candidates, CT_SPHERES, strict=True):
        assert np.linalg.norm(np.asarray(cand.center_mm) - CT_GRID.index_to_world(index)) < 1.0
        assert list(cand.center_voxel) == [int(v) for v in np.rint(index)]
        assert cand.diameter_mm == pytest.approx(diameter, rel=0.25)
    # the same file through `wlcad detect` gives the same JSON as the response's fields
    out = tmp_path / "cli.json"
    args = ["--task", CT, "--image", str(ct_file), "--out", str(out), "--threshold", "0.3"]
    assert wlcad(["detect", "--model-repository", str(repository), *args]) == 0
    as_json = json_format.MessageToDict(via_gateway, preserving_proto_field_name=True)
    cli = json.loads(out.read_text())
    assert {k: as_json[k] for k in ("task", "model", "model_version")} == {
        k: cli[k] for k in ("task", "model", "model_version")
    }
    assert len(cli["candidates"]) == len(as_json["candidates"])
    for served, printed in zip(as_json["candidates"], cli["candidates"], strict=True):
        assert served["center_voxel"] == printed["center_voxel"]
        for key in ("center_mm", "diameter_mm", "confidence"):
            assert served[key] == pytest.approx(printed[key], rel=1e-6, abs=1e-9), key


def test_the_cut_off_follows_the_request_and_the_model_card(stack):
    _, grpc_address, _ = stack
    stub = _stub(grpc_address)
    volume = synthetic_ct()

    def detect(**cutoff: float) -> pb.DetectResponse:
        return stub.Detect(_volume_request(volume, **cutoff), timeout=60)

    default = detect()  # the card's operating point at the task's default rate (4 FP/case → 0.7)
    assert default.threshold == pytest.approx(0.7) and len(default.candidates) == 1
    assert detect(fp_rate=4).SerializeToString() == default.SerializeToString()
    strict = detect(fp_rate=1)  # card: 0.99, above both nodules: a valid empty list
    assert strict.threshold == pytest.approx(0.99) and list(strict.candidates) == []
    low = detect(threshold=0.3)
    confidences = [c.confidence for c in low.candidates]
    assert confidences == sorted(confidences, reverse=True) and min(confidences) >= 0.3
    assert detect(threshold=0.85).candidates[0] == low.candidates[0]  # the solid nodule only
    assert len(detect(threshold=0.85).candidates) == 1
    empty = stub.Detect(_volume_request(synthetic_ct(spheres=[]), threshold=0.3), timeout=60)
    assert list(empty.candidates) == [] and empty.model_version == "cade_chest-ct-nodule/1"


def test_grpc_upload_in_chunks_equals_the_unary_call(stack):
    _, grpc_address, _ = stack
    volume = synthetic_ct()
    header = pb.DetectRequest(
        task=CT, image=image_pb2.ImageSource(volume=volume_to_proto(volume, with_data=False)), threshold=0.3
    )
    data = volume.array.tobytes()
    uploaded = _upload(grpc_address, header, data, chunk=len(data) // 5 + 1)  # several chunks
    unary = _stub(grpc_address).Detect(_volume_request(volume, threshold=0.3), timeout=60)
    assert uploaded.SerializeToString() == unary.SerializeToString() and len(uploaded.candidates) == 2
    short = _refusal(lambda: _upload(grpc_address, header, data[:-2], chunk=len(data)))
    assert short.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk.data" in short.details()
    # a bad task is refused from the first message, before the voxels matter
    unknown = pb.DetectRequest(task="liver-lesion", image=header.image)
    refused = _refusal(lambda: _upload(grpc_address, unknown, data, chunk=len(data)))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and refused.details().startswith("task:")


def test_http_detect_upload_and_describe(stack, ct_file):
    _, grpc_address, http_url = stack
    volume = synthetic_ct()
    request = _volume_request(volume, threshold=0.3)
    body = json_format.MessageToDict(request, preserving_proto_field_name=True)
    result = http_client.post_json(http_url, "/v1/detections:detect", body)
    grpc_result = _stub(grpc_address).Detect(request, timeout=60)
    assert result == json_format.MessageToDict(grpc_result, preserving_proto_field_name=True)
    assert [c["center_voxel"] for c in result["candidates"]] == [
        list(c.center_voxel) for c in grpc_result.candidates
    ]

    options = json.dumps({"task": CT, "threshold": 0.3}).encode()
    form, content_type = http_client.multipart(
        {
            "request": (None, options, "application/json"),
            "file": (ct_file.name, ct_file.read_bytes(), "application/octet-stream"),
        }
    )
    status, uploaded = _post(f"{http_url}/v1/detections:upload", form, content_type)
    assert status == 200, uploaded
    assert (
        uploaded["candidates"] == result["candidates"]
        and uploaded["model_version"] == "cade_chest-ct-nodule/1"
    )

    with urllib.request.urlopen(f"{http_url}/v1/detections:describe", timeout=30) as response:
        described = json.loads(response.read())
    tasks = {t["name"]: t for t in described["tasks"]}
    assert tasks[CT]["available"] and tasks[CT]["dims"] == 3
    assert [(p["fp_per_case"], p["threshold"]) for p in tasks[CT]["operating_points"]] == [
        (1.0, 0.99),
        (4.0, 0.7),
    ]
    with urllib.request.urlopen(f"{http_url}/openapi.json", timeout=30) as response:
        paths = json.loads(response.read())["paths"]
    assert {"/v1/detections:detect", "/v1/detections:upload", "/v1/detections:describe"} <= set(paths)


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("radiograph to the CT detector", "image"),
        ("non-finite voxels", "image"),
        ("too small to tile", "image"),
        ("unknown task", "task"),
        ("threshold and fp_rate", "threshold"),
        ("threshold out of range", "threshold"),
        ("fp_rate not on the card", "fp_rate"),
        ("no image", "image"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(stack, case, field):
    _, grpc_address, http_url = stack
    volume, task, cutoff = synthetic_ct(), CT, {}
    if case == "radiograph to the CT detector":
        volume = synthetic_radiograph()
    elif case == "non-finite voxels":
        array = np.array(synthetic_ct(dtype=np.float32).array)
        array[10, 20, 30] = np.nan
        volume = volume.with_array(array)
    elif case == "too small to tile":
        volume = Volume(np.zeros((4, 96, 110), np.int16), (0.8, 0.75, 2.0))  # 8 mm deep
    elif case == "unknown task":
        task = "liver-lesion"
    elif case == "threshold and fp_rate":
        cutoff = {"threshold": 0.5, "fp_rate": 1.0}
    elif case == "threshold out of range":
        cutoff = {"threshold": 1.5}
    elif case == "fp_rate not on the card":
        cutoff = {"fp_rate": 2.0}
    request = _volume_request(volume, task, **cutoff)
    if case == "no image":
        request.ClearField("image")
    refused = _refusal(lambda: _stub(grpc_address).Detect(request, timeout=60))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.details().split(":")[0].split(".")[0] == field, refused.details()
    status, answer = _post(
        f"{http_url}/v1/detections:detect",
        json.dumps(json_format.MessageToDict(request, preserving_proto_field_name=True)).encode(),
        "application/json",
    )
    assert status == 400 and field in json.dumps(answer), answer


def test_a_task_without_its_model_is_unavailable_until_registered(stack, repository):
    """The service started without cade_cxr-mass: Describe says so, Detect is FAILED_PRECONDITION
    (HTTP 412) naming the task; registered while the service runs, the task is served at once."""
    _, grpc_address, http_url = stack
    stub = _stub(grpc_address)
    radiograph = synthetic_radiograph()
    described = {t.name: t for t in stub.Describe(common_pb2.DescribeRequest(), timeout=30).tasks}
    assert not described[CXR].available and CXR in described[CXR].reason and not described[CXR].model_version
    assert described[CXR].model == "cade_cxr-mass" and described[CXR].dims == 2
    assert described[CT].available and described[CT].model_version == "cade_chest-ct-nodule/1"
    assert described[CT].default_threshold == pytest.approx(0.7)  # the card's 4 FP/case point
    # a generic client reads the answer as the shared ServiceDescription
    generic = common_pb2.ServiceDescription.FromString(
        stub.Describe(common_pb2.DescribeRequest(), timeout=30).SerializeToString()
    )
    assert {(m.name, m.available) for m in generic.methods} == {
        (CT, True),
        (CXR, False),
        ("head-mra-aneurysm", False),  # no model in this repository either
    }

    missing = _refusal(lambda: stub.Detect(_volume_request(radiograph, CXR), timeout=60))
    assert missing.code() == grpc.StatusCode.FAILED_PRECONDITION and CXR in missing.details()
    body = json.dumps(json_format.MessageToDict(_volume_request(radiograph, CXR))).encode()
    status, answer = _post(f"{http_url}/v1/detections:detect", body, "application/json")
    assert status == 412 and CXR in json.dumps(answer)

    register_onnx_model(
        repository, "cade_cxr-mass", blob_scorer_onnx(2, None), metrics={}, max_batch_size=2, **CARD
    )
    described = {t.name: t for t in stub.Describe(common_pb2.DescribeRequest(), timeout=30).tasks}
    assert described[CXR].available and described[CXR].model_version == "cade_cxr-mass/1"
    assert list(described[CXR].operating_points) == [] and described[CXR].default_threshold == pytest.approx(
        0.5
    )
    found = stub.Detect(_volume_request(radiograph, CXR, threshold=0.3), timeout=60)
    assert len(found.candidates) == 2 and all(c.center_voxel[2] == 0 for c in found.candidates)
    wrong = _refusal(lambda: stub.Detect(_volume_request(synthetic_ct(), CXR), timeout=60))
    assert wrong.code() == grpc.StatusCode.INVALID_ARGUMENT and wrong.details().startswith("image:")


def test_serve_all_starts_the_detection_service(repository, tmp_path):
    grpc_address, http_port = f"127.0.0.1:{free_port()}", free_port()
    addresses = []
    for name in ("label-estimation", "cade"):
        addresses += ["--service-listen", f"{name}=127.0.0.1:{free_port()}"]
        addresses += ["--service-metrics-listen", f"{name}=127.0.0.1:{free_port()}"]
    stack = Process(
        [
            "serve",
            "all",
            "--grpc-listen",
            grpc_address,
            "--http-listen",
            f"127.0.0.1:{http_port}",
            *addresses,
        ],
        tmp_path / "serve-all.log",
        {"WLCAD_MODEL_REPOSITORY": str(repository)},
    ).start()
    try:
        wait_serving(grpc_address, timeout_s=180, service="wlcad.v1.Detection")
        described = _stub(grpc_address).Describe(common_pb2.DescribeRequest(), timeout=60)
        assert {t.name for t in described.tasks} == set(TASKS)
        assert {t.name: t.available for t in described.tasks}[CT]
    finally:
        stack.stop()
    assert "started cade (pid" in (tmp_path / "serve-all.log").read_text()


def test_http_routes_survive_schemathesis(stack, tmp_path):
    """Generated requests to every Detection route (from the gateway's OpenAPI): none is a server
    error, and the service logs no traceback (the module fixture checks that at its end)."""
    _, _, http_url = stack
    result = subprocess.run(
        [
            str(REPO_ROOT / ".venv" / "bin" / "st"),
            "run",
            f"{http_url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "40",
            "--phases",
            "coverage,fuzzing",
            "--request-timeout",
            "30",
            "--generation-deterministic",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "/v1/detections:detect" in result.stdout
    print(
        "\n"
        + "\n".join(line for line in result.stdout.splitlines() if "generated" in line or "passed" in line)
    )
