"""Supervision by ``wlcad serve all`` and start-up safety of the generated code.

- A service killed again and again (SIGKILL, more often than the old lifetime budget of 5 restarts)
  is restarted within a restart budget per time window, the gateway stays up (same process) and
  answers UNAVAILABLE while the service is down, and the service serves again afterwards.
- Code generation run by several processes at once on a checkout without generated code (the
  children of ``serve all``, parallel tests) leaves complete modules that import, and never shows a
  partial result while a generator is still writing.

Everything runs as real processes on 127.0.0.1; waits are generous bounds, never timing asserts.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from services.api.pb import label_estimation_pb2_grpc as pb_grpc
from services.cli.serve_cmd import RestartBudget
from tests.serving_support import REPO_ROOT, Process, estimate_request, free_port, small_volume, wait_serving

SERVICE = "label-estimation"


# --- the restart budget -------------------------------------------------------------------------


def test_restart_budget_allows_limit_restarts_per_window_and_resets_after_a_quiet_window() -> None:
    budget = RestartBudget(limit=2, window_s=10.0, base_delay_s=0.5, max_delay_s=10.0)
    assert budget.next_start(0.0) == 0.5  # first death: short back-off
    budget.record(0.5)
    assert budget.next_start(1.0) == 2.0  # second: doubled
    budget.record(2.0)
    assert budget.exhausted()
    # third death within the window: waits until the oldest restart leaves it (2 restarts / 10 s)
    assert budget.next_start(2.5) == 10.5
    budget.record(10.5)
    # a child that stayed up a whole window has its budget back: short back-off again
    assert budget.next_start(40.0) == 40.5
    assert not budget.exhausted()


# --- serve all under repeated SIGKILL -----------------------------------------------------------


def _started_pids(log: Path, name: str) -> list[int]:
    return [int(p) for p in re.findall(rf"started {re.escape(name)} \(pid (\d+)\)", log.read_text())]


def _wait_for(predicate, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout_s} s")


def _death_line(log: Path, pid_count: int) -> str | None:
    """The supervisor's message about the ``pid_count``-th death of the service, once written."""
    lines = re.findall(rf"{SERVICE} exited \(-9\); restarting in .*", log.read_text())
    return lines[pid_count - 1] if len(lines) >= pid_count else None


def _estimate(address: str, timeout_s: float):
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.LabelEstimationStub(channel).Estimate(
            estimate_request(small_volume()), timeout=timeout_s
        )


def _estimate_ok_within(address: str, timeout_s: float) -> float:
    """Seconds until an Estimate through the gateway succeeds (bounded by ``timeout_s``)."""
    start = time.monotonic()
    while True:
        try:
            _estimate(address, timeout_s=10)
            return time.monotonic() - start
        except grpc.RpcError as exc:
            if time.monotonic() - start > timeout_s:
                raise AssertionError(f"no successful Estimate within {timeout_s} s: {exc.code()}") from exc
            time.sleep(0.2)


