"""Faults: the service is SIGKILLed under load → every caller gets UNAVAILABLE within its deadline
(no hang); the service is restarted on the same address → traffic recovers through the same gateway
process, which was never restarted."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import pytest

from services.api.client import channel
from services.api.pb import label_estimation_pb2_grpc as pb_grpc
from tests.serving_support import estimate_request, small_volume, start_service, start_stack, wait_serving

pytestmark = pytest.mark.timeout(180)

DEADLINE_S = 2.0
SLACK_S = 0.5


def test_kill_and_restart_a_service_under_load(tmp_path):
    stack = start_stack(tmp_path)
    gateway_pid = stack.gateway.pid
    stub = pb_grpc.LabelEstimationStub(channel(stack.grpc_address))
    request = estimate_request(small_volume((16, 32, 32)), "sphere", diameter=6)
    outcomes: list[tuple[float, float, str]] = []  # (start, seconds, code)
    lock = threading.Lock()
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                stub.Estimate(request, timeout=DEADLINE_S)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            with lock:
                outcomes.append((started, time.monotonic() - started, code))

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for _ in range(8):
                pool.submit(caller)
            time.sleep(2.0)
            killed_at = time.monotonic()
            stack.service.kill()
            time.sleep(3.0)
            restarted_at = time.monotonic()
            port = int(stack.service_address.rsplit(":", 1)[1])
            stack.service, _, _ = start_service(tmp_path, port=port)
            wait_serving(stack.service_address)
            time.sleep(3.0)
            stop.set()
        before = [o for o in outcomes if o[0] < killed_at - DEADLINE_S]
        down = [o for o in outcomes if killed_at + 0.2 < o[0] < restarted_at]
        recovered = [o for o in outcomes if o[0] > restarted_at + 4.0]
        assert before and all(code == "OK" for _, _, code in before)
        assert down and {code for _, _, code in down} == {"UNAVAILABLE"}
        assert max(seconds for _, seconds, _ in outcomes) < DEADLINE_S + SLACK_S  # nobody hangs
        assert recovered and all(code == "OK" for _, _, code in recovered)
        assert stack.gateway.alive() and stack.gateway.pid == gateway_pid
        print(
            f"\n{len(outcomes)} calls; while down: {len(down)} UNAVAILABLE, slowest call {max(s for _, s, _ in outcomes):.2f} s"
        )
    finally:
        stop.set()
        stack.stop()
