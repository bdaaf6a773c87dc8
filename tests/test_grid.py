"""Grid: the geometry-only type. It must place voxels exactly where Volume and SimpleITK do, refuse bad
geometry naming the field, and serve as a resampling target without changing a single output value."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from services.core.errors import InputError
from services.core.grid import Grid, as_grid
from services.core.lesion_prompt import LesionPrompt
from services.core.sitk_bridge import sitk_from_volume
from services.core.volume import Volume
from services.label_estimation.voi import voi_grid
from tests.test_volume import finite, oblique_volumes

#: The oblique, anisotropic, possibly left-handed geometries test_volume draws, without their zeros.
oblique_grids = oblique_volumes().map(lambda volume: volume.grid)


def _oblique() -> Grid:
    direction = Rotation.from_euler("xyz", [10, -25, 40], degrees=True).as_matrix()
    return Grid((7, 9, 11), (0.7, 0.9, 2.5), (-100.0, 20.0, 33.0), direction)


@settings(max_examples=200, deadline=None)
@given(grid=oblique_grids, index=st.lists(st.floats(-50, 50, allow_nan=False), min_size=3, max_size=3))
def test_index_world_round_trip_agrees_with_volume_and_simpleitk(grid: Grid, index: list[float]) -> None:
    world = grid.index_to_world(index)
    np.testing.assert_allclose(grid.world_to_index(world), index, atol=1e-6)
    volume = grid.with_array(np.zeros(grid.shape, np.int16))
    # Volume delegates to its grid: the numbers are the same to the bit, not just close.
    assert np.array_equal(volume.index_to_world(index), world)
    assert np.array_equal(volume.world_to_index(world), grid.world_to_index(world))
    image = sitk_from_volume(volume)
    np.testing.assert_allclose(world, image.TransformContinuousIndexToPhysicalPoint(index), atol=1e-6)
    np.testing.assert_allclose(
        grid.world_to_index(world), image.TransformPhysicalPointToContinuousIndex(world.tolist()), atol=1e-6
    )


@settings(max_examples=100, deadline=None)
@given(grid=oblique_grids, world=st.lists(finite, min_size=3, max_size=3))
def test_world_index_round_trip_and_nearest_index(grid: Grid, world: list[float]) -> None:
    np.testing.assert_allclose(grid.index_to_world(grid.world_to_index(world)), world, atol=1e-6)
    image = sitk_from_volume(grid.with_array(np.zeros(grid.shape, np.uint8)))
    nearest = grid.world_to_nearest_index(world)
    if np.all(np.abs(grid.world_to_index(world) - nearest) < 0.49):  # ITK and numpy round .5 differently
        assert tuple(nearest) == image.TransformPhysicalPointToIndex(world)


def test_volume_grid_carries_the_volume_geometry() -> None:
    grid = _oblique()
    volume = grid.with_array(
        np.arange(np.prod(grid.shape), dtype=np.int16).reshape(grid.shape), modality="CT"
    )
    assert isinstance(volume, Volume) and volume.metadata == {"modality": "CT"}
    assert volume.grid.same_grid(grid, tolerance_mm=0.0) and volume.same_grid(grid)
    assert volume.grid.shape == volume.array.shape and volume.shape_xyz == grid.shape_xyz == (11, 9, 7)
    assert volume.spacing == grid.spacing and volume.origin == grid.origin
    assert np.array_equal(volume.direction, grid.direction)
    assert np.array_equal(volume.affine_lps, grid.affine_lps)
    assert volume.describe() == {**grid.describe(), "dtype": "int16", "modality": "CT"}
    assert as_grid(volume) is volume.grid and as_grid(grid) is grid
    with pytest.raises(TypeError):
        as_grid(np.zeros((2, 2, 2)))


def test_direction_is_read_only_and_copied() -> None:
    direction = np.eye(3)
    grid = Grid((2, 2, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), direction)
    direction[0, 0] = -1.0  # the caller's array changing later must not move the grid
    assert grid.direction[0, 0] == 1.0
    with pytest.raises(ValueError):
        grid.direction[0, 0] = 2.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"shape": (2, 2)}, "shape"),
        ({"shape": (2, 0, 2)}, "shape"),
        ({"shape": (2, 2.5, 2)}, "shape"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ({"spacing": (1.0, -1.0, 1.0)}, "spacing"),
        ({"spacing": (1.0, float("nan"), 1.0)}, "spacing"),
        ({"spacing": (1.0, 1.0)}, "spacing"),
        ({"origin": (0.0, float("inf"), 0.0)}, "origin"),
        ({"origin": (0.0, 0.0, 0.0, 0.0)}, "origin"),
        ({"direction": np.ones((3, 3))}, "direction"),
        ({"direction": np.eye(2)}, "direction"),
        ({"direction": np.full((3, 3), np.nan)}, "direction"),
    ],
)
def test_invalid_geometry_is_refused_naming_the_field(kwargs: dict, field: str) -> None:
    arguments = {"shape": (2, 2, 2), "spacing": (1.0, 1.0, 1.0), **kwargs}
    with pytest.raises(InputError) as caught:
        Grid(**arguments)
    assert caught.value.field == field


def test_constructors_validate_too() -> None:
    grid = _oblique()
    with pytest.raises(InputError) as caught:
        grid.respaced((1.0, 0.0, 1.0))
    assert caught.value.field == "spacing"
    with pytest.raises(InputError) as caught:
        grid.window((0, 0, 0), (3, 0, 3))
    assert caught.value.field == "shape"
    with pytest.raises(InputError) as caught:
        Grid.centred_on((0.0, float("nan"), 0.0), (3, 3, 3), (1.0, 1.0, 1.0))
    assert caught.value.field == "centre"
    with pytest.raises(InputError) as caught:
        grid.with_array(np.zeros((7, 9, 10)))
    assert caught.value.field == "array"


def test_contains_world_reaches_half_a_voxel_beyond_the_centres() -> None:
    grid = _oblique()
    for index, inside in (
        ([-0.49, 0, 0], True),
        ([-0.51, 0, 0], False),
        ([10.49, 8, 6], True),
        ([10.6, 8, 6], False),
    ):
        assert grid.contains_world(grid.index_to_world(index)) is inside


def test_same_grid_compares_world_positions() -> None:
    grid = _oblique()
    moved = Grid(grid.shape, grid.spacing, tuple(np.asarray(grid.origin) + 0.01), grid.direction)
    assert not grid.same_grid(moved)
    assert grid.same_grid(moved, tolerance_mm=0.02)
    assert not grid.same_grid(Grid((7, 9, 12), grid.spacing, grid.origin, grid.direction))


def test_world_grid_matches_index_to_world() -> None:
    grid = _oblique()
    world = grid.world_grid()
    assert world.shape == (*grid.shape, 3)
    np.testing.assert_array_equal(world[2, 3, 4], grid.index_to_world([4, 3, 2]))


def test_window_is_the_lattice_box_crop_and_pad_use() -> None:
    grid = _oblique()
    volume = grid.with_array(np.arange(np.prod(grid.shape), dtype=np.int32).reshape(grid.shape))
    crop = volume.crop((2, 1, 3), (4, 5, 2))
    assert crop.grid.same_grid(grid.window((2, 1, 3), (4, 5, 2)), tolerance_mm=0.0)
    np.testing.assert_array_equal(crop.origin, grid.index_to_world([2.0, 1.0, 3.0]))
    padded = volume.pad((1, 2, 3), (0, 1, 2))
    assert padded.grid.same_grid(grid.window((-1, -2, -3), (12, 12, 12)), tolerance_mm=0.0)
    # A window beyond the grid is still on the same lattice: its voxel 0 is the grid's voxel -1.
    np.testing.assert_allclose(
        grid.window((-1, 0, 0), (2, 2, 2)).index_to_world([1, 0, 0]), grid.index_to_world([0, 0, 0])
    )


def test_centred_on_puts_the_box_centre_on_the_point() -> None:
    direction = _oblique().direction
    for shape in ((32, 32, 32), (5, 4, 1)):
        grid = Grid.centred_on((10.0, -20.0, 30.0), shape, (0.5, 0.75, 2.0), direction)
        centre = grid.index_to_world((np.asarray(grid.shape_xyz) - 1) / 2)
        np.testing.assert_allclose(centre, (10.0, -20.0, 30.0), atol=1e-9)
    assert np.array_equal(Grid.centred_on((0.0, 0.0, 0.0), (2, 2, 2), (1.0, 1.0, 1.0)).direction, np.eye(3))


def test_voi_grid_is_bit_identical_to_the_grid_the_shipped_model_was_trained_on() -> None:
    image = _oblique().with_array(np.zeros((7, 9, 11), np.int16))
    prompt = LesionPrompt(center_mm=(-95.5, 24.25, 40.0), diameter_mm=13.7)
    grid = voi_grid(image, prompt)
    # The formula voi_grid had before Grid existed, evaluated here on its own.
    spacing = 13.7 / (0.5 * 32)
    origin = np.asarray(prompt.center_mm) - image.direction @ np.full(3, spacing * (32 - 1) / 2)
    assert grid.shape == (32, 32, 32) and grid.spacing == (spacing,) * 3
    assert grid.origin == tuple(float(v) for v in origin)
    assert np.array_equal(grid.direction, image.direction)


def test_respaced_keeps_the_physical_box() -> None:
    grid = _oblique()
    fine = grid.respaced((0.35, 0.45, 1.0))
    assert fine.shape == (18, 18, 22)
    np.testing.assert_allclose(fine.index_to_world([-0.5] * 3), grid.index_to_world([-0.5] * 3), atol=1e-9)
    assert grid.respaced((100.0, 100.0, 100.0)).shape == (1, 1, 1)  # never an empty grid


@pytest.mark.parametrize("interpolation", ["linear", "nearest", "bspline"])
def test_resample_onto_a_grid_equals_resample_onto_a_dummy_volume(interpolation: str) -> None:
    rng = np.random.default_rng(5)
    source = _oblique().with_array(rng.integers(-1000, 1000, (7, 9, 11)).astype(np.int16), modality="CT")
    direction = Rotation.from_euler("z", 15, degrees=True).as_matrix()
    target = Grid((6, 8, 10), (0.8, 0.6, 1.9), tuple(source.index_to_world([1.5, 2.0, 1.0])), direction)
    dummy = target.with_array(np.zeros(target.shape, np.uint8))  # how targets were given before Grid
    new = source.resample(reference=target, interpolation=interpolation, default_value=-1024)
    old = source.resample(reference=dummy, interpolation=interpolation, default_value=-1024)
    assert new.array.dtype == old.array.dtype
    assert new.array.tobytes() == old.array.tobytes()
    assert new.grid.same_grid(target, tolerance_mm=1e-9) and new.metadata == {"modality": "CT"}


def test_resample_by_spacing_targets_the_respaced_grid() -> None:
    source = _oblique().with_array(np.random.default_rng(6).random((7, 9, 11)).astype(np.float32))
    by_spacing = source.resample(spacing=(0.5, 0.5, 1.5))
    by_grid = source.resample(reference=source.grid.respaced((0.5, 0.5, 1.5)))
    assert by_spacing.array.tobytes() == by_grid.array.tobytes()
    assert by_spacing.same_grid(by_grid, tolerance_mm=0.0)
    # The old inline computation of the target, kept here to pin the geometry.
    extent = np.asarray(source.shape_xyz) * np.asarray(source.spacing)
    size = np.maximum(1, np.round(extent / np.array([0.5, 0.5, 1.5]))).astype(int)
    origin = source.index_to_world(np.full(3, -0.5)) + source.direction @ (np.array([0.5, 0.5, 1.5]) * 0.5)
    assert by_spacing.shape_xyz == tuple(int(n) for n in size)
    np.testing.assert_allclose(by_spacing.origin, origin, atol=1e-9)


def test_sitk_agrees_on_a_one_slice_grid() -> None:
    grid = Grid((1, 30, 20), (0.2, 0.3, 1.0))
    image = sitk_from_volume(grid.with_array(np.zeros(grid.shape, np.uint16)))
    assert image.GetSize() == grid.shape_xyz
    assert image.GetSpacing() == grid.spacing and image.GetOrigin() == grid.origin
    assert isinstance(image, sitk.Image)
