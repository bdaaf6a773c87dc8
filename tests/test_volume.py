"""Volume geometry: index↔world both ways, agreement with SimpleITK, crop/pad/resample keep the world."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from services.core.errors import InputError
from services.core.sitk_bridge import sitk_from_volume, volume_from_sitk
from services.core.volume import Volume

finite = st.floats(min_value=-500, max_value=500, allow_nan=False, allow_infinity=False)
spacing_value = st.floats(min_value=0.05, max_value=10.0, allow_nan=False)


@st.composite
def oblique_volumes(draw) -> Volume:
    quaternion = draw(
        st.lists(st.floats(-1, 1, allow_nan=False), min_size=4, max_size=4).filter(
            lambda q: np.linalg.norm(q) > 0.1
        )
    )
    direction = Rotation.from_quat(quaternion).as_matrix()
    # ITK inverts the direction by SVD, which returns NaN when tiny cosines underflow on squaring
    # (|c| < 1e-150 or so; no scanner writes them), so such cosines are drawn as exact zeros.
    direction[np.abs(direction) < 1e-100] = 0.0
    if draw(st.booleans()):  # left-handed grids (e.g. NIfTI flipped to LPS) exist too
        direction[:, 2] *= -1
    spacing = tuple(draw(spacing_value) for _ in range(3))
    origin = tuple(draw(finite) for _ in range(3))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(3))
    return Volume(np.zeros(shape, np.int16), spacing, origin, direction)


@settings(max_examples=200, deadline=None)
@given(volume=oblique_volumes(), index=st.lists(st.floats(-50, 50, allow_nan=False), min_size=3, max_size=3))
def test_index_world_round_trip_on_oblique_anisotropic_grids(volume: Volume, index: list[float]) -> None:
    world = volume.index_to_world(index)
    np.testing.assert_allclose(volume.world_to_index(world), index, atol=1e-6)
    # The same numbers SimpleITK computes for the same geometry.
    image = sitk_from_volume(volume)
    np.testing.assert_allclose(world, image.TransformContinuousIndexToPhysicalPoint(index), atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(volume=oblique_volumes(), world=st.lists(finite, min_size=3, max_size=3))
def test_world_index_round_trip(volume: Volume, world: list[float]) -> None:
    np.testing.assert_allclose(volume.index_to_world(volume.world_to_index(world)), world, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(volume=oblique_volumes())
def test_sitk_bridge_is_lossless(volume: Volume) -> None:
    back = volume_from_sitk(sitk_from_volume(volume))
    assert back.same_grid(volume, tolerance_mm=1e-9)
    np.testing.assert_allclose(back.direction, volume.direction, atol=1e-12)


def _marked_volume() -> Volume:
    rng = np.random.default_rng(3)
    direction = Rotation.from_euler("xyz", [10, -20, 35], degrees=True).as_matrix()
    array = rng.integers(-1000, 1000, size=(7, 9, 11)).astype(np.int16)
    return Volume(array, (0.7, 0.9, 2.5), (-100.0, 20.0, 33.0), direction, {"modality": "CT"})


def test_crop_keeps_every_voxel_at_its_world_position() -> None:
    volume = _marked_volume()
    sub = volume.crop((2, 3, 1), (5, 4, 3))
    assert sub.shape_xyz == (5, 4, 3)
    assert sub.array[0, 0, 0] == volume.array[1, 3, 2]
    np.testing.assert_allclose(sub.index_to_world([0, 0, 0]), volume.index_to_world([2, 3, 1]), atol=1e-9)
    np.testing.assert_allclose(sub.index_to_world([4, 3, 2]), volume.index_to_world([6, 6, 3]), atol=1e-9)
    assert sub.metadata["modality"] == "CT"


def test_pad_and_crop_or_pad_keep_world_positions() -> None:
    volume = _marked_volume()
    padded = volume.pad((1, 2, 3), (0, 1, 0), value=-1024)
    assert padded.shape_xyz == (12, 12, 10)
    assert padded.array[3, 2, 1] == volume.array[0, 0, 0]
    assert padded.array[0, 0, 0] == -1024
    np.testing.assert_allclose(padded.index_to_world([1, 2, 3]), volume.origin, atol=1e-9)
    window = volume.crop_or_pad((-2, -2, -2), (4, 4, 4), value=-5)
    assert window.array[2, 2, 2] == volume.array[0, 0, 0]
    assert window.array[0, 0, 0] == -5
    np.testing.assert_allclose(window.index_to_world([2, 2, 2]), volume.origin, atol=1e-9)


def test_crop_outside_the_image_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="leaves the image"):
        _marked_volume().crop((8, 0, 0), (5, 1, 1))


def test_resample_onto_own_grid_is_identity_and_onto_finer_grid_keeps_a_point() -> None:
    volume = _marked_volume()
    same = volume.resample(reference=volume, interpolation="nearest")
    np.testing.assert_array_equal(same.array, volume.array)
    # A single bright voxel stays at the same world position on a 2× finer grid.
    array = np.zeros((9, 9, 9), np.float32)
    array[4, 5, 3] = 1000
    point = Volume(array, (1.0, 1.5, 3.0), (5.0, -7.0, 12.0), volume.direction)
    fine = point.resample(spacing=(0.5, 0.75, 1.5))
    assert fine.shape_xyz == (18, 18, 18)
    k, j, i = np.nonzero(fine.array)
    weights = fine.array[k, j, i]
    centroid_voxel = np.average(np.stack([i, j, k], axis=1), axis=0, weights=weights)
    np.testing.assert_allclose(
        fine.index_to_world(centroid_voxel), point.index_to_world([3, 5, 4]), atol=1e-3
    )
    # Physical extent is preserved: first and last voxel edges coincide.
    np.testing.assert_allclose(fine.index_to_world([-0.5] * 3), point.index_to_world([-0.5] * 3), atol=1e-9)


def test_resample_nearest_keeps_label_dtype() -> None:
    labels = Volume(np.arange(27, dtype=np.uint8).reshape(3, 3, 3), (1, 1, 1))
    fine = labels.resample(spacing=(0.5, 0.5, 0.5), interpolation="nearest")
    assert fine.array.dtype == np.uint8
    assert set(np.unique(fine.array)) == set(range(27))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ({"spacing": (1.0, float("nan"), 1.0)}, "spacing"),
        ({"origin": (0.0, float("inf"), 0.0)}, "origin"),
        ({"direction": np.ones((3, 3))}, "direction"),
        ({"array": np.zeros((3, 3))}, "array"),
        ({"array": np.zeros((0, 3, 3))}, "array"),
    ],
)
def test_invalid_geometry_is_refused_naming_the_field(kwargs: dict, field: str) -> None:
    arguments = {"array": np.zeros((2, 2, 2)), "spacing": (1.0, 1.0, 1.0), **kwargs}
    with pytest.raises(InputError) as caught:
        Volume(**arguments)
    assert caught.value.field == field


def test_radiograph_is_a_one_slice_volume_and_describe_uses_itk_order() -> None:
    xray = Volume(np.zeros((1, 30, 20), np.uint16), (0.2, 0.3, 1.0))
    assert xray.shape_xyz == (20, 30, 1)
    described = xray.describe()
    assert described["shape"] == [20, 30, 1]
    assert described["spacing"] == [0.2, 0.3, 1.0]
    assert len(described["direction"]) == 9