def test_serve_all_keeps_the_gateway_up_while_a_service_is_killed_repeatedly(tmp_path: Path) -> None:
    grpc_address, http_port = f"127.0.0.1:{free_port()}", free_port()
    service_address, metrics_port = f"127.0.0.1:{free_port()}", free_port()
    log = tmp_path / "serve-all.log"
    stack = Process(
        [
            "serve", "all", "--grpc-listen", grpc_address, "--http-listen", f"127.0.0.1:{http_port}",
            "--service-listen", f"{SERVICE}={service_address}",
            "--service-metrics-listen", f"{SERVICE}=127.0.0.1:{metrics_port}",
            "--restart-limit", "2", "--restart-window", "8",
        ],
        log,
    ).start()  # fmt: skip
    try:
        wait_serving(grpc_address, timeout_s=120, service="wlcad.v1.LabelEstimation")
        _estimate(grpc_address, timeout_s=60)
        gateway_pids = _started_pids(log, "gateway")
        assert len(gateway_pids) == 1

        # one kill with the budget unused: the time the stack needs to serve again
        os.kill(_started_pids(log, SERVICE)[-1], signal.SIGKILL)
        recovered_s = _estimate_ok_within(grpc_address, timeout_s=120)

        # then five more, each as soon as the new process exists: 6 deaths in all, more than the old
        # lifetime budget (5 restarts, then the whole stack exited)
        unavailable_while_paused = None
        for death in range(2, 7):
            pids = _wait_for(lambda n=death: len(_started_pids(log, SERVICE)) >= n and _started_pids(log, SERVICE),
                             f"restart {death - 1} of the service", timeout_s=90)  # fmt: skip
            os.kill(pids[-1], signal.SIGKILL)
            line = _wait_for(lambda n=death: _death_line(log, n), f"death {death} noticed")
            if "used up" in line and unavailable_while_paused is None:
                with pytest.raises(grpc.RpcError) as refused:
                    _estimate(grpc_address, timeout_s=30)
                unavailable_while_paused = refused.value.code()
            assert stack.alive(), log.read_text()[-3000:]
            os.kill(gateway_pids[0], 0)  # the same gateway process, never restarted or stopped

        assert unavailable_while_paused == grpc.StatusCode.UNAVAILABLE, log.read_text()[-3000:]
        final_recovery_s = _estimate_ok_within(grpc_address, timeout_s=120)
        assert _started_pids(log, "gateway") == gateway_pids
        assert len(_started_pids(log, SERVICE)) == 7
        print(
            f"\nrestart after one SIGKILL: {recovered_s:.1f} s; after the 6th (budget): {final_recovery_s:.1f} s"
        )
    finally:
        stack.stop()
    assert stack.popen.returncode == 0, log.read_text()[-3000:]


# --- code generation under concurrent start -----------------------------------------------------

_GENERATE = """
import sys
from pathlib import Path
from services.api import codegen
codegen.generate(Path(sys.argv[1]))
sys.path.insert(0, sys.argv[1])
from wlcad.v1 import label_estimation_pb2, label_estimation_pb2_grpc
assert label_estimation_pb2.DESCRIPTOR.services_by_name["LabelEstimation"]
"""

#: A generator that stops after protoc wrote its files, until told to go on (a flag file).
_PAUSED_GENERATE = """
import sys, time
from pathlib import Path
from grpc_tools import protoc
real = protoc.main
def paused(args):
    status = real(args)
    Path(sys.argv[2]).touch()
    while not Path(sys.argv[3]).exists():
        time.sleep(0.05)
    return status
protoc.main = paused
from services.api import codegen
codegen.generate(Path(sys.argv[1]))
"""


def _python(script: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_concurrent_generators_on_an_empty_folder_all_succeed_and_the_result_imports(tmp_path: Path) -> None:
    for round_ in range(2):
        out = tmp_path / f"generated-{round_}"
        generators = [_python(_GENERATE, out) for _ in range(3)]
        for generator in generators:
            output, _ = generator.communicate(timeout=120)
            assert generator.returncode == 0, output
        assert not list(out.glob(".codegen-*")), "temporary folders left behind"


def test_generated_modules_appear_only_once_complete(tmp_path: Path) -> None:
    out, written, go_on = tmp_path / "generated", tmp_path / "written", tmp_path / "go-on"
    generator = _python(_PAUSED_GENERATE, out, written, go_on)
    try:
        _wait_for(written.exists, "protoc finished", timeout_s=120)
        visible = sorted(p.name for p in (out / "wlcad" / "v1").glob("*_pb2*.py")) if out.exists() else []
        assert visible == [], f"modules visible before generation finished: {visible}"
    finally:
        go_on.touch()
        output, _ = generator.communicate(timeout=120)
    assert generator.returncode == 0, output
    names = sorted(p.name for p in (out / "wlcad" / "v1").glob("*_pb2*.py"))
    assert "label_estimation_pb2.py" in names and "common_pb2.py" in names
    assert not list(out.glob(".codegen-*"))
