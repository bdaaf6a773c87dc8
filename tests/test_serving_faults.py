"""Faults: the service is SIGKILLed under load → every caller gets UNAVAILABLE, none is left hanging
until its deadline; the service is restarted on the same address → traffic recovers through the same
gateway process, which was never restarted.

Nothing here races the clock: the phases wait for outcomes (so many calls answered), not for fixed
sleeps, and the deadline is generous, so DEADLINE_EXCEEDED anywhere means a caller was left hanging
(the gateway gives up on a dead upstream after a few quick retries, long before it)."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable

import grpc
import pytest

from services.api.client import channel
from services.api.pb import label_estimation_pb2_grpc as pb_grpc
from tests.serving_support import estimate_request, small_volume, start_service, start_stack, wait_serving

pytestmark = pytest.mark.timeout(420)  # phases are bounded by WAIT_S each

DEADLINE_S = 30.0  # per call; an answer is due long before it, on any machine
CALLERS = 8
WAIT_S = 60.0  # liveness bound of each phase: only a hang runs it out


def test_kill_and_restart_a_service_under_load(tmp_path):
    stack = start_stack(tmp_path)
    gateway_pid = stack.gateway.pid
    stub = pb_grpc.LabelEstimationStub(channel(stack.grpc_address))
    request = estimate_request(small_volume((16, 32, 32)), "sphere", diameter=6)
    outcomes: list[tuple[float, float, str]] = []  # (start, end, code)
    recorded = threading.Condition()
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                stub.Estimate(request, timeout=DEADLINE_S)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            with recorded:
                outcomes.append((started, time.monotonic(), code))
                recorded.notify_all()

    def wait_for(count: int, which: Callable[[tuple[float, float, str]], bool], what: str) -> None:
        """Until ``count`` recorded calls satisfy ``which`` (counted from those recorded after now)."""
        with recorded:
            since = len(outcomes)
            if not recorded.wait_for(lambda: sum(map(which, outcomes[since:])) >= count, timeout=WAIT_S):
                pytest.fail(f"fewer than {count} calls {what} within {WAIT_S:g} s")

    try:
        with concurrent.futures.ThreadPoolExecutor(CALLERS) as pool:
            try:
                for _ in range(CALLERS):
                    pool.submit(caller)
                wait_for(4 * CALLERS, lambda o: o[2] == "OK", "answered OK before the kill")
                kill_sent = time.monotonic()
                stack.service.kill()  # SIGKILL, then reaped: its port is closed from here on
                killed_at = time.monotonic()
                wait_for(2 * CALLERS, lambda o: o[0] > killed_at, "answered while the service was down")
                restarted_at = time.monotonic()
                port = int(stack.service_address.rsplit(":", 1)[1])
                stack.service, _, _ = start_service(tmp_path, port=port)
                wait_serving(stack.service_address)
                # The gateway reconnects by itself (backoff <= 1 s): traffic has recovered once a call
                # succeeds, and from then on every call must.
                wait_for(1, lambda o: o[0] > restarted_at and o[2] == "OK", "answered OK after the restart")
                with recorded:
                    recovered_at = min(o[1] for o in outcomes if o[0] > restarted_at and o[2] == "OK")
                wait_for(4 * CALLERS, lambda o: o[0] > recovered_at, "answered after the recovery")
            finally:
                stop.set()  # before the pool joins its callers, also when a phase failed
        before = [o for o in outcomes if o[1] < kill_sent]
        down = [o for o in outcomes if killed_at < o[0] and o[1] < restarted_at]  # wholly while down
        recovered = [o for o in outcomes if o[0] > recovered_at]
        assert before and all(code == "OK" for _, _, code in before)
        assert down and {code for _, _, code in down} == {"UNAVAILABLE"}
        # Nobody was left hanging: a hung caller would have ended with DEADLINE_EXCEEDED.
        assert "DEADLINE_EXCEEDED" not in {code for _, _, code in outcomes}
        assert recovered and all(code == "OK" for _, _, code in recovered)
        assert stack.gateway.alive() and stack.gateway.pid == gateway_pid
        print(
            f"\n{len(outcomes)} calls; while down: {len(down)} UNAVAILABLE; "
            f"slowest call {max(end - start for start, end, _ in outcomes):.2f} s"
        )
    finally:
        stack.stop()
