"""The gateway's core: admission (bounded concurrency), deadlines, retries and upstream calls.

Messages pass through as bytes — the gateway never decodes a gRPC request — so its overhead does not
grow with the image size and a new service needs no code here. The HTTP side decodes JSON and then
goes through the same :meth:`Gateway.unary` / :meth:`Gateway.stream` as gRPC callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.api import limits
from services.api.status import ANSWERED_BY_SERVICE
from services.gateway.routes import ROUTES, Route
from services.servers.memory import trim_freed_memory
from services.servers.observability import (
    IN_FLIGHT,
    QUEUE_DEPTH,
    RETRIES,
    UPSTREAM_UP,
    MethodMetrics,
)

COMPONENT = "gateway"
log = logging.getLogger("wlcad.gateway")
T = TypeVar("T")


class GatewayError(Exception):
    """A failure to hand to the caller as a gRPC status (and HTTP code)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_in_flight: int = 64
    max_queue: int = 256
    default_deadline_s: float = 60.0
    retry_attempts: int = 4
    retry_initial_backoff_s: float = 0.05
    retry_max_backoff_s: float = 1.0


class Admission:
    """At most ``max_in_flight`` upstream calls at once and ``max_queue`` waiting; beyond that
    RESOURCE_EXHAUSTED at once, so overload sheds instead of piling up memory and latency. A queued
    call waits no longer than its deadline: waiting past it would only hand the upstream a call
    whose caller has already given up."""

    def __init__(self, max_in_flight: int, max_queue: int) -> None:
        self._semaphore = asyncio.Semaphore(max_in_flight)
        self._max_queue = max_queue
        self._waiting = 0
        self._in_flight = IN_FLIGHT.labels(COMPONENT)
        self._queue_depth = QUEUE_DEPTH.labels(COMPONENT)

    @contextlib.asynccontextmanager
    async def slot(self, deadline: float) -> AsyncIterator[None]:
        """Hold one slot for the block; ``deadline`` (``time.monotonic()``) bounds the wait for it."""
        await self._acquire(deadline)
        self._in_flight.inc()
        try:
            yield
        finally:
            self._in_flight.dec()
            self._semaphore.release()

    async def _acquire(self, deadline: float) -> None:
        if not self._semaphore.locked():
            await self._semaphore.acquire()  # a free slot: returns without waiting
            return
        if self._waiting >= self._max_queue:
            raise GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the gateway is at capacity; retry later")
        self._waiting += 1
        self._queue_depth.inc()
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._semaphore.acquire()
        except TimeoutError:
            raise GatewayError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the deadline passed while the call waited for a gateway slot (the gateway is at capacity)",
            ) from None
        finally:
            self._waiting -= 1
            self._queue_depth.dec()


#: HTTP/2 flow control of the gateway's streams, both sides: a fixed per-stream window of one chunk
#: message instead of BDP-probed auto-tuning. With auto-tuning, an upstream that stopped reading let
#: the gateway pull ~70 × 4 MiB from each caller (8 such streams took its RSS from 252 MiB to 2.4 GiB,
#: above the chart's 1 GiB limit); with the fixed window the bytes one stream holds in flight are a few
#: messages. ``lookahead_bytes`` is gRPC's initial stream window target (GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES).
STREAM_WINDOW_OPTIONS: list[tuple[str, int]] = [
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", limits.MAX_CHUNK_BYTES),
]


def channel_options() -> list[tuple[str, int | str]]:
    """Big messages both ways, quick reconnects so a restarted service is used again in ~1 s, the
    fixed stream window (:data:`STREAM_WINDOW_OPTIONS`) and ``round_robin`` over every address an
    upstream name resolves to: behind a headless Kubernetes Service (``dns:///…``) each replica gets
    its share, where gRPC's default ``pick_first`` would pin the gateway to one pod."""
    return [
        *STREAM_WINDOW_OPTIONS,
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.max_receive_message_length", limits.MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", limits.MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.enable_retries", 0),
    ]


#: What grpc.aio reports in place of the upstream's status when a write fails as the call ends.
_WRITE_RACE_DETAILS = "Internal error from Core"


