"""Start a wlcad gRPC service process: the servicer, the standard health service, reflection,
explicit message-size limits, bounded concurrency and a Prometheus endpoint.

Health has two levels: the overall status ("") is liveness, SERVING while the process serves; the
status of the service's own name is readiness, NOT_SERVING while a backend it needs (Triton) does
not answer, so the gateway's ``/readyz`` tells the truth while methods that need no backend keep
working behind it.

Shared by every capability's service (``services.servers.scaffold.serve_capability`` starts it), so
a capability only provides its servicer.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from services.api import limits
from services.api.upload import method_upload_shape
from services.core.errors import InputError
from services.servers.memory import limit_malloc_arenas

log = logging.getLogger("wlcad.serving")

#: Requests a service holds at once (computing or queued); beyond this gRPC answers RESOURCE_EXHAUSTED.
DEFAULT_MAX_CONCURRENT = 128
#: The longest a refused stream is read on (see :func:`_drain`), when the caller's deadline is later.
MAX_DRAIN_S = 10.0
#: How often readiness is asked (each ask is bounded by the probe's own timeout).
READINESS_INTERVAL_S = 1.0


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


#: A client connection is closed (gracefully, after its calls end) this long after it opened, so
#: round-robin clients re-resolve the service name and reach replicas added by a scale-up.
MAX_CONNECTION_AGE_MS = 5 * 60 * 1000
#: Calls still running on an aged connection get this long to finish before it is closed.
MAX_CONNECTION_AGE_GRACE_MS = 10 * 60 * 1000


def grpc_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", limits.MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", limits.MAX_MESSAGE_BYTES),
        ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
        ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_MS),
    ]


def parse_request(message_class, data: bytes):
    """``message_class`` from ``data``; bytes that are not that message are the caller's error."""
    try:
        return message_class.FromString(data)
    except DecodeError as exc:
        raise InputError("the request is not a valid protobuf message", field="request") from exc


def _drain(requests, context: grpc.ServicerContext) -> None:
    """Read what is left of a refused stream before the status goes out: a status sent while the
    caller is still writing reaches callers behind the gateway as INTERNAL "Internal error from
    Core" instead of the real reason.

    Bounded by the upload limit and by time: the caller's deadline, at most ``MAX_DRAIN_S``. A
    caller that stalls without a deadline would otherwise hold this handler thread for good; past
    the bound the call is cancelled (which ends the blocked read), and such a caller, no longer
    writing, gets CANCELLED instead of the reason."""
    remaining = context.time_remaining()
    timer = threading.Timer(MAX_DRAIN_S if remaining is None else min(remaining, MAX_DRAIN_S), context.cancel)
    timer.daemon = True
    timer.start()
    drained = 0
    try:
        for data in requests:
            drained += len(data)
            if drained > limits.MAX_UPLOAD_BYTES:
                return
    except Exception:  # the caller cancelled or the deadline passed: nothing left to protect
        return
    finally:
        timer.cancel()


def servicer_handler(servicer: object, service: ServiceDescriptor) -> grpc.GenericRpcHandler:
    """Handlers for every RPC of ``service`` that decode requests themselves, so bytes that are not
    the declared message become INVALID_ARGUMENT (grpcio's own deserializer answers INTERNAL).

    Upload RPCs (the upload shape of ``common.proto``) get the messages' bytes undecoded: the scaffold
    reads voxel chunks without protobuf copies and decodes the rest. Server-streaming RPCs (progress
    of long jobs) are served as generators."""
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
        implementation = getattr(servicer, method.name)
        if method.client_streaming and method.server_streaming:
            raise ValueError(f"{method.full_name}: bidirectional streams are not served")
        if method.client_streaming:
            raw = method_upload_shape(method) is not None

            def stream(requests, context, _impl=implementation, _cls=request_class, _raw=raw):
                try:
                    decoded = requests if _raw else (parse_request(_cls, data) for data in requests)
                    return _impl(decoded, context)
                finally:
                    _drain(requests, context)

            handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                stream, response_serializer=serialize
            )
            continue

        def unary(data, context, _impl=implementation, _cls=request_class):
            try:
                request = parse_request(_cls, data)
            except InputError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return _impl(request, context)

        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(unary, response_serializer=serialize)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def run_service(
    service_name: str,
    add_servicer: Callable[[grpc.Server], None],
    address: str,
    metrics_address: str | None,
    threads: int = 32,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    on_stop: Callable[[], None] | None = None,
    readiness: Callable[[], bool] | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status.

    ``readiness`` (asked every ``READINESS_INTERVAL_S`` on a thread of its own): whether the
    backends the service needs answer; the health of ``service_name`` follows it and is NOT_SERVING
    until its first True. Without it the service is ready as soon as it listens. ``interceptors``:
    e.g. the bearer-token check of a service reachable beyond loopback."""
    limit_malloc_arenas()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc"),
        options=grpc_options(),
        maximum_concurrent_rpcs=max_concurrent,
        interceptors=tuple(interceptors),
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
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stopped = threading.Event()
    if readiness is None:
        health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    else:
        health_servicer.set(service_name, health_pb2.HealthCheckResponse.NOT_SERVING)
        threading.Thread(
            target=_follow_readiness,
            args=(readiness, health_servicer, service_name, stopped),
            name="readiness",
            daemon=True,
        ).start()
    log.warning("%s serving on %s (metrics on %s)", service_name, address, metrics_address or "-")

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


def _follow_readiness(
    readiness: Callable[[], bool],
    health_servicer: health.HealthServicer,
    service_name: str,
    stopped: threading.Event,
) -> None:
    """Set the health of ``service_name`` from ``readiness()`` until ``stopped``; log each change."""
    ready: bool | None = None
    while not stopped.is_set():
        try:
            now = bool(readiness())
        except Exception:  # a probe that fails means not ready; never end the loop
            now = False
        if now != ready and not stopped.is_set():
            status = (
                health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            health_servicer.set(service_name, status)
            log.warning(
                "%s %s", service_name, "ready" if now else "not ready: a backend it needs does not answer"
            )
            ready = now
        stopped.wait(READINESS_INTERVAL_S)
