"""gRPC side of the gateway: generic byte-level handlers for every routed RPC, plus auth.

Handlers are built from the routes' service descriptors (unary, client- or server-streaming), so they never
decode a message; health and reflection are the standard grpcio ones.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from services.gateway.auth import TokenSet
from services.gateway.core import Gateway, GatewayError

log = logging.getLogger("wlcad.gateway")

#: Callable without a token (probes must work before a client has credentials).
UNAUTHENTICATED_SERVICES = ("grpc.health.v1.Health",)
_UNAUTHENTICATED_PREFIXES = tuple(f"/{service}/" for service in UNAUTHENTICATED_SERVICES)


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    return context.time_remaining()


async def _fail(context: grpc.aio.ServicerContext, error: Exception) -> None:
    if isinstance(error, GatewayError):
        await context.abort(error.code, error.message)
    log.error("gateway failure: %s", type(error).__name__)
    await context.abort(grpc.StatusCode.INTERNAL, "internal gateway error")


def _unary(gateway: Gateway, service: str, rpc: str) -> Callable[..., Awaitable[bytes]]:
    async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await gateway.unary(service, rpc, request, _timeout(context))
        except Exception as error:
            await _fail(context, error)
            raise

    return handle


def _stream(gateway: Gateway, service: str, rpc: str) -> Callable[..., Awaitable[bytes]]:
    async def handle(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await gateway.stream(service, rpc, requests, _timeout(context))
        except Exception as error:
            await _fail(context, error)
            raise

    return handle


def _server_stream(gateway: Gateway, service: str, rpc: str) -> Callable[..., AsyncIterator[bytes]]:
    async def handle(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            messages = gateway.server_stream(service, rpc, request, _timeout(context))
            async with contextlib.aclosing(messages):  # the caller left: the upstream call is cancelled
                async for message in messages:
                    yield message
        except Exception as error:
            await _fail(context, error)
            raise

    return handle


def generic_handlers(gateway: Gateway) -> list[grpc.GenericRpcHandler]:
    """One generic handler per routed service, covering every RPC its descriptor declares."""
    handlers = []
    for service, route in gateway.routes.items():
        methods = {}
        for method in route.descriptor.methods:
            if method.server_streaming and method.client_streaming:
                continue  # bidirectional streams: no wlcad RPC has one; UNIMPLEMENTED
            if method.server_streaming:
                methods[method.name] = grpc.unary_stream_rpc_method_handler(
                    _server_stream(gateway, service, method.name)
                )
            elif method.client_streaming:
                methods[method.name] = grpc.stream_unary_rpc_method_handler(
                    _stream(gateway, service, method.name)
                )
            else:
                methods[method.name] = grpc.unary_unary_rpc_method_handler(
                    _unary(gateway, service, method.name)
                )
        handlers.append(grpc.method_handlers_generic_handler(service, methods))
    return handlers


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC except health checks."""

    def __init__(self, tokens: TokenSet) -> None:
        self._tokens = tokens

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        if handler_call_details.method.startswith(_UNAUTHENTICATED_PREFIXES):
            return await continuation(handler_call_details)
        if self._tokens.check_metadata(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    async def refuse(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")

    if handler is not None and handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            refuse, handler.request_deserializer, handler.response_serializer
        )
    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            refuse, handler.request_deserializer, handler.response_serializer
        )
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            refuse, handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(refuse)
