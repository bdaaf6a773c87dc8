"""The CIRCUS CS remote plug-in (``type: "CAD+remote"``): the same run as the Docker plug-in, over HTTP.

* ``POST {endpoint}/run`` with ``Authorization: Bearer <secret>`` and a multipart/form-data body whose
  ``files`` parts are the job's ``N.mhd``, ``N.raw``, ``N.json``. The request is checked before any
  answer: a bad or missing secret is 401; a body larger than the limit is 413 *from its
  Content-Length*, before a byte of it is read; anything wrong with the upload or the volumes is
  4xx with ``{"field", "message"}``. Then 200 with ``X-Request-ID`` and a ``text/event-stream`` body:
  ``log`` events while the job runs, then ``finished`` (data: the id) or ``error`` (data: one line).
* ``GET {endpoint}/result/{id}``: a tar with ``results.json`` and the attachments at its root.

The standard library's threading HTTP server is enough here: CIRCUS sends one job at a time per
plug-in, and jobs run one at a time anyway (two cores, one model). The body is streamed to disk
through python-multipart's parser (already the gateway's), so memory does not grow with the upload;
every socket read waits at most ``socket_timeout_s``, so a stalled client frees its thread. The
secret is held as its SHA-256 digest and compared in constant time. No patient data is logged: the
inputs are CIRCUS's anonymised dumps and only counts, ids and statuses reach the log.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import re
import secrets
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from services.circus.entrypoint import read_inputs, run_on_volumes, write_results
from services.circus.plugin import RESULTS_FILE, Capability
from services.core.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["RemoteConfig", "make_server", "serve"]

FIELD = "files"
_FILE_NAME = re.compile(r"^\d{1,3}\.(mhd|raw|json)$")
_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
MIN_SECRET_CHARS = 16
READ_CHUNK_BYTES = 1024 * 1024
#: A refused body is read to its end (and dropped) when no more than this is left of it.
DRAIN_MAX_BYTES = 16 * 1024 * 1024
#: Parts a job may upload: three files per volume.
MAX_PARTS = 3 * 16


@dataclass(frozen=True)
class RemoteConfig:
    capability: Capability
    host: str
    port: int
    secret_sha256: bytes
    endpoint_path: str
    work_dir: Path
    max_request_bytes: int
    method: str = "unet"
    repository: Path | None = None
    #: Finished results kept for GET; older ones are deleted.
    max_results: int = 64
    socket_timeout_s: float = 60.0
    #: The work dir is a temporary one of this server's: removed when it stops.
    owns_work_dir: bool = False

    @classmethod
    def from_options(
        cls,
        capability: Capability,
        *,
        listen: str,
        secret_file: Path,
        endpoint_path: str = "",
        work_dir: Path | None = None,
        max_request_bytes: int = 2 * 1024**3,
        method: str = "unet",
        repository: Path | None = None,
    ) -> RemoteConfig:
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise InputError(f"must be host:port, got {listen!r}", field="listen")
        try:
            secret = secret_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(
                f"cannot read {secret_file.name} ({type(exc).__name__})", field="secret-file"
            ) from None
        if len(secret) < MIN_SECRET_CHARS or any(c.isspace() for c in secret):
            raise InputError(
                f"the secret must be one word of at least {MIN_SECRET_CHARS} characters", field="secret-file"
            )
        path = "/" + endpoint_path.strip("/") if endpoint_path.strip("/") else ""
        if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)*", path):
            raise InputError(f"{endpoint_path[:64]!r} is not a plain URL path", field="endpoint-path")
        if max_request_bytes < 1024:
            raise InputError(f"must be ≥ 1024, got {max_request_bytes}", field="max-request-bytes")
        folder = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="wlcad-circus-"))
        folder.mkdir(parents=True, exist_ok=True)
        return cls(
            capability,
            host.strip("[]"),
            int(port),
            hashlib.sha256(secret.encode()).digest(),
            path,
            folder,
            max_request_bytes,
            method,
            repository,
            owns_work_dir=work_dir is None,
        )


class _RefusalError(Exception):
    """A 4xx answer: its status, the field it names and one line of reason."""

    def __init__(self, status: HTTPStatus, field: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.message = message


class _Upload:
    """python-multipart callbacks that write each ``files`` part to ``folder/<its file name>``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.names: list[str] = []
        self.ended = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._handle = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._add("_header_name", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_header_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _add(self, attribute: str, data: bytes) -> None:
        setattr(self, attribute, getattr(self, attribute) + bytes(data))
        if len(getattr(self, attribute)) > 4096:
            raise _RefusalError(HTTPStatus.BAD_REQUEST, FIELD, "a part header is longer than 4096 bytes")

    def _part_begin(self) -> None:
        self._disposition = b""
        if len(self.names) >= MAX_PARTS:
            raise _RefusalError(HTTPStatus.BAD_REQUEST, FIELD, f"more than {MAX_PARTS} parts")

    def _header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("latin-1")
        if name != FIELD:
            raise _RefusalError(
                HTTPStatus.BAD_REQUEST, name[:64] or "body", f"unknown part; send the files as '{FIELD}'"
            )
        filename = options.get(b"filename", b"").decode("latin-1")
        if not _FILE_NAME.match(filename):
            raise _RefusalError(
                HTTPStatus.BAD_REQUEST,
                FIELD,
                f"{filename[:64]!r} is not a CIRCUS input file (N.mhd, N.raw, N.json)",
            )
        if filename in self.names:
            raise _RefusalError(HTTPStatus.BAD_REQUEST, FIELD, f"{filename} was sent twice")
        self.names.append(filename)
        self._handle = open(self.folder / filename, "xb")  # noqa: SIM115 - closed in _part_end

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._handle.write(data[start:end])

    def _part_end(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _end(self) -> None:
        self.ended = True

    def close(self) -> None:
        self._part_end()


def _sse(event: str, data: str) -> bytes:
    lines = "".join(f"data: {line}\n" for line in (data.splitlines() or [""]))
    return f"event: {event}\n{lines}\n".encode()


class _Handler(BaseHTTPRequestHandler):
    server_version = "wlcad-circus"
    protocol_version = "HTTP/1.1"
    config: RemoteConfig
    run_lock: threading.Lock

    # -- plumbing -------------------------------------------------------------------------------
    def setup(self) -> None:
        self.timeout = self.config.socket_timeout_s
        super().setup()

    def log_message(self, format: str, *args) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def _json(self, status: HTTPStatus, payload: dict, headers: dict[str, str] | None = None) -> None:
        body = (json.dumps(payload) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _refuse(self, refusal: _RefusalError) -> None:
        headers = {"WWW-Authenticate": "Bearer"} if refusal.status == HTTPStatus.UNAUTHORIZED else None
        self._json(refusal.status, {"field": refusal.field, "message": refusal.message}, headers)

    def _check_auth(self) -> None:
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        if (
            scheme.lower() != "bearer"
            or not token.strip()
            or not hmac.compare_digest(digest, self.config.secret_sha256)
        ):
            raise _RefusalError(HTTPStatus.UNAUTHORIZED, "authorization", "a valid Bearer secret is required")

    # -- routes -------------------------------------------------------------------------------
    def do_POST(self) -> None:
        declared = (self.headers.get("Content-Length") or "").strip()
        unread = int(declared) if declared.isdigit() else 0  # drained if refused before the upload
        if self.path.split("?", 1)[0] != f"{self.config.endpoint_path}/run":
            self._drain(unread)
            self._json(HTTPStatus.NOT_FOUND, {"field": "path", "message": "not found"})
            return
        job_dir = None
        try:
            self._check_auth()
            length = self._content_length()
            boundary = self._boundary()
            unread = 0  # from here on _receive reads, or drains, the body itself
            request_id = secrets.token_hex(16)
            job_dir = self.config.work_dir / request_id
            (job_dir / "in").mkdir(parents=True)
            names = self._receive(length, boundary, job_dir / "in")
            try:
                volumes = read_inputs(job_dir / "in")
            except InputError as exc:
                raise _RefusalError(HTTPStatus.BAD_REQUEST, FIELD, exc.message) from None
        except _RefusalError as refusal:
            self._drain(unread)
            if job_dir is not None:
                shutil.rmtree(job_dir, ignore_errors=True)
            log.info("POST /run refused: %s %s", int(refusal.status), refusal.field)
            self._refuse(refusal)
            return
        log.info("job %s: %d file(s), %d volume(s)", request_id, len(names), len(volumes))
        self._stream_job(request_id, job_dir, volumes)

    def do_GET(self) -> None:
        prefix = f"{self.config.endpoint_path}/result/"
        path = self.path.split("?", 1)[0]
        if not path.startswith(prefix):
            self._json(HTTPStatus.NOT_FOUND, {"field": "path", "message": "not found"})
            return
        try:
            self._check_auth()
        except _RefusalError as refusal:
            self._refuse(refusal)
            return
        request_id = path[len(prefix) :]
        out = self.config.work_dir / request_id / "out"
        if not _REQUEST_ID.match(request_id) or not (out / RESULTS_FILE).is_file():
            self._json(HTTPStatus.NOT_FOUND, {"field": "id", "message": "no finished job with this id"})
            return
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for file in sorted(out.iterdir()):
                if file.is_file() and not file.name.startswith("."):
                    tar.add(file, arcname=file.name, recursive=False)
        body = buffer.getvalue()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    # -- the upload ---------------------------------------------------------------------------
    def _content_length(self) -> int:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise _RefusalError(
                HTTPStatus.LENGTH_REQUIRED, "Content-Length", "send a Content-Length, not chunks"
            )
        value = self.headers.get("Content-Length")
        if value is None:
            raise _RefusalError(HTTPStatus.LENGTH_REQUIRED, "Content-Length", "is required")
        if not value.strip().isdigit():
            raise _RefusalError(
                HTTPStatus.BAD_REQUEST, "Content-Length", f"{value[:32]!r} is not a byte count"
            )
        length = int(value)
        if length > self.config.max_request_bytes:
            raise _RefusalError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "Content-Length",
                f"{length} bytes is more than the limit of {self.config.max_request_bytes}",
            )
        return length

    def _boundary(self) -> bytes:
        media_type, options = parse_options_header(self.headers.get("Content-Type") or "")
        if media_type != b"multipart/form-data":
            raise _RefusalError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Content-Type", "must be multipart/form-data"
            )
        boundary = options.get(b"boundary")
        if not boundary or len(boundary) > 200:
            raise _RefusalError(
                HTTPStatus.BAD_REQUEST, "Content-Type", "multipart/form-data needs a boundary"
            )
        return boundary

    def _receive(self, length: int, boundary: bytes, folder: Path) -> list[str]:
        upload = _Upload(folder)
        parser = MultipartParser(boundary, upload.callbacks())
        left = length
        try:
            while left > 0:
                chunk = self.rfile.read(min(READ_CHUNK_BYTES, left))
                if not chunk:
                    raise _RefusalError(HTTPStatus.BAD_REQUEST, "body", "ended before its Content-Length")
                left -= len(chunk)
                parser.write(chunk)
        except FormParserError as exc:
            self._drain(left)
            raise _RefusalError(
                HTTPStatus.BAD_REQUEST, "body", f"not valid multipart/form-data ({str(exc)[:120]})"
            ) from None
        except _RefusalError:
            self._drain(left)
            raise
        except TimeoutError:
            raise _RefusalError(HTTPStatus.REQUEST_TIMEOUT, "body", "the client stopped sending") from None
        finally:
            upload.close()
        if not upload.ended:
            raise _RefusalError(HTTPStatus.BAD_REQUEST, "body", "the multipart body has no closing boundary")
        if not upload.names:
            raise _RefusalError(HTTPStatus.BAD_REQUEST, FIELD, "no files were sent")
        return upload.names

    def _drain(self, left: int) -> None:
        """Read (and drop) the rest of a refused body when it is small and within the limit, so that
        a client still sending it reads the 4xx instead of a connection reset; a larger rest (a body
        over the limit above all) is never read: the connection is closed after the answer."""
        if 0 < left <= min(DRAIN_MAX_BYTES, self.config.max_request_bytes):  # never past the limit
            try:
                while left > 0 and (chunk := self.rfile.read(min(READ_CHUNK_BYTES, left))):
                    left -= len(chunk)
            except OSError:
                pass

    # -- the job ------------------------------------------------------------------------------
    def _stream_job(self, request_id: str, job_dir: Path, volumes: list) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Request-ID", request_id)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def emit(event: str, data: str) -> None:
            try:
                self.wfile.write(_sse(event, data))
                self.wfile.flush()
            except OSError:
                pass  # the caller left; the job still finishes and its result can be fetched

        emit("log", f"{len(volumes)} volume(s) received")
        try:
            with self.run_lock:
                results = run_on_volumes(
                    self.config.capability,
                    volumes,
                    repository=self.config.repository,
                    method=self.config.method,
                    progress=lambda line: emit("log", line),
                )
                write_results(results, job_dir / "out")
        except InputError as exc:
            log.info("job %s failed: %s", request_id, exc.field)
            emit("error", str(exc))
        except Exception as exc:  # one line to the caller; the type only to the log
            log.warning("job %s failed: %s", request_id, type(exc).__name__)
            emit("error", f"internal error ({type(exc).__name__})")
        else:
            log.info("job %s finished", request_id)
            emit("log", results.summary())
            emit("finished", request_id)
        finally:
            shutil.rmtree(job_dir / "in", ignore_errors=True)
            if not (job_dir / "out" / RESULTS_FILE).is_file():
                shutil.rmtree(job_dir, ignore_errors=True)
            self._prune()

    def _prune(self) -> None:
        """Keep the newest ``max_results`` finished jobs."""
        jobs = [
            p for p in self.config.work_dir.iterdir() if _REQUEST_ID.match(p.name) and (p / "out").is_dir()
        ]
        jobs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for old in jobs[self.config.max_results :]:
            shutil.rmtree(old, ignore_errors=True)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def make_server(config: RemoteConfig) -> ThreadingHTTPServer:
    handler = type("CircusHandler", (_Handler,), {"config": config, "run_lock": threading.Lock()})
    server = ThreadingHTTPServer((config.host, config.port), handler)
    server.daemon_threads = True
    return server


def serve(config: RemoteConfig) -> None:
    """Serve until interrupted; the first line on stdout names the address (port 0 → the one chosen)."""
    server = make_server(config)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl-C: the work dir is cleaned up
    host, port = server.server_address[:2]
    print(
        f"wlcad circus {config.capability.name}: listening on http://{host}:{port}{config.endpoint_path}",
        flush=True,
    )
    print(f"wlcad circus: work dir {config.work_dir}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if config.owns_work_dir:
            shutil.rmtree(config.work_dir, ignore_errors=True)