@dataclass
class _UpstreamStatus:
    """The status the upstream sent on a client-streaming call, kept as grpc.aio first reports it.

    grpc.aio (grpcio 1.85; grpc/grpc#36066) replaces the status with INTERNAL "Internal error from
    Core" when a write was in flight as the upstream ended the call, so an upload the upstream refused
    with INVALID_ARGUMENT reached the caller as INTERNAL about one time in five (measured with an
    upstream that refuses the first message). The call's done callbacks see every status as it is
    set, before that overwrite, so the upstream's own one is kept here."""

    code: grpc.StatusCode | None = None
    details: str = ""

    def watch(self, call: grpc.aio.Call) -> None:
        call.add_done_callback(self._record)

    def _record(self, call: grpc.aio.Call) -> None:
        if self.code is not None and self.details != _WRITE_RACE_DETAILS:
            return  # the first real status wins; a later INTERNAL is the write race
        with contextlib.suppress(Exception):  # a done callback must never raise into grpc
            code, details = _finished(call.code()), _finished(call.details())
            if self.code is None or details != _WRITE_RACE_DETAILS:
                self.code, self.details = code, details or ""

    def error(self, error: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
        """``error``, or the upstream's own status where grpc.aio replaced it."""
        if (
            error.code() == grpc.StatusCode.INTERNAL
            and error.details() == _WRITE_RACE_DETAILS
            and self.code not in (None, grpc.StatusCode.OK, grpc.StatusCode.INTERNAL)
        ):
            return grpc.aio.AioRpcError(
                self.code, error.initial_metadata(), error.trailing_metadata(), self.details
            )
        return error


def _answered(error: grpc.aio.AioRpcError) -> bool:
    """Whether the upstream service itself answered with this status (its trailing metadata says
    so), rather than the transport failing to reach it: only the latter is worth retrying here."""
    return any(key == ANSWERED_BY_SERVICE for key, _ in error.trailing_metadata() or ())


def _finished(awaitable: Awaitable[T]) -> T:
    """The value of an awaitable that completes without waiting (a finished call's code or details),
    for a done callback, which cannot await."""
    steps = awaitable.__await__()
    try:
        next(steps)
    except StopIteration as done:
        return done.value
    steps.close()
    raise RuntimeError("the call has not finished")


async def _write_all(requests: AsyncIterator[bytes], call: grpc.aio.StreamUnaryCall) -> None:
    """Forward the caller's messages one at a time: the next is read only once the upstream took
    the previous (gRPC flow control), so a call holds at most one message in the gateway."""
    try:
        async for message in requests:
            try:
                await call.write(message)
            except (asyncio.InvalidStateError, grpc.aio.UsageError, grpc.aio.AioRpcError):
                return  # the upstream already answered; its status is the call's answer
        with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.UsageError, grpc.aio.AioRpcError):
            await call.done_writing()
    finally:
        close = getattr(requests, "aclose", None)
        if close is not None:
            await close()


async def _forward(requests: AsyncIterator[bytes], call: grpc.aio.StreamUnaryCall) -> bytes:
    """The upstream's answer to the caller's stream, which is written in a task of its own.

    The answer, not the end of the caller's stream, ends the call: an upstream that refuses the
    first message is answered at once and the rest is never read, and a caller that stalls is ended
    by the upstream call's deadline instead of holding its slot until it closes. Leaving the caller's
    stream half-read does not turn the status into INTERNAL (an earlier comment here said so): a
    grpcio (sync) caller got the upstream's INVALID_ARGUMENT 40 times in 40 while still writing; a
    grpc.aio caller can still see INTERNAL, from the same bug of its own library as
    :class:`_UpstreamStatus` works around. The writer is always stopped before returning, and the
    upstream call cancelled if it is still running (the caller cancelled, or its stream failed)."""
    status = _UpstreamStatus()
    status.watch(call)
    writer = asyncio.ensure_future(_write_all(requests, call))
    answer = asyncio.ensure_future(_answer(call, status))
    try:
        done, _ = await asyncio.wait((writer, answer), return_when=asyncio.FIRST_COMPLETED)
        if answer not in done:
            writer.result()  # the caller's stream failed: raise that
        return await answer
    finally:
        call.cancel()  # no-op once the upstream answered
        writer.cancel()
        answer.cancel()
        await asyncio.gather(writer, answer, return_exceptions=True)


async def _answer(call: grpc.aio.StreamUnaryCall, status: _UpstreamStatus) -> bytes:
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        raise status.error(error) from None


@dataclass
class _Target:
    """One routed RPC, resolved once: the upstream multicallable and its metric children, so a call
    does no channel, stub or label lookup (together ~0.1 ms of a pass-through's ~1 ms budget)."""

    route: Route
    rpc: str
    retryable: bool
    call: (
        grpc.aio.UnaryUnaryMultiCallable
        | grpc.aio.StreamUnaryMultiCallable
        | grpc.aio.UnaryStreamMultiCallable
    )
    metrics: MethodMetrics
    up: object  # the route's wlcad_upstream_up child
    retries: object  # the wlcad_gateway_retries child


