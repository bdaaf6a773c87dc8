"""``wlcad serve``: run a capability's service, the gateway, or everything (``all``) as processes.

One sub-command per entry of the capability table (``services/capabilities.py``), all with the same
options; ``all`` starts each capability's service as its own child process (Triton too with
``--backend triton``) on the table's default ports, then the gateway routed to them, restarts a
service that dies, and stops them all on SIGTERM/Ctrl-C — what ``make run`` uses. Every address
defaults to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

from services.capabilities import CAPABILITIES, Capability
from services.core.errors import InputError
from services.gateway.routes import DEFAULT_UPSTREAMS, ROUTES

log = logging.getLogger("wlcad.serve")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serve", help="run the gRPC services and the gateway")
    which = parser.add_subparsers(dest="serve_what", metavar="WHAT", required=True)

    for entry in CAPABILITIES:
        service = which.add_parser(entry.name, help=f"the {entry.service} gRPC service: {entry.summary}")
        _service_options(service, entry)
        service.set_defaults(handler=_run_service, capability=entry.name)

    gateway = which.add_parser("gateway", help="the gRPC + HTTP/JSON gateway")
    _gateway_options(gateway)
    gateway.set_defaults(handler=_run_gateway)

    both = which.add_parser(
        "all", help="every service + the gateway (+ Triton with --backend triton) as child processes"
    )
    _gateway_options(both, routes=False)
    _addresses_option(both, "--service-listen", "a service's gRPC address")
    both.add_argument(
        "--backend", choices=("embedded", "triton"), default="embedded", help="inference backend"
    )
    both.add_argument(
        "--triton-grpc-port", type=int, default=8001, help="Triton gRPC port with --backend triton"
    )
    both.add_argument(
        "--dicomweb", action="append", default=[], metavar="URL", help="allowed DICOMweb server"
    )
    both.set_defaults(handler=_run_all)

    token = which.add_parser("token", help="print a new bearer token and the hash line to store for it")
    token.set_defaults(handler=_run_token)


def _service_options(parser: argparse.ArgumentParser, entry: Capability) -> None:
    parser.add_argument(
        "--listen", default=entry.default_address, help=f"gRPC address (default {entry.default_address})"
    )
    parser.add_argument(
        "--metrics-listen",
        default=entry.default_metrics_address,
        help=f"Prometheus /metrics address ('' = off; default {entry.default_metrics_address})",
    )
    parser.add_argument(
        "--dicomweb",
        action="append",
        default=[],
        metavar="URL",
        help="a DICOMweb server requests may reference",
    )
    parser.add_argument(
        "--compute-slots", type=int, default=os.cpu_count() or 2, help="requests computing at once"
    )
    parser.add_argument("--inference", default=None, help="embedded (default) or triton://host:port")


def _addresses_option(parser: argparse.ArgumentParser, option: str, what: str) -> None:
    """``NAME=HOST:PORT`` for any capability of the table (repeatable); the table's addresses otherwise."""
    parser.add_argument(
        option,
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help=f"{what} ({', '.join(r.name for r in ROUTES)}); default {DEFAULT_UPSTREAMS}",
    )


def _gateway_options(parser: argparse.ArgumentParser, routes: bool = True) -> None:
    parser.add_argument("--grpc-listen", default="127.0.0.1:50051", help="gateway gRPC address")
    parser.add_argument("--http-listen", default="127.0.0.1:8080", help="gateway HTTP/JSON address")
    if routes:
        _addresses_option(parser, "--route", "upstream address of a route")
    parser.add_argument(
        "--tokens-file", type=Path, help="accepted bearer-token hashes, one 'sha256:<hex>' a line"
    )
    parser.add_argument("--tls-cert", type=Path, help="server certificate (PEM): enables TLS on both ports")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    parser.add_argument("--tls-client-ca", type=Path, help="CA of client certificates: enables mutual TLS")
    parser.add_argument("--max-in-flight", type=int, default=64, help="upstream calls at once")
    parser.add_argument(
        "--max-queue", type=int, default=256, help="calls waiting beyond that (then RESOURCE_EXHAUSTED)"
    )
    parser.add_argument("--deadline", type=float, default=60.0, help="longest deadline, seconds")


def _run_service(args: argparse.Namespace) -> int:
    from services.servers.scaffold import ServiceSettings, serve_capability

    _quiet_logging(args)
    if args.compute_slots < 1:
        raise InputError(f"must be >= 1, got {args.compute_slots}", field="--compute-slots")
    settings = ServiceSettings(tuple(args.dicomweb), args.compute_slots, args.inference)
    return serve_capability(args.capability, settings, args.listen, args.metrics_listen or None)


def _parse_routes(values: list[str], option: str = "--route") -> dict[str, str]:
    upstreams = dict(DEFAULT_UPSTREAMS)
    known = {r.name for r in ROUTES}
    for value in values:
        name, sep, address = value.partition("=")
        if not sep or name not in known or ":" not in address:
            raise InputError(
                f"expected NAME=HOST:PORT with NAME in {sorted(known)}, got {value!r}", field=option
            )
        upstreams[name] = address
    return upstreams


