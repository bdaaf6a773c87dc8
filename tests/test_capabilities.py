"""One capability table: a throw-away capability (tests/echo: its own proto, a servicer over the
scaffold, one ``Capability``) is served through the real gateway over gRPC and HTTP — unary,
server-streaming and upload RPCs — with no change to the gateway, the scaffold or ``wlcad serve``;
and the deployment files name exactly the capabilities of the table."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from services.api.client import channel
from services.api.convert import volume_to_proto
from services.api.http_client import multipart
from services.api.pb import image_pb2
from services.capabilities import BUILT_IN, CAPABILITIES, PLUGINS_ENV
from services.core.io import write_image
from services.core.volume import Volume
from services.gateway.routes import ROUTES
from tests.conftest import REPO_ROOT
from tests.echo.service import UPLOAD, echo_pb2
from tests.serving_support import Process, free_port, wait_serving

pytestmark = pytest.mark.timeout(300)
PLUGIN = {PLUGINS_ENV: "tests.echo.service:ECHO"}


@pytest.fixture(scope="module")
def echo_stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("echo")
    service_address = f"127.0.0.1:{free_port()}"
    grpc_address, http_port = f"127.0.0.1:{free_port()}", free_port()
    service = Process(
        ["serve", "echo", "--listen", service_address, "--metrics-listen", ""], logs / "echo.log", PLUGIN
    ).start()
    listen = ["--grpc-listen", grpc_address, "--http-listen", f"127.0.0.1:{http_port}"]
    gateway = Process(
        ["serve", "gateway", *listen, "--route", f"echo={service_address}"], logs / "gateway.log", PLUGIN
    ).start()
    try:
        wait_serving(service_address, service="wlcad.test.v1.Echo")
        wait_serving(grpc_address)
        yield grpc_address, f"http://127.0.0.1:{http_port}", logs
    finally:
        gateway.stop()
        service.stop()


def _call(address: str, path: str, request, reply_class, streaming: bool = False):
    wire = channel(address)
    try:
        kind = wire.unary_stream if streaming else wire.unary_unary
        call = kind(
            path,
            request_serializer=type(request).SerializeToString,
            response_deserializer=reply_class.FromString,
        )
        result = call(request, timeout=30)
        return list(result) if streaming else result
    finally:
        wire.close()


def test_echo_over_grpc_unary_streaming_and_upload(echo_stack):
    grpc_address, _, _ = echo_stack
    reply = _call(
        grpc_address, "/wlcad.test.v1.Echo/Say", echo_pb2.EchoRequest(text="hi"), echo_pb2.EchoReply
    )
    assert (reply.text, reply.component) == ("hi", "echo")
    with pytest.raises(grpc.RpcError) as refused:
        _call(grpc_address, "/wlcad.test.v1.Echo/Say", echo_pb2.EchoRequest(), echo_pb2.EchoReply)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text" in refused.value.details()
    counted = _call(
        grpc_address, "/wlcad.test.v1.Echo/Count", echo_pb2.CountRequest(up_to=5), echo_pb2.CountReply, True
    )
    assert [r.value for r in counted] == [1, 2, 3, 4, 5]

    volume = Volume(np.arange(6 * 5 * 4, dtype=np.int16).reshape(4, 5, 6), (1.0, 1.0, 2.0))
    header = volume_to_proto(volume, with_data=False)
    first = UPLOAD.first_message(echo_pb2.MeasureRequest(image=image_pb2.ImageSource(volume=header)))
    wire = channel(grpc_address)
    try:
        upload = wire.stream_unary(
            "/wlcad.test.v1.Echo/MeasureUpload", response_deserializer=echo_pb2.MeasureReply.FromString
        )
        measured = upload(iter([first, *UPLOAD.chunk_messages(volume.array.tobytes(), size=64)]), timeout=30)
    finally:
        wire.close()
    assert list(measured.shape_xyz) == [6, 5, 4] and measured.sum == float(volume.array.sum())


def test_echo_over_http_json_ndjson_and_multipart(echo_stack, tmp_path):
    _, http_url, _ = echo_stack
    said = urllib.request.Request(
        f"{http_url}/v1/echo:say",
        json.dumps({"text": "hello"}).encode(),
        {"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(said, timeout=30) as response:
        assert json.loads(response.read()) == {"text": "hello", "component": "echo"}
    counted = urllib.request.Request(
        f"{http_url}/v1/echo:count", b'{"up_to": 3}', {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(counted, timeout=30) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        assert [json.loads(line)["value"] for line in response.read().splitlines()] == [1, 2, 3]
    path = write_image(Volume(np.ones((3, 4, 5), np.int16), (1.0, 1.0, 1.0)), tmp_path / "ones.nii.gz")
    body, content_type = multipart({"file": ("ones.nii.gz", path.read_bytes(), "application/octet-stream")})
    upload = urllib.request.Request(f"{http_url}/v1/echo:measure", body, {"Content-Type": content_type})
    with urllib.request.urlopen(upload, timeout=30) as response:
        assert json.loads(response.read()) == {"shape_xyz": [5, 4, 3], "sum": 60.0}
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(
            urllib.request.Request(
                f"{http_url}/v1/echo:say", b"{}", {"Content-Type": "application/json"}, method="POST"
            ),
            timeout=30,
        )
    assert refused.value.code == 400
    with urllib.request.urlopen(f"{http_url}/openapi.json", timeout=30) as response:
        paths = json.loads(response.read())["paths"]
    assert {"/v1/echo:say", "/v1/echo:count", "/v1/echo:measure"} <= set(paths)
    # a gateway given routes serves those only: ready with echo up, whatever else the table holds
    with urllib.request.urlopen(f"{http_url}/readyz", timeout=30) as response:
        assert json.loads(response.read()) == {"upstreams": {"echo": True}}


def test_the_table_drives_routes_and_serve():
    assert [r.name for r in ROUTES] == [c.name for c in CAPABILITIES] == [c.name for c in BUILT_IN]
    from services.cli.main import build_parser

    parser = build_parser()
    for entry in CAPABILITIES:
        args = parser.parse_args(["serve", entry.name])
        assert (args.capability, args.listen) == (entry.name, entry.default_address)


def _compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


@pytest.mark.parametrize("entry", BUILT_IN, ids=lambda c: c.name)
def test_deployment_files_name_every_capability(entry):
    """docker-compose, the Helm values and the Prometheus targets list each capability on its table
    ports, so adding one to the table without deploying it fails here."""
    compose = _compose()["services"]
    command = compose[entry.name]["command"]
    assert command[:2] == ["serve", entry.name] and f"0.0.0.0:{entry.port}" in command
    assert f"0.0.0.0:{entry.metrics_port}" in command
    assert f"{entry.name}={entry.name}:{entry.port}" in compose["gateway"]["command"]
    values = yaml.safe_load((REPO_ROOT / "helm/wlcad/values.yaml").read_text())
    assert values["capabilities"][entry.name]["port"] == entry.port
    assert values["capabilities"][entry.name]["metricsPort"] == entry.metrics_port
    for config in ("prometheus.yml", "prometheus-compose.yml"):
        jobs = yaml.safe_load((REPO_ROOT / "deploy/prometheus" / config).read_text())["scrape_configs"]
        targets = {
            t
            for job in jobs
            if job["job_name"] == entry.name
            for s in job["static_configs"]
            for t in s["targets"]
        }
        assert any(t.endswith(f":{entry.metrics_port}") for t in targets), (config, targets)


def test_the_echo_capability_is_under_100_lines():
    echo = Path(__file__).parent / "echo"
    lines = sum(len(p.read_text().splitlines()) for p in (echo / "echo.proto", echo / "service.py"))
    assert lines < 100