class Gateway:
    """Routes calls to upstreams by address (``upstreams``: route name → host:port).

    ``upstream_token``: when set, every upstream call (health checks included) carries
    ``authorization: Bearer <token>``, for services that require one (the gateway's own callers'
    credentials are never passed on)."""

    def __init__(
        self,
        upstreams: Mapping[str, str],
        limits_: Limits | None = None,
        upstream_token: str | None = None,
    ) -> None:
        self.limits = limits_ or Limits()
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {upstream_token}"),) if upstream_token else ()
        )
        self.routes = {route.service: route for route in ROUTES if route.name in upstreams}
        missing = [route.name for route in ROUTES if route.name not in upstreams]
        if missing:
            log.warning("no upstream address for %s: its RPCs answer UNIMPLEMENTED", ", ".join(missing))
        self._channels = {
            route.service: grpc.aio.insecure_channel(upstreams[route.name], options=channel_options())
            for route in self.routes.values()
        }
        self._admission = Admission(self.limits.max_in_flight, self.limits.max_queue)
        self.upstream_serving: dict[str, bool] = {route.name: False for route in self.routes.values()}
        self._targets: dict[tuple[str, str], _Target] = {}
        self._streams = 0  # client-streaming calls in progress

    def _target(self, service: str, rpc: str) -> _Target:
        target = self._targets.get((service, rpc))
        if target is not None:
            return target
        route = self.routes.get(service)
        if route is None:
            raise GatewayError(grpc.StatusCode.UNIMPLEMENTED, f"no route for {service}")
        method = route.descriptor.methods_by_name.get(rpc)
        if method is None:
            raise GatewayError(grpc.StatusCode.UNIMPLEMENTED, f"{service} has no method {rpc[:64]}")
        channel = self._channels[service]
        path = f"/{service}/{rpc}"
        target = _Target(
            route=route,
            rpc=rpc,
            retryable=rpc in route.idempotent,
            call=_multicallable(channel, path, method.client_streaming, method.server_streaming),
            metrics=MethodMetrics(COMPONENT, f"{route.name}/{rpc}"),
            up=UPSTREAM_UP.labels(route.name),
            retries=RETRIES.labels(route.name, rpc),
        )
        self._targets[(service, rpc)] = target
        return target

    def _deadline(self, timeout_s: float | None) -> float:
        timeout = (
            self.limits.default_deadline_s
            if timeout_s is None
            else min(timeout_s, self.limits.default_deadline_s)
        )
        return time.monotonic() + max(0.0, timeout)

    @staticmethod
    def _upstream_error(route: Route, error: grpc.aio.AioRpcError) -> GatewayError:
        code = error.code()
        if code == grpc.StatusCode.UNAVAILABLE and not _answered(error):
            return GatewayError(code, f"the {route.name} service is unavailable; retry later")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return GatewayError(code, f"the deadline passed before {route.name} answered")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Received message larger" in (
            error.details() or ""
        ):
            return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "a message is larger than the size limit")
        if code == grpc.StatusCode.UNKNOWN:
            return GatewayError(grpc.StatusCode.INTERNAL, f"the {route.name} service failed")
        return GatewayError(code, error.details() or code.name)

    async def unary(self, service: str, rpc: str, request: bytes, timeout_s: float | None) -> bytes:
        """One unary call; idempotent RPCs are retried with jittered back-off while UNAVAILABLE."""
        target = self._target(service, rpc)
        deadline = self._deadline(timeout_s)
        with _observed(target):
            async with self._admission.slot(deadline):
                attempt = 0
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise GatewayError(
                            grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed in the gateway"
                        )
                    try:
                        response = await target.call(request, timeout=remaining, metadata=self._metadata)
                        target.up.set(1)
                        return response
                    except grpc.aio.AioRpcError as error:
                        unreachable = error.code() == grpc.StatusCode.UNAVAILABLE and not _answered(error)
                        if unreachable:
                            target.up.set(0)
                        if not (
                            unreachable and target.retryable and attempt + 1 < self.limits.retry_attempts
                        ):
                            raise self._upstream_error(target.route, error) from None
                    backoff = min(
                        self.limits.retry_max_backoff_s, self.limits.retry_initial_backoff_s * 2**attempt
                    )
                    backoff *= random.uniform(0.5, 1.0)
                    if time.monotonic() + backoff >= deadline:
                        raise GatewayError(
                            grpc.StatusCode.UNAVAILABLE,
                            f"the {target.route.name} service is unavailable; retry later",
                        )
                    target.retries.inc()
                    attempt += 1
                    await asyncio.sleep(backoff)

    async def stream(
        self, service: str, rpc: str, requests: AsyncIterator[bytes], timeout_s: float | None
    ) -> bytes:
        """A client-streaming call, forwarded message by message (never buffered whole, never retried:
        the stream cannot be replayed; the caller retries on UNAVAILABLE). The deadline (the
        gateway's when the caller gave none) bounds all of it, the wait for a slot and the reading
        of the caller's stream included; the call ends when the upstream answers."""
        target = self._target(service, rpc)
        deadline = self._deadline(timeout_s)
        with self._counted_stream(), _observed(target):
            async with self._admission.slot(deadline):
                remaining = deadline - time.monotonic()
                call = target.call(timeout=max(0.001, remaining), metadata=self._metadata)
                try:
                    response = await _forward(requests, call)
                except grpc.aio.AioRpcError as error:
                    if error.code() == grpc.StatusCode.UNAVAILABLE and not _answered(error):
                        target.up.set(0)
                    raise self._upstream_error(target.route, error) from None
                target.up.set(1)
                return response

    @contextlib.contextmanager
    def _counted_stream(self) -> Iterator[None]:
        """Count a client-streaming call; when the last one ends, hand freed memory back.

        Streamed messages (up to 4 MiB each, several per call in gRPC's buffers) are freed when a
        call ends, but glibc keeps them: without this the gateway's RSS after rounds of cancelled
        uploads stayed at the rounds' peak and climbed. Trimming only when no stream is left costs
        2-8 ms per burst, not per call, and runs after the answer is handed to gRPC (``call_soon``);
        under steady load the freed blocks are reused by the next calls instead."""
        self._streams += 1
        try:
            yield
        finally:
            self._streams -= 1
            if self._streams == 0:
                asyncio.get_running_loop().call_soon(trim_freed_memory)

    async def server_stream(
        self, service: str, rpc: str, request: bytes, timeout_s: float | None
    ) -> AsyncIterator[bytes]:
        """A server-streaming call (progress of a long job, results as they come), passed through
        message by message. Not retried: part of the answer may already have reached the caller.
        Closing the returned generator (the caller went away) cancels the upstream call."""
        target = self._target(service, rpc)
        deadline = self._deadline(timeout_s)
        with _observed(target):
            async with self._admission.slot(deadline):
                call = target.call(
                    request, timeout=max(0.001, deadline - time.monotonic()), metadata=self._metadata
                )
                try:
                    async for message in call:
                        yield message
                except grpc.aio.AioRpcError as error:
                    if error.code() == grpc.StatusCode.UNAVAILABLE and not _answered(error):
                        target.up.set(0)
                    raise self._upstream_error(target.route, error) from None
                finally:
                    call.cancel()  # no-op once finished; ends upstream work when the caller left
                target.up.set(1)

    async def check_upstreams(self, timeout_s: float = 0.5) -> dict[str, bool]:
        """grpc.health.v1 Check on every upstream; updates ``upstream_serving`` and the up gauge."""

        async def one(service: str, route: Route) -> None:
            stub = health_pb2_grpc.HealthStub(self._channels[service])
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service),
                    timeout=timeout_s,
                    metadata=self._metadata,
                )
                serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                serving = False
            self.upstream_serving[route.name] = serving
            UPSTREAM_UP.labels(route.name).set(1 if serving else 0)

        await asyncio.gather(*(one(service, route) for service, route in self.routes.items()))
        return dict(self.upstream_serving)

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))


def _multicallable(channel: grpc.aio.Channel, path: str, client_streaming: bool, server_streaming: bool):
    """The byte-level upstream callable for one RPC kind (requests and responses stay serialised)."""
    if client_streaming and server_streaming:
        raise GatewayError(grpc.StatusCode.UNIMPLEMENTED, f"{path}: bidirectional streams are not routed")
    if client_streaming:
        return channel.stream_unary(path)
    if server_streaming:
        return channel.unary_stream(path)
    return channel.unary_unary(path)


@contextlib.contextmanager
def _observed(target):
    """Count one routed call by its final status and time it (both RPC kinds end the same way)."""
    started = time.perf_counter()
    code = "OK"
    try:
        yield
    except GatewayError as error:
        code = error.code.name
        raise
    except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: a stream's caller went away
        code = "CANCELLED"
        raise
    finally:
        target.metrics.observe(code, started)
