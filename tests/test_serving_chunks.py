"""The hand-written chunk wire form (services/api/chunks.py, tags from the descriptor in
services/api/upload.py) must be exactly protobuf's, and anything else must fall back to protobuf,
so the fast upload path cannot change what a message means."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.api.pb import image_pb2
from services.api.pb import label_estimation_pb2 as pb
from services.api.upload import upload_shape

SHAPE = upload_shape(pb.EstimateUploadMessage.DESCRIPTOR)
encode_chunk, chunk_data = SHAPE.encode_chunk, SHAPE.chunk_data


def _protobuf(data: bytes) -> bytes:
    return pb.EstimateUploadMessage(chunk=image_pb2.ImageChunk(data=data)).SerializeToString()


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 4 * 2**20])
def test_encoding_is_protobufs_at_varint_boundaries(size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert encode_chunk(memoryview(data)) == _protobuf(data)
    assert bytes(chunk_data(_protobuf(data))) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_either_the_chunk_protobuf_reads_or_left_to_protobuf(message):
    view = chunk_data(message)
    if view is not None:
        assert bytes(view) == pb.EstimateUploadMessage.FromString(message).chunk.data


def test_other_messages_are_left_to_protobuf():
    request = pb.EstimateUploadMessage(request=pb.EstimateRequest(method="sphere")).SerializeToString()
    assert chunk_data(request) is None
    data = b"voxels"
    extra_field = _protobuf(data) + b"\x12\x00"  # a second chunk field: valid protobuf, not the form
    assert chunk_data(extra_field) is None
    assert chunk_data(_protobuf(data)[:-1]) is None  # truncated
    assert chunk_data(b"") is None


def test_the_shape_is_found_from_the_descriptor_alone():
    assert SHAPE.request_field.name == "request" and SHAPE.chunk_field.name == "chunk"
    assert SHAPE.request_class is pb.EstimateRequest
    assert upload_shape(pb.EstimateRequest.DESCRIPTOR) is None  # not an upload message
    first = SHAPE.first_message(pb.EstimateRequest(method="sphere"))
    assert pb.EstimateUploadMessage.FromString(first).request.method == "sphere"
    data = bytes(range(256)) * 40
    joined = b"".join(bytes(chunk_data(m)) for m in SHAPE.chunk_messages(data, size=1000))
    assert joined == data
