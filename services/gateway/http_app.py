"""HTTP/JSON side of the gateway (FastAPI): the same operations as gRPC, built from the routing table.

Each binding decodes JSON into the RPC's request message, calls the gateway core (admission,
deadline, retries, metrics — the same path as gRPC callers) and encodes the response back. Errors are
``{"code", "message"}`` with the HTTP status of the gRPC code; never a stack trace.

A request's deadline starts when its endpoint starts, so reading the body counts against it (a
body trickled in cannot hold a slot past the deadline). JSON endpoints take only
``Content-Type: application/json`` (415 otherwise): a web page can send ``text/plain`` to a
loopback gateway without a CORS preflight, but not JSON. Uploads are streamed
(:mod:`services.gateway.http_upload`); connection-level bounds are in :mod:`services.gateway.http_limits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from google.protobuf import json_format, message_factory
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect

from services.api import limits
from services.api.status import HTTP_STATUS
from services.api.upload import UploadShape, method_upload_shape
from services.core.work_budget import WorkBudget
from services.gateway.auth import TokenSet
from services.gateway.core import Gateway, GatewayError
from services.gateway.http_limits import BodyPaceMiddleware, HttpRefusalError, refusal_response, too_large
from services.gateway.http_upload import MAX_UPLOAD_BODY_BYTES, MultipartUpload, boundary_of, multipart_events
from services.gateway.openapi import ERROR_SCHEMA, message_schema
from services.gateway.routes import HttpBinding, Route

log = logging.getLogger("wlcad.gateway")

#: Largest JSON body: a maximal gRPC message in base64 plus room for the rest.
MAX_JSON_BYTES = limits.MAX_MESSAGE_BYTES * 4 // 3 + 1024 * 1024
TIMEOUT_HEADER = "x-timeout-seconds"
NDJSON = "application/x-ndjson"


def error_response(code: grpc.StatusCode, message: str) -> JSONResponse:
    return JSONResponse({"code": code.name, "message": message}, status_code=HTTP_STATUS.get(code, 500))


def failure_response(error: Exception) -> JSONResponse:
    """Map any failure of an endpoint to its HTTP answer: the gRPC code's status, or the refusal's own
    (408, 413, 415); never a stack trace."""
    if isinstance(error, HttpRefusalError):
        return refusal_response(error)
    if isinstance(error, GatewayError):
        return error_response(error.code, error.message)
    return internal_error(error)


def internal_error(error: Exception) -> JSONResponse:
    log.error("HTTP handler failure: %s", type(error).__name__)
    return error_response(grpc.StatusCode.INTERNAL, "internal gateway error")


def _timeout(request: Request) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"{TIMEOUT_HEADER}: must be seconds > 0")
    return value


def _budget(request: Request, default_s: float) -> WorkBudget:
    """The request's deadline from now: ``x-timeout-seconds``, at most the gateway's default."""
    timeout = _timeout(request)
    return WorkBudget.from_timeout(default_s if timeout is None else min(timeout, default_s))


def _check_declared_size(request: Request, limit: int) -> None:
    """413 before reading anything when the Content-Length already says too much."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large("body", limit)


def _refuse_cross_site(request: Request) -> None:
    """403 for a request a browser made on behalf of another site's page: a multipart POST is a CORS
    "simple request" that any web page can send to a token-less gateway on the reader's own machine.
    Browsers say so (``Sec-Fetch-Site``; ``Origin`` on every cross-origin POST); API clients such as
    curl, the wlcad client and other services send neither, and the gateway serves no web pages."""
    site = request.headers.get("sec-fetch-site", "").lower()
    origin = request.headers.get("origin")
    if site in ("cross-site", "same-site") or (origin is not None and not _same_origin(origin, request)):
        raise HttpRefusalError(
            grpc.StatusCode.PERMISSION_DENIED,
            "Origin: requests from web pages of other sites are refused",
            403,
        )


def _same_origin(origin: str, request: Request) -> bool:
    """``Origin`` names this gateway (its Host header), e.g. the Swagger UI it serves at /docs."""
    host = request.headers.get("host", "")
    return origin.lower() in (f"http://{host}".lower(), f"https://{host}".lower())


def _require_json(request: Request) -> None:
    if parse_options_header(request.headers.get("content-type"))[0] != b"application/json":
        raise HttpRefusalError(
            grpc.StatusCode.INVALID_ARGUMENT, "Content-Type: must be application/json", 415
        )


