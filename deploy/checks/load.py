"""A bounded load client for a deployed stack (docker-compose's ``load`` profile): ``Describe`` of
every capability (or those named by ``--capability``), called round-robin through the gateway's gRPC port at a fixed concurrency.

    python load.py --target HOST:PORT [--requests 2000] [--concurrency 16] [--max-seconds 120]
                   [--token-env WLCAD_TOKEN]

Bounded twice: it stops after ``--requests`` calls or ``--max-seconds``, whichever comes first. It
prints the calls made, the errors by status code and the latency p50/p99 (numbers for the record,
nothing is asserted on them), and exits 1 when any call failed or none was made.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import threading
import time
from collections import Counter


def _calls(token: str | None, names: list[str]):
    """One (path, request bytes, response parser) per capability's Describe RPC, from the table."""
    from google.protobuf import message_factory

    from services.api import pb  # noqa: F401 - registers the wlcad.v1 descriptors
    from services.capabilities import CAPABILITIES

    calls = []
    for entry in (c for c in CAPABILITIES if not names or c.name in names):
        method = entry.method("Describe")
        request = message_factory.GetMessageClass(method.input_type)()
        reply = message_factory.GetMessageClass(method.output_type)
        calls.append((f"/{entry.service}/Describe", request.SerializeToString(), reply.FromString))
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return calls, metadata


def run(
    target: str, requests: int, concurrency: int, max_seconds: float, token: str | None, names: list[str]
) -> dict:
    import grpc

    calls, metadata = _calls(token, names)
    if not calls:
        raise SystemExit(f"load: no capability of the table is called {names}")
    deadline = time.monotonic() + max_seconds
    codes: Counter[str] = Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    issued = iter(range(requests))

    with grpc.insecure_channel(target) as channel:
        stubs = [
            (channel.unary_unary(path, request_serializer=None, response_deserializer=parse), body)
            for path, body, parse in calls
        ]

        def worker() -> None:
            while time.monotonic() < deadline:
                with lock:
                    index = next(issued, None)
                if index is None:
                    return
                stub, body = stubs[index % len(stubs)]
                started = time.monotonic()
                try:
                    stub(body, timeout=30, metadata=metadata)
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name
                with lock:
                    codes[code] += 1
                    latencies.append(time.monotonic() - started)

        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            for future in [pool.submit(worker) for _ in range(concurrency)]:
                future.result()
    latencies.sort()

    def quantile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {
        "calls": sum(codes.values()),
        "codes": dict(codes),
        "p50_s": quantile(0.5),
        "p99_s": quantile(0.99),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="the gateway's gRPC HOST:PORT")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--token-env", default="WLCAD_TOKEN", help="variable holding a client token ('' = none)")
    p.add_argument(
        "--capability", action="append", default=[], help="call only these (default: the whole table)"
    )
    args = p.parse_args(argv)
    for name in ("requests", "concurrency", "max_seconds"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    token = os.environ.get(args.token_env, "").strip() if args.token_env else ""
    if not token:
        print(
            f"load: no token in ${args.token_env or '(none)'}: a gateway with tokens answers UNAUTHENTICATED",
            file=sys.stderr,
        )
    result = run(
        args.target, args.requests, args.concurrency, args.max_seconds, token or None, args.capability
    )
    print(
        f"load: {result['calls']} calls, codes {result['codes']}, "
        f"p50 {result['p50_s'] * 1000:.1f} ms, p99 {result['p99_s'] * 1000:.1f} ms",
        flush=True,
    )
    return 0 if result["calls"] and set(result["codes"]) == {"OK"} else 1


if __name__ == "__main__":
    sys.exit(main())
