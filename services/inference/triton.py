"""``triton`` backend: a Triton Inference Server over gRPC (tritonclient aio).

What a network hop needs that in-process inference does not:

* a deadline on every call (the caller's ``timeout_s``, else ``deadline_s``), so a hung or dead
  server costs a bounded wait;
* retry with jittered exponential back-off while the server answers UNAVAILABLE (restarting,
  overloaded, not yet listening), ending in :class:`InferenceUnavailableError` (UNAVAILABLE) a small
  margin before the deadline, so the answer reaches the caller in time and says the backend is down
  (not that the caller's deadline passed). Retrying is for a blip: a call retries for at most
  ``max_retry_s``, so a long outage is answered fast instead of holding every caller (and its
  compute slot) until its deadline;
* a cheap reachability probe (:meth:`TritonBackend.ready`) for the service's readiness;
* system shared memory for large tensors when the server runs on the same host, so a volume is
  not serialized into a gRPC message.

Requests are checked against the model's config (fetched once from the server) before they are
sent, so bad input fails with the same :class:`InputError` as the embedded backend.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from services.core.errors import InputError
from services.inference.backend import InferenceBackend
from services.inference.errors import InferenceError, InferenceUnavailableError
from services.inference.shm import Region, SharedMemoryPool
from services.inference.signature import ModelSignature

log = logging.getLogger(__name__)

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _status(exc: InferenceServerException) -> str:
    """'UNAVAILABLE' from tritonclient's 'StatusCode.UNAVAILABLE' (or '' when it has none)."""
    return (exc.status() or "").rsplit(".", 1)[-1]


def answer_margin_s(deadline_s: float) -> float:
    """How long before a deadline the retries stop, so that the answer (an error included) still
    crosses the service and the gateway before the caller's own deadline: a tenth of it, between
    50 ms and 1 s."""
    return min(1.0, max(0.05, 0.1 * deadline_s))


