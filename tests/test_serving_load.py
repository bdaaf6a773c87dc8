"""Load: thousands of requests at concurrency 32 through the gateway to the service (separate
processes) → zero errors, and neither process grows (RSS) by 5 % or more after warm-up."""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest

from services.api.client import channel
from services.api.pb import label_estimation_pb2_grpc as pb_grpc
from tests.serving_support import estimate_request, small_volume, start_stack

pytestmark = pytest.mark.timeout(600)  # liveness only: ~40 s on 2 idle cores, nothing is timed

CONCURRENCY = 32
WARM_UP = 500
MEASURED = 5000


def test_load_zero_errors_and_flat_memory(tmp_path):
    stack = start_stack(tmp_path)
    try:
        stub = pb_grpc.LabelEstimationStub(channel(stack.grpc_address))
        requests = [
            estimate_request(small_volume((16, 32, 32), seed=i), "sphere", diameter=6) for i in range(8)
        ]

        def call(number: int) -> str:
            try:
                response = stub.Estimate(requests[number % len(requests)], timeout=30)
                return "OK" if response.lesions[0].measurements.voxels > 0 else "EMPTY"
            except grpc.RpcError as error:
                return error.code().name

        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            warm = list(pool.map(call, range(WARM_UP)))
            rss_before = {"gateway": stack.gateway.rss_bytes(), "service": stack.service.rss_bytes()}
            started = time.perf_counter()
            results = list(pool.map(call, range(MEASURED)))
            seconds = time.perf_counter() - started
        rss_after = {"gateway": stack.gateway.rss_bytes(), "service": stack.service.rss_bytes()}
        errors = {code: results.count(code) for code in set(results + warm) if code != "OK"}
        print(
            f"\n{MEASURED} requests at concurrency {CONCURRENCY}: {MEASURED / seconds:.0f} req/s, errors {errors}"
        )
        for name in rss_before:
            growth = rss_after[name] / rss_before[name] - 1
            print(
                f"{name} RSS {rss_before[name] / 2**20:.1f} → {rss_after[name] / 2**20:.1f} MiB ({growth:+.1%})"
            )
        assert not errors
        for name in rss_before:
            assert rss_after[name] < 1.05 * rss_before[name], name
        assert stack.gateway.alive() and stack.service.alive()
    finally:
        stack.stop()
