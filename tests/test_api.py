"""The wlcad.v1 conversions: volumes and masks survive the wire exactly; every bad field is named."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.api import codegen
from services.api.convert import (
    DTYPES,
    pack_mask,
    unpack_mask,
    volume_from_proto,
    volume_to_proto,
)
from services.api.pb import image_pb2
from services.api.pb import label_estimation_pb2 as pb
from services.core.errors import InputError
from services.core.volume import Volume
from services.label_estimation.wire import prompts_from_proto


def test_generated_code_is_current_and_not_tracked():
    assert not codegen.is_stale()
    assert (codegen.OUT_DIR / "wlcad" / "v1" / "label_estimation_pb2.py").is_file()
    ignored = (codegen.PROTO_ROOT.parent / ".gitignore").read_text()
    assert "services/api/_generated/" in ignored


@pytest.mark.parametrize("dtype", DTYPES)
def test_volume_round_trip_keeps_voxels_and_geometry(dtype):
    rng = np.random.default_rng(1)
    array = (rng.random((3, 4, 5)) * 100).astype(dtype)
    angle = 0.3
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    volume = Volume(array, (0.7, 0.8, 2.5), (-100.5, 20.0, 33.0), direction, {"modality": "CT"})
    message = image_pb2.Volume.FromString(volume_to_proto(volume).SerializeToString())
    assert list(message.shape_xyz) == [5, 4, 3]
    back = volume_from_proto(message)
    assert back.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.array, array)
    assert back.spacing == volume.spacing and back.origin == volume.origin
    np.testing.assert_allclose(back.direction, direction)
    assert back.metadata["modality"] == "CT"


def test_wire_bytes_are_little_endian_c_order():
    volume = Volume(np.arange(6, dtype=np.uint16).reshape(1, 2, 3), (1, 1, 1))
    assert volume_to_proto(volume).data == np.arange(6, dtype="<u2").tobytes()


@settings(max_examples=60, deadline=None)
@given(
    st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7)),
    st.integers(0, 2**32 - 1),
    st.tuples(st.integers(0, 500), st.integers(0, 500), st.integers(0, 500)),
)
def test_packed_mask_round_trip(shape, seed, start):
    mask = np.random.default_rng(seed).random(shape) > 0.5
    message = pack_mask(start, mask)
    assert len(message.bits) == (mask.size + 7) // 8
    got_start, got = unpack_mask(image_pb2.PackedMask.FromString(message.SerializeToString()))
    assert got_start == start
    np.testing.assert_array_equal(got, mask)


def _volume_message(**changes) -> image_pb2.Volume:
    message = volume_to_proto(Volume(np.zeros((2, 3, 4), np.int16), (1, 1, 1)))
    for name, value in changes.items():
        if isinstance(value, list):
            message.ClearField(name)
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return message


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"dtype": "complex64"}, "image.volume.dtype"),
        ({"dtype": ""}, "image.volume.dtype"),
        ({"shape_xyz": [4, 3]}, "image.volume.shape_xyz"),
        ({"shape_xyz": [4, 0, 2]}, "image.volume.shape_xyz"),
        ({"shape_xyz": [100000, 100000, 100000]}, "image.volume.shape_xyz"),
        ({"data": b"\0" * 7}, "image.volume.data"),
        ({"spacing_mm": [1.0, float("nan"), 1.0]}, "image.volume.spacing_mm"),
        ({"spacing_mm": [1.0, -1.0, 1.0]}, "image.volume.spacing_mm"),
        ({"spacing_mm": []}, "image.volume.spacing_mm"),
        ({"origin_mm": [0.0, float("inf"), 0.0]}, "image.volume.origin_mm"),
        ({"direction": [1.0] * 4}, "image.volume.direction"),
        ({"direction": [1.0] * 9}, "image.volume.direction"),
    ],
)
def test_bad_volume_fields_are_named(changes, field):
    with pytest.raises(InputError) as error:
        volume_from_proto(_volume_message(**changes))
    assert error.value.field == field


def test_nan_voxels_are_refused():
    message = volume_to_proto(Volume(np.full((2, 2, 2), np.nan, np.float32), (1, 1, 1)))
    with pytest.raises(InputError, match="finite") as error:
        volume_from_proto(message)
    assert error.value.field == "image.volume.data"


@pytest.mark.parametrize(
    ("lesion", "field"),
    [
        (pb.LesionPrompt(lesion_id=0, center_mm=[0, 0, 0], diameter_mm=5), "lesions[0].lesion_id"),
        (pb.LesionPrompt(lesion_id=1, center_mm=[0, 0], diameter_mm=5), "lesions[0].center_mm"),
        (pb.LesionPrompt(lesion_id=1, center_mm=[0, 0, float("nan")], diameter_mm=5), "lesions[0].center_mm"),
        (pb.LesionPrompt(lesion_id=1, center_mm=[0, 0, 0], diameter_mm=0), "lesions[0].diameter_mm"),
        (
            pb.LesionPrompt(lesion_id=1, center_mm=[0, 0, 0], diameter_mm=float("inf")),
            "lesions[0].diameter_mm",
        ),
        (
            pb.LesionPrompt(lesion_id=1, center_mm=[0, 0, 0], diameter_mm=5, axes_mm=[1, 2]),
            "lesions[0].axes_mm",
        ),
    ],
)
def test_bad_prompts_are_named(lesion, field):
    with pytest.raises(InputError) as error:
        prompts_from_proto([lesion])
    assert error.value.field == field


def test_prompt_count_is_bounded():
    with pytest.raises(InputError):
        prompts_from_proto([])
    many = [pb.LesionPrompt(lesion_id=i + 1, center_mm=[0, 0, 0], diameter_mm=1) for i in range(257)]
    with pytest.raises(InputError, match="at most"):
        prompts_from_proto(many)