class TritonBackend(InferenceBackend):
    """Client of one Triton server at ``host:port`` (gRPC).

    ``deadline_s``: a call's deadline when its caller gives none. ``max_retry_s``: how long one call
    retries while the server is UNAVAILABLE (longer than the channel's 1 s reconnect back-off, so a
    server back from an outage is found by the first call)."""

    kind = "triton"

    def __init__(
        self,
        url: str,
        *,
        deadline_s: float = 30.0,
        shared_memory: bool | None = None,
        shared_memory_min_bytes: int = 1 << 20,
        initial_backoff_s: float = 0.05,
        max_backoff_s: float = 1.0,
        max_retry_s: float = 2.0,
    ) -> None:
        self.url = url
        self.deadline_s = deadline_s
        host = url.rsplit(":", 1)[0]
        self.shared_memory = host in _LOCAL_HOSTS if shared_memory is None else shared_memory
        self.shared_memory_min_bytes = shared_memory_min_bytes
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_retry_s = max_retry_s
        self._client = InferenceServerClient(
            url,
            channel_args=[
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", -1),
                # Reconnect quickly once a restarted server listens again (gRPC's default waits up to 2 min).
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        self._signatures: dict[str, ModelSignature] = {}
        self._pool = SharedMemoryPool(self._client)

    def _end(self, timeout_s: float | None) -> float:
        """Loop time by which a call must have answered: its deadline less the answer margin."""
        deadline_s = timeout_s or self.deadline_s
        return asyncio.get_running_loop().time() + deadline_s - answer_margin_s(deadline_s)

    async def _retrying(self, what: str, call: Callable[[float], Awaitable], end: float):
        """Run ``call(remaining_seconds)`` until it succeeds, fails for good, or retrying stops (at
        ``end``, or ``max_retry_s`` after the first try).

        Once the server answered UNAVAILABLE, running out of time is reported as UNAVAILABLE too
        (also when the last try then timed out): the caller must learn that the backend is down, not
        that its own deadline passed. DEADLINE_EXCEEDED is left for a server that was reached but
        did not answer in time."""
        loop = asyncio.get_running_loop()
        stop = min(end, loop.time() + self.max_retry_s)
        backoff = self.initial_backoff_s
        attempts = 0
        refusal: InferenceServerException | None = None
        while True:
            attempts += 1
            try:
                return await call(max(end - loop.time(), 0.001))
            except InferenceServerException as exc:
                status = _status(exc)
                if status == "DEADLINE_EXCEEDED" and refusal is None:
                    raise InferenceUnavailableError(
                        f"triton at {self.url}: {what} did not answer within its deadline",
                        code="DEADLINE_EXCEEDED",
                    ) from exc
                if status not in {"UNAVAILABLE", "DEADLINE_EXCEEDED"}:
                    raise
                refusal = exc if status == "UNAVAILABLE" else refusal
                self._pool.invalidate()  # a restarted server has forgotten our shared-memory regions
                pause = backoff * (0.5 + random.random())
                if status == "DEADLINE_EXCEEDED" or loop.time() + pause >= stop:
                    raise InferenceUnavailableError(
                        f"triton at {self.url}: UNAVAILABLE for {what} after {attempts} tries "
                        f"({refusal.message()})"
                    ) from exc
                log.info("triton %s UNAVAILABLE (%s); retrying in %.2f s", self.url, exc.message(), pause)
                await asyncio.sleep(pause)
                backoff = min(backoff * 2, self.max_backoff_s)

    async def ready(self, timeout_s: float, models: Sequence[str] = ()) -> bool:
        """Whether the server is ready and serves ``models`` now: cheap health RPCs, no retry, all
        within ``timeout_s`` (a hung server is not ready)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        try:
            if not await self._client.is_server_ready(client_timeout=max(end - loop.time(), 0.001)):
                return False
            for model in models:
                if not await self._client.is_model_ready(model, client_timeout=max(end - loop.time(), 0.001)):
                    return False
        except InferenceServerException:
            return False
        return True

    def _translate(self, exc: InferenceServerException, model: str) -> Exception:
        """Map a final server error to wlcad's errors (bad input vs server failure)."""
        status, message = _status(exc), exc.message() or str(exc)
        lowered = message.lower()
        if status == "NOT_FOUND" or "unknown model" in lowered or "is not found" in lowered:
            return InputError(f"unknown model {model!r} on triton at {self.url}: {message}", field="model")
        if status == "INVALID_ARGUMENT":
            return InputError(f"triton rejected the request: {message}", field="inputs")
        return InferenceError(
            f"triton at {self.url} failed model {model!r}: {message}", code=status or "INTERNAL"
        )

    async def signature(self, model: str, timeout_s: float | None = None) -> ModelSignature:
        return await self._signature(model, self._end(timeout_s))

    async def _signature(self, model: str, end: float) -> ModelSignature:
        if model not in self._signatures:

            async def fetch(remaining: float):
                return await self._client.get_model_config(model, client_timeout=remaining)

            try:
                response = await self._retrying(f"config of {model!r}", fetch, end)
            except InferenceServerException as exc:
                raise self._translate(exc, model) from exc
            self._signatures[model] = ModelSignature.from_config(response.config)
        return self._signatures[model]

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        end = self._end(timeout_s)
        signature = await self._signature(model, end)
        batch = signature.validate(inputs)
        wanted = [signature.output(name) for name in outputs] if outputs else list(signature.outputs)
        arrays = {name: np.ascontiguousarray(array) for name, array in inputs.items()}
        use_shm = (
            self.shared_memory and sum(a.nbytes for a in arrays.values()) >= self.shared_memory_min_bytes
        )

        async def attempt(remaining: float) -> dict[str, np.ndarray]:
            if use_shm:
                return await self._infer_shm(model, arrays, wanted, batch, remaining)
            request = []
            for name, array in arrays.items():
                tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
                tensor.set_data_from_numpy(array)
                request.append(tensor)
            requested = [grpcclient.InferRequestedOutput(spec.name) for spec in wanted]
            result = await self._client.infer(model, request, outputs=requested, client_timeout=remaining)
            return {spec.name: result.as_numpy(spec.name) for spec in wanted}

        try:
            return await self._retrying(f"infer {model!r}", attempt, end)
        except InferenceServerException as exc:
            raise self._translate(exc, model) from exc

    async def _infer_shm(self, model, arrays, wanted, batch, remaining: float) -> dict[str, np.ndarray]:
        """One request with inputs (and fixed-size outputs) in shared memory."""
        in_bytes = sum(a.nbytes for a in arrays.values())
        out_shapes = {spec.name: spec.full_shape(batch) for spec in wanted}
        outputs_fixed = all(-1 not in shape for shape in out_shapes.values())
        out_bytes = {
            spec.name: int(np.prod(out_shapes[spec.name])) * spec.dtype.itemsize
            for spec in wanted
            if outputs_fixed
        }
        regions: list[Region] = []
        try:
            in_region = await self._pool.acquire(in_bytes, remaining)
            regions.append(in_region)
            request, offset = [], 0
            for name, array in arrays.items():
                shm.set_shared_memory_region(in_region.handle, [array], offset=offset)
                tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
                tensor.set_shared_memory(in_region.name, array.nbytes, offset=offset)
                request.append(tensor)
                offset += array.nbytes
            requested, out_offsets = [], {}
            out_region = None
            if outputs_fixed:
                out_region = await self._pool.acquire(max(sum(out_bytes.values()), 1), remaining)
                regions.append(out_region)
            offset = 0
            for spec in wanted:
                output = grpcclient.InferRequestedOutput(spec.name)
                if out_region is not None:
                    output.set_shared_memory(out_region.name, out_bytes[spec.name], offset=offset)
                    out_offsets[spec.name] = offset
                    offset += out_bytes[spec.name]
                requested.append(output)
            try:
                result = await self._client.infer(model, request, outputs=requested, client_timeout=remaining)
            except InferenceServerException as exc:
                if "shared memory region" in (exc.message() or ""):
                    # Server restarted between two calls and forgot the regions: re-register, retry.
                    self._pool.invalidate()
                    raise InferenceServerException(exc.message(), status="StatusCode.UNAVAILABLE") from exc
                raise
            answer = {}
            for spec in wanted:
                if out_region is None:
                    answer[spec.name] = result.as_numpy(spec.name)
                else:
                    view = shm.get_contents_as_numpy(
                        out_region.handle, spec.dtype, out_shapes[spec.name], offset=out_offsets[spec.name]
                    )
                    answer[spec.name] = np.array(view, copy=True)  # the region is reused by the next request
            return answer
        finally:
            for region in regions:
                self._pool.release(region)

    async def close(self) -> None:
        await self._pool.close()
        await self._client.close()
