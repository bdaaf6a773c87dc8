"""The gateway's HTTP side against hostile or careless clients, over real sockets to a real gateway
process on 127.0.0.1: uploads streamed with the size limit enforced while reading (a chunked body
past the limit is refused with 413, nothing spooled to disk, the upstream never handed a truncated
image as a whole one), header and body read timeouts, the request deadline covering the body,
``application/json`` required on JSON endpoints, and the bearer scheme matched case-insensitively.

The upstream is a recording gRPC server in this process (it takes the raw upload stream and
discards it), so a 1 GiB body costs the gateway's work only. Waits are liveness bounds several times
the configured timeouts; the measured times are printed (``pytest -s``)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from services.api import limits
from services.api.pb import label_estimation_pb2 as pb
from services.api.upload import method_upload_shape
from services.gateway.auth import TokenSet, hash_token
from services.gateway.http_limits import LIMITS
from tests.serving_support import Process, start_gateway, until, wait_serving

pytestmark = pytest.mark.timeout(240)

SERVICE = "wlcad.v1.LabelEstimation"
SHAPE = method_upload_shape(
    pb.DESCRIPTOR.services_by_name["LabelEstimation"].methods_by_name["EstimateUpload"]
)
BOUNDARY = "hardening-boundary-7c1d"
REQUEST_JSON = json.dumps(
    {"method": "sphere", "lesions": [{"lesion_id": 1, "center_mm": [0, 0, 0], "diameter_mm": 10}]}
).encode()
#: Bounds on waits, several times the configured timeouts: only a hang runs them out.
BOUND_S = 4 * max(LIMITS.header_timeout_s, LIMITS.body_grace_s + LIMITS.body_idle_timeout_s)


@dataclass
class _Upload:
    """What the upstream received on one EstimateUpload call."""

    first: bytes = b""
    chunks: int = 0
    largest_chunk: int = 0
    data_bytes: int = 0
    digest: object = field(default_factory=hashlib.sha256)
    completed: bool = False  # the gateway half-closed the stream (it claims the image is whole)
    ended: threading.Event = field(default_factory=threading.Event)


class _RecordingUpstream:
    """A gRPC server taking EstimateUpload as raw bytes and answering an empty EstimateResponse; every
    other RPC is UNIMPLEMENTED, which tells a test that the gateway let the call through.

    A stream the gateway cancels and one it half-closes look alike to the handler until the cancel
    is seen (both end the request iterator), so at the end of a stream the handler waits up to
    ``hold_s`` for the call to end before deciding: a cancel ends it within milliseconds, while a
    half-closed call waits for this answer. Tests that expect a completed stream set ``hold_s = 0``."""

    def __init__(self) -> None:
        self.uploads: list[_Upload] = []
        self.hold_s = BOUND_S
        self.server = grpc.server(
            futures.ThreadPoolExecutor(4),
            options=[("grpc.max_receive_message_length", limits.MAX_MESSAGE_BYTES)],
        )
        handler = grpc.stream_unary_rpc_method_handler(self._upload)
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, {"EstimateUpload": handler})]
        )
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _upload(self, messages, context) -> bytes:
        record = _Upload()
        self.uploads.append(record)
        call_ended = threading.Event()
        context.add_callback(call_ended.set)
        try:
            for message in messages:
                if not record.first:
                    record.first = message
                    continue
                data = SHAPE.chunk_data(message)
                record.chunks += 1
                record.largest_chunk = max(record.largest_chunk, len(data))
                record.data_bytes += len(data)
                record.digest.update(data)
            if self.hold_s:
                call_ended.wait(self.hold_s)
            record.completed = context.is_active()
        except grpc.RpcError:
            pass  # the gateway cancelled the stream
        finally:
            record.ended.set()
        return b""


@dataclass
class _Gateway:
    process: Process
    grpc_address: str
    port: int
    tmp: Path  # the gateway's TMPDIR: a spooled upload would show up here


def _start_gateway(log_dir: Path, upstream: str, extra: list[str] | None = None) -> _Gateway:
    tmp = log_dir / "gateway-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    process, grpc_address, http_url = start_gateway(log_dir, upstream, extra, env={"TMPDIR": str(tmp)})
    try:
        wait_serving(grpc_address)
    except TimeoutError:
        process.stop()
        raise
    return _Gateway(process, grpc_address, int(http_url.rsplit(":", 1)[1]), tmp)


@pytest.fixture(scope="module")
def upstream():
    server = _RecordingUpstream()
    yield server
    server.server.stop(grace=None)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream):
    started = _start_gateway(tmp_path_factory.mktemp("http-hardening"), upstream.address)
    yield started
    started.process.stop()


# --- raw HTTP over sockets -------------------------------------------------------------------


def _connect(gateway: _Gateway, timeout: float = BOUND_S) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gateway.port), timeout=timeout)


def _head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def _read_answer(sock: socket.socket) -> _Answer:
    """One HTTP/1.1 response with a Content-Length body (what the gateway's JSON answers carry)."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise ConnectionError(f"closed before a full response: {data[:200]!r}")
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        body += piece
    return _Answer(int(status_line.split()[1]), headers, body[:length])


def _closed_by_peer(sock: socket.socket) -> bool:
    """True once the server has closed the connection (EOF or reset), reading off any answer."""
    try:
        while piece := sock.recv(65536):
            del piece
    except (ConnectionResetError, BrokenPipeError):
        pass
    return True


def _part(name: str, content: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"


def _file_part_head(filename: str = "image.nii") -> bytes:
    disposition = f'form-data; name="file"; filename="{filename}"'
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()


CLOSING = f"\r\n--{BOUNDARY}--\r\n".encode()
FORM = f"multipart/form-data; boundary={BOUNDARY}"


def _chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _post(gateway: _Gateway, path: str, body: bytes, headers: dict[str, str]) -> _Answer:
    with _connect(gateway) as sock:
        sock.sendall(_head("POST", path, {"Content-Length": str(len(body)), **headers}) + body)
        return _read_answer(sock)


def _trickle(sock: socket.socket, piece: bytes, interval_s: float) -> tuple[bytes, float]:
    """Send ``piece`` every ``interval_s`` until the server answers and closes (or BOUND_S passes):
    (everything it sent, seconds to its first byte). A thread reads all along, so the answer is
    taken before a send into the closed connection can reset it."""
    received, first_byte_at, closed = bytearray(), [math.inf], threading.Event()
    started = time.monotonic()

    def read() -> None:
        try:
            while piece_in := sock.recv(65536):
                first_byte_at[0] = min(first_byte_at[0], time.monotonic())
                received.extend(piece_in)
        except OSError:
            pass
        closed.set()

    threading.Thread(target=read, daemon=True).start()
    while not closed.wait(interval_s) and time.monotonic() - started < BOUND_S:
        try:
            sock.sendall(piece)
        except OSError:
            break  # closed by the server; the reader has its answer
    closed.wait(BOUND_S)
    return bytes(received), first_byte_at[0] - started


def _gateway_temp_files(gateway: _Gateway) -> list[str]:
    """Files the gateway holds open under its TMPDIR (a spooled upload is an unlinked one there)."""
    found = []
    for fd in Path(f"/proc/{gateway.process.pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(gateway.tmp)):
            found.append(target)
    return found


def _large_files(folder: Path) -> list[Path]:
    """Files over 1 MiB (a spooled upload; libraries leave small session files in TMPDIR)."""
    return [path for path in folder.rglob("*") if path.is_file() and path.stat().st_size > 2**20]


# --- uploads ------------------------------------------------------------------------------------


def test_chunked_upload_past_the_limit_is_refused_while_reading(gateway, upstream):
    """A chunked body (no Content-Length) whose file passes MAX_UPLOAD_BYTES: 413 naming the file,
    the gateway stops reading near the limit, spools nothing, and the upstream's stream is cancelled,
    never half-closed as if the truncated image were whole."""
    before = len(upstream.uploads)
    rss_before = gateway.process.rss_bytes()
    piece = b"\0" * (1024 * 1024)
    total = limits.MAX_UPLOAD_BYTES + 64 * len(piece)
    sent, temp_files = [0], set()
    sock = _connect(gateway)
    head = _head("POST", "/v1/labels:upload", {"Content-Type": FORM, "Transfer-Encoding": "chunked"})
    sock.sendall(head + _chunked(_part("request", REQUEST_JSON) + _file_part_head()))

    def send_file() -> None:
        try:
            while sent[0] < total:
                sock.sendall(_chunked(piece))
                sent[0] += len(piece)
                if sent[0] % (64 * len(piece)) == 0:
                    temp_files.update(_gateway_temp_files(gateway))
            sock.sendall(_chunked(CLOSING) + b"0\r\n\r\n")
        except OSError:
            pass  # the gateway answered and closed: the rest is never read

    started = time.monotonic()
    sender = threading.Thread(target=send_file, daemon=True)
    sender.start()
    answer = _read_answer(sock)
    sender.join(BOUND_S)
    sock.close()
    elapsed = time.monotonic() - started
    assert answer.status == 413, answer
    assert (
        answer.json()["message"].startswith("file:")
        and str(limits.MAX_UPLOAD_BYTES) in answer.json()["message"]
    )
    assert answer.headers.get("connection") == "close"
    assert not sender.is_alive()
    assert sent[0] < total, "the gateway read the whole oversize body"
    assert sent[0] <= limits.MAX_UPLOAD_BYTES + 32 * len(piece)
    assert temp_files == set() and _large_files(gateway.tmp) == []
    assert len(upstream.uploads) == before + 1
    record = upstream.uploads[-1]
    assert record.ended.wait(BOUND_S)
    assert not record.completed and record.data_bytes <= limits.MAX_UPLOAD_BYTES
    rss_after = gateway.process.rss_bytes()
    print(
        f"\noversize chunked upload: 413 after {elapsed:.1f} s; client sent {sent[0] / 2**20:.0f} MiB of "
        f"{total / 2**20:.0f}; upstream got {record.data_bytes / 2**20:.0f} MiB, not completed; gateway RSS "
        f"{rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB"
    )
    assert rss_after - rss_before < 256 * 2**20  # at most a few chunks held at once, never the body


def test_upload_is_forwarded_as_it_arrives(gateway, upstream):
    """The first chunks reach the upstream while the client still holds the rest of the file back:
    the gateway streams the body instead of reading it whole first. The upstream then gets the
    request, the exact bytes in chunks of at most MAX_CHUNK_BYTES, and a completed stream."""
    upstream.hold_s = 0  # this stream is meant to complete: answer at once
    try:
        before = len(upstream.uploads)
        data = os.urandom(2 * limits.MAX_CHUNK_BYTES + 12345)
        split = limits.MAX_CHUNK_BYTES + 1000
        with _connect(gateway) as sock:
            head = _head("POST", "/v1/labels:upload", {"Content-Type": FORM, "Transfer-Encoding": "chunked"})
            sock.sendall(head + _chunked(_part("request", REQUEST_JSON) + _file_part_head("ct.nii.gz")))
            sock.sendall(_chunked(data[:split]))
            record = until(
                lambda: upstream.uploads[before] if len(upstream.uploads) > before else None, "upload started"
            )
            until(
                lambda: record.chunks >= 1 or None, "the first chunk forwarded before the body ended", BOUND_S
            )
            assert not record.ended.is_set()
            sock.sendall(_chunked(data[split:]) + _chunked(CLOSING) + b"0\r\n\r\n")
            answer = _read_answer(sock)
        assert answer.status == 200, answer
        assert record.ended.wait(BOUND_S) and record.completed
        assert (
            record.data_bytes == len(data) and record.digest.hexdigest() == hashlib.sha256(data).hexdigest()
        )
        assert record.largest_chunk == limits.MAX_CHUNK_BYTES and record.chunks == 3
        first = SHAPE.message_class.FromString(record.first)
        request = getattr(first, SHAPE.request_field.name)
        assert request.image.file.filename == "ct.nii.gz" and request.lesions[0].diameter_mm == 10
    finally:
        upstream.hold_s = BOUND_S


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (
            _file_part_head() + b"xx" + b"\r\n" + _part("request", REQUEST_JSON) + CLOSING[2:],
            "request: send the request part before",
        ),
        (_part("other", b"1") + _file_part_head() + b"xx" + CLOSING, "other: unknown part"),
        (_part("request", REQUEST_JSON) + _file_part_head() + b"xx", "ended before its closing boundary"),
        (
            _part("request", REQUEST_JSON) + _part("file", b"not a file part") + CLOSING[2:],
            "file: give the image as a file part",
        ),
        (_part("request", b"{not json") + _file_part_head() + b"xx" + CLOSING, "request: not valid JSON"),
    ],
    ids=["request-after-file", "unknown-part", "cut-short", "file-without-filename", "bad-request-json"],
)
def test_malformed_uploads_are_refused_naming_the_part(gateway, upstream, body, needle):
    """Refused with 400 naming the part, and the upstream never gets a completed stream."""
    before = len(upstream.uploads)
    answer = _post(gateway, "/v1/labels:upload", body, {"Content-Type": FORM})
    assert answer.status == 400, answer
    assert needle in answer.json()["message"] and "Traceback" not in answer.json()["message"]
    for record in upstream.uploads[before:]:
        assert record.ended.wait(BOUND_S) and not record.completed


def test_declared_oversize_and_wrong_types_are_refused_before_reading(gateway):
    with _connect(gateway) as sock:  # a Content-Length over the limit: 413 before any body byte
        sock.sendall(
            _head("POST", "/v1/labels:upload", {"Content-Type": FORM, "Content-Length": str(10**12)})
        )
        answer = _read_answer(sock)
        assert answer.status == 413 and answer.json()["message"].startswith("body:")
        assert answer.headers.get("connection") == "close" and _closed_by_peer(sock)
    answer = _post(gateway, "/v1/labels:upload", b"{}", {"Content-Type": "application/json"})
    assert answer.status == 415 and "multipart/form-data" in answer.json()["message"]


# --- JSON endpoints: Content-Type ---------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_json_endpoints_refuse_other_content_types(gateway, content_type):
    """A web page can POST text/plain or a form to a loopback gateway without a CORS preflight; the
    JSON endpoints refuse anything but application/json with 415."""
    headers = {"Content-Type": content_type} if content_type else {}
    answer = _post(gateway, "/v1/labels:estimate", REQUEST_JSON, headers)
    assert answer.status == 415, answer
    assert answer.json() == {"code": "INVALID_ARGUMENT", "message": "Content-Type: must be application/json"}


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON; charset=utf-8"])
def test_json_content_type_is_accepted(gateway, content_type):
    answer = _post(gateway, "/v1/labels:estimate", REQUEST_JSON, {"Content-Type": content_type})
    assert answer.status == 501, answer  # through to the upstream, which has no Estimate


@pytest.mark.parametrize(
    "browser_headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
    ],
    ids=["foreign-origin", "opaque-origin", "sec-fetch-cross-site"],
)
@pytest.mark.parametrize("path", ["/v1/labels:estimate", "/v1/labels:upload"])
def test_requests_made_by_other_sites_pages_are_refused(gateway, upstream, path, browser_headers):
    """A multipart POST needs no CORS preflight, so another site's page could make the reader's
    browser upload to a token-less loopback gateway; browsers mark such requests, API clients don't."""
    content_type = "application/json" if path.endswith("estimate") else FORM
    answer = _post(gateway, path, REQUEST_JSON, {"Content-Type": content_type, **browser_headers})
    assert answer.status == 403, answer
    assert answer.json()["message"].startswith("Origin:")


