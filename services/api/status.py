"""One mapping from what went wrong to a gRPC status (and from a gRPC status to an HTTP code).

The services raise wlcad's own exceptions; only this module decides what a client sees. Messages for
internal failures are generic on purpose: a stack trace or an exception message from deep inside a
reader could carry file contents, and no patient data may reach a client or a log line.
"""

from __future__ import annotations

import uuid

import grpc

from services.core.errors import InputError
from services.core.work_budget import DeadlineExceededError, RequestCancelledError
from services.inference.errors import InferenceError, InferenceUnavailableError

#: Trailing metadata a wlcad service sets on every status it answers with. A gateway retries an
#: idempotent call only when UNAVAILABLE came from the transport (service down, restarting); an
#: UNAVAILABLE the service answered itself (its inference backend is down, after the backend
#: client's own retries) is passed on at once with its message.
ANSWERED_BY_SERVICE = "wlcad-answered-by"


class PreconditionError(RuntimeError):
    """The request is well-formed but the service cannot serve it in its current state (e.g. a model
    that is not in the model repository yet): FAILED_PRECONDITION, not worth retrying unchanged."""


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str, str | None]:
    """(status, client message, incident id for the log) for an exception raised by a handler."""
    if isinstance(exc, InputError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), None
    if isinstance(exc, PreconditionError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc), None
    if isinstance(exc, InferenceUnavailableError):
        if exc.code == "DEADLINE_EXCEEDED":
            return grpc.StatusCode.DEADLINE_EXCEEDED, "the inference backend did not answer in time", None
        return grpc.StatusCode.UNAVAILABLE, "the inference backend is unavailable; retry later", None
    if isinstance(exc, RequestCancelledError):
        return grpc.StatusCode.CANCELLED, str(exc), None
    if isinstance(exc, DeadlineExceededError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc), None
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed", None
    if isinstance(exc, ConnectionError):
        return grpc.StatusCode.UNAVAILABLE, f"a dependency is unavailable: {exc}", None
    if isinstance(exc, InferenceError):
        code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
        if code == grpc.StatusCode.INTERNAL:
            incident = uuid.uuid4().hex[:12]
            return code, f"the inference backend failed (incident {incident})", incident
        return code, "the inference backend refused the request", None
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the request needs more memory than the service has", None
    incident = uuid.uuid4().hex[:12]
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); see the service log", incident


#: gRPC status → HTTP status, as grpc-gateway and Google's API design guide map them.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 412,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
