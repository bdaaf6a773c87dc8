"""A multipart/form-data upload read as a stream: the ``request`` JSON part, then the ``file`` part's
bytes handed on chunk by chunk as they arrive, with the size limit enforced while reading.

Nothing is spooled: the gateway holds at most one chunk (``MAX_CHUNK_BYTES``) of a file at a time,
and refuses with 413 the moment a file passes ``MAX_UPLOAD_BYTES``; the upstream stream is then
never finished, so the service cannot mistake the part it got for the whole image (no silent
truncation). Streaming needs the request before the file, the way S3's POST uploads do: a
``request`` part after the ``file`` part is refused, naming the order to use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from services.api import limits
from services.gateway.core import GatewayError
from services.gateway.http_limits import HttpRefusalError, too_large

#: Largest ``request`` part (lesions and options as JSON).
MAX_REQUEST_PART_BYTES = 1024 * 1024
#: Largest multipart body a Content-Length may declare: the file, the request part and the framing.
MAX_UPLOAD_BODY_BYTES = limits.MAX_UPLOAD_BYTES + MAX_REQUEST_PART_BYTES + 64 * 1024
FORM_DATA = b"multipart/form-data"


@dataclass(frozen=True)
class PartStart:
    name: str
    filename: str | None  # None: a plain field (no ``filename`` in its Content-Disposition)


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd


def _invalid(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _decode(value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type; 415 for any other type."""
    media_type, options = parse_options_header(content_type)
    if media_type != FORM_DATA:
        raise HttpRefusalError(
            grpc.StatusCode.INVALID_ARGUMENT, "Content-Type: must be multipart/form-data", 415
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise _invalid("Content-Type: multipart/form-data needs a boundary")
    return boundary


class _Collector:
    """The parser's callbacks, turned into events for the caller to take after each write."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.ended = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_part,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": lambda: self.events.append(PartEnd()),
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._disposition = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_part(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            raise _invalid("body: a multipart part has no name in its Content-Disposition")
        filename = options.get(b"filename")
        self.events.append(PartStart(_decode(name), None if filename is None else _decode(filename)))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self.events.append(PartData(bytes(data[start:end])))

    def _end(self) -> None:
        self.ended = True


async def multipart_events(chunks: AsyncIterator[bytes], boundary: bytes) -> AsyncIterator[Event]:
    """The parts of a multipart body as events, parsed as the chunks arrive (python-multipart's
    streaming parser, whose part headers are bounded in count and size). Reading stops at the
    closing boundary; a body that ends before it is refused (its last part may be cut short)."""
    collector = _Collector()
    try:
        parser = MultipartParser(boundary, collector.callbacks())
    except FormParserError as exc:
        raise _invalid(f"Content-Type: {exc}") from None
    async for chunk in chunks:
        try:
            parser.write(chunk)
        except FormParserError as exc:
            raise _invalid(f"body: not valid multipart/form-data ({str(exc)[:200]})") from None
        for event in collector.events:
            yield event
        collector.events.clear()
        if collector.ended:
            return
    raise _invalid("body: the multipart body ended before its closing boundary")


class MultipartUpload:
    """One upload body: :meth:`head` reads up to the file part, :meth:`file_chunks` then gives the
    file's bytes and checks that nothing but the closing boundary follows."""

    def __init__(self, events: AsyncIterator[Event]) -> None:
        self._events = events

    async def head(self) -> tuple[bytes, str]:
        """(the ``request`` part, ``b"{}"`` when absent; the file part's filename)."""
        request: bytearray | None = None
        async for event in self._events:
            if isinstance(event, PartData) and request is not None:
                request += event.data
                if len(request) > MAX_REQUEST_PART_BYTES:
                    raise too_large("request", MAX_REQUEST_PART_BYTES)
            elif isinstance(event, PartStart):
                if event.name == "file":
                    if event.filename is None:
                        raise _invalid("file: give the image as a file part (with a filename)")
                    return (bytes(request) if request is not None else b"{}"), event.filename
                if event.name != "request":
                    raise _invalid(f"{event.name[:64]}: unknown part; give 'request' (JSON), then 'file'")
                if request is not None:
                    raise _invalid("request: give one request part")
                request = bytearray()
        raise _invalid("file: give the image as a file part")

    async def file_chunks(self) -> AsyncIterator[bytearray]:
        """The file's bytes in chunks of ``MAX_CHUNK_BYTES`` (the last one shorter); 413 as soon as
        the file passes ``MAX_UPLOAD_BYTES``, before that chunk is handed on."""
        chunk, size = bytearray(), 0
        async for event in self._events:
            if isinstance(event, PartEnd):
                break
            if not isinstance(event, PartData):
                continue
            size += len(event.data)
            if size > limits.MAX_UPLOAD_BYTES:
                raise too_large("file", limits.MAX_UPLOAD_BYTES)
            view = memoryview(event.data)
            while view:
                taken = view[: limits.MAX_CHUNK_BYTES - len(chunk)]
                chunk += taken
                view = view[len(taken) :]
                if len(chunk) == limits.MAX_CHUNK_BYTES:
                    yield chunk
                    chunk = bytearray()
        if chunk:
            yield chunk
        async for event in self._events:  # to the closing boundary: only an epilogue may follow
            if isinstance(event, PartStart):
                if event.name == "request":
                    raise _invalid(
                        "request: send the request part before the file part (the file is streamed on)"
                    )
                raise _invalid(f"{event.name[:64]}: unexpected part after the file; give one file part")

    async def aclose(self) -> None:
        await self._events.aclose()  # type: ignore[attr-defined]
