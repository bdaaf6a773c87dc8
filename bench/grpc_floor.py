"""What any Python gRPC hop costs here: the gateway next to a bare grpc.aio byte proxy.

    .venv/bin/python bench/grpc_floor.py [--calls 1000]

The gateway's goal is ≤ 1 ms p50 added (bench/gateway.py). This measures, call by call in rotation,
``Describe`` made directly to the service, through the gateway, and through a proxy that does nothing
but forward bytes with grpc.aio (one cached multicallable, no auth, metrics, admission or retries).
If the bare proxy adds about what the gateway adds, the remaining overhead is grpc.aio's own per-call
cost on this machine, not the gateway's logic, and only a different runtime would remove it.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.gateway import free_port, start, wait_ready  # noqa: E402
from services.api.client import LabelEstimationClient  # noqa: E402

SERVICE = "wlcad.v1.LabelEstimation"


async def bare_proxy(upstream: str, listen: str) -> None:
    """Forward unary ``Describe``/``Estimate`` as bytes; nothing else."""
    channel = grpc.aio.insecure_channel(upstream)

    def handler(rpc: str) -> grpc.RpcMethodHandler:
        call = channel.unary_unary(f"/{SERVICE}/{rpc}")

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await call(request, timeout=context.time_remaining())

        return grpc.unary_unary_rpc_method_handler(forward)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE, {rpc: handler(rpc) for rpc in ("Describe", "Estimate")}
            ),
        )
    )
    server.add_insecure_port(listen)
    await server.start()
    await server.wait_for_termination()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--bare-proxy", nargs=2, metavar=("UPSTREAM", "LISTEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_proxy:
        asyncio.run(bare_proxy(*args.bare_proxy))
        return 0
    service_address, gateway_address, bare_address = (f"127.0.0.1:{free_port()}" for _ in range(3))
    processes = [
        start(["serve", "label-estimation", "--listen", service_address, "--metrics-listen", ""]),
        start(
            [
                "serve",
                "gateway",
                "--grpc-listen",
                gateway_address,
                "--http-listen",
                f"127.0.0.1:{free_port()}",
                "--route",
                f"label-estimation={service_address}",
            ]
        ),
        subprocess.Popen(
            [sys.executable, __file__, "--bare-proxy", service_address, bare_address], cwd=REPO_ROOT
        ),
    ]
    try:
        clients = {
            name: LabelEstimationClient(address)
            for name, address in (
                ("direct", service_address),
                ("gateway", gateway_address),
                ("bare", bare_address),
            )
        }
        for client in clients.values():
            wait_ready(client)
        names = list(clients)
        times = {name: np.empty(args.calls) for name in names}
        for i in range(-200, args.calls):  # the first 200 rounds warm up
            for k in range(len(names)):
                name = names[(i + k) % len(names)]  # rotate the order every round
                started = time.perf_counter()
                clients[name].describe(timeout=10)
                if i >= 0:
                    times[name][i] = (time.perf_counter() - started) * 1000
        direct = float(np.median(times["direct"]))
        print(f"Describe p50, {args.calls} calls each in rotation: direct {direct:.3f} ms")
        for name in ("gateway", "bare"):
            p50 = float(np.median(times[name]))
            print(f"  {name:8s} p50 {p50:.3f} ms, added {p50 - direct:.3f} ms")
        for client in clients.values():
            client.close()
    finally:
        for process in processes:
            process.terminate()
            process.wait(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
