"""The AnomalyScoring service (capability ``anomaly``) as a real ``wlcad serve anomaly`` process behind
a real gateway on 127.0.0.1, on the shipped cxr-anomaly models: Score by file and by voxels, the map,
ScoreUpload over gRPC and multipart HTTP, ``POST /v1/anomaly:score``, Describe, and every refusal
naming its field. The model repository is a temporary copy holding only the shipped two-flow model:
glow and every head-ct-anomaly model are missing at first (the service must start and say so), and
the shipped glow is registered while the service runs."""

from __future__ import annotations

import json
import shutil
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
from services.api.convert import volume_from_proto, volume_to_proto
from services.api.pb import anomaly_pb2 as pb
from services.api.pb import anomaly_pb2_grpc as pb_grpc
from services.api.pb import common_pb2, image_pb2
from services.api.upload import upload_shape
from services.cli.main import main as wlcad
from services.core.io import write_image
from services.core.volume import Volume
from services.inference.factory import default_repository
from services.inference.repository import ModelRepository
from tests.serving_support import REPO_ROOT, Process, free_port, wait_serving
from training.data.dataset import generate_case

pytestmark = pytest.mark.timeout(300)
UPLOAD = upload_shape(pb.ScoreUploadMessage.DESCRIPTOR)
CXR, CT = "cxr-anomaly", "head-ct-anomaly"
TEST_SEED = 1303  # training/anomaly/tasks.py: never used for training or selection
NORMAL_CASE, EFFUSION_CASE = 0, 11  # of the test seed (tests/test_anomaly_shipped.py)


def shipped_version(name: str) -> str:
    """``name/<newest version>`` of the shipped model (what the scorer binds)."""
    return f"{name}/{max(ModelRepository(default_repository()).versions(name))}"


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(
        default_repository() / "anomaly_cxr-anomaly_two-flow", root / "anomaly_cxr-anomaly_two-flow"
    )
    return root


@pytest.fixture(scope="module")
def stack(repository, tmp_path_factory):
    """(service address, gateway gRPC address, gateway HTTP URL)."""
    logs = tmp_path_factory.mktemp("anomaly-logs")
    service_address = f"127.0.0.1:{free_port()}"
    grpc_address, http_port = f"127.0.0.1:{free_port()}", free_port()
    service = Process(
        ["serve", "anomaly", "--listen", service_address, "--metrics-listen", "", "--compute-slots", "1"],
        logs / "anomaly.log",
        {"WLCAD_MODEL_REPOSITORY": str(repository)},
    ).start()
    listen = ["--grpc-listen", grpc_address, "--http-listen", f"127.0.0.1:{http_port}"]
    gateway = Process(
        ["serve", "gateway", *listen, "--route", f"anomaly={service_address}"], logs / "gateway.log"
    ).start()
    try:
        wait_serving(service_address)
        wait_serving(grpc_address, service="wlcad.v1.AnomalyScoring")
        yield service_address, grpc_address, f"http://127.0.0.1:{http_port}"
    finally:
        gateway.stop()
        service.stop()
    assert "Traceback" not in (logs / "anomaly.log").read_text()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cxr")
    return {
        name: write_image(generate_case(CXR, TEST_SEED, index).image, folder / f"{name}.nii.gz")
        for name, index in (("normal", NORMAL_CASE), ("effusion", EFFUSION_CASE))
    }


def _stub(address: str) -> pb_grpc.AnomalyScoringStub:
    return pb_grpc.AnomalyScoringStub(channel(address))


def _file_request(path: Path, **fields) -> pb.ScoreRequest:
    source = image_pb2.ImageSource(file=image_pb2.ImageFile(filename=path.name, content=path.read_bytes()))
    return pb.ScoreRequest(task=CXR, image=source, **fields)


def _volume_request(volume: Volume, task: str = CXR, **fields) -> pb.ScoreRequest:
    return pb.ScoreRequest(task=task, image=image_pb2.ImageSource(volume=volume_to_proto(volume)), **fields)


