"""Errors of the inference runtime that are not the caller's fault.

Bad requests (unknown model, wrong tensor name, shape or dtype) are the caller's fault and raise
:class:`services.core.errors.InputError` naming the field. What is left is the server's state: it
is unreachable (``InferenceUnavailableError``, which callers may retry later or map to gRPC UNAVAILABLE /
HTTP 503) or it failed the request in some other way (``InferenceError``).
"""

from __future__ import annotations


class InferenceError(RuntimeError):
    """The backend failed a well-formed request. ``code`` is the gRPC-style status name."""

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        super().__init__(message)
        self.code = code


class InferenceUnavailableError(InferenceError):
    """The server could not be reached (or answered UNAVAILABLE) until the request's deadline."""

    def __init__(self, message: str, code: str = "UNAVAILABLE") -> None:
        super().__init__(message, code)