async def _chunks(request: Request, budget: WorkBudget) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive, each wait bounded by the request's deadline."""
    stream = request.stream()
    while True:
        try:
            async with asyncio.timeout(budget.remaining_s()):
                chunk = await anext(stream, None)
        except TimeoutError:
            raise GatewayError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed while reading the request body"
            ) from None
        except ClientDisconnect:
            raise GatewayError(grpc.StatusCode.CANCELLED, "the caller went away") from None
        if chunk is None:
            return
        if chunk:
            yield chunk


async def _body(request: Request, limit: int, budget: WorkBudget) -> bytes:
    _check_declared_size(request, limit)
    chunks, size = [], 0
    async for chunk in _chunks(request, budget):
        size += len(chunk)
        if size > limit:
            raise too_large("body", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_message(text: bytes | str, message_class, field: str):
    try:
        payload = json.loads(text) if text else {}
    except (ValueError, RecursionError) as exc:
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: not valid JSON ({exc})") from exc
    if not isinstance(payload, dict):
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: must be a JSON object")
    try:
        return json_format.ParseDict(payload, message_class())
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {str(exc)[:300]}") from exc


def _message_classes(route: Route, binding: HttpBinding) -> tuple[type, type]:
    method = route.method(binding.rpc)
    return message_factory.GetMessageClass(method.input_type), message_factory.GetMessageClass(
        method.output_type
    )


def _to_json(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


class _Endpoints:
    """The endpoint coroutines for one route's bindings."""

    def __init__(self, gateway: Gateway, tokens: TokenSet | None) -> None:
        self.gateway = gateway
        self.tokens = tokens

    def _authorize(self, request: Request) -> None:
        _refuse_cross_site(request)
        if self.tokens is not None and not self.tokens.check(request.headers.get("authorization")):
            raise GatewayError(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")

    async def _json_request(
        self, request: Request, binding: HttpBinding, request_class
    ) -> tuple[bytes, float]:
        """Authorise, start the deadline and decode the JSON body: (serialised request, seconds left)."""
        self._authorize(request)
        budget = _budget(request, self.gateway.limits.default_deadline_s)
        body = b""
        if binding.verb != "GET":
            _require_json(request)
            body = await _body(request, MAX_JSON_BYTES, budget)
        return _parse_message(body, request_class, "body").SerializeToString(), budget.remaining_s()

    def unary(self, route: Route, binding: HttpBinding):
        request_class, response_class = _message_classes(route, binding)

        async def endpoint(request: Request) -> Response:
            try:
                message, timeout = await self._json_request(request, binding, request_class)
                raw = await self.gateway.unary(route.service, binding.rpc, message, timeout)
                return JSONResponse(_to_json(response_class.FromString(raw)))
            except Exception as error:
                return failure_response(error)

        return endpoint

    def upload(self, route: Route, binding: HttpBinding, shape: UploadShape):
        """multipart/form-data → the upload RPC, streamed: the file's chunks are forwarded as they
        arrive (see :mod:`services.gateway.http_upload`), within the request's deadline."""
        response_class = message_factory.GetMessageClass(route.method(binding.rpc).output_type)
        request_class = shape.request_class

        async def endpoint(request: Request) -> Response:
            upload: MultipartUpload | None = None
            try:
                self._authorize(request)
                budget = _budget(request, self.gateway.limits.default_deadline_s)
                boundary = boundary_of(request.headers.get("content-type"))
                _check_declared_size(request, MAX_UPLOAD_BODY_BYTES)
                upload = MultipartUpload(multipart_events(_chunks(request, budget), boundary))
                text, filename = await upload.head()
                first = _parse_message(text, request_class, "request")
                image = getattr(first, shape.image_field.name)
                if image.WhichOneof("source") is not None:
                    raise GatewayError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"request.{shape.image_field.name}: the image is the file part; leave it out",
                    )
                image.file.filename = filename[:256]
                raw = await self.gateway.stream(
                    route.service, binding.rpc, _file_messages(shape, first, upload), budget.remaining_s()
                )
                return JSONResponse(_to_json(response_class.FromString(raw)))
            except Exception as error:
                return failure_response(error)
            finally:
                if upload is not None:
                    await upload.aclose()

        return endpoint

    def server_stream(self, route: Route, binding: HttpBinding):
        """A server-streaming RPC as newline-delimited JSON, one line per message. The first message is
        awaited before the answer starts, so a refused request still gets its HTTP status; a failure
        after that ends the stream with one ``{"code", "message"}`` line."""
        request_class, response_class = _message_classes(route, binding)

        async def endpoint(request: Request) -> Response:
            try:
                message, timeout = await self._json_request(request, binding, request_class)
                messages = self.gateway.server_stream(route.service, binding.rpc, message, timeout)
                try:
                    first = await anext(messages, None)
                except BaseException:
                    await messages.aclose()
                    raise
            except Exception as error:
                return failure_response(error)

            async def lines() -> AsyncIterator[bytes]:
                async with contextlib.aclosing(messages):
                    try:
                        raw = first
                        while raw is not None:
                            yield json.dumps(_to_json(response_class.FromString(raw))).encode() + b"\n"
                            raw = await anext(messages, None)
                    except GatewayError as error:
                        yield json.dumps({"code": error.code.name, "message": error.message}).encode() + b"\n"

            return StreamingResponse(lines(), media_type=NDJSON)

        return endpoint


async def _file_messages(shape: UploadShape, first, upload: MultipartUpload) -> AsyncIterator[bytes]:
    """The upload RPC's messages: the request, then one chunk message per file chunk as it arrives.
    A refusal while reading (413, a malformed or cut body, the deadline) is raised from here, so the
    upstream stream is never half-closed and the service never takes a part for the whole."""
    yield shape.first_message(first)
    async for chunk in upload.file_chunks():
        yield shape.encode_chunk(chunk)


def build_app(gateway: Gateway, tokens: TokenSet | None = None) -> FastAPI:
    app = FastAPI(
        title="wlcad gateway",
        version="v1",
        description="Weak-Label CADe: the HTTP/JSON face of the wlcad.v1 gRPC API (proto3 JSON mapping).",
    )
    app.add_middleware(BodyPaceMiddleware)
    endpoints = _Endpoints(gateway, tokens)
    schemas: dict = {"Error": ERROR_SCHEMA}
    error_ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for route in gateway.routes.values():
        for binding in route.http:
            method = route.method(binding.rpc)
            responses = {
                "200": {
                    "description": "OK",
                    "content": {"application/json": {"schema": message_schema(method.output_type, schemas)}},
                },
                **{str(s): {"description": d, **error_ref} for s, d in _ERRORS.items()},
            }
            extra: dict = {"responses": responses, "security": [{"bearerAuth": []}]}
            shape = method_upload_shape(method)
            if shape is not None:
                request_type = shape.request_field.message_type
                message_schema(request_type, schemas)
                extra["requestBody"] = {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "file": {"type": "string", "format": "binary"},
                                    "request": {
                                        "type": "string",
                                        "description": f"JSON of {request_type.full_name} without image; "
                                        "send it before the file part (the file is streamed on)",
                                    },
                                },
                                "required": ["file"],
                            }
                        }
                    },
                }
                endpoint = endpoints.upload(route, binding, shape)
            else:
                if binding.verb != "GET":
                    extra["requestBody"] = {
                        "required": True,
                        "content": {
                            "application/json": {"schema": message_schema(method.input_type, schemas)}
                        },
                    }
                if method.server_streaming:
                    responses["200"] = {
                        "description": "OK: one JSON message a line; a failure mid-stream ends with an Error line",
                        "content": {NDJSON: {"schema": message_schema(method.output_type, schemas)}},
                    }
                    endpoint = endpoints.server_stream(route, binding)
                else:
                    endpoint = endpoints.unary(route, binding)
            app.add_api_route(
                binding.path,
                endpoint,
                methods=[binding.verb],
                summary=binding.summary,
                operation_id=f"{route.name}.{binding.rpc}",
                openapi_extra=extra,
                response_class=JSONResponse,
            )

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok\n")

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        serving = await gateway.check_upstreams()
        return JSONResponse({"upstreams": serving}, status_code=200 if all(serving.values()) else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = document.setdefault("components", {})
            components.setdefault("schemas", {}).update(schemas)
            components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


_ERRORS = {
    400: "invalid argument (the message names the field)",
    401: "missing or invalid bearer token",
    408: "the body did not arrive at the minimum pace",
    412: "failed precondition (e.g. a method whose model is not installed)",
    413: "body too large (the message names the part: body, request or file)",
    415: "wrong Content-Type (application/json; multipart/form-data for uploads)",
    429: "the gateway is at capacity",
    503: "a service is unavailable; retry later",
    504: "the deadline passed",
}
