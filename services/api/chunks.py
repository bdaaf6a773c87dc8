"""The wire form of an upload's chunk message, written and read without protobuf objects.

A 150 MiB volume crosses the client, the gateway and the service as ~40 chunk messages
``<Upload message>{chunk: ImageChunk{data}}`` (the upload shape of ``common.proto``). Going through protobuf objects costs three or
four full copies of the voxels per process (slice → ``bytes``, into the message, serialised, and on
the way back parsed and read out), which on two shared cores was most of the upload's time. The
chunk form is two length-delimited fields around the data, so it is written with one join and read
as a memoryview into the received message. Anything that is not exactly that form (the first
message, unusual but valid encodings, junk) returns ``None`` from :func:`chunk_data` and goes
through protobuf as before, so validation and error messages do not change.
"""

from __future__ import annotations

#: Wire type of a length-delimited field (a message or bytes).
_LENGTH_DELIMITED = 2


def field_tag(number: int) -> int:
    """The one-byte tag of length-delimited field ``number`` (1..15: the upload shape's fields are)."""
    if not 1 <= number <= 15:
        raise ValueError(f"the chunk wire form needs field numbers 1..15, got {number}")
    return (number << 3) | _LENGTH_DELIMITED


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


def encode_chunk(data: bytes | bytearray | memoryview, chunk_tag: int, data_tag: int) -> bytes:
    """The serialised ``Upload(chunk=ImageChunk(data=data))``, with one copy of data; the tags come from
    :func:`field_tag` of the chunk field and of ``ImageChunk.data``."""
    size = len(data)
    if size == 0:
        return bytes((chunk_tag, 0))  # protobuf leaves an empty bytes field out
    inner = _varint(size)
    header = bytes((chunk_tag,)) + _varint(1 + len(inner) + size) + bytes((data_tag,)) + inner
    return b"".join((header, data))


def chunk_data(message: bytes, chunk_tag: int, data_tag: int) -> memoryview | None:
    """The chunk's data as a view into ``message`` when ``message`` is exactly one chunk field holding
    one data field (what :func:`encode_chunk` and protobuf write); ``None`` for anything else."""
    view = memoryview(message)
    if len(view) < 2 or view[0] != chunk_tag:
        return None
    outer, position = _read_varint(view, 1)
    if outer < 0 or position + outer != len(view):
        return None
    if outer == 0:
        return view[position:position]
    if view[position] != data_tag:
        return None
    size, start = _read_varint(view, position + 1)
    if size < 0 or start + size != len(view):
        return None
    return view[start:]
