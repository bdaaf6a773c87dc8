"""What one HTTP connection may take from the gateway: time to send its request headers, pace of its
request body, how many connections at once; and the uvicorn settings that apply them.

uvicorn (h11) has neither a header nor a body read timeout: a connection that sends half its
headers, or its body at 1 B/s, is kept for ever, and a few hundred of them hold the gateway's
sockets and admission slots. So the gateway runs uvicorn with :class:`HeaderTimeoutProtocol` (the
h11 protocol plus a timer from the first byte of a request to the end of its headers) and wraps the
app in :class:`BodyPaceMiddleware` (each wait for body bytes bounded, and an average rate the client
must keep). The values follow Apache's ``RequestReadTimeout`` (20 s, then 500 B/s): generous for any
real client, fatal only to one that is not sending.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import h11
import uvicorn
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.gateway.core import GatewayError

if TYPE_CHECKING:
    from services.gateway.server import TlsFiles


@dataclass(frozen=True)
class HttpLimits:
    #: From a connection's start (or a keep-alive request's first byte) to the end of its headers.
    header_timeout_s: float = 10.0
    #: Body wait allowed before the rate counts, and the average rate the client must keep after it.
    body_grace_s: float = 10.0
    body_min_rate_bytes_s: float = 1024.0
    #: Longest single wait for the next body bytes, however far ahead of the rate the client is.
    body_idle_timeout_s: float = 10.0
    #: Connections at once; beyond it new requests get 503 at once instead of exhausting sockets.
    max_connections: int = 1000
    #: Largest request line plus headers (h11's own default, stated so it cannot drift).
    max_header_bytes: int = 16 * 1024
    keep_alive_s: int = 5


LIMITS = HttpLimits()


class HttpRefusalError(GatewayError):
    """A refusal with an HTTP status of its own (408, 413, 415) rather than the gRPC code's mapping;
    still a :class:`GatewayError`, so a refusal raised inside a forwarded stream is counted by its
    code like any other failure."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int) -> None:
        super().__init__(code, message)
        self.http_status = http_status


def too_large(field: str, limit: int) -> HttpRefusalError:
    return HttpRefusalError(
        grpc.StatusCode.INVALID_ARGUMENT, f"{field}: larger than the limit of {limit} bytes", 413
    )


def refusal_response(error: HttpRefusalError) -> JSONResponse:
    return JSONResponse({"code": error.code.name, "message": error.message}, status_code=error.http_status)


def _expects_body(scope: dict[str, Any]) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


class _PacedReceive:
    """``receive`` with each wait for body bytes bounded: by the idle timeout, and by the rate budget
    (``grace + received / min_rate`` seconds of waiting in all). Only time spent waiting on the
    client counts, so a slow upstream that keeps the gateway from reading is never the client's fault.
    Once the body is complete, calls pass straight through (a streaming response waits on
    ``receive`` for the disconnect, for as long as it streams)."""

    def __init__(self, receive, limits: HttpLimits, expects_body: bool) -> None:
        self._receive = receive
        self._limits = limits
        self.body_complete = not expects_body
        self._received = 0
        self._waited_s = 0.0

    async def __call__(self) -> dict[str, Any]:
        if self.body_complete:
            return await self._receive()
        limits = self._limits
        budget = limits.body_grace_s + self._received / limits.body_min_rate_bytes_s - self._waited_s
        timeout = min(limits.body_idle_timeout_s, budget)
        started = time.monotonic()
        try:
            if timeout <= 0:
                raise TimeoutError
            async with asyncio.timeout(timeout):
                message = await self._receive()
        except TimeoutError:
            raise HttpRefusalError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"body: not received in time (at least {limits.body_min_rate_bytes_s:g} B/s after "
                f"{limits.body_grace_s:g} s, no pause over {limits.body_idle_timeout_s:g} s)",
                408,
            ) from None
        finally:
            self._waited_s += time.monotonic() - started
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            self.body_complete = not message.get("more_body", False)
        else:  # http.disconnect
            self.body_complete = True
        return message


class BodyPaceMiddleware:
    """ASGI middleware: the request body must arrive at a minimum pace (408 otherwise), and any answer
    sent before the body was read to its end closes the connection. Without the close, uvicorn
    would keep draining a refused body (a 413, a 408) for as long as the client sends it."""

    def __init__(self, app, limits: HttpLimits = LIMITS) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        paced = _PacedReceive(receive, self.limits, _expects_body(scope))
        started = False

        async def send_closing(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not paced.body_complete:
                    message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, paced, send_closing)
        except HttpRefusalError as refusal:  # raised where no endpoint turned it into its answer
            if started:
                raise
            await refusal_response(refusal)(scope, paced, send_closing)


def _timeout_answer(limits: HttpLimits) -> bytes:
    body = json.dumps(
        {
            "code": "DEADLINE_EXCEEDED",
            "message": f"headers: not received within {limits.header_timeout_s:g} s",
        }
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout: a connection must complete its request headers
    within ``header_timeout_s`` of opening (or, on keep-alive, of the next request's first byte),
    else it gets a 408 (when it sent something) and is closed. uvicorn's own keep-alive timer does not
    cover this: any byte received cancels it, and nothing is armed before the first request."""

    limits = LIMITS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._partial_headers = False
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # the next request's headers are not complete yet
            self._partial_headers = True
            self._arm_header_timer()
        else:
            self._partial_headers = False
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self._partial_headers:
                self.transport.write(_timeout_answer(self.limits))
            self.transport.close()


def http_server_config(app, host: str, port: int, tls: TlsFiles | None) -> uvicorn.Config:
    """The gateway's uvicorn configuration: the header timeout protocol (h11, stated rather than
    "auto", which would switch to httptools without the timer if httptools were installed), the
    connection cap, the header size cap, and TLS (mutual when the files name a client CA)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=HeaderTimeoutProtocol,
        limit_concurrency=LIMITS.max_connections,
        h11_max_incomplete_event_size=LIMITS.max_header_bytes,
        timeout_keep_alive=LIMITS.keep_alive_s,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        ssl_certfile=str(tls.cert) if tls else None,
        ssl_keyfile=str(tls.key) if tls else None,
        ssl_ca_certs=str(tls.client_ca) if tls and tls.client_ca else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca else ssl.CERT_NONE,
    )