def _refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def _post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, body, {"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_score_over_grpc_ranks_the_effusion_above_the_normal_and_equals_the_cli(
    stack, repository, phantoms, tmp_path
):
    service_address, grpc_address, _ = stack
    stub = _stub(grpc_address)
    normal = stub.Score(_file_request(phantoms["normal"]), timeout=60)
    effusion = stub.Score(_file_request(phantoms["effusion"], with_map=True), timeout=60)
    direct = _stub(service_address).Score(_file_request(phantoms["normal"]), timeout=60)
    assert direct.SerializeToString() == normal.SerializeToString()
    assert (normal.task, normal.model, normal.model_version) == (
        CXR,
        "two-flow",
        shipped_version("anomaly_cxr-anomaly_two-flow"),
    )
    assert normal.units == "bits/dim" and normal.calibration_normals == 56
    assert effusion.score > normal.score and np.isfinite([effusion.score, effusion.z, normal.z]).all()
    assert effusion.percentile_among_normals == 100.0 and effusion.z > 3.0
    assert 0.0 < normal.percentile_among_normals < 100.0
    assert set(normal.components) == {"nll_normal_bits_per_dim", "nll_mixture_bits_per_dim"}
    assert normal.score == pytest.approx(
        normal.components["nll_normal_bits_per_dim"] - normal.components["nll_mixture_bits_per_dim"], abs=1e-9
    )
    assert not normal.HasField("map") and effusion.HasField("map")
    score_map = volume_from_proto(effusion.map)
    assert score_map.array.shape == (1, 64, 64) and float(score_map.array.mean()) == pytest.approx(
        effusion.score, abs=1e-3
    )
    assert list(effusion.grid.shape_xyz) == list(generate_case(CXR, TEST_SEED, EFFUSION_CASE).image.shape_xyz)
    # the same file through `wlcad score` gives the same JSON fields
    out = tmp_path / "cli.json"
    argv = ["score", "--task", CXR, "--image", str(phantoms["effusion"]), "--out", str(out)]
    assert wlcad([*argv, "--model-repository", str(repository)]) == 0
    cli = json.loads(out.read_text())
    served = json_format.MessageToDict(effusion, preserving_proto_field_name=True)
    for key in ("task", "model", "model_version", "units"):
        assert cli[key] == served[key], key
    for key in ("score", "percentile_among_normals", "z"):
        assert cli[key] == pytest.approx(served[key], abs=1e-4), key


