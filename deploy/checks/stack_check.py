"""Is a deployed wlcad stack up? Asked of the gateway only, as a client would: ``helm test`` runs this
in its pod, docker-compose's ``integration`` profile in a container, tests/test_deploy_checks.py
against real local processes.

    python stack_check.py --host HOST [--grpc-port 50051] [--http-port 8080] [--tls]
                          [--capability NAME ...] [--token-env WLCAD_TOKEN]

1. HTTP ``/readyz`` lists every expected capability, each up.
2. ``grpc.health.v1`` answers SERVING for each capability's gRPC service (the gateway mirrors its
   upstreams' health; plaintext gateways only: a TLS one needs the caller's trust set-up).
3. With a token (the variable named by ``--token-env``): every GET binding of each capability
   (its ``Describe``) answers 200 with a JSON object through the gateway's HTTP API.

Exit 0 only when every check passed; one line per check either way. No patient data is involved.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.request
from dataclasses import dataclass


@dataclass
class Outcome:
    name: str
    ok: bool
    detail: str


def _get(url: str, token: str | None, context: ssl.SSLContext | None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=15, context=context) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def check(args: argparse.Namespace) -> list[Outcome]:
    from services.capabilities import CAPABILITIES

    expected = [c for c in CAPABILITIES if not args.capability or c.name in args.capability]
    unknown = set(args.capability) - {c.name for c in CAPABILITIES}
    if unknown:
        return [Outcome("capabilities", False, f"not in the capability table: {sorted(unknown)}")]
    # The check is of health, not of the certificate: over TLS the server is not verified.
    context = ssl._create_unverified_context() if args.tls else None
    base = f"{'https' if args.tls else 'http'}://{args.host}:{args.http_port}"
    outcomes: list[Outcome] = []
    try:
        status, body = _get(f"{base}/readyz", None, context)
        upstreams = json.loads(body).get("upstreams", {})
        missing = [c.name for c in expected if upstreams.get(c.name) is not True]
        outcomes.append(Outcome("readyz", status == 200 and not missing, f"{status} {upstreams}"))
    except (OSError, ValueError) as error:
        outcomes.append(Outcome("readyz", False, repr(error)))

    if not args.tls:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"{args.host}:{args.grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for entry in expected:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=entry.service), timeout=15)
                    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                    ok = reply.status == health_pb2.HealthCheckResponse.SERVING
                    outcomes.append(Outcome(f"health {entry.service}", ok, name))
                except grpc.RpcError as error:
                    outcomes.append(Outcome(f"health {entry.service}", False, str(error.code())))

    token = os.environ.get(args.token_env, "").strip() if args.token_env else ""
    if token:
        for entry in expected:
            for binding in (b for b in entry.http if b.verb == "GET"):
                try:
                    status, body = _get(f"{base}{binding.path}", token, context)
                    ok = status == 200 and isinstance(json.loads(body), dict)
                    outcomes.append(Outcome(f"GET {binding.path}", ok, str(status)))
                except (OSError, ValueError) as error:
                    outcomes.append(Outcome(f"GET {binding.path}", False, repr(error)))
    return outcomes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", required=True, help="the gateway's host name")
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--tls", action="store_true", help="the gateway serves TLS")
    p.add_argument(
        "--capability", action="append", default=[], help="expect only these (default: the whole table)"
    )
    p.add_argument("--token-env", default="WLCAD_TOKEN", help="variable holding a client token ('' = none)")
    return p


def main(argv: list[str] | None = None) -> int:
    outcomes = check(parser().parse_args(argv))
    for outcome in outcomes:
        print(f"{'ok  ' if outcome.ok else 'FAIL'} {outcome.name}: {outcome.detail}", flush=True)
    return 0 if outcomes and all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
