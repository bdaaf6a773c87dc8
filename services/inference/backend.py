"""The one interface every service (and training's evaluation) uses to run a model.

It is asynchronous because the services are gRPC aio servers and because batching needs several
requests in flight at once; :class:`BlockingBackend` wraps any backend for synchronous callers
(training loops, scripts) by running it on its own event-loop thread.
"""

from __future__ import annotations

import abc
import asyncio
import threading
from collections.abc import Mapping, Sequence

import numpy as np

from services.inference.signature import ModelSignature


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
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def signature(self, model: str) -> ModelSignature:
        return self._call(self.backend.signature(model))

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
