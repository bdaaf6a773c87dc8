"""The capability-neutral service scaffold: what every wlcad gRPC service does the same way.

Compute slots (a burst queues, visible as ``wlcad_queue_depth``, instead of thrashing two cores),
upload receiving (voxel chunks copied straight into a pre-sized buffer), deadlines while waiting,
error mapping (:func:`services.api.status.grpc_status`), metrics and log lines, ``Describe`` and
model-availability reporting. A capability subclasses :class:`CapabilityServicer`, implements its
RPCs as one-liners over :meth:`~CapabilityServicer.handle` / :meth:`~CapabilityServicer.handle_upload`
and lists its methods in :meth:`~CapabilityServicer.methods`; it never touches concurrency.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf.message import Message

from services.api import limits
from services.api.convert import expected_bytes, volume_from_proto
from services.api.pb import common_pb2
from services.api.sources import remove_stale_temp, volume_from_file, volume_from_source
from services.api.status import ANSWERED_BY_SERVICE, grpc_status
from services.api.upload import UploadShape
from services.core.errors import InputError
from services.core.version import software_version
from services.core.volume import Volume
from services.core.work_budget import (
    DeadlineExceededError,
    RequestCancelledError,
    WorkBudget,
    checkpoint,
    scope,
)
from services.core.work_budget import current as current_budget
from services.inference.factory import BackendProbe, default_repository
from services.inference.repository import ModelRepository
from services.servers.grpc_server import parse_request
from services.servers.memory import trim_freed_memory
from services.servers.observability import IN_FLIGHT, QUEUE_DEPTH, observe

if TYPE_CHECKING:
    from services.gateway.auth import TokenSet

log = logging.getLogger("wlcad.serving")
T = TypeVar("T")
R = TypeVar("R", bound=Message)
P = TypeVar("P")


@dataclass(frozen=True)
class ServiceSettings:
    """What ``wlcad serve <capability>`` configures, the same for every capability."""

    dicomweb_servers: tuple[str, ...] = ()
    compute_slots: int = 2
    inference_setting: str | None = None  # None/"embedded" or triton://host:port
    model_repository: Path | None = None
    #: The longest any request may take, receiving included: the deadline of a caller that gave none
    #: (or a longer one), so no request can hold a thread or a compute slot without bound.
    max_request_s: float = 600.0

    def __post_init__(self) -> None:
        if self.compute_slots < 1:
            raise InputError(f"must be >= 1, got {self.compute_slots}", field="compute_slots")
        if not 0 < self.max_request_s <= 24 * 3600:
            raise InputError(f"must be in (0, 86400] s, got {self.max_request_s}", field="max_request_s")


@dataclass(frozen=True)
class MethodStatus:
    """One method (or model) a service offers and whether it can run now (``Describe``)."""

    name: str
    available: bool = True
    reason: str = ""
    model_version: str = ""


class DeadlineWhileQueuedError(DeadlineExceededError):
    """The caller's deadline passed while its request waited for a compute slot."""

    def __init__(self) -> None:
        super().__init__("the wait for a compute slot")


#: How often a request waiting for a compute slot looks whether its caller is still there: the
#: bound on how long a cancelled request keeps its place in the queue.
_SLOT_POLL_S = 0.05


