"""Backend outages and stalled streams, with real processes on 127.0.0.1.

* Triton SIGKILLed under load, through the gateway: U-Net callers get UNAVAILABLE before their
  deadline (never DEADLINE_EXCEEDED), sphere callers keep getting answers, no request outlives its
  caller, the service's health for its own name is NOT_SERVING while Triton is down (liveness, "",
  stays SERVING) and SERVING again once Triton is back, and U-Net calls then succeed again.
* Triton hung (SIGSTOP: it accepts requests and never answers): a U-Net call waits no longer than
  its caller's deadline, so the service holds nothing once the caller has its answer, and sphere
  calls are answered meanwhile.
* Readiness follows the probe in a real service process; the probe of a dead Triton says not ready.
* A try that times out after the server refused earlier tries is reported as UNAVAILABLE.
* A refused upload whose caller then stalls without a deadline is ended by the drain's time bound
  instead of holding the handler thread until the caller closes.

Nothing races the clock: phases wait for outcomes with generous bounds; the figures are printed.
Needs ``bash scripts/install-triton.sh`` for the Triton test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from services.api.client import channel
from services.api.pb import label_estimation_pb2 as pb
from services.api.pb import label_estimation_pb2_grpc as pb_grpc
from services.inference.errors import InferenceUnavailableError
from services.inference.factory import BackendProbe, default_repository
from services.inference.repository import ModelRepository
from services.inference.triton import TritonBackend
from services.inference.triton_server import TritonServer
from services.label_estimation.unet import MODEL_NAME
from services.servers.grpc_server import MAX_DRAIN_S
from tests.serving_support import (
    REPO_ROOT,
    estimate_request,
    free_port,
    metric_value,
    small_volume,
    start_service,
    start_stack,
    until,
    wait_serving,
)

pytestmark = pytest.mark.timeout(600)

SERVICE = "wlcad.v1.LabelEstimation"
UNET_DEADLINE_S = 20.0  # per U-Net call: the outage must be answered well inside it
SPHERE_DEADLINE_S = 30.0
HUNG_DEADLINE_S = 10.0  # the U-Net call to a hung Triton: shorter than the old fixed 30 s wait
WAIT_S = 120.0  # liveness bound of each phase: only a hang runs it out


def _health(address: str, service: str) -> str:
    """The health status name of ``service`` at ``address`` ("DOWN" when it does not answer)."""
    with grpc.insecure_channel(address) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
        except grpc.RpcError:
            return "DOWN"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@dataclass(frozen=True)
class Outcome:
    method: str
    start: float
    end: float
    code: str


class Callers:
    """Callers looping on Estimate through the gateway, each outcome recorded."""

    def __init__(self, stub: pb_grpc.LabelEstimationStub) -> None:
        self.stub = stub
        self.outcomes: list[Outcome] = []
        self.recorded = threading.Condition()
        self.stop = threading.Event()

    def loop(self, method: str, request: pb.EstimateRequest, deadline_s: float) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.stub.Estimate(request, timeout=deadline_s)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            with self.recorded:
                self.outcomes.append(Outcome(method, started, time.monotonic(), code))
                self.recorded.notify_all()

    def wait_for(self, count: int, which: Callable[[Outcome], bool], what: str) -> None:
        """Until ``count`` calls recorded from now on satisfy ``which``."""
        with self.recorded:
            since = len(self.outcomes)
            if not self.recorded.wait_for(
                lambda: sum(map(which, self.outcomes[since:])) >= count, timeout=WAIT_S
            ):
                pytest.fail(f"fewer than {count} calls {what} within {WAIT_S:g} s")


def _until_idle(stack, what: str) -> None:
    """Until the service has no request in flight (the bound is generous: only a hang runs it out)."""
    until(
        lambda: (
            metric_value(stack.metrics_url, "wlcad_in_flight_requests", component="label-estimation") == 0
            or None
        ),
        what,
        WAIT_S,
    )


def test_triton_killed_under_load_through_the_gateway(tmp_path: Path) -> None:
    repository = ModelRepository(default_repository())
    if MODEL_NAME not in repository.model_names():
        pytest.skip(f"{MODEL_NAME} is not in the model repository")
    ports = {"grpc_port": free_port(), "http_port": free_port(), "metrics_port": free_port()}
    setting = f"triton://127.0.0.1:{ports['grpc_port']}"
    triton = TritonServer(repository, workdir=tmp_path / "triton-1", **ports).start(timeout_s=WAIT_S)
    stack = None
    try:
        assert BackendProbe(setting, models=[MODEL_NAME])()
        stack = start_stack(tmp_path, service_extra=["--inference", setting])
        stub = pb_grpc.LabelEstimationStub(channel(stack.grpc_address))
        volume = small_volume((32, 48, 48))
        unet = estimate_request(volume, "unet", diameter=10)
        sphere = estimate_request(volume, "sphere", diameter=10)
        callers = Callers(stub)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            try:
                for method, request, deadline in (
                    ("unet", unet, UNET_DEADLINE_S),
                    ("unet", unet, UNET_DEADLINE_S),
                    ("sphere", sphere, SPHERE_DEADLINE_S),
                    ("sphere", sphere, SPHERE_DEADLINE_S),
                ):
                    pool.submit(callers.loop, method, request, deadline)
                callers.wait_for(
                    4, lambda o: o.method == "unet" and o.code == "OK", "of unet OK before the kill"
                )
                triton.kill()  # SIGKILL to the server and its python-backend stubs
                killed_at = time.monotonic()
                until(
                    lambda: _health(stack.service_address, SERVICE) == "NOT_SERVING" or None,
                    "not ready",
                    WAIT_S,
                )
                not_ready_s = time.monotonic() - killed_at
                assert _health(stack.service_address, "") == "SERVING"  # liveness is not readiness
                callers.wait_for(
                    6, lambda o: o.method == "unet" and o.start > killed_at, "of unet while down"
                )
                callers.wait_for(
                    4, lambda o: o.method == "sphere" and o.start > killed_at, "of sphere while down"
                )
            finally:
                callers.stop.set()
        stopped_at = time.monotonic()  # every caller has its answer
        # Nothing keeps working for a caller that has its answer: no retries past the deadline.
        _until_idle(stack, "requests in flight after the callers left")
        idle_after_s = time.monotonic() - stopped_at
        assert _health(stack.service_address, SERVICE) == "NOT_SERVING"
        restarted_at = time.monotonic()
        triton = TritonServer(repository, workdir=tmp_path / "triton-2", **ports).start(timeout_s=WAIT_S)
        until(lambda: _health(stack.service_address, SERVICE) == "SERVING" or None, "ready again", WAIT_S)
        ready_again_s = time.monotonic() - restarted_at
        after = _recovered_unet_codes(stub, unet)

        down = [o for o in callers.outcomes if o.start > killed_at]
        down_unet = [o for o in down if o.method == "unet"]
        assert {o.code for o in callers.outcomes if o.method == "sphere"} == {"OK"}
        assert {o.code for o in down_unet} == {"UNAVAILABLE"}
        assert all(o.end - o.start < UNET_DEADLINE_S for o in down_unet)
        assert {o.code for o in callers.outcomes} <= {"OK", "UNAVAILABLE"}  # never DEADLINE_EXCEEDED
        assert idle_after_s < 5.0, idle_after_s
        assert after == ["OK"] * len(after)
        # The service answered UNAVAILABLE itself (after its Triton client's retries): the gateway
        # passes that on at once instead of retrying the service, which is up.
        retried = metric_value(
            f"{stack.http_url}/metrics",
            "wlcad_gateway_retries_total",
            route="label-estimation",
            method="Estimate",
        )
        assert retried == 0, retried
        print(
            f"\n{len(callers.outcomes)} calls; NOT_SERVING {not_ready_s:.2f} s after the kill; "
            f"unet while down: {len(down_unet)} UNAVAILABLE, slowest {max(o.end - o.start for o in down_unet):.2f} s "
            f"(deadline {UNET_DEADLINE_S:g} s); sphere while down: "
            f"{sum(o.method == 'sphere' for o in down)} OK, slowest "
            f"{max(o.end - o.start for o in down if o.method == 'sphere'):.2f} s; in flight 0 "
            f"{idle_after_s:.2f} s after the callers left; SERVING {ready_again_s:.2f} s after the restart"
        )
    finally:
        if stack is not None:
            stack.stop()
        triton.cleanup()


def test_hung_triton_holds_no_work_past_the_callers_deadline(tmp_path: Path) -> None:
    repository = ModelRepository(default_repository())
    if MODEL_NAME not in repository.model_names():
        pytest.skip(f"{MODEL_NAME} is not in the model repository")
    triton = TritonServer(repository, workdir=tmp_path / "triton").start(timeout_s=WAIT_S)
    stack = None
    try:
        stack = start_stack(tmp_path, service_extra=["--inference", f"triton://{triton.grpc_url}"])
        stub = pb_grpc.LabelEstimationStub(channel(stack.grpc_address))
        volume = small_volume((32, 48, 48))
        unet = estimate_request(volume, "unet", diameter=10)
        sphere = estimate_request(volume, "sphere", diameter=10)
        stub.Estimate(unet, timeout=WAIT_S)  # the model works (and the channel to Triton is open)
        os.killpg(triton.process.pid, signal.SIGSTOP)  # hung: connections stay open, nothing answers
        until(lambda: _health(stack.service_address, SERVICE) == "NOT_SERVING" or None, "not ready", WAIT_S)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            hung = pool.submit(_code, stub, unet, HUNG_DEADLINE_S)
            spheres = [_code(stub, sphere, SPHERE_DEADLINE_S) for _ in range(3)]  # one slot stays free
            code = hung.result(timeout=WAIT_S)
        answered_s = time.monotonic() - started
        returned_at = time.monotonic()
        _until_idle(stack, "requests in flight after the caller had its answer")
        idle_after_s = time.monotonic() - returned_at
        assert code == "DEADLINE_EXCEEDED", code  # reached but silent: not UNAVAILABLE
        assert spheres == ["OK"] * 3
        # Before, the service waited its fixed 30 s for Triton after the caller's 10 s had passed.
        assert idle_after_s < 5.0, idle_after_s
        print(
            f"\nhung triton: unet answered {code} after {answered_s:.2f} s (deadline {HUNG_DEADLINE_S:g} s); "
            f"in flight 0 {idle_after_s:.2f} s after it"
        )
    finally:
        if stack is not None:
            stack.stop()
        if triton.process is not None and triton.process.poll() is None:
            os.killpg(triton.process.pid, signal.SIGCONT)
        triton.cleanup()


def _code(stub: pb_grpc.LabelEstimationStub, request: pb.EstimateRequest, deadline_s: float) -> str:
    try:
        stub.Estimate(request, timeout=deadline_s)
        return "OK"
    except grpc.RpcError as error:
        return error.code().name


def _recovered_unet_codes(stub: pb_grpc.LabelEstimationStub, request: pb.EstimateRequest) -> list[str]:
    """Once one U-Net call succeeds after the restart, the codes of the next four (all must be OK)."""

    until(
        lambda: _code(stub, request, 60) == "OK" or None, "a unet call answered OK after the restart", WAIT_S
    )
    return [_code(stub, request, 60) for _ in range(4)]


_READINESS_SERVICE = """
import sys
from pathlib import Path
from services.servers.grpc_server import run_service
flag = Path(sys.argv[1])
sys.exit(run_service("wlcad.test.Probe", lambda server: None, sys.argv[2], None, readiness=flag.exists))
"""


def test_readiness_sets_the_service_status_and_liveness_stays_serving(tmp_path: Path) -> None:
    flag, address = tmp_path / "ready", f"127.0.0.1:{free_port()}"
    process = subprocess.Popen([sys.executable, "-c", _READINESS_SERVICE, str(flag), address], cwd=REPO_ROOT)
    try:
        wait_serving(address)  # "" is SERVING as soon as the process listens
        assert _health(address, "wlcad.test.Probe") == "NOT_SERVING"  # not ready before the probe says so
        flag.touch()
        until(lambda: _health(address, "wlcad.test.Probe") == "SERVING" or None, "ready", 30)
        flag.unlink()
        until(lambda: _health(address, "wlcad.test.Probe") == "NOT_SERVING" or None, "not ready", 30)
        assert _health(address, "") == "SERVING"
    finally:
        process.terminate()
        process.wait(30)


def test_probe_of_a_dead_triton_is_not_ready_and_embedded_is() -> None:
    started = time.monotonic()
    assert not BackendProbe(f"triton://127.0.0.1:{free_port()}", timeout_s=5)()
    assert time.monotonic() - started < 30  # liveness: bounded by the probe's timeout
    assert BackendProbe("embedded")()


def test_timeout_after_refusals_is_reported_unavailable() -> None:
    """The server refused (it is down), then the last try ran out of time: the caller must learn that
    the backend is down, not that its deadline passed. A first try that times out stays
    DEADLINE_EXCEEDED (reached, but no answer in time)."""

    def scripted(statuses: list[str]):
        async def call(remaining: float):
            raise InferenceServerException("scripted", status=f"StatusCode.{statuses.pop(0)}")

        return call

    async def run() -> tuple[str, str]:
        async with TritonBackend(f"127.0.0.1:{free_port()}", initial_backoff_s=0.001) as backend:
            codes = []
            for statuses in (["UNAVAILABLE", "UNAVAILABLE", "DEADLINE_EXCEEDED"], ["DEADLINE_EXCEEDED"]):
                with pytest.raises(InferenceUnavailableError) as caught:
                    await backend._retrying("infer", scripted(statuses), backend._end(30.0))
                codes.append(caught.value.code)
            return tuple(codes)

    assert asyncio.run(run()) == ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def test_refused_upload_then_stalled_caller_is_ended_by_the_drain_bound(tmp_path: Path) -> None:
    """The first message is refused (unknown method); the caller then neither writes nor closes and
    gave no deadline. The service ends the call within the drain bound instead of never."""
    service, address, _ = start_service(tmp_path)
    release = threading.Event()
    try:
        wait_serving(address)
        stub = pb_grpc.LabelEstimationStub(channel(address))
        request = estimate_request(small_volume((8, 8, 8)), "no-such-method")
        request.image.volume.ClearField("data")

        def messages():
            yield pb.EstimateUploadMessage(request=request)
            release.wait(WAIT_S)  # the stall: nothing more, and the stream stays open

        def call() -> str:
            try:
                stub.EstimateUpload(messages())  # no deadline
                return "OK"
            except grpc.RpcError as error:
                return error.code().name

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(call)
            try:
                code = future.result(timeout=MAX_DRAIN_S + 30)
            finally:
                release.set()
        ended_s = time.monotonic() - started
        assert code in {"CANCELLED", "INVALID_ARGUMENT"}, code
        assert service.alive()
        print(f"\nstalled refused upload ended after {ended_s:.2f} s ({code}; drain bound {MAX_DRAIN_S:g} s)")
    finally:
        service.stop()