def _gateway_config(args: argparse.Namespace, upstreams: dict[str, str]):
    from services.gateway.auth import TokenSet
    from services.gateway.core import Limits
    from services.gateway.server import GatewayConfig, TlsFiles, check_config

    if (args.tls_cert is None) != (args.tls_key is None):
        raise InputError("give both --tls-cert and --tls-key", field="--tls-cert")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise InputError("mutual TLS needs --tls-cert and --tls-key too", field="--tls-client-ca")
    for option in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(args, option)
        if path is not None and not path.is_file():
            raise InputError(f"not a file: {path}", field="--" + option.replace("_", "-"))
    config = GatewayConfig(
        grpc_listen=args.grpc_listen,
        http_listen=args.http_listen,
        upstreams=upstreams,
        tokens=TokenSet.load(args.tokens_file),
        tls=TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None,
        limits=Limits(
            max_in_flight=args.max_in_flight, max_queue=args.max_queue, default_deadline_s=args.deadline
        ),
    )
    check_config(config)
    return config


def _run_gateway(args: argparse.Namespace) -> int:
    from services.gateway.server import run

    _quiet_logging(args)
    return run(_gateway_config(args, _parse_routes(args.route)))


def _run_token(args: argparse.Namespace) -> int:
    from services.gateway.auth import new_token

    token, digest = new_token()
    print(f"token (give to the client):      {token}")
    print(f"hash (add to the tokens file):   {digest}")
    return 0


def _quiet_logging(args: argparse.Namespace) -> None:
    """Log level from ``-v``; Python warnings off, because third-party ones (pydicom) may quote DICOM
    values such as a patient's name, and no identifier may reach a server log."""
    level = logging.INFO if args.verbose else logging.WARNING
    logging.getLogger().setLevel(level)
    warnings.simplefilter("ignore")


def _child(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "services.cli.main", *argv], env=env)


def _run_all(args: argparse.Namespace) -> int:
    upstreams = _parse_routes(args.service_listen, "--service-listen")
    _gateway_config(args, upstreams)  # refuse a bad configuration before starting anything
    verbose = ["-v"] if args.verbose else []
    children: dict[str, tuple[list[str], subprocess.Popen]] = {}
    inference: list[str] = []
    if args.backend == "triton":
        port = args.triton_grpc_port
        triton_argv = ["triton", "--grpc-port", str(port), "--http-port", str(port - 1)]
        triton_argv += ["--metrics-port", str(port + 1)]
        children["triton"] = (triton_argv, _child(triton_argv))
        inference = ["--inference", f"triton://127.0.0.1:{port}"]
    for entry in CAPABILITIES:
        service_argv = [*verbose, "serve", entry.name, "--listen", upstreams[entry.name]]
        service_argv += ["--metrics-listen", entry.default_metrics_address, *inference]
        for url in args.dicomweb:
            service_argv += ["--dicomweb", url]
        children[entry.name] = (service_argv, _child(service_argv))
    gateway_argv = [*verbose, "serve", "gateway", "--grpc-listen", args.grpc_listen]
    gateway_argv += ["--http-listen", args.http_listen]
    for name, address in upstreams.items():
        gateway_argv += ["--route", f"{name}={address}"]
    for option in ("tokens_file", "tls_cert", "tls_key", "tls_client_ca"):
        if getattr(args, option) is not None:
            gateway_argv += ["--" + option.replace("_", "-"), str(getattr(args, option))]
    gateway_argv += ["--max-in-flight", str(args.max_in_flight), "--max-queue", str(args.max_queue)]
    gateway_argv += ["--deadline", str(args.deadline)]
    children["gateway"] = (gateway_argv, _child(gateway_argv))
    services = ", ".join(f"{name} {address}" for name, address in upstreams.items())
    print(
        f"wlcad serve all: gateway gRPC {args.grpc_listen}, HTTP http://{args.http_listen} "
        f"({services}; backend {args.backend}); Ctrl-C stops",
        flush=True,
    )
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.append(signum))
    restarts = 0
    try:
        while not stopping:
            time.sleep(0.2)
            for name, (argv, process) in list(children.items()):
                if process.poll() is None or stopping:
                    continue
                if name == "gateway" or restarts >= 5:
                    print(
                        f"wlcad serve all: {name} exited with status {process.returncode}; stopping",
                        file=sys.stderr,
                    )
                    return 1
                restarts += 1
                print(f"wlcad serve all: {name} exited ({process.returncode}); restarting", file=sys.stderr)
                time.sleep(min(5.0, 0.5 * 2**restarts))
                children[name] = (argv, _child(argv))
    finally:
        for _, process in reversed(list(children.values())):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process in children.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
    return 0
