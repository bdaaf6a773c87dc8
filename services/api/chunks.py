"""The wire form of an upload's chunk message, written and read without protobuf objects.

A 150 MiB volume crosses the client, the gateway and the service as ~40 chunk messages
``EstimateUploadMessage{chunk: ImageChunk{data}}``. Going through protobuf objects costs three or
four full copies of the voxels per process (slice → ``bytes``, into the message, serialised, and on
the way back parsed and read out), which on two shared cores was most of the upload's time. The
chunk form is two length-delimited fields around the data, so it is written with one join and read
as a memoryview into the received message. Anything that is not exactly that form (the first
message, unusual but valid encodings, junk) returns ``None`` from :func:`chunk_data` and goes
through protobuf as before, so validation and error messages do not change.
"""

from __future__ import annotations

#: Field 2 of ``EstimateUploadMessage`` (``chunk``) and field 1 of ``ImageChunk`` (``data``), both
#: length-delimited (wire type 2). ``tests/test_serving_chunks.py`` checks them against protobuf.
_CHUNK_TAG = 0x12
_DATA_TAG = 0x0A
_EMPTY_CHUNK = bytes((_CHUNK_TAG, 0))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(view: memoryview, position: int) -> tuple[int, int]:
    """``(value, next position)``; ``(-1, -1)`` when the varint is truncated or longer than 5 bytes
    (no valid chunk length needs more)."""
    value = shift = 0
    for index in range(position, min(position + 5, len(view))):
        byte = view[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    return -1, -1


def encode_chunk(data: bytes | bytearray | memoryview) -> bytes:
    """The serialised ``EstimateUploadMessage(chunk=ImageChunk(data=data))``, with one copy of data."""
    size = len(data)
    if size == 0:
        return _EMPTY_CHUNK  # protobuf leaves an empty bytes field out
    inner = _varint(size)
    header = bytes((_CHUNK_TAG,)) + _varint(1 + len(inner) + size) + bytes((_DATA_TAG,)) + inner
    return b"".join((header, data))


def chunk_data(message: bytes) -> memoryview | None:
    """The chunk's data as a view into ``message`` when ``message`` is exactly one chunk field holding
    one data field (what :func:`encode_chunk` and protobuf write); ``None`` for anything else."""
    view = memoryview(message)
    if len(view) < 2 or view[0] != _CHUNK_TAG:
        return None
    outer, position = _read_varint(view, 1)
    if outer < 0 or position + outer != len(view):
        return None
    if outer == 0:
        return view[position:position]
    if view[position] != _DATA_TAG:
        return None
    size, start = _read_varint(view, position + 1)
    if size < 0 or start + size != len(view):
        return None
    return view[start:]
