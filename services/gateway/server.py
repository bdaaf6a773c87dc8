"""Run the gateway process: gRPC (routed RPCs + health + reflection) and HTTP/JSON on one event loop.

Refuses to start on a non-loopback address without bearer tokens. TLS is optional on both ports;
giving a client CA turns it into mutual TLS.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.core.errors import InputError
from services.gateway.auth import TokenSet, is_loopback
from services.gateway.core import STREAM_WINDOW_OPTIONS, Gateway, Limits
from services.gateway.grpc_proxy import AuthInterceptor, generic_handlers
from services.gateway.http_app import build_app
from services.gateway.http_limits import http_server_config
from services.servers.grpc_server import grpc_options, split_address
from services.servers.memory import limit_malloc_arenas

log = logging.getLogger("wlcad.gateway")


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None  # mutual TLS when set


@dataclass
class GatewayConfig:
    grpc_listen: str = "127.0.0.1:50051"
    http_listen: str = "127.0.0.1:8080"
    upstreams: dict[str, str] = field(default_factory=dict)
    tokens: TokenSet | None = None
    tls: TlsFiles | None = None
    limits: Limits = field(default_factory=Limits)
    health_interval_s: float = 1.0
    upstream_token: str | None = None  # sent to the services, which need one beyond loopback


def check_config(config: GatewayConfig) -> None:
    """Refuse configurations that would expose the gateway without authentication."""
    for name, address in (("grpc-listen", config.grpc_listen), ("http-listen", config.http_listen)):
        try:
            host, _ = split_address(address)
        except ValueError as exc:
            raise InputError(str(exc), field=name) from exc
        if not is_loopback(host) and config.tokens is None:
            raise InputError(
                f"{address} is not a loopback address: give --tokens-file or $WLCAD_GATEWAY_TOKEN_HASHES",
                field="tokens",
            )


def _grpc_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    ca = tls.client_ca.read_bytes() if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(tls.key.read_bytes(), tls.cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


async def _watch_health(gateway: Gateway, servicer: health.aio.HealthServicer, interval_s: float) -> None:
    """Mirror each upstream's health into the gateway's own grpc.health.v1 statuses."""
    while True:
        serving = await gateway.check_upstreams()
        for service, route in gateway.routes.items():
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving.get(route.name)
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await servicer.set(service, status)
        await asyncio.sleep(interval_s)


async def serve(config: GatewayConfig) -> int:
    check_config(config)
    gateway = Gateway(config.upstreams, config.limits, upstream_token=config.upstream_token)
    interceptors = [AuthInterceptor(config.tokens)] if config.tokens else []
    server = grpc.aio.server(options=[*grpc_options(), *STREAM_WINDOW_OPTIONS], interceptors=interceptors)
    server.add_generic_rpc_handlers(generic_handlers(gateway))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*gateway.routes.keys(), health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if config.tls:
        bound = server.add_secure_port(config.grpc_listen, _grpc_credentials(config.tls))
    else:
        bound = server.add_insecure_port(config.grpc_listen)
    if bound == 0:
        raise OSError(f"cannot listen on {config.grpc_listen}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    watcher = asyncio.create_task(_watch_health(gateway, health_servicer, config.health_interval_s))

    host, port = split_address(config.http_listen)
    http = uvicorn.Server(http_server_config(build_app(gateway, config.tokens), host, port, config.tls))
    log.warning(
        "gateway: gRPC on %s, HTTP on %s, routes %s", config.grpc_listen, config.http_listen, config.upstreams
    )
    stop_requested: list[int] = []

    def flag(signum, frame) -> None:  # uvicorn re-raises the signal it captured after it stops
        stop_requested.append(signum)

    signal.signal(signal.SIGTERM, flag)
    signal.signal(signal.SIGINT, flag)
    try:
        await http.serve()  # returns on SIGTERM/SIGINT (or at once if the port is taken)
    finally:
        watcher.cancel()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=5)
        await gateway.close()
    return 0 if http.started else 1


def run(config: GatewayConfig) -> int:
    limit_malloc_arenas()  # before any thread starts: freed stream buffers are reused, not kept per arena
    return asyncio.run(serve(config))
