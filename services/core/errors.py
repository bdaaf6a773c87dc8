"""Errors that travel to the user.

Every problem caused by the *input* (a file, a coordinate, a request field) is raised as an
``InputError`` naming the offending field, so the CLI can print one clear line (no traceback) and the
services can map it to gRPC ``INVALID_ARGUMENT`` / HTTP 400 without guessing.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input. ``field`` names what was wrong (a path, a CLI option, a request field)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message
