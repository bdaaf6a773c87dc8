"""``wlcad serve``: run a capability's service, the gateway, or everything (``all``) as processes.

One sub-command per entry of the capability table (``services/capabilities.py``), all with the same
options; ``all`` starts each capability's service as its own child process (Triton too with
``--backend triton``) on the table's default ports, then the gateway routed to them, restarts a
child that dies (within a restart budget per time window, see :class:`RestartBudget`), and stops them
all on SIGTERM/Ctrl-C — what ``make run`` uses. Every address defaults to 127.0.0.1; a service on any
other address needs the hashes of the token the gateway sends (``services/servers/service_auth.py``).
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
from collections import deque
from dataclasses import dataclass, field
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
    _addresses_option(
        both, "--service-metrics-listen", "a service's /metrics address", DEFAULT_METRICS_ADDRESSES
    )
    both.add_argument(
        "--backend", choices=("embedded", "triton"), default="embedded", help="inference backend"
    )
    both.add_argument(
        "--triton-grpc-port", type=int, default=8001, help="Triton gRPC port with --backend triton"
    )
    both.add_argument(
        "--dicomweb", action="append", default=[], metavar="URL", help="allowed DICOMweb server"
    )
    both.add_argument(
        "--restart-limit",
        type=int,
        default=RestartBudget.limit,
        help=f"restarts of one child within --restart-window before it waits (default {RestartBudget.limit})",
    )
    both.add_argument(
        "--restart-window",
        type=float,
        default=RestartBudget.window_s,
        metavar="SECONDS",
        help=f"the restart budget's time window (default {RestartBudget.window_s:g})",
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
    parser.add_argument(
        "--max-request-s",
        type=float,
        default=None,
        help="longest a request may take, receiving included; the deadline of callers that give none "
        "(default 600)",
    )
    parser.add_argument(
        "--tokens-file",
        type=Path,
        help="hashes of the tokens accepted from the gateway, one 'sha256:<hex>' a line (also "
        "$WLCAD_SERVICE_TOKEN_HASHES); required on a non-loopback --listen",
    )


#: Default /metrics addresses of the services ``serve all`` starts.
DEFAULT_METRICS_ADDRESSES = {c.name: c.default_metrics_address for c in CAPABILITIES}


def _addresses_option(
    parser: argparse.ArgumentParser, option: str, what: str, defaults: dict[str, str] = DEFAULT_UPSTREAMS
) -> None:
    """``NAME=HOST:PORT`` for any capability of the table (repeatable); the table's addresses otherwise."""
    parser.add_argument(
        option,
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help=f"{what} ({', '.join(r.name for r in ROUTES)}); default {defaults}",
    )


def _gateway_options(parser: argparse.ArgumentParser, routes: bool = True) -> None:
    parser.add_argument("--grpc-listen", default="127.0.0.1:50051", help="gateway gRPC address")
    parser.add_argument("--http-listen", default="127.0.0.1:8080", help="gateway HTTP/JSON address")
    if routes:
        _addresses_option(
            parser, "--route", "upstream address of a route; given, only the routes given are served"
        )
        parser.add_argument(
            "--upstream-token-file",
            type=Path,
            help="the token to send to the services (also $WLCAD_UPSTREAM_TOKEN); needed when they "
            "listen on non-loopback addresses (`serve all` makes one itself)",
        )
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
    from services.servers.service_auth import check_listen, load_service_tokens

    _quiet_logging(args)
    if args.compute_slots < 1:
        raise InputError(f"must be >= 1, got {args.compute_slots}", field="--compute-slots")
    tokens = load_service_tokens(args.tokens_file)
    check_listen(args.listen, tokens)
    limit = {} if args.max_request_s is None else {"max_request_s": args.max_request_s}
    settings = ServiceSettings(tuple(args.dicomweb), args.compute_slots, args.inference, **limit)
    return serve_capability(
        args.capability, settings, args.listen, args.metrics_listen or None, tokens=tokens
    )


