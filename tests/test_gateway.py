"""Integration: the gateway and the label-estimation service as separate real processes on 127.0.0.1,
every operation over gRPC and HTTP, health, reflection, deadlines, limits and authentication."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from services.api import http_client
from services.api.client import LabelEstimationClient, channel, zip_folder
from services.api.convert import unpack_mask, volume_to_proto
from services.api.pb import common_pb2, image_pb2
from services.api.pb import label_estimation_pb2 as pb
from services.api.pb import label_estimation_pb2_grpc as pb_grpc
from services.core.io import read_image
from services.core.volume import Volume
from services.gateway.auth import hash_token
from tests.conftest import REPO_ROOT, run_cli
from tests.serving_support import (
    centre_mm,
    estimate_request,
    free_port,
    small_volume,
    start_gateway,
    start_stack,
    wait_serving,
)

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("gateway-logs"))
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def rtdose(tmp_path_factory) -> tuple[Volume, bytes]:
    """A planning image and a real RT Dose file with one Gaussian dose peak at the image centre."""
    from training.data.rtdose import write_rtdose

    image = small_volume((30, 40, 40))
    z, y, x = np.mgrid[:30, :40, :40]
    dose = 20.0 * np.exp(-((z - 15) ** 2 + (y - 20) ** 2 + (x - 20) ** 2) / (2 * 4.0**2))
    path = tmp_path_factory.mktemp("dose") / "rtdose.dcm"
    write_rtdose(image.with_array(dose.astype(np.float32)), path, uid_seed="gateway-test")
    return image, path.read_bytes()


def _stub(address: str) -> pb_grpc.LabelEstimationStub:
    return pb_grpc.LabelEstimationStub(channel(address))


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code()


def _held_open_upload(volume: Volume, release: threading.Event) -> Iterator[pb.EstimateUploadMessage]:
    """An EstimateUpload of ``volume`` that sends all but its last two bytes, then waits for ``release``:
    until the test sets it the call cannot complete on any machine, however fast, so what happens to it
    meanwhile (a deadline, a full gateway) does not depend on speed."""
    header = pb.EstimateRequest(
        image=image_pb2.ImageSource(volume=volume_to_proto(volume, with_data=False)),
        lesions=estimate_request(volume, "sphere").lesions,
        method="sphere",
    )
    data = volume.array.tobytes()
    yield pb.EstimateUploadMessage(request=header)
    yield pb.EstimateUploadMessage(chunk=image_pb2.ImageChunk(data=data[:-2]))
    release.wait()
    yield pb.EstimateUploadMessage(chunk=image_pb2.ImageChunk(data=data[-2:]))


def _until(attempt: Callable[[], T | None], what: str, budget_s: float = 60.0) -> T:
    """``attempt()`` again until it returns something other than None. Only for something already due
    (a slot being freed, a call being admitted): the budget is generous, so only a hang runs it out."""
    deadline = time.monotonic() + budget_s
    while (result := attempt()) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {budget_s:g} s")
        time.sleep(0.05)
    return result


def _gauge(metrics_url: str, name: str, component: str) -> float:
    """One gauge of a process's Prometheus /metrics, by its component label."""
    prefix = f'{name}{{component="{component}"}} '
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return next(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def test_every_grpc_operation_through_the_gateway_equals_the_service(stack, rtdose):
    gateway, direct = _stub(stack.grpc_address), _stub(stack.service_address)
    description = gateway.Describe(common_pb2.DescribeRequest(), timeout=10)
    available = {m.name for m in description.methods if m.available}
    assert {"sphere", "ellipsoid", "threshold", "random-walker"} <= available
    volume = small_volume()
    for method in ("sphere", "ellipsoid", "threshold", "random-walker"):
        request = estimate_request(volume, method, lesions=3)  # many lesions of one image
        if method == "ellipsoid":
            for lesion in request.lesions:
                lesion.axes_mm.extend([10, 8, 6])
        via_gateway = gateway.Estimate(request, timeout=30)
        assert via_gateway.SerializeToString() == direct.Estimate(request, timeout=30).SerializeToString()
        assert [lesion.lesion_id for lesion in via_gateway.lesions] == [1, 2, 3]
    single = gateway.Estimate(estimate_request(volume, "sphere"), timeout=30).lesions[0]
    _, mask = unpack_mask(single.mask)
    assert mask.sum() == single.measurements.voxels > 0
    assert single.qc.passed and abs(single.measurements.max_diameter_mm - 10) < 3

    image, dose = rtdose
    dose_request = pb.DoseRequest(
        image=image_pb2.ImageSource(volume=volume_to_proto(image)), rtdose_dicom=dose, isodose="50%"
    )
    targets = gateway.EstimateDose(dose_request, timeout=30).targets
    assert len(targets) == 1 and targets[0].max_dose_gy == pytest.approx(20, rel=0.05)
    assert targets[0].threshold_gy == pytest.approx(10, rel=0.05)
    assert targets[0].measurements.center_mm == pytest.approx(centre_mm(image), abs=1.0)


def test_streamed_upload_of_a_volume_larger_than_one_message(stack):
    client = LabelEstimationClient(stack.grpc_address)
    big = small_volume((96, 200, 200))  # 7.7 MB of int16: two 4 MiB chunks and a bit
    prompt_request = estimate_request(big, "threshold")
    header = volume_to_proto(big, with_data=False)
    request = pb.EstimateRequest(
        image=image_pb2.ImageSource(volume=header), lesions=prompt_request.lesions, method="threshold"
    )
    uploaded = client.upload(request, big.array.tobytes(), timeout=60)
    unary = client.estimate_request(prompt_request, timeout=60)
    assert uploaded.SerializeToString() == unary.SerializeToString()
    truncated = _code(lambda: client.upload(request, big.array.tobytes()[:-2], timeout=60))
    assert truncated == grpc.StatusCode.INVALID_ARGUMENT
    client.close()


def test_files_and_dicom_zips_are_read_by_the_service(stack, sample):
    client = LabelEstimationClient(stack.grpc_address)
    from services.core.lesion_prompt import LesionPrompt

    for name in ("ct-dicom-series", "chest-xray", "brain-t1-nifti"):
        path = sample(name)
        image = read_image(path)
        centre = image.index_to_world((np.asarray(image.shape_xyz) - 1) // 2)
        prompts = [LesionPrompt(tuple(centre), 8.0, 1)]
        response = client.estimate_file(path, prompts, "sphere", timeout=60)
        assert list(response.grid.shape_xyz) == list(image.shape_xyz)
        assert response.lesions[0].measurements.voxels > 0
    # the same file, streamed in chunks
    path = sample("brain-t1-nifti")
    request = pb.EstimateRequest(
        image=image_pb2.ImageSource(file=image_pb2.ImageFile(filename=path.name)),
        lesions=[pb.LesionPrompt(lesion_id=1, center_mm=[0, -20, 10], diameter_mm=10)],
        method="sphere",
    )
    assert client.upload(request, path.read_bytes(), timeout=60).lesions[0].measurements.voxels > 0
    client.close()


def test_every_http_operation(stack, rtdose, sample):
    describe = json.loads(urllib.request.urlopen(f"{stack.http_url}/v1/labels:describe", timeout=10).read())
    assert {m["name"] for m in describe["methods"]} == {
        "sphere",
        "ellipsoid",
        "threshold",
        "random-walker",
        "unet",
    }
    volume = small_volume()
    body = json_format.MessageToDict(
        estimate_request(volume, "sphere", lesions=2), preserving_proto_field_name=True
    )
    result = http_client.post_json(stack.http_url, "/v1/labels:estimate", body)
    grpc_result = _stub(stack.grpc_address).Estimate(
        estimate_request(volume, "sphere", lesions=2), timeout=30
    )
    assert result == json_format.MessageToDict(grpc_result, preserving_proto_field_name=True)
    assert base64.b64decode(result["lesions"][0]["mask"]["bits"]) == grpc_result.lesions[0].mask.bits

    image, dose = rtdose
    dose_body = {
        "image": {
            "volume": json_format.MessageToDict(volume_to_proto(image), preserving_proto_field_name=True)
        },
        "rtdose_dicom": base64.b64encode(dose).decode(),
        "isodose": "12Gy",
    }
    assert len(http_client.post_json(stack.http_url, "/v1/labels:estimateDose", dose_body)["targets"]) == 1

    dicom_zip = zip_folder(sample("ct-dicom-series"))
    ct = read_image(sample("ct-dicom-series"))
    centre = [float(v) for v in ct.index_to_world((np.asarray(ct.shape_xyz) - 1) // 2)]
    request = pb.EstimateRequest(
        lesions=[pb.LesionPrompt(lesion_id=3, center_mm=centre, diameter_mm=12)], method="threshold"
    )
    uploaded = http_client.upload(stack.http_url, "series.zip", dicom_zip, request)
    assert uploaded.lesions[0].lesion_id == 3 and uploaded.lesions[0].measurements.voxels > 0

    for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        assert urllib.request.urlopen(f"{stack.http_url}{path}", timeout=10).status == 200
    spec = json.loads(urllib.request.urlopen(f"{stack.http_url}/openapi.json", timeout=10).read())
    assert {
        "/v1/labels:estimate",
        "/v1/labels:upload",
        "/v1/labels:estimateDose",
        "/v1/labels:describe",
    } <= set(spec["paths"])
    metrics = urllib.request.urlopen(f"{stack.http_url}/metrics", timeout=10).read().decode()
    assert 'wlcad_requests_total{code="OK",component="gateway",method="label-estimation/Estimate"}' in metrics
    service_metrics = urllib.request.urlopen(stack.metrics_url, timeout=10).read().decode()
    assert 'wlcad_inference_duration_seconds_count{model="sphere"' in service_metrics
    assert "wlcad_queue_depth" in service_metrics and "wlcad_in_flight_requests" in service_metrics


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/labels:estimate", b"{not json", 400, "body: not valid JSON"),
        ("/v1/labels:estimate", b"[1]", 400, "must be a JSON object"),
        ("/v1/labels:estimate", b'{"lesions": "x"}', 400, "body:"),
        ("/v1/labels:estimate", b'{"no_such_field": 1}', 400, "no_such_field"),
        ("/v1/labels:estimate", b'{"method": "sphere"}', 400, "lesions"),
        ("/v1/labels:estimateDose", b'{"isodose": "50%"}', 400, "rtdose_dicom"),
        (  # checked with the prompts, before any image is read
            "/v1/labels:estimate",
            json.dumps(
                {
                    "method": "sphere",
                    "lesions": [
                        {"lesion_id": 1, "center_mm": [0, 0, 0], "diameter_mm": 5, "lesion_type": "x" * 65}
                    ],
                }
            ).encode(),
            400,
            "lesions[0].lesion_type",
        ),
    ],
)
def test_http_errors_name_the_field(stack, path, body, status, needle):
    request = urllib.request.Request(f"{stack.http_url}{path}", body, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    assert error.value.code == status
    payload = json.loads(error.value.read())
    assert payload["code"] == "INVALID_ARGUMENT" and needle in payload["message"]
    assert "Traceback" not in payload["message"]


def test_unet_through_the_gateway_when_its_model_is_installed(stack):
    description = _stub(stack.grpc_address).Describe(common_pb2.DescribeRequest(), timeout=10)
    unet = next(m for m in description.methods if m.name == "unet")
    assert unet.available, unet.reason  # model_repository/label_unet3d ships with the repository
    response = _stub(stack.grpc_address).Estimate(
        estimate_request(small_volume((32, 48, 48)), "unet"), timeout=120
    )
    assert response.lesions[0].model_version == unet.model_version
    assert response.lesions[0].qc.HasField("mean_probability_inside")


def test_unet_without_its_model_fails_cleanly(tmp_path):
    empty = tmp_path / "empty-repository"
    empty.mkdir()
    stack = start_stack(tmp_path / "logs", service_env={"WLCAD_MODEL_REPOSITORY": str(empty)})
    try:
        description = _stub(stack.grpc_address).Describe(common_pb2.DescribeRequest(), timeout=10)
        unet = next(m for m in description.methods if m.name == "unet")
        assert not unet.available and "label_unet3d" in unet.reason
        request = estimate_request(small_volume(), "unet")
        with pytest.raises(grpc.RpcError) as error:
            _stub(stack.grpc_address).Estimate(request, timeout=10)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "label_unet3d" in error.value.details()
        body = json_format.MessageToDict(request, preserving_proto_field_name=True)
        with pytest.raises(http_client.HttpError) as http_error:
            http_client.post_json(stack.http_url, "/v1/labels:estimate", body)
        assert http_error.value.status == 412
    finally:
        stack.stop()


def test_deadlines_reach_the_caller_in_time(stack, tmp_path):
    """Requests that cannot finish in time on any machine: an upload held open by the caller (gRPC)
    and a deadline that has passed by the time the gateway looks at it (HTTP). The caller gets
    DEADLINE_EXCEEDED, and nothing stays taken: a gateway with a single slot admits the next call,
    and the service ends the held upload (its in-flight gauge returns to 0) instead of waiting on
    the stream for ever. Timing is never asserted; waits are liveness bounds."""
    gateway, address, http_url = start_gateway(
        tmp_path, stack.service_address, ["--max-in-flight", "1", "--max-queue", "0"]
    )
    try:
        wait_serving(address, service="wlcad.v1.LabelEstimation")
        stub, volume = _stub(address), small_volume()
        release = threading.Event()
        try:  # the gateway passes the caller's 1 s deadline upstream; the stream never completes
            code = _code(lambda: stub.EstimateUpload(_held_open_upload(volume, release), timeout=1))
        finally:
            release.set()  # lets grpc's request thread finish; the call has already ended
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED

        request = estimate_request(volume, "sphere")

        def admitted() -> pb.EstimateResponse | None:
            try:
                return stub.Estimate(request, timeout=30)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                return None  # the caller's own timer can fire just before the gateway frees the slot

        assert _until(admitted, "the held call's gateway slot freed").lesions
        _until(
            lambda: _gauge(stack.metrics_url, "wlcad_in_flight_requests", "label-estimation") == 0 or None,
            "the service ended the held upload",
        )

        body = json_format.MessageToDict(request, preserving_proto_field_name=True)
        expired = urllib.request.Request(
            f"{http_url}/v1/labels:estimate",
            json.dumps(body).encode(),
            {"Content-Type": "application/json", "x-timeout-seconds": "1e-9"},  # past before it is read
        )
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(expired, timeout=60)
        assert error.value.code == 504 and json.loads(error.value.read())["code"] == "DEADLINE_EXCEEDED"
        assert http_client.post_json(http_url, "/v1/labels:estimate", body)["lesions"]  # slot free again
    finally:
        gateway.stop()


def test_size_limits(stack):
    port = int(stack.http_url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.putrequest("POST", "/v1/labels:estimate")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(10**10))
    connection.endheaders()
    assert connection.getresponse().status == 413
    huge = pb.EstimateRequest(
        image=image_pb2.ImageSource(file=image_pb2.ImageFile(filename="x.nii", content=b"\0" * (65 * 2**20))),
        lesions=[pb.LesionPrompt(lesion_id=1, center_mm=[0, 0, 0], diameter_mm=1)],
        method="sphere",
    )
    plain = pb_grpc.LabelEstimationStub(
        grpc.insecure_channel(stack.grpc_address, [("grpc.max_send_message_length", -1)])
    )
    assert _code(lambda: plain.Estimate(huge, timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_grpcurl_sees_health_reflection_and_calls(stack):
    grpcurl = str(Path(REPO_ROOT) / ".venv" / "bin" / "grpcurl")
    listed = subprocess.run(
        [grpcurl, "-plaintext", stack.grpc_address, "list"], capture_output=True, text=True, timeout=30
    )
    assert {"wlcad.v1.LabelEstimation", "grpc.health.v1.Health"} <= set(listed.stdout.split()), listed.stderr
    health = subprocess.run(
        [grpcurl, "-plaintext", stack.grpc_address, "grpc.health.v1.Health/Check"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert '"SERVING"' in health.stdout
    volume = Volume(np.zeros((4, 8, 8), np.uint8), (1, 1, 1))
    body = json_format.MessageToJson(estimate_request(volume, "sphere", diameter=3))
    called = subprocess.run(
        [grpcurl, "-plaintext", "-d", body, stack.grpc_address, "wlcad.v1.LabelEstimation/Estimate"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert '"lesion_id": 1' in called.stdout, called.stderr


def test_concurrency_limit_sheds_with_resource_exhausted(stack, tmp_path):
    gateway, address, http_url = start_gateway(
        tmp_path, stack.service_address, ["--max-in-flight", "1", "--max-queue", "0"]
    )
    try:
        wait_serving(address)
        stub, volume = _stub(address), small_volume()
        request = estimate_request(volume, "sphere")
        # The gateway's only slot is taken by an upload the test holds open, not by work racing the
        # next call (a fast machine finished that work before the next call arrived).
        release = threading.Event()
        held = stub.EstimateUpload.future(_held_open_upload(volume, release), timeout=60)
        try:
            _until(
                lambda: _gauge(f"{http_url}/metrics", "wlcad_in_flight_requests", "gateway") == 1 or None,
                "the held upload admitted",
            )
            assert _code(lambda: stub.Estimate(request, timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            release.set()
        assert held.result().lesions[0].measurements.voxels > 0  # the admitted call was not disturbed
        assert stub.Estimate(request, timeout=30).lesions  # its slot is free once it has answered
    finally:
        gateway.stop()


def test_bearer_tokens(stack, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# one hash a line\n{hash_token('s3cret-token')}\n")
    gateway, address, http_url = start_gateway(
        tmp_path, stack.service_address, ["--tokens-file", str(tokens)]
    )
    try:
        wait_serving(address)  # health needs no token
        request = estimate_request(small_volume(), "sphere")
        for token in (None, "wrong"):
            with LabelEstimationClient(address, token=token) as client:
                assert (
                    _code(lambda c=client: c.estimate_request(request, 30)) == grpc.StatusCode.UNAUTHENTICATED
                )
        with LabelEstimationClient(address, token="s3cret-token") as client:
            assert client.estimate_request(request, 30).lesions
        body = json_format.MessageToDict(request, preserving_proto_field_name=True)
        with pytest.raises(http_client.HttpError) as error:
            http_client.post_json(http_url, "/v1/labels:estimate", body, token="wrong")
        assert error.value.status == 401
        assert http_client.post_json(http_url, "/v1/labels:estimate", body, token="s3cret-token")["lesions"]
    finally:
        gateway.stop()
    assert "s3cret-token" not in tokens.read_text()


def test_non_loopback_gateway_needs_tokens():
    result = run_cli("serve", "gateway", "--grpc-listen", f"0.0.0.0:{free_port()}", timeout=60)
    assert result.returncode == 2
    assert "tokens" in result.stderr and "Traceback" not in result.stderr


def test_tls_and_mutual_tls(stack, tmp_path):
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=wlcad-test-ca",
            "-keyout", str(tmp_path / "ca.key"), "-out", str(tmp_path / "ca.pem"))  # fmt: skip
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                "-keyout", str(tmp_path / f"{name}.key"), "-out", str(tmp_path / f"{name}.csr"))  # fmt: skip
        (tmp_path / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        openssl("x509", "-req", "-in", str(tmp_path / f"{name}.csr"), "-CA", str(tmp_path / "ca.pem"),
                "-CAkey", str(tmp_path / "ca.key"), "-CAcreateserial", "-days", "2",
                "-extfile", str(tmp_path / "san.ext"), "-out", str(tmp_path / f"{name}.pem"))  # fmt: skip
    options = ["--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key")]
    options += ["--tls-client-ca", str(tmp_path / "ca.pem")]
    gateway, address, http_url = start_gateway(tmp_path, stack.service_address, options)
    try:
        ca = (tmp_path / "ca.pem").read_bytes()
        client_pair = ((tmp_path / "client.key").read_bytes(), (tmp_path / "client.pem").read_bytes())
        request = estimate_request(small_volume(), "sphere")
        deadline = time.monotonic() + 60  # the gateway is starting: a readiness wait, generous
        while True:
            try:
                reply = LabelEstimationClient(
                    address, channel_=channel(address, ca, client_pair)
                ).estimate_request(request, 30)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        assert reply.lesions
        without_cert = LabelEstimationClient(address, channel_=channel(address, ca))
        assert _code(lambda: without_cert.estimate_request(request, 30)) == grpc.StatusCode.UNAVAILABLE
        https = http_url.replace("http://", "https://") + "/healthz"
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(https, timeout=30, context=context).read()  # no client certificate
        context.load_cert_chain(str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
        assert urllib.request.urlopen(https, timeout=30, context=context).status == 200
    finally:
        gateway.stop()
