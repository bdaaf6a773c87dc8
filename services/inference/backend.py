"""The one interface every service (and training's evaluation) uses to run a model.

It is asynchronous because the services are gRPC aio servers and because batching needs several
requests in flight at once; :class:`BlockingBackend` wraps any backend for synchronous callers
(training loops, scripts, the services' handler threads) by running it on its own event-loop thread.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from services.core.work_budget import checkpoint
from services.inference.signature import ModelSignature

#: A one-input, one-output network bound to a backend: ``infer(batch)`` takes float32 (n, 1, ...)
#: and returns logits of the same shape. What the pipelines (label U-Net, CADe tiling) call, so they
#: never see which backend runs the model.
InferFunction = Callable[[np.ndarray], np.ndarray]

#: How often a blocked caller looks whether its request was cancelled (the bound on how long an
#: abandoned request keeps waiting for the backend).
_CANCEL_POLL_S = 0.05


class InferenceBackend(abc.ABC):
    """Runs named models of a Triton-layout repository on named numpy tensors.

    ``infer`` raises :class:`~services.core.errors.InputError` (field named) for an unknown model or a
    wrong input name/shape/dtype, :class:`~services.inference.errors.InferenceUnavailableError` when the
    server cannot be reached within the deadline, and ``InferenceError`` for other failures.
    """

    #: "embedded" or "triton", for logs and ``wlcad info``.
    kind: str = ""

    @abc.abstractmethod
    async def signature(self, model: str) -> ModelSignature:
        """Inputs, outputs and batching limit of ``model``."""

    @abc.abstractmethod
    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one request; returns the requested outputs (all when None) by name."""

    async def ready(self, timeout_s: float, models: Sequence[str] = ()) -> bool:
        """Whether the backend can serve ``models`` now, answered within ``timeout_s`` (a service's
        readiness). An in-process backend is always ready; a remote one asks its server."""
        return True

    @abc.abstractmethod
    async def close(self) -> None:
        """Release sessions, channels and shared memory."""

    async def __aenter__(self) -> InferenceBackend:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()


class BlockingBackend:
    """Synchronous facade: runs an :class:`InferenceBackend` on a private event-loop thread.

    The backend object must be created by ``factory`` *inside* that loop (gRPC aio channels bind to
    the loop that made them), hence a factory rather than a backend instance.
    """

    def __init__(self, factory) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wlcad-inference", daemon=True)
        self._thread.start()

        async def create() -> InferenceBackend:
            return factory()

        self.backend: InferenceBackend = self._call(create())

    def _call(self, coroutine):
        """Run ``coroutine`` on the loop thread and wait for it; when the current request is
        cancelled meanwhile (:func:`~services.core.work_budget.checkpoint`), the coroutine is
        cancelled too, which ends its backend call, and the request stops at once."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        while True:
            done, _ = concurrent.futures.wait([future], timeout=_CANCEL_POLL_S)
            if done:
                return future.result()
            try:
                checkpoint("inference")
            except BaseException:
                future.cancel()
                raise

    def signature(self, model: str) -> ModelSignature:
        return self._call(self.backend.signature(model))

    def ready(self, timeout_s: float, models: Sequence[str] = ()) -> bool:
        return self._call(self.backend.ready(timeout_s, models))

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        return self._call(self.backend.infer(model, inputs, outputs, timeout_s=timeout_s))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self.backend.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> BlockingBackend:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