def _parse_routes(
    values: list[str], option: str = "--route", defaults: dict[str, str] = DEFAULT_UPSTREAMS
) -> dict[str, str]:
    upstreams = dict(defaults)
    known = {r.name for r in ROUTES}
    for value in values:
        name, sep, address = value.partition("=")
        if not sep or name not in known or ":" not in address:
            raise InputError(
                f"expected NAME=HOST:PORT with NAME in {sorted(known)}, got {value!r}", field=option
            )
        upstreams[name] = address
    return upstreams


def _gateway_config(args: argparse.Namespace, upstreams: dict[str, str], upstream_token: str | None = None):
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
        upstream_token=upstream_token,
    )
    check_config(config)
    return config


def _run_gateway(args: argparse.Namespace) -> int:
    from services.gateway.server import run
    from services.servers.service_auth import load_upstream_token

    _quiet_logging(args)
    upstream_token = load_upstream_token(args.upstream_token_file)
    # Routes given: exactly those (a gateway in front of some services is ready when they are);
    # none given: every capability at the table's default address.
    upstreams = _parse_routes(args.route, defaults={} if args.route else DEFAULT_UPSTREAMS)
    return run(_gateway_config(args, upstreams, upstream_token))


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


@dataclass
class RestartBudget:
    """When a dead child may start again: after an exponential back-off, and never more than
    ``limit`` restarts in any ``window_s`` seconds. A child that stays up a whole window has its
    budget back (its old restarts fall out of the window), so a service that crashes now and then is
    restarted at once however long the stack runs, while one that crashes on start is retried ever
    more slowly instead of in a tight loop — but retried: the stack never gives up on a service, and
    the gateway keeps answering (UNAVAILABLE for that service) meanwhile."""

    limit: int = 5
    window_s: float = 60.0
    base_delay_s: float = 0.5
    max_delay_s: float = 10.0
    restarts: deque[float] = field(default_factory=deque)

    def next_start(self, now: float) -> float:
        """The monotonic time at which a child that died at ``now`` may start again."""
        while self.restarts and self.restarts[0] <= now - self.window_s:
            self.restarts.popleft()
        start = now + min(self.max_delay_s, self.base_delay_s * 2 ** len(self.restarts))
        if len(self.restarts) >= self.limit:
            start = max(start, self.restarts[-self.limit] + self.window_s)
        return start

    def exhausted(self) -> bool:
        return len(self.restarts) >= self.limit

    def record(self, when: float) -> None:
        self.restarts.append(when)