def test_upload_in_chunks_and_http_equal_the_unary_call(stack, phantoms):
    _, grpc_address, http_url = stack
    volume = generate_case(CXR, TEST_SEED, NORMAL_CASE).image
    unary = _stub(grpc_address).Score(_volume_request(volume), timeout=60)
    header = pb.ScoreRequest(
        task=CXR, image=image_pb2.ImageSource(volume=volume_to_proto(volume, with_data=False))
    )
    data = volume.array.tobytes()
    wire = channel(grpc_address)
    try:
        upload = wire.stream_unary(
            "/wlcad.v1.AnomalyScoring/ScoreUpload", response_deserializer=pb.ScoreResponse.FromString
        )
        uploaded = upload(
            iter([UPLOAD.first_message(header), *UPLOAD.chunk_messages(data, size=len(data) // 4 + 1)]),
            timeout=60,
        )
        short = _refusal(
            lambda: upload(
                iter([UPLOAD.first_message(header), *UPLOAD.chunk_messages(data[:-2])]), timeout=60
            )
        )
    finally:
        wire.close()
    assert uploaded.SerializeToString() == unary.SerializeToString()
    assert short.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk.data" in short.details()

    body = json_format.MessageToDict(_volume_request(volume), preserving_proto_field_name=True)
    result = http_client.post_json(http_url, "/v1/anomaly:score", body)
    assert result == json_format.MessageToDict(unary, preserving_proto_field_name=True)
    form, content_type = http_client.multipart(
        {
            "request": (None, json.dumps({"task": CXR, "model": "two-flow"}).encode(), "application/json"),
            "file": (phantoms["normal"].name, phantoms["normal"].read_bytes(), "application/octet-stream"),
        }
    )
    status, answer = _post(f"{http_url}/v1/anomaly:upload", form, content_type)
    assert status == 200, answer
    assert answer["score"] == pytest.approx(unary.score, abs=1e-6)
    with urllib.request.urlopen(f"{http_url}/openapi.json", timeout=30) as response:
        paths = json.loads(response.read())["paths"]
    assert {"/v1/anomaly:score", "/v1/anomaly:upload", "/v1/anomaly:describe"} <= set(paths)


def _bad(case: str) -> tuple[pb.ScoreRequest, str]:
    radiograph = generate_case(CXR, TEST_SEED, NORMAL_CASE).image
    array = np.asarray(radiograph.array, dtype=np.float32)
    if case == "non-finite pixels":
        bad = array.copy()
        bad[0, 100, 100] = np.nan
        return _volume_request(radiograph.with_array(bad)), "image"
    if case == "a volume to the radiograph model":
        return _volume_request(Volume(np.repeat(array[:, ::8, ::8], 12, axis=0), (1.0, 1.0, 2.0))), "image"
    if case == "constant image":
        return _volume_request(radiograph.with_array(np.full_like(array, 7.0))), "image"
    if case == "tiny image":
        return _volume_request(
            Volume(np.arange(20, dtype=np.float32).reshape(1, 4, 5), (1.0, 1.0, 1.0))
        ), "image"
    if case == "unknown task":
        return _volume_request(radiograph, task="cxr-anomalies"), "task"
    if case == "unknown model":
        return _volume_request(radiograph, model="vae"), "model"
    request = _volume_request(radiograph)
    request.ClearField("image")
    return request, "image"


@pytest.mark.parametrize(
    "case",
    [
        "non-finite pixels",
        "a volume to the radiograph model",
        "constant image",
        "tiny image",
        "unknown task",
        "unknown model",
        "no image",
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(stack, case):
    _, grpc_address, http_url = stack
    request, field = _bad(case)
    refused = _refusal(lambda: _stub(grpc_address).Score(request, timeout=60))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.details().split(":")[0].split(".")[0] == field, refused.details()
    assert "nan" not in refused.details().lower() or case == "non-finite pixels"
    body = json.dumps(json_format.MessageToDict(request, preserving_proto_field_name=True)).encode()
    status, answer = _post(f"{http_url}/v1/anomaly:score", body, "application/json")
    assert status == 400 and field in json.dumps(answer), answer


def test_a_model_not_in_the_repository_is_unavailable_until_registered(stack, repository):
    _, grpc_address, http_url = stack
    stub = _stub(grpc_address)
    radiograph = generate_case(CXR, TEST_SEED, NORMAL_CASE).image
    models = {(m.task, m.model): m for m in stub.Describe(common_pb2.DescribeRequest(), timeout=30).models}
    assert set(models) == {(t, m) for t in (CXR, CT) for m in ("two-flow", "glow", "gan")}
    two_flow = models[(CXR, "two-flow")]
    assert (
        two_flow.available
        and two_flow.is_default
        and two_flow.model_version == shipped_version("anomaly_cxr-anomaly_two-flow")
    )
    assert (
        two_flow.calibration_normals == 56
        and two_flow.calibration_sd > 0
        and list(two_flow.model_shape_xyz) == [64, 64, 1]
    )
    assert not models[(CXR, "glow")].available and "anomaly_cxr-anomaly_glow" in models[(CXR, "glow")].reason
    assert not models[(CT, "glow")].available and models[(CT, "glow")].dims == 3
    missing = _refusal(lambda: stub.Score(_volume_request(radiograph, model="glow"), timeout=60))
    assert (
        missing.code() == grpc.StatusCode.FAILED_PRECONDITION
        and "anomaly_cxr-anomaly_glow" in missing.details()
    )
    head_ct = _refusal(lambda: stub.Score(_volume_request(radiograph, task=CT), timeout=60))
    assert head_ct.code() == grpc.StatusCode.FAILED_PRECONDITION and CT in head_ct.details()
    with urllib.request.urlopen(f"{http_url}/v1/anomaly:describe", timeout=30) as response:
        described = json.loads(response.read())
    assert {m["name"] for m in described["methods"]} == {f"{t}/{m}" for t, m in models}

    shutil.copytree(
        default_repository() / "anomaly_cxr-anomaly_glow", repository / "anomaly_cxr-anomaly_glow"
    )
    glow = stub.Score(_volume_request(radiograph, model="glow"), timeout=60)
    assert glow.model_version == shipped_version("anomaly_cxr-anomaly_glow") and set(glow.components) == {
        "nll_flow_bits_per_dim"
    }
    assert glow.score == pytest.approx(glow.components["nll_flow_bits_per_dim"], abs=1e-9)
    default = stub.Score(_volume_request(radiograph), timeout=60)
    assert default.model == "two-flow"  # the default stays the posterior when both are there


def test_the_demo_scores_phantoms_and_the_real_radiograph_honestly(stack, tmp_path, capsys):
    """``wlcad demo``'s anomaly part through the gateway: the test-seed phantoms ranked with their
    truth, the real (abnormal) radiograph scored and called what it is: unlike the phantom normals."""
    from services.cli.demo_anomaly import run_anomaly
    from services.cli.demo_cmd import real_sample_plan

    _, grpc_address, _ = stack
    summary = run_anomaly(grpc_address, None, tmp_path, real_sample_plan(["chest-xray"]))
    printed = capsys.readouterr().out
    rows = summary["cxr-anomaly"]["phantoms"]
    assert {r["truth"] for r in rows} == {"normal", "mass", "consolidation", "effusion", "cardiomegaly"}
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    top_normal = max(r["score"] for r in rows if r["truth"] == "normal")
    for kind in ("cardiomegaly", "effusion"):  # test AUC ≈ 1 for both types
        assert next(r["score"] for r in rows if r["truth"] == kind) > top_normal
    assert all((tmp_path / "anomaly" / f"{r['case']}.png").is_file() for r in rows)
    assert summary["head-ct-anomaly"]["skipped"].startswith("head-ct-anomaly with model glow needs")
    real = summary["cxr-anomaly"]["chest-xray"]
    assert np.isfinite([real["score"], real["z"]]).all() and real["percentile_among_normals"] == 100.0
    assert "not that the masses were found" in printed and (tmp_path / "chest-xray" / "anomaly.png").is_file()


def test_http_routes_survive_schemathesis(stack, tmp_path):
    """Generated requests to every AnomalyScoring route (from the gateway's OpenAPI): none is a server
    error, and the service logs no traceback (the module fixture checks that at its end)."""
    _, _, http_url = stack
    st = [str(REPO_ROOT / ".venv" / "bin" / "st"), "run", f"{http_url}/openapi.json"]
    options = ["--checks", "not_a_server_error", "--max-examples", "40", "--phases", "coverage,fuzzing"]
    result = subprocess.run(
        [*st, *options, "--request-timeout", "30", "--generation-deterministic"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "/v1/anomaly:score" in result.stdout and "passed" in result.stdout