class CapabilityServicer:
    """Base of every capability's servicer; ``component`` names it in metrics and logs."""

    component = "service"

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self._slots = threading.BoundedSemaphore(settings.compute_slots)
        self._uploads = _UploadCount()
        self.repository = (
            Path(settings.model_repository) if settings.model_repository else default_repository()
        )

    # -- what a capability provides ---------------------------------------------------------------
    def methods(self) -> Sequence[MethodStatus]:
        """The methods or models this service offers now (override)."""
        return ()

    def close(self) -> None:
        """Release models and backends when the process stops (override when holding any)."""

    def readiness_probe(self) -> BackendProbe:
        """Whether the configured inference backend serves the models this service's methods use:
        the service's readiness (its own health name), while liveness ("") stays SERVING so that
        methods needing no model keep working when Triton is down."""
        models = sorted(  # "cade_x/1+cade_x_fpr/1": a method served by two models needs both
            {
                part.split("/")[0]
                for m in self.methods()
                if m.available and m.model_version
                for part in m.model_version.split("+")
            }
        )
        return BackendProbe(self.settings.inference_setting, self.repository, models)

    # -- shared RPC ---------------------------------------------------------------------------------
    def Describe(self, request: common_pb2.DescribeRequest, context: grpc.ServicerContext):  # noqa: N802 - gRPC names
        return self.handle("Describe", context, self.describe, use_slot=False)

    def describe(self) -> common_pb2.ServiceDescription:
        return common_pb2.ServiceDescription(
            methods=[
                common_pb2.MethodInfo(
                    name=m.name, available=m.available, reason=m.reason, model_version=m.model_version
                )
                for m in self.methods()
            ],
            software_version=software_version(),
            inference_backend=self.settings.inference_setting or "embedded",
        )

    # -- helpers for the capability's RPCs ---------------------------------------------------------
    def model_status(self, name: str, model: str) -> MethodStatus:
        """``name`` is available when ``model`` has a version in the model repository."""
        try:
            versions = ModelRepository(self.repository).versions(model)
        except (InputError, OSError):
            versions = []
        if not versions:
            return MethodStatus(
                name,
                available=False,
                reason=f"the {name} method needs model {model} in the model repository, which does not hold it yet",
            )
        return MethodStatus(name, model_version=f"{model}/{versions[-1]}")

    def image(self, source: Message) -> Volume:
        """The Volume of a request's ``ImageSource`` (voxels, file or an allowed DICOMweb server)."""
        return volume_from_source(source, self.settings.dicomweb_servers)

    def handle(
        self, method: str, context: grpc.ServicerContext, work: Callable[[], T], use_slot: bool = True
    ) -> T:
        """Run ``work`` (in a compute slot unless ``use_slot`` is false) under the request's budget,
        with metrics, one log line and every failure mapped to a gRPC status; never returns on
        failure (``context.abort`` raises).

        The budget is the caller's deadline capped by ``max_request_s`` (which is also the deadline
        of a caller that gave none) and the caller's presence: the stages below stop at their next
        :func:`~services.core.work_budget.checkpoint` once either ends, so an abandoned request
        frees its slot instead of computing an answer nobody reads. A request past the service's own
        limit is cancelled by a timer, which also ends a read blocked on a stalled stream."""
        started = time.perf_counter()
        IN_FLIGHT.labels(self.component).inc()
        code, message = grpc.StatusCode.OK, ""
        budget, watchdog = self._budget(context)
        try:
            with scope(budget):
                if use_slot:
                    with self.slot():
                        return work()
                return work()
        except Exception as exc:
            code, message = self._failure(method, context, budget, exc)
            # grpcio keeps the RpcError a cancelled stream raised (and so its traceback's frames)
            # in the call's state, which its abort() puts in a reference cycle: without this an
            # upload buffer in those frames lived until a full garbage collection (the service's
            # RSS went 222 → 1287 MiB over three rounds of cancelled 32 MiB uploads).
            traceback.clear_frames(exc.__traceback__)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            IN_FLIGHT.labels(self.component).dec()
            observe(self.component, method, code.name, started)
        context.set_trailing_metadata(((ANSWERED_BY_SERVICE, self.component),))
        context.abort(code, message)
        raise AssertionError("unreachable")  # context.abort raises

    def _budget(self, context: grpc.ServicerContext) -> tuple[WorkBudget, threading.Timer | None]:
        """The request's budget, and the timer cancelling it at the service's limit when the caller's
        own deadline is later (gRPC cancels a call at the caller's deadline by itself)."""
        limit = self.settings.max_request_s
        caller = context.time_remaining()
        budget = WorkBudget.from_timeout(
            min(limit, caller) if caller is not None else limit, context.is_active
        )
        if caller is not None and caller <= limit:
            return budget, None
        watchdog = threading.Timer(limit, context.cancel)
        watchdog.daemon = True
        watchdog.start()
        return budget, watchdog

    def _failure(
        self, method: str, context: grpc.ServicerContext, budget: WorkBudget, exc: Exception
    ) -> tuple[grpc.StatusCode, str]:
        """The status for a failed request, and its log line. A request whose caller left or whose
        deadline passed ends as CANCELLED / DEADLINE_EXCEEDED whatever the stage raised (a stream
        read raises a bare RpcError then): an abandoned call is not a service failure, so it is
        logged at info and never feeds the error-ratio alert."""
        if not isinstance(exc, RequestCancelledError | DeadlineExceededError):
            # Not raised: a raised one would keep ``exc`` (its context) and so the frames of the
            # failed stage, an upload's buffer among them, alive in a reference cycle until the
            # cyclic garbage collector happens to run (223 → 1628 MiB RSS after cancel rounds).
            exc = budget.ended("the request") or exc
        if isinstance(exc, RequestCancelledError):
            log.info("%s %s cancelled by the caller during %s", self.component, method, exc.stage)
            return grpc.StatusCode.CANCELLED, str(exc)
        if isinstance(exc, DeadlineExceededError):
            log.info("%s %s stopped: the deadline passed during %s", self.component, method, exc.stage)
            return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
        code, message, incident = grpc_status(exc)
        if incident:
            log.error("%s %s failed: %s (incident %s)", self.component, method, type(exc).__name__, incident)
        elif isinstance(exc, InputError):
            log.info("%s %s refused: invalid field %s", self.component, method, exc.field)
        return code, message

    def handle_upload(
        self,
        method: str,
        context: grpc.ServicerContext,
        messages: Iterator[bytes],
        shape: UploadShape,
        prepare: Callable[[R], P],
        compute: Callable[[P, Volume], T],
    ) -> T:
        """An upload RPC: the first message's request is decoded and ``prepare``-d (validated into what
        ``compute`` needs) before any voxel arrives, so an unknown method costs the caller nothing; the
        chunks are received outside a compute slot (a slow network does not block computing), then
        ``compute(prepared, image)`` runs in one."""

        def work() -> T:
            with self._uploads:
                prepared, image = self.receive_upload(messages, shape, prepare)
                with self.slot():
                    return compute(prepared, image)

        return self.handle(method, context, work, use_slot=False)

    def slot(self) -> _Slot:
        """A compute slot, waited for while the current request's budget lasts."""
        return _Slot(self)

    def receive_upload(
        self, messages: Iterator[bytes], shape: UploadShape, prepare: Callable[[R], P]
    ) -> tuple[P, Volume]:
        """``prepare(request)`` and the Volume of one upload stream (bytes of the upload shape's messages)."""
        data = next(messages, None)
        first = None if data is None else parse_request(shape.message_class, data)
        if (
            first is None
            or first.WhichOneof(shape.request_field.containing_oneof.name) != shape.request_field.name
        ):
            raise InputError("the first message of an upload must carry the request", field="request")
        request = getattr(first, shape.request_field.name)
        prepared = prepare(request)
        image_name = shape.image_field.name
        source = getattr(request, image_name)
        kind = source.WhichOneof("source")
        field = f"request.{image_name}"
        if kind == "volume":
            if source.volume.data:
                raise InputError(
                    "must be empty in an upload; send voxels in chunks", field=f"{field}.volume.data"
                )
            buffer = _volume_buffer(expected_bytes(source.volume, f"{field}.volume"))
        elif kind == "file":
            if source.file.content:
                raise InputError(
                    "must be empty in an upload; send bytes in chunks", field=f"{field}.file.content"
                )
            buffer = bytearray()
        else:
            raise InputError("an upload carries a volume or a file", field=field)
        received = _receive_chunks(messages, shape, buffer, fixed=kind == "volume")
        if kind == "volume":
            if received != len(buffer):
                _caller_left_within(_SHORT_STREAM_GRACE_S)
                raise InputError(
                    f"the stream ended after {received} of {len(buffer)} bytes", field="chunk.data"
                )
            return prepared, volume_from_proto(source.volume, data=buffer, field=f"{field}.volume")
        return prepared, volume_from_file(source.file.filename, buffer, f"{field}.file")


