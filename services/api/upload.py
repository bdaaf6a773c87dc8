"""The upload shape every capability shares, read from the proto descriptors.

A client-streaming RPC whose message is ``oneof part { <Request> request; ImageChunk chunk; }``, the
request holding one ``ImageSource``, is an upload (``common.proto`` describes it): the first message carries the request with the image's bytes
left out, every later message one chunk of them. The Python client, the gateway's HTTP multipart
binding and the service scaffold all get the field numbers here, from the descriptor, so a new
capability declares its upload message and nothing in the transport changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, cached_property

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from services.api import chunks, limits

#: The chunk message of the upload shape, and the image field its request must have (image.proto).
CHUNK_MESSAGE = "wlcad.v1.ImageChunk"
IMAGE_SOURCE = "wlcad.v1.ImageSource"


@dataclass(frozen=True)
class UploadShape:
    """The two fields of one upload message and the chunk wire form they imply."""

    message: Descriptor
    request_field: FieldDescriptor
    chunk_field: FieldDescriptor
    #: The request's ``ImageSource`` field: the uploaded bytes are its volume's data or file's content.
    image_field: FieldDescriptor

    @cached_property
    def message_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.message)

    @cached_property
    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.request_field.message_type)

    @cached_property
    def _tags(self) -> tuple[int, int]:
        """(chunk field tag, ``ImageChunk.data`` tag), worked out once: every chunk uses them."""
        data_field = self.chunk_field.message_type.fields_by_name["data"]
        return chunks.field_tag(self.chunk_field.number), chunks.field_tag(data_field.number)

    def first_message(self, request: Message) -> bytes:
        """The serialised first message of an upload, carrying ``request``."""
        return self.message_class(**{self.request_field.name: request}).SerializeToString()

    def encode_chunk(self, data: bytes | bytearray | memoryview) -> bytes:
        """One serialised chunk message, written with one copy of ``data``."""
        return chunks.encode_chunk(data, *self._tags)

    def chunk_messages(self, data: bytes | memoryview, size: int = limits.MAX_CHUNK_BYTES) -> Iterator[bytes]:
        """``data`` as serialised chunk messages of at most ``size`` bytes each."""
        view = memoryview(data).cast("B")  # byte offsets, whatever the caller's item format
        for start in range(0, len(view), size):
            yield self.encode_chunk(view[start : start + size])

    def chunk_data(self, message: bytes) -> memoryview | None:
        """A chunk message's data as a view into ``message``; ``None`` for anything else (decode it)."""
        return chunks.chunk_data(message, *self._tags)


@cache
def upload_shape(message: Descriptor) -> UploadShape | None:
    """The upload shape of ``message``, or ``None`` when it is not one."""
    for oneof in message.oneofs:
        members = list(oneof.fields)
        if len(members) != 2 or any(f.type != FieldDescriptor.TYPE_MESSAGE for f in members):
            continue
        chunk = [f for f in members if f.message_type.full_name == CHUNK_MESSAGE]
        request = [f for f in members if f.message_type.full_name != CHUNK_MESSAGE]
        if len(chunk) != 1 or len(request) != 1:
            continue
        images = [
            f
            for f in request[0].message_type.fields
            if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.full_name == IMAGE_SOURCE
        ]
        if len(images) == 1:
            return UploadShape(message, request[0], chunk[0], images[0])
    return None


def method_upload_shape(method: MethodDescriptor) -> UploadShape | None:
    """The upload shape of a client-streaming RPC's message; ``None`` for every other RPC."""
    if not method.client_streaming or method.server_streaming:
        return None
    return upload_shape(method.input_type)
