"""HTTP/JSON side of the gateway (FastAPI): the same operations as gRPC, built from the routing table.

Each binding decodes JSON into the RPC's request message, calls the gateway core (admission,
deadline, retries, metrics — the same path as gRPC callers) and encodes the response back. Errors are
``{"code", "message"}`` with the HTTP status of the gRPC code; never a stack trace.
"""

from __future__ import annotations

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
from starlette.datastructures import UploadFile

from services.api import limits
from services.api.status import HTTP_STATUS
from services.api.upload import UploadShape, method_upload_shape
from services.gateway.auth import TokenSet
from services.gateway.core import Gateway, GatewayError
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
    """Map any failure of an endpoint to its HTTP answer: status mapped, 413 for size, never a stack trace."""
    if isinstance(error, GatewayError):
        return error_response(error.code, error.message)
    if isinstance(error, _TooLargeError):
        return JSONResponse({"code": "INVALID_ARGUMENT", "message": str(error)}, status_code=413)
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


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLargeError(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLargeError(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class _TooLargeError(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the body is larger than {limit} bytes")


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
        if self.tokens is not None and not self.tokens.check(request.headers.get("authorization")):
            raise GatewayError(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")

    async def _json_request(
        self, request: Request, binding: HttpBinding, request_class
    ) -> tuple[bytes, float | None]:
        """Authorise, read the deadline header and decode the JSON body: (serialised request, timeout)."""
        self._authorize(request)
        timeout = _timeout(request)
        body = b"" if binding.verb == "GET" else await _body(request, MAX_JSON_BYTES)
        return _parse_message(body, request_class, "body").SerializeToString(), timeout

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
        response_class = message_factory.GetMessageClass(route.method(binding.rpc).output_type)
        request_class = shape.request_class

        async def endpoint(request: Request) -> Response:
            try:
                self._authorize(request)
                timeout = _timeout(request)
                declared = request.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > limits.MAX_UPLOAD_BYTES:
                    raise _TooLargeError(limits.MAX_UPLOAD_BYTES)
                try:
                    form = await request.form(max_files=1, max_fields=2, max_part_size=1024 * 1024)
                except Exception as exc:  # malformed multipart: the client's fault
                    raise GatewayError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"body: not valid multipart/form-data ({type(exc).__name__})",
                    ) from exc
                try:
                    upload = form.get("file")
                    if not isinstance(upload, UploadFile):
                        raise GatewayError(
                            grpc.StatusCode.INVALID_ARGUMENT, "file: give the image as a file part"
                        )
                    text = form.get("request", "{}")
                    if not isinstance(text, str):
                        raise GatewayError(
                            grpc.StatusCode.INVALID_ARGUMENT, "request: must be a JSON text part"
                        )
                    first = _parse_message(text, request_class, "request")
                    image = getattr(first, shape.image_field.name)
                    if image.WhichOneof("source") is not None:
                        raise GatewayError(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"request.{shape.image_field.name}: the image is the file part; leave it out",
                        )
                    image.file.filename = (upload.filename or "")[:256]
                    raw = await self.gateway.stream(
                        route.service, binding.rpc, _file_messages(shape, first, upload), timeout
                    )
                finally:
                    await form.close()
                return JSONResponse(_to_json(response_class.FromString(raw)))
            except Exception as error:
                return failure_response(error)

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


async def _file_messages(shape: UploadShape, first, upload: UploadFile) -> AsyncIterator[bytes]:
    yield shape.first_message(first)
    sent = 0
    while data := await upload.read(limits.MAX_CHUNK_BYTES):
        sent += len(data)
        if sent > limits.MAX_UPLOAD_BYTES:
            break  # the service refuses the oversize stream with INVALID_ARGUMENT
        yield shape.encode_chunk(data)


def build_app(gateway: Gateway, tokens: TokenSet | None = None) -> FastAPI:
    app = FastAPI(
        title="wlcad gateway",
        version="v1",
        description="Weak-Label CADe: the HTTP/JSON face of the wlcad.v1 gRPC API (proto3 JSON mapping).",
    )
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
                                        "description": f"JSON of {request_type.full_name} without image",
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
    412: "failed precondition (e.g. a method whose model is not installed)",
    413: "body too large",
    429: "the gateway is at capacity",
    503: "a service is unavailable; retry later",
    504: "the deadline passed",
}