def test_the_gateways_own_pages_and_api_clients_are_not_refused(gateway):
    same = _post(
        gateway,
        "/v1/labels:estimate",
        REQUEST_JSON,
        {"Content-Type": "application/json", "Origin": "http://127.0.0.1", "Sec-Fetch-Site": "same-origin"},
    )
    assert same.status == 501, same  # through to the upstream, which has no Estimate


# --- read timeouts --------------------------------------------------------------------------------


def test_a_body_trickled_at_1_byte_per_second_is_cut_with_408(gateway):
    with _connect(gateway) as sock:
        headers = {"Content-Type": "application/json", "Content-Length": "10000"}
        sock.sendall(_head("POST", "/v1/labels:estimate", headers))
        answer, elapsed = _trickle(sock, b" ", interval_s=1.0)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"connection: close" in head.lower()  # and closed: _trickle read to the end of the stream
    assert json.loads(body)["code"] == "DEADLINE_EXCEEDED" and b"body:" in body
    print(f"\n1 B/s body: 408 after {elapsed:.1f} s (grace {LIMITS.body_grace_s:g} s)")


def test_partial_headers_and_silent_connections_are_closed(gateway):
    """Slowloris: connections that send half their headers (one more header line a second) or
    nothing at all are closed by the gateway within its header timeout, while it keeps serving."""
    started = time.monotonic()
    slow = [_connect(gateway) for _ in range(20)]
    silent = [_connect(gateway) for _ in range(10)]
    for sock in slow:
        sock.sendall(b"POST /v1/labels:estimate HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    for sock in slow + silent:
        sock.setblocking(False)
    closed_at: dict[int, float] = {}
    answers: dict[int, bytes] = {}
    while len(closed_at) < len(slow) + len(silent) and time.monotonic() - started < BOUND_S:
        for index, sock in enumerate(slow + silent):
            if index in closed_at:
                continue
            try:
                if sock in slow:
                    sock.send(b"X-Slow: 1\r\n")
                piece = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                piece = b""
            answers[index] = answers.get(index, b"") + piece
            if not piece:
                closed_at[index] = time.monotonic() - started
        time.sleep(1.0)
    with _connect(gateway) as sock:  # serving the whole time
        sock.sendall(_head("GET", "/healthz", {}))
        assert _read_answer(sock).status == 200
    for sock in slow + silent:
        sock.close()
    assert len(closed_at) == len(slow) + len(silent), f"{len(closed_at)} of {len(slow) + len(silent)} closed"
    assert all(answers[i].startswith(b"HTTP/1.1 408") for i in range(len(slow)))
    print(
        f"\npartial headers: {len(slow)} slow and {len(silent)} silent connections closed after "
        f"{min(closed_at.values()):.1f}-{max(closed_at.values()):.1f} s (timeout {LIMITS.header_timeout_s:g} s)"
    )


@pytest.mark.parametrize("path", ["/v1/labels:estimate", "/v1/labels:upload"])
def test_the_deadline_covers_reading_the_body(gateway, path):
    """A body sent steadily (well above the minimum rate) but too slowly to finish within the
    caller's 2 s deadline: 504 DEADLINE_EXCEEDED near the deadline, not after the whole body."""
    if path.endswith("upload"):
        content_type, prefix = FORM, _part("request", REQUEST_JSON) + _file_part_head()
    else:
        content_type, prefix = "application/json", b'{"method": "sphere", "lesions": ['
    headers = {"Content-Type": content_type, "Transfer-Encoding": "chunked", "x-timeout-seconds": "2"}
    with _connect(gateway) as sock:
        sock.sendall(_head("POST", path, headers) + _chunked(prefix))
        answer, elapsed = _trickle(sock, _chunked(b" " * 4096), interval_s=0.25)  # 16 KiB/s
    assert answer.startswith(b"HTTP/1.1 504"), answer[:300]
    assert b"DEADLINE_EXCEEDED" in answer
    print(f"\n{path}: 504 after {elapsed:.1f} s with a 2 s deadline, body still arriving")


# --- auth -------------------------------------------------------------------------------------------


def test_bearer_scheme_is_case_insensitive():
    tokens = TokenSet([hash_token("tok")])
    for accepted in ("Bearer tok", "bearer tok", "BEARER tok", "bEaReR tok", "Bearer  tok "):
        assert tokens.check(accepted), accepted
    for refused in (
        "Bearer wrong",
        "Bearertok",
        "Basic tok",
        "bearer",
        "bearer ",
        "tok",
        "",
        None,
        "Bearer\ttok",
    ):
        assert not tokens.check(refused), refused


def test_bearer_scheme_case_through_http_and_grpc(tmp_path, upstream):
    tokens = tmp_path / "tokens"
    tokens.write_text(hash_token("s3cret") + "\n")
    started = _start_gateway(tmp_path, upstream.address, ["--tokens-file", str(tokens)])
    try:
        for authorization, status in (("bearer s3cret", 501), ("BEARER s3cret", 501), ("bearer wrong", 401)):
            with _connect(started) as sock:
                sock.sendall(_head("GET", "/v1/labels:describe", {"Authorization": authorization}))
                assert _read_answer(sock).status == status, authorization
        with grpc.insecure_channel(started.grpc_address) as channel:
            describe = channel.unary_unary(f"/{SERVICE}/Describe")
            for authorization, code in (
                ("bearer s3cret", grpc.StatusCode.UNIMPLEMENTED),
                ("bearer wrong", grpc.StatusCode.UNAUTHENTICATED),
            ):
                with pytest.raises(grpc.RpcError) as error:
                    describe(b"", timeout=30, metadata=[("authorization", authorization)])
                assert error.value.code() == code, authorization
    finally:
        started.process.stop()


def test_gateway_survived(gateway):
    assert gateway.process.alive()
    with _connect(gateway) as sock:
        sock.sendall(_head("GET", "/healthz", {}))
        assert _read_answer(sock).status == 200