class _UploadCount:
    """Uploads in progress; when the last one ends, freed memory is handed back to the system.

    An upload's 4 MiB chunk messages are freed as they are copied, but glibc keeps freed heap
    blocks (its mmap threshold rises to the chunk size after the first one), so after rounds of
    cancelled uploads the service's RSS stayed near the rounds' peak (223 → 1628 MiB, peak 2505).
    Trimming when no upload is left costs a few ms per burst, on a thread of its own so that no
    answer waits for it; under steady load the freed blocks are reused by the next uploads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def __enter__(self) -> None:
        with self._lock:
            self._count += 1

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            self._count -= 1
            last = self._count == 0
        if last:
            threading.Thread(target=trim_freed_memory, name="trim", daemon=True).start()


class _Slot:
    """One compute slot, waited for no longer than the request's budget (deadline or cancel)."""

    def __init__(self, owner: CapabilityServicer) -> None:
        self._owner = owner

    def __enter__(self) -> None:
        depth = QUEUE_DEPTH.labels(self._owner.component)
        depth.inc()
        try:
            while not self._owner._slots.acquire(timeout=_SLOT_POLL_S):
                try:
                    checkpoint("the wait for a compute slot")
                except DeadlineExceededError:
                    raise DeadlineWhileQueuedError() from None
        finally:
            depth.dec()

    def __exit__(self, *exc_info) -> None:
        self._owner._slots.release()


