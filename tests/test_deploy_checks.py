"""The stack checks the deployments run (``helm test``, compose's ``integration`` and ``load``
profiles: deploy/checks/), run here against real processes: a label-estimation service and a gateway
that dials it the way the chart does, ``dns:///<host>:<port>`` (the headless Service's name), and
requires a bearer token. The checks pass on the healthy stack and fail, naming what, when a
capability is missing or the token is wrong."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.gateway.auth import new_token
from tests.conftest import REPO_ROOT
from tests.serving_support import Process, free_port, wait_serving

pytestmark = pytest.mark.timeout(300)
CHECKS = REPO_ROOT / "deploy" / "checks"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("stack")
    token, digest = new_token()
    (logs / "tokens").write_text(digest + "\n")
    service_port, grpc_port, http_port = free_port(), free_port(), free_port()
    service = Process(
        [
            "serve",
            "label-estimation",
            "--listen",
            f"127.0.0.1:{service_port}",
            "--metrics-listen",
            "",
            "--compute-slots",
            "1",
        ],
        logs / "service.log",
    ).start()
    gateway = Process(
        [
            "serve", "gateway", "--grpc-listen", f"127.0.0.1:{grpc_port}", "--http-listen", f"127.0.0.1:{http_port}",
            "--route", f"label-estimation=dns:///localhost:{service_port}", "--tokens-file", str(logs / "tokens"),
        ],
        logs / "gateway.log",
    ).start()  # fmt: skip
    try:
        wait_serving(f"127.0.0.1:{grpc_port}", service="wlcad.v1.LabelEstimation")
        yield {"token": token, "grpc": grpc_port, "http": http_port}
    finally:
        gateway.stop()
        service.stop()


def _check(script: str, *args: str, token: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "WLCAD_TOKEN": token}
    return subprocess.run(
        [sys.executable, str(CHECKS / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO_ROOT,
    )


def test_stack_check_passes_through_a_gateway_dialling_dns_targets(stack):
    ports = ["--host", "127.0.0.1", "--grpc-port", str(stack["grpc"]), "--http-port", str(stack["http"])]
    passed = _check("stack_check.py", *ports, "--capability", "label-estimation", token=stack["token"])
    assert passed.returncode == 0, passed.stdout + passed.stderr
    lines = passed.stdout.splitlines()
    assert lines == [
        "ok   readyz: 200 {'label-estimation': True}",
        "ok   health wlcad.v1.LabelEstimation: SERVING",
        "ok   GET /v1/labels:describe: 200",
    ]
    # every capability of the table expected: cade is not behind this gateway, and that is said
    whole = _check("stack_check.py", *ports, token=stack["token"])
    assert whole.returncode == 1 and "FAIL health wlcad.v1.Detection: StatusCode.NOT_FOUND" in whole.stdout
    wrong = _check("stack_check.py", *ports, "--capability", "label-estimation", token="not-the-token")
    assert wrong.returncode == 1 and "FAIL GET /v1/labels:describe: 401" in wrong.stdout
    unknown = _check("stack_check.py", *ports, "--capability", "nope")
    assert unknown.returncode == 1 and "not in the capability table: ['nope']" in unknown.stdout


def test_load_client_is_bounded_and_fails_on_any_error(stack):
    target = [
        "--target",
        f"127.0.0.1:{stack['grpc']}",
        "--capability",
        "label-estimation",
        "--concurrency",
        "4",
    ]
    loaded = _check("load.py", *target, "--requests", "200", token=stack["token"])
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert "load: 200 calls, codes {'OK': 200}" in loaded.stdout
    refused = _check("load.py", *target, "--requests", "20")  # no token: every call UNAUTHENTICATED
    assert refused.returncode == 1 and "codes {'UNAUTHENTICATED': 20}" in refused.stdout
    bad = _check("load.py", *target, "--requests", "0")
    assert bad.returncode == 2 and "--requests must be > 0" in bad.stderr