@dataclass
class Child:
    """One supervised ``wlcad`` child process: how to start it, and when to start it again."""

    name: str
    argv: list[str]
    budget: RestartBudget
    env: dict[str, str] | None = None
    process: subprocess.Popen | None = None
    start_at: float = 0.0

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", *self.argv],
            env={**os.environ, **self.env} if self.env else None,
        )
        print(f"wlcad serve all: started {self.name} (pid {self.process.pid})", file=sys.stderr, flush=True)

    def check(self, now: float) -> None:
        """Notice a death (schedule the restart) or restart a child whose time has come."""
        if self.process is not None and self.process.poll() is not None:
            status = self.process.returncode
            self.process = None
            self.start_at = self.budget.next_start(now)
            why = (
                f"{self.budget.limit} restarts in {self.budget.window_s:g} s used up"
                if self.budget.exhausted()
                else "back-off"
            )
            print(
                f"wlcad serve all: {self.name} exited ({status}); restarting in "
                f"{self.start_at - now:.1f} s ({why})",
                file=sys.stderr,
                flush=True,
            )
        if self.process is None and now >= self.start_at:
            self.budget.record(now)
            self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _run_all(args: argparse.Namespace) -> int:
    from services.api import codegen
    from services.gateway.auth import new_token
    from services.servers.service_auth import ENV_SERVICE_HASHES, ENV_UPSTREAM_TOKEN

    upstreams = _parse_routes(args.service_listen, "--service-listen")
    metrics = _parse_routes(
        args.service_metrics_listen, "--service-metrics-listen", DEFAULT_METRICS_ADDRESSES
    )
    gateway_config = _gateway_config(args, upstreams)  # refuse a bad configuration before starting anything
    if args.restart_limit < 1:
        raise InputError(f"must be >= 1, got {args.restart_limit}", field="--restart-limit")
    if args.restart_window <= 0:
        raise InputError(f"must be > 0, got {args.restart_window}", field="--restart-window")
    codegen.generate()  # once, here: children then find the generated code fresh instead of racing
    # The services are as protected as the gateway: with gateway tokens, or on a non-loopback address,
    # they accept only a token made for this run, which only the gateway is given.
    service_env: dict[str, str] = {}
    gateway_env: dict[str, str] = {}
    if gateway_config.tokens is not None or not all(_loopback(a) for a in upstreams.values()):
        token, digest = new_token()
        service_env, gateway_env = {ENV_SERVICE_HASHES: digest}, {ENV_UPSTREAM_TOKEN: token}

    def child(name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        return Child(name, argv, RestartBudget(args.restart_limit, args.restart_window), env)

    verbose = ["-v"] if args.verbose else []
    children: list[Child] = []
    inference: list[str] = []
    if args.backend == "triton":
        port = args.triton_grpc_port
        triton_argv = ["triton", "--grpc-port", str(port), "--http-port", str(port - 1)]
        triton_argv += ["--metrics-port", str(port + 1)]
        children.append(child("triton", triton_argv))
        inference = ["--inference", f"triton://127.0.0.1:{port}"]
    for entry in CAPABILITIES:
        service_argv = [*verbose, "serve", entry.name, "--listen", upstreams[entry.name]]
        service_argv += ["--metrics-listen", metrics[entry.name], *inference]
        for url in args.dicomweb:
            service_argv += ["--dicomweb", url]
        children.append(child(entry.name, service_argv, service_env))
    children.append(child("gateway", _gateway_argv(args, upstreams, verbose), gateway_env))
    services = ", ".join(f"{name} {address}" for name, address in upstreams.items())
    print(
        f"wlcad serve all: gateway gRPC {args.grpc_listen}, HTTP http://{args.http_listen} "
        f"({services}; backend {args.backend}); Ctrl-C stops",
        flush=True,
    )
    return _supervise(children)


def _loopback(address: str) -> bool:
    from services.gateway.auth import is_loopback

    return is_loopback(address.rpartition(":")[0])


def _gateway_argv(args: argparse.Namespace, upstreams: dict[str, str], verbose: list[str]) -> list[str]:
    argv = [
        *verbose,
        "serve",
        "gateway",
        "--grpc-listen",
        args.grpc_listen,
        "--http-listen",
        args.http_listen,
    ]
    for name, address in upstreams.items():
        argv += ["--route", f"{name}={address}"]
    for option in ("tokens_file", "tls_cert", "tls_key", "tls_client_ca"):
        if getattr(args, option) is not None:
            argv += ["--" + option.replace("_", "-"), str(getattr(args, option))]
    argv += ["--max-in-flight", str(args.max_in_flight), "--max-queue", str(args.max_queue)]
    return [*argv, "--deadline", str(args.deadline)]


def _supervise(children: list[Child]) -> int:
    """Keep every child running until SIGTERM/SIGINT, then stop them (the gateway first)."""
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.append(signum))
    for supervised in children:
        supervised.start()
    try:
        while not stopping:
            now = time.monotonic()
            for supervised in children:
                supervised.check(now)
            time.sleep(0.2)
    finally:
        for supervised in reversed(children):
            supervised.stop()
        for supervised in children:
            supervised.wait()
    return 0
