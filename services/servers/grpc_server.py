"""Start a wlcad gRPC service process: the servicer, the standard health service, reflection,
explicit message-size limits, bounded concurrency and a Prometheus endpoint.

Shared by every service (label estimation now, CADe and anomaly scoring later) so each service
module only provides its servicer.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from services.api import limits

log = logging.getLogger("wlcad.serving")

#: Requests a service holds at once (computing or queued); beyond this gRPC answers RESOURCE_EXHAUSTED.
DEFAULT_MAX_CONCURRENT = 128


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def grpc_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", limits.MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", limits.MAX_MESSAGE_BYTES),
    ]


def run_service(
    service_name: str,
    add_servicer: Callable[[grpc.Server], None],
    address: str,
    metrics_address: str | None,
    threads: int = 32,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    on_stop: Callable[[], None] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc"),
        options=grpc_options(),
        maximum_concurrent_rpcs=max_concurrent,
    )
    add_servicer(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    if metrics_address:
        host, port = split_address(metrics_address)
        start_http_server(port, addr=host)
    server.start()
    for name in ("", service_name):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.warning("%s serving on %s (metrics on %s)", service_name, address, metrics_address or "-")
    stopped = threading.Event()

    def stop(signum, frame) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    stopped.wait()
    health_servicer.enter_graceful_shutdown()
    server.stop(grace=5).wait()
    if on_stop is not None:
        on_stop()
    return 0
