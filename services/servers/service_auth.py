"""Bearer-token authentication between the gateway and a capability's service.

A service reachable from other hosts (a pod address) must not let callers skip the gateway and its
auth, limits and audit: it then requires ``authorization: Bearer <token>`` on every RPC except
``grpc.health.v1`` (probes, and the gateway's own upstream health watch, carry no credentials). The
accepted tokens are stored as SHA-256 hashes exactly like the gateway's clients' (the same
:class:`~services.gateway.auth.TokenSet`), but under their own variable, so the gateway's client
tokens are never accepted by a service and the service token never by the gateway. The gateway sends
the token it is given in ``$WLCAD_UPSTREAM_TOKEN`` (or ``--upstream-token-file``).

On a loopback address a service may run without tokens (tests, ``wlcad serve all`` on one host); on
any other address :func:`check_listen` refuses to start without them.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
from grpc_health.v1 import health

from services.core.errors import InputError
from services.gateway.auth import TokenSet, is_loopback
from services.servers.grpc_server import split_address

#: Hashes of the tokens a service accepts, comma-separated (``wlcad serve token`` prints a pair).
ENV_SERVICE_HASHES = "WLCAD_SERVICE_TOKEN_HASHES"
#: The token the gateway presents to the services (plain: the gateway must send it).
ENV_UPSTREAM_TOKEN = "WLCAD_UPSTREAM_TOKEN"

_UNAUTHENTICATED_PREFIX = f"/{health.SERVICE_NAME}/"


def load_service_tokens(path: Path | None) -> TokenSet | None:
    """The hashes in ``path`` (one ``sha256:<hex>`` a line) and ``$WLCAD_SERVICE_TOKEN_HASHES``;
    None when neither gives any."""
    lines: list[str] = []
    if path is not None:
        lines += _read(path, "--tokens-file").splitlines()
    lines += [h for h in os.environ.get(ENV_SERVICE_HASHES, "").split(",") if h.strip()]
    return TokenSet(lines) if lines else None


def load_upstream_token(path: Path | None) -> str | None:
    """The gateway's token for the services: the first line of ``path``, else
    ``$WLCAD_UPSTREAM_TOKEN``; None when neither is set. A given but empty file is an error, not
    "no token": it would silently turn authentication off."""
    if path is not None:
        token = _read(path, "--upstream-token-file").strip()
        if not token:
            raise InputError(f"{path} is empty", field="--upstream-token-file")
        return token
    return os.environ.get(ENV_UPSTREAM_TOKEN, "").strip() or None


def check_listen(address: str, tokens: TokenSet | None) -> None:
    """Refuse a non-loopback ``--listen`` without tokens: anyone who can reach the port could
    otherwise call the service directly, past the gateway."""
    try:
        host, _ = split_address(address)
    except ValueError as exc:
        raise InputError(str(exc), field="--listen") from exc
    if tokens is None and not is_loopback(host):
        raise InputError(
            f"{address} is not a loopback address: give --tokens-file or ${ENV_SERVICE_HASHES} "
            "(the hashes of the token the gateway sends; `wlcad serve token` makes one)",
            field="--listen",
        )


def _read(path: Path, option: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise InputError(f"cannot read {path} ({exc.strerror})", field=option) from exc


class ServiceAuthInterceptor(grpc.ServerInterceptor):
    """Requires an accepted ``authorization: Bearer <token>`` on every RPC except health checks; a
    refused call is answered UNAUTHENTICATED before any of its request is read."""

    def __init__(self, tokens: TokenSet) -> None:
        self._tokens = tokens

    def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_UNAUTHENTICATED_PREFIX):
            return handler
        if self._tokens.check_metadata(handler_call_details.invocation_metadata):
            return handler
        return _refusing(handler)


def _refuse(request, context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary/streaming) as ``handler`` that only refuses."""
    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(_refuse, handler.request_deserializer, handler.response_serializer)
