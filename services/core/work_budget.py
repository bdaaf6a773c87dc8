"""The time budget of the request being worked on: its deadline and whether its caller is still there.

A service sets one :class:`WorkBudget` per request (the caller's deadline, or the service's own
limit when the caller gave none) around the work; the stages below it — reading and unpacking an
image, per-lesion loops, inference — call :func:`checkpoint` between steps and ask
:func:`remaining_s` for the timeout of anything that waits (a Triton call, a DICOMweb fetch). So an
abandoned or expired request stops at its next step and frees its compute slot, instead of
computing an answer nobody will read. Code run outside any request (the CLI, the batch runner,
training) has no budget: :func:`checkpoint` is then a no-op and :func:`remaining_s` returns its
default, so the pipelines need no second code path.

Why a context variable rather than an argument threaded through every call: the stages that must
stop (a zip member loop, a lesion loop, a backend call) sit several layers below the RPC and are
shared with the CLI; passing a budget through each signature would put serving concerns into every
pipeline function. The variable is per thread (each gRPC handler thread has its own context).
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


class RequestCancelledError(Exception):
    """The caller cancelled or went away; the work was stopped (gRPC CANCELLED, logged as cancelled)."""

    def __init__(self, stage: str) -> None:
        super().__init__(f"the caller cancelled the request during {stage}")
        self.stage = stage


class DeadlineExceededError(TimeoutError):
    """The request's deadline passed while it was being worked on (gRPC DEADLINE_EXCEEDED)."""

    def __init__(self, stage: str) -> None:
        super().__init__(f"the deadline passed during {stage}")
        self.stage = stage


@dataclass(frozen=True)
class WorkBudget:
    """``deadline_monotonic``: ``time.monotonic()`` at which the work must end (None: unbounded).
    ``is_active``: whether the caller still waits for the answer (gRPC ``context.is_active``)."""

    deadline_monotonic: float | None = None
    is_active: Callable[[], bool] = field(default=lambda: True)

    @classmethod
    def from_timeout(cls, timeout_s: float | None, is_active: Callable[[], bool] | None = None) -> WorkBudget:
        deadline = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
        return cls(deadline, is_active or (lambda: True))

    def remaining_s(self) -> float | None:
        """Seconds left (never negative), or None when unbounded."""
        if self.deadline_monotonic is None:
            return None
        return max(0.0, self.deadline_monotonic - time.monotonic())

    def check(self, stage: str) -> None:
        """Raise when the caller left or the deadline passed; ``stage`` says what was being done."""
        ended = self.ended(stage)
        if ended is not None:
            raise ended

    def ended(self, stage: str) -> RequestCancelledError | DeadlineExceededError | None:
        """Why the work must stop (not raised), or None while it may go on."""
        # The deadline first: gRPC also marks a call inactive when its deadline passes.
        if self.deadline_monotonic is not None and time.monotonic() >= self.deadline_monotonic:
            return DeadlineExceededError(stage)
        if not self.is_active():
            return RequestCancelledError(stage)
        return None


_CURRENT: contextvars.ContextVar[WorkBudget | None] = contextvars.ContextVar(
    "wlcad_work_budget", default=None
)


def current() -> WorkBudget | None:
    """The budget of the request this thread works on, or None outside a request."""
    return _CURRENT.get()


@contextlib.contextmanager
def scope(budget: WorkBudget) -> Iterator[WorkBudget]:
    """Make ``budget`` the current one for the code inside (restored afterwards)."""
    token = _CURRENT.set(budget)
    try:
        yield budget
    finally:
        _CURRENT.reset(token)


def checkpoint(stage: str) -> None:
    """Stop here if the current request was cancelled or is past its deadline (no-op outside one)."""
    budget = _CURRENT.get()
    if budget is not None:
        budget.check(stage)


def remaining_s(default: float) -> float:
    """The timeout for something that waits: the current request's time left, at most ``default``.

    Raises :class:`DeadlineExceededError` when none is left, so a caller never starts a wait of 0 s
    (which some clients read as "no timeout")."""
    budget = _CURRENT.get()
    if budget is None:
        return default
    budget.check("waiting")
    left = budget.remaining_s()
    return default if left is None else min(default, left)
