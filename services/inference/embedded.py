"""``embedded`` backend: onnxruntime in-process, reading the same repository Triton serves.

It mirrors what Triton does with the same config.pbtxt, so switching backends changes nothing but
where the work runs: requests that arrive while a batch is running (or within the config's
``max_queue_delay_microseconds``) are stacked along the batch axis up to ``max_batch_size`` and run
as one onnxruntime call, which is where batching pays on both CPU and GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from services.inference.backend import InferenceBackend
from services.inference.errors import InferenceError, InferenceUnavailableError
from services.inference.repository import ModelRepository
from services.inference.signature import ModelSignature

log = logging.getLogger(__name__)


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build and machine have it, else CPU."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass
class _Request:
    inputs: dict[str, np.ndarray]
    rows: int  # batch rows (1 for non-batching models, which never share a run)
    future: asyncio.Future = field(repr=False)

    def key(self) -> tuple:
        """Requests can share one run only if every input agrees on dtype and non-batch shape."""
        return tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(self.inputs.items()))


class _EmbeddedModel:
    """One loaded model: its onnxruntime session and the batching loop feeding it."""

    def __init__(self, signature: ModelSignature, session: ort.InferenceSession) -> None:
        self.signature = signature
        self.session = session
        self.output_names = [spec.name for spec in signature.outputs]
        # One run at a time per model, like one Triton instance; onnxruntime itself uses all cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{signature.name}")
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        #: Counters for metrics and tests: onnxruntime runs, requests served, largest batch (rows).
        self.stats = {"runs": 0, "requests": 0, "max_rows": 0}
        self._worker = asyncio.get_running_loop().create_task(self._serve())

    async def submit(self, inputs: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(inputs, rows, future))
        return await future

    async def _serve(self) -> None:
        carried: _Request | None = None
        loop = asyncio.get_running_loop()
        while True:
            first = carried or await self._queue.get()
            carried = None
            batch, rows = [first], first.rows
            if self.signature.batches:
                deadline = loop.time() + self.signature.max_queue_delay_us / 1e6
                while rows < self.signature.max_batch_size:
                    try:
                        item = self._queue.get_nowait()
                    except asyncio.QueueEmpty:
                        remaining = deadline - loop.time()
                        if remaining <= 0:
                            break
                        try:
                            item = await asyncio.wait_for(self._queue.get(), remaining)
                        except TimeoutError:
                            break
                    if item.key() != first.key() or rows + item.rows > self.signature.max_batch_size:
                        carried = item
                        break
                    batch.append(item)
                    rows += item.rows
            batch = [request for request in batch if not request.future.done()]  # drop timed-out callers
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[_Request]) -> None:
        if len(batch) == 1:
            feed = batch[0].inputs
        else:
            feed = {name: np.concatenate([r.inputs[name] for r in batch]) for name in batch[0].inputs}
        rows = sum(r.rows for r in batch)
        self.stats["runs"] += 1
        self.stats["requests"] += len(batch)
        self.stats["max_rows"] = max(self.stats["max_rows"], rows)
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.session.run, self.output_names, feed
            )
        except Exception as exc:  # onnxruntime raises its own exception types for runtime failures
            error = InferenceError(f"onnxruntime failed on model {self.signature.name!r}: {exc}")
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        start = 0
        for request in batch:
            stop = start + request.rows
            if not request.future.done():
                if len(batch) == 1:
                    request.future.set_result(dict(zip(self.output_names, results, strict=True)))
                else:
                    request.future.set_result(
                        {name: out[start:stop] for name, out in zip(self.output_names, results, strict=True)}
                    )
            start = stop

    async def close(self) -> None:
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._executor.shutdown(wait=True)


class EmbeddedBackend(InferenceBackend):
    """onnxruntime in this process; models load on first use from the repository's latest version."""

    kind = "embedded"

    def __init__(
        self,
        repository: ModelRepository | Path | str,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
    ) -> None:
        self.repository = (
            repository if isinstance(repository, ModelRepository) else ModelRepository(repository)
        )
        self.providers = list(providers) if providers else default_providers()
        self.intra_op_threads = intra_op_threads
        self._models: dict[str, _EmbeddedModel] = {}
        self._loading = asyncio.Lock()

    async def _model(self, name: str) -> _EmbeddedModel:
        if name in self._models:
            return self._models[name]
        async with self._loading:
            if name not in self._models:
                signature = self.repository.signature(name)  # InputError(field="model") when unknown
                path = self.repository.onnx_path(name)
                options = ort.SessionOptions()
                options.intra_op_num_threads = self.intra_op_threads
                session = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: ort.InferenceSession(str(path), options, providers=self.providers)
                )
                running_on = session.get_providers()[0]
                if self.providers[0] == "CUDAExecutionProvider" and running_on != "CUDAExecutionProvider":
                    # A GPU image on a node without a usable GPU (driver, CUDA or cuDNN missing): it
                    # still serves, on the CPU, and says so loudly.
                    log.error("embedded: %s asked for CUDA but runs on %s (no usable GPU)", name, running_on)
                log.info("embedded: loaded %s from %s on %s", name, path, running_on)
                self._models[name] = _EmbeddedModel(signature, session)
        return self._models[name]

    async def signature(self, model: str) -> ModelSignature:
        return (await self._model(model)).signature

    def stats(self, model: str) -> dict[str, int]:
        """Batching counters of a loaded model (runs, requests, max_rows)."""
        return (
            dict(self._models[model].stats)
            if model in self._models
            else {"runs": 0, "requests": 0, "max_rows": 0}
        )

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        loaded = await self._model(model)
        signature = loaded.signature
        batch = signature.validate(inputs)
        wanted = [signature.output(name).name for name in outputs] if outputs else loaded.output_names
        work = loaded.submit(dict(inputs), batch or 1)
        try:
            results = await (asyncio.wait_for(work, timeout_s) if timeout_s else work)
        except TimeoutError as exc:
            raise InferenceUnavailableError(
                f"model {model!r} did not answer within {timeout_s:g} s", code="DEADLINE_EXCEEDED"
            ) from exc
        return {name: results[name] for name in wanted}

    async def close(self) -> None:
        models, self._models = self._models, {}
        for loaded in models.values():
            await loaded.close()
