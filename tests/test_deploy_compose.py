"""docker-compose.yml against what the tests run: each wlcad command is the one ``wlcad serve all`` (the
supervisor the process tests and ``make run`` use) gives that child, up to the container network's
host names; every service is built from the Dockerfile, checked for health and started only after
what it needs is healthy; Triton gets a GPU; the ``load`` and ``integration`` profiles run the
stack checks shipped in the image; Prometheus scrapes every process. The healthcheck commands of
the third-party containers run here against a real HTTP server."""

from __future__ import annotations

import http.server
import re
import runpy
import subprocess
import threading

import pytest
import yaml

from services.capabilities import BUILT_IN
from services.cli import serve_cmd
from services.cli.main import build_parser
from tests.conftest import REPO_ROOT

WLCAD = ("gateway", *(c.name for c in BUILT_IN))
TRITON_GRPC = 8001
DICOMWEB = "http://orthanc:8042/dicom-web"


def _compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]


def _serve_all_children(monkeypatch) -> dict[str, list[str]]:
    """The argv ``wlcad serve all --backend triton`` gives each child, captured at the supervisor (no
    process is started), for the services on all addresses as in a container."""
    argv = [
        "serve",
        "all",
        "--backend",
        "triton",
        "--triton-grpc-port",
        str(TRITON_GRPC),
        "--dicomweb",
        DICOMWEB,
    ]
    for entry in BUILT_IN:
        argv += ["--service-listen", f"{entry.name}=0.0.0.0:{entry.port}"]
        argv += ["--service-metrics-listen", f"{entry.name}=0.0.0.0:{entry.metrics_port}"]
    captured: dict[str, list[str]] = {}

    def supervise(children) -> int:
        captured.update({child.name: child.argv for child in children})
        return 0

    monkeypatch.setattr(serve_cmd, "_supervise", supervise)
    args = build_parser().parse_args(argv)
    assert args.handler(args) == 0
    return captured


def _in_a_container(argv: list[str]) -> list[str]:
    """What differs inside compose's network, and only that: peers by service name, and the
    gateway on all addresses (it then needs its tokens, which compose requires from the environment)."""
    hosts = {f"{c.name}=0.0.0.0:{c.port}": f"{c.name}={c.name}:{c.port}" for c in BUILT_IN}
    hosts |= {f"triton://127.0.0.1:{TRITON_GRPC}": f"triton://triton:{TRITON_GRPC}"}
    hosts |= {"127.0.0.1:50051": "0.0.0.0:50051", "127.0.0.1:8080": "0.0.0.0:8080"}
    return [hosts.get(a, a) for a in argv]


def test_each_wlcad_command_is_what_serve_all_starts(monkeypatch):
    children = _serve_all_children(monkeypatch)
    compose = _compose()
    assert set(children) == {"triton", *WLCAD}
    for name in WLCAD:
        assert compose[name]["command"] == _in_a_container(children[name]), name


def test_every_service_is_built_checked_for_health_and_waits_for_healthy_dependencies():
    compose = _compose()
    for name in WLCAD:
        service = compose[name]
        assert service["build"] == {"context": ".", "dockerfile": "Dockerfile"}, name
        assert service["image"] == "wlcad:0.1.0"
        # the image's HEALTHCHECK (tests/test_packaging.py runs it) probes this process's own gRPC port
        listen = next(a for a in service["command"] if re.fullmatch(r"0\.0\.0\.0:5\d{4}", a))
        assert service["environment"]["WLCAD_HEALTH_ADDRESS"] == listen.replace("0.0.0.0", "127.0.0.1")
        assert "test" not in service["healthcheck"] and service["healthcheck"]["start_period"]
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert service["tmpfs"] == ["/tmp:size=2g"] and "no-new-privileges:true" in service["security_opt"]
    for name in ("triton", "orthanc", "prometheus"):
        assert compose[name]["healthcheck"]["test"][0] == "CMD", name
    for name, service in compose.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
            assert compose[dependency].get("healthcheck", {}).get("disable") is not True
    assert set(compose["gateway"]["depends_on"]) == {c.name for c in BUILT_IN}
    for entry in BUILT_IN:
        assert set(compose[entry.name]["depends_on"]) == {"triton", "orthanc"}


def test_triton_has_a_gpu_and_the_model_repository():
    triton = _compose()["triton"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "./model_repository:/models:ro" in triton["volumes"]
    assert (
        "--model-repository=/models" in triton["command"]
        and f"--grpc-port={TRITON_GRPC}" in triton["command"]
    )
    configs = list((REPO_ROOT / "model_repository").glob("*/config.pbtxt"))
    assert configs and all("KIND_GPU" in c.read_text() for c in configs)  # what the reservation is for


@pytest.mark.parametrize(("profile", "script"), [("integration", "stack_check.py"), ("load", "load.py")])
def test_profiles_run_the_checks_shipped_in_the_image(profile, script):
    service = _compose()[profile]
    assert service["profiles"] == [profile] and service["build"]["dockerfile"] == "Dockerfile"
    assert service["entrypoint"] == ["python", f"/opt/wlcad/checks/{script}"]
    assert "COPY --from=build /src/checks /opt/wlcad/checks" in (REPO_ROOT / "Dockerfile").read_text()
    module = runpy.run_path(str(REPO_ROOT / "deploy" / "checks" / script))
    if profile == "integration":
        args = module["parser"]().parse_args(service["command"])
        assert (args.host, args.grpc_port, args.http_port) == ("gateway", 50051, 8080)
    else:  # bounded: a count and a time limit
        command = service["command"]
        assert command[command.index("--target") + 1] == "gateway:50051"
        assert int(command[command.index("--requests") + 1]) <= 10_000
        assert float(command[command.index("--max-seconds") + 1]) <= 600
    assert service["environment"]["WLCAD_TOKEN"] == "${WLCAD_TOKEN:-}"


def test_prometheus_scrapes_every_process_at_its_compose_address():
    compose = _compose()
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus-compose.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets.pop("wlcad-gateway") == ["gateway:8080"]
    for entry in BUILT_IN:
        assert targets.pop(entry.name) == [f"{entry.name}:{entry.metrics_port}"]
        assert f"0.0.0.0:{entry.metrics_port}" in compose[entry.name]["command"]
    assert targets.pop("triton") == ["triton:8002"] and "--metrics-port=8002" in compose["triton"]["command"]
    assert targets == {"orthanc": ["orthanc:8042"]}
    assert compose["prometheus"]["volumes"] == ["./deploy/prometheus:/etc/prometheus:ro"]


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(_Health.status if self.path in ("/v2/health/ready", "/system") else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("name", ["triton", "orthanc"])
def test_bash_healthchecks_pass_on_200_and_fail_otherwise(name):
    """The /dev/tcp health commands (the images need no curl), run by bash against a real server."""
    test = _compose()[name]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "bash", "-c"]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = str(server.server_address[1])
    script = re.sub(r"/dev/tcp/127\.0\.0\.1/\d+", f"/dev/tcp/127.0.0.1/{port}", test[3])
    try:

        def check() -> int:
            return subprocess.run(
                ["bash", "-c", script], capture_output=True, timeout=30, check=False
            ).returncode

        _Health.status = 200
        assert check() == 0
        _Health.status = 503
        assert check() != 0
    finally:
        server.shutdown()
        server.server_close()
    assert check() != 0  # nothing listening
