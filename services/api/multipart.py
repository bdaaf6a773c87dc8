"""Split a WADO-RS ``multipart/related`` body into its parts, as views into the body (no copies).

The standard library's email parser took ~7 s for a 300-instance, 150 MiB series (it feeds the body
line by line through Python); DICOM parts are binary, so a boundary search with ``bytes.find`` does
the same job in a fraction of a second and lets each part be written to disk without a copy.
Anything malformed is the DICOMweb server's answer being unusable: an :class:`InputError`.
"""

from __future__ import annotations

from email.message import Message

from services.core.errors import InputError

FIELD = "image.dicomweb"


def boundary(content_type: str) -> bytes:
    """The boundary parameter of a ``multipart/*`` Content-Type (quoted or not)."""
    header = Message()
    header["Content-Type"] = content_type
    value = header.get_param("boundary") if header.get_content_maintype() == "multipart" else None
    if not isinstance(value, str) or not 0 < len(value) <= 200:
        raise InputError("the DICOMweb server did not answer multipart/related", field=FIELD)
    return value.encode("latin-1", errors="replace")


def split_parts(body: bytes | bytearray | memoryview, content_type: str) -> list[memoryview]:
    """The parts' contents (headers dropped), in order, as views into ``body``."""
    delimiter = b"--" + boundary(content_type)
    data = bytes(body) if isinstance(body, memoryview) else body
    view = memoryview(data)
    position = data.find(delimiter)
    if position < 0:
        raise InputError("the multipart answer holds no parts", field=FIELD)
    position += len(delimiter)
    parts: list[memoryview] = []
    while data[position : position + 2] != b"--":
        line_end = data.find(b"\r\n", position)
        headers_end = data.find(b"\r\n\r\n", line_end) if line_end >= 0 else -1
        if headers_end < 0:
            raise InputError("a multipart part has no header end", field=FIELD)
        start = headers_end + 4
        end = data.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise InputError("the multipart answer is truncated", field=FIELD)
        parts.append(view[start:end])
        position = end + 2 + len(delimiter)
    return parts