#: How long an upload that ended short waits to learn whether its caller cancelled: a gateway
#: cancelling its upstream call can end the stream cleanly just before the cancel itself arrives.
_SHORT_STREAM_GRACE_S = 0.02


def _caller_left_within(seconds: float) -> None:
    """Raise :class:`RequestCancelledError` if the current request's caller is gone, or goes within
    ``seconds`` (a short stream is the caller's mistake only when the caller still waits)."""
    budget = current_budget()
    if budget is None:
        return
    end = time.monotonic() + seconds
    while budget.is_active() and time.monotonic() < end:
        time.sleep(0.002)
    checkpoint("receiving the upload")


def _volume_buffer(size: int) -> bytearray | memoryview:
    """A byte buffer for an upload's voxels, its pages mapped up front (``MAP_POPULATE``).

    ``bytearray(size)`` zero-fills page by page, one page fault each: ~0.15 s per 150 MiB in this
    VM, a third of the upload. Populating the mapping in one call costs ~0.08 s, steadily; numpy's
    transparent huge pages were faster when free huge pages existed but stalled 0.3-0.7 s on memory
    compaction when not. Every byte is written before use, or the upload is refused."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if not populate or size == 0:
        return bytearray(size)
    return memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate))


def _chunk_bytes(message: bytes, shape: UploadShape, number: int) -> bytes | memoryview:
    """A chunk's data: a view into the message in the usual encoding, else decoded by protobuf."""
    data = shape.chunk_data(message)
    if data is not None:
        return data
    parsed = parse_request(shape.message_class, message)
    if parsed.WhichOneof(shape.chunk_field.containing_oneof.name) != shape.chunk_field.name:
        raise InputError(f"message {number}: only chunks may follow the request", field="request")
    return getattr(parsed, shape.chunk_field.name).data


def _receive_chunks(
    messages: Iterator[bytes], shape: UploadShape, buffer: bytearray | memoryview, fixed: bool
) -> int:
    """Copy chunk bytes into ``buffer`` (pre-sized when ``fixed``); returns the bytes received."""
    view = memoryview(buffer) if fixed else None
    received = 0
    for number, message in enumerate(messages, start=1):
        checkpoint("receiving the upload")
        data = _chunk_bytes(message, shape, number)
        if len(data) > limits.MAX_CHUNK_BYTES:
            raise InputError(
                f"message {number}: chunks are at most {limits.MAX_CHUNK_BYTES} bytes", field="chunk.data"
            )
        if fixed:
            if received + len(data) > len(buffer):
                raise InputError(f"more bytes than the volume's {len(buffer)}", field="chunk.data")
            view[received : received + len(data)] = data
        else:
            if received + len(data) > limits.MAX_UPLOAD_BYTES:
                raise InputError(f"the file exceeds {limits.MAX_UPLOAD_BYTES} bytes", field="chunk.data")
            buffer += data
        received += len(data)
    return received


def serve_capability(
    name: str,
    settings: ServiceSettings,
    address: str,
    metrics_address: str | None,
    tokens: TokenSet | None = None,
) -> int:
    """Run the service process of capability ``name`` until SIGTERM; with ``tokens``, every RPC
    but health checks needs one of their bearer tokens (a service reachable beyond loopback)."""
    from google.protobuf import descriptor_pool

    from services.capabilities import capability
    from services.servers.grpc_server import run_service, servicer_handler
    from services.servers.service_auth import ServiceAuthInterceptor

    removed = remove_stale_temp()  # request folders of a killed predecessor (SIGKILL skips cleanup)
    if removed:
        log.warning("removed %d temporary folders of stopped wlcad processes", len(removed))
    entry = capability(name)
    servicer = entry.servicer_factory()(settings)
    service = descriptor_pool.Default().FindServiceByName(entry.service)
    probe = servicer.readiness_probe()

    def stop() -> None:
        probe.close()
        servicer.close()

    return run_service(
        service.full_name,
        lambda server: server.add_generic_rpc_handlers((servicer_handler(servicer, service),)),
        address,
        metrics_address,
        on_stop=stop,
        readiness=probe,
        interceptors=(ServiceAuthInterceptor(tokens),) if tokens is not None else (),
    )
