"""Where voxels are, without any voxels: the sampling geometry of an image.

Many steps need only a grid — the target of a resample, the VOI a network sees, the coarse RT-dose
lattice, the canvas a phantom is drawn on — and used to build a :class:`Volume` around a dummy array
to say so. A :class:`Grid` states that geometry on its own (like highdicom's ``VolumeGeometry`` or
torchio's affine), so no placeholder memory is allocated and a function's signature tells whether it
reads pixels or only positions.

Conventions are :mod:`services.core.volume`'s, stated once there: world is LPS mm, ``shape`` is in
array order ``(z, y, x)``, every other index/size/spacing is ITK ``(x, y, z)``, ``origin`` is the
centre of voxel ``(0, 0, 0)`` and the direction's **columns** are the i, j, k axis vectors, so
``world = origin + direction @ (spacing * index)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from services.core.errors import InputError

if TYPE_CHECKING:
    from services.core.volume import Volume

#: How far ``directionᵀ·direction`` may stray from the identity: DICOM stores direction cosines with
#: ~6 decimals, so exact orthonormality cannot be asked for, but a skewed grid must be refused.
ORTHONORMAL_TOLERANCE = 1e-3


def as_triplet(values: Sequence[float] | np.ndarray, name: str) -> tuple[float, float, float]:
    """Three finite floats, or an InputError naming ``name`` (spacing, origin, …)."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.shape != (3,):
        raise InputError(f"needs 3 numbers, got {arr.size}", field=name)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"must be finite, got {arr.tolist()}", field=name)
    return (float(arr[0]), float(arr[1]), float(arr[2]))


def _as_shape(values: Sequence[int] | np.ndarray) -> tuple[int, int, int]:
    arr = np.asarray(values).reshape(-1)
    if arr.shape != (3,):
        raise InputError(f"needs 3 sizes (z, y, x), got {arr.size}", field="shape")
    if not (np.issubdtype(arr.dtype, np.integer) or np.all(np.mod(arr.astype(np.float64), 1) == 0)):
        raise InputError(f"must be whole voxel counts, got {arr.tolist()}", field="shape")
    if np.any(arr < 1):
        raise InputError(f"has an empty axis: shape {arr.tolist()}", field="shape")
    return (int(arr[0]), int(arr[1]), int(arr[2]))


def _as_direction(values: Sequence[float] | np.ndarray) -> np.ndarray:
    direction = np.asarray(values, dtype=np.float64)
    if direction.size != 9:
        raise InputError(f"needs 9 numbers, got {direction.size}", field="direction")
    direction = direction.reshape(3, 3)
    if not np.all(np.isfinite(direction)):
        raise InputError("must be finite", field="direction")
    if not np.allclose(direction.T @ direction, np.eye(3), atol=ORTHONORMAL_TOLERANCE):
        raise InputError(f"must be orthonormal, got {direction.ravel().tolist()}", field="direction")
    direction = direction.copy()
    direction.setflags(write=False)  # shared by every Volume on this grid: nobody may bend it
    return direction


@dataclass(frozen=True, eq=False)
class Grid:
    """A regular lattice of voxel centres in LPS mm. Immutable; validated on construction.

    Equality is deliberately not defined (``direction`` is an array and float geometry never matches
    to the bit after arithmetic): ask :meth:`same_grid`, which compares world positions with a
    tolerance.
    """

    shape: tuple[int, int, int]  # (z, y, x), the array order
    spacing: tuple[float, float, float]  # (x, y, z) mm
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        shape = _as_shape(self.shape)
        spacing = as_triplet(self.spacing, "spacing")
        if min(spacing) <= 0:
            raise InputError(f"must be > 0 mm, got {list(spacing)}", field="spacing")
        origin = as_triplet(self.origin, "origin")
        direction = _as_direction(self.direction)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def centred_on(
        cls,
        centre_mm: Sequence[float] | np.ndarray,
        shape: Sequence[int],
        spacing: Sequence[float],
        direction: Sequence[float] | np.ndarray | None = None,
    ) -> Grid:
        """The grid of ``shape`` (z, y, x) whose box is centred on ``centre_mm`` (identity direction if None).

        How VOIs around a prompt and scanner reconstructions around the table axis are laid out; for
        an even size the centre falls between two voxel centres, as it does on a scanner.
        """
        shape_zyx = _as_shape(shape)
        axes = np.eye(3) if direction is None else _as_direction(direction)
        half = np.asarray(as_triplet(spacing, "spacing")) * (np.asarray(shape_zyx[::-1]) - 1) / 2
        origin = np.asarray(as_triplet(centre_mm, "centre")) - axes @ half
        return cls(shape_zyx, spacing, tuple(origin), axes)

    def window(self, start_xyz: Sequence[int] | np.ndarray, size_xyz: Sequence[int] | np.ndarray) -> Grid:
        """The lattice-aligned box of ``size_xyz`` voxels whose first voxel is this grid's ``start_xyz``.

        The box may reach beyond this grid (negative ``start_xyz`` is how padding grows it): a crop,
        a pad and "the image voxels under a VOI" are all windows of the same lattice.
        """
        start = np.asarray(start_xyz, dtype=np.int64)
        size = np.asarray(size_xyz, dtype=np.int64)
        origin = self.index_to_world(start.astype(float))
        return Grid(tuple(int(n) for n in size[::-1]), self.spacing, tuple(origin), self.direction)

    def respaced(self, spacing: Sequence[float]) -> Grid:
        """Same direction and physical box at a new voxel size (the size rounds to whole voxels).

        The first new voxel centre sits half a new voxel inside the old box's edge, so the box's
        corners stay put however the spacing changes.
        """
        new_spacing = np.asarray(as_triplet(spacing, "spacing"))
        if np.any(new_spacing <= 0):
            raise InputError("must be > 0 mm", field="spacing")
        extent = np.asarray(self.shape_xyz) * np.asarray(self.spacing)
        new_size = np.maximum(1, np.round(extent / new_spacing)).astype(int)
        corner = self.index_to_world(np.full(3, -0.5))
        origin = corner + self.direction @ (new_spacing * 0.5)
        return Grid(tuple(int(n) for n in new_size[::-1]), tuple(new_spacing), tuple(origin), self.direction)

    def with_array(self, array: np.ndarray, **metadata: Any) -> Volume:
        """Values on this grid: the :class:`Volume` holding ``array`` (shape must be :attr:`shape`)."""
        from services.core.volume import Volume  # volume.py builds on this module

        array = np.asarray(array)
        if array.shape != self.shape:
            raise InputError(f"shape {array.shape} differs from the grid's {self.shape}", field="array")
        return Volume(array, self.spacing, self.origin, self.direction, metadata)

    # ------------------------------------------------------------------ basic facts
    @property
    def shape_xyz(self) -> tuple[int, int, int]:
        """Size in voxels in ITK (x, y, z) order."""
        z, y, x = self.shape
        return (x, y, z)

    @property
    def affine_lps(self) -> np.ndarray:
        """4×4 matrix mapping homogeneous (i, j, k, 1) indices to LPS mm."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        affine[:3, 3] = self.origin
        return affine

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def same_grid(self, other: Grid | Volume, tolerance_mm: float = 1e-3) -> bool:
        """True when both sample exactly the same world points (a few corners within ``tolerance_mm``)."""
        other = as_grid(other)
        if self.shape != other.shape:
            return False
        corners = np.array(
            [[0, 0, 0], [s - 1 for s in self.shape_xyz], [self.shape_xyz[0] - 1, 0, 0], [0, 0, 1]],
            dtype=float,
        )
        return bool(
            np.allclose(self.index_to_world(corners), other.index_to_world(corners), atol=tolerance_mm)
        )

    def describe(self) -> dict[str, Any]:
        """The geometry in ITK order, as ``wlcad inspect`` prints it."""
        return {
            "shape": list(self.shape_xyz),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": [float(v) for v in self.direction.ravel()],
        }

    # ------------------------------------------------------------------ coordinates
    def index_to_world(self, index_xyz: Sequence[float] | np.ndarray) -> np.ndarray:
        """Continuous voxel index (i, j, k), shape (..., 3) → world LPS mm, shape (..., 3)."""
        index = np.asarray(index_xyz, dtype=np.float64)
        return index @ (self.direction * np.asarray(self.spacing)[None, :]).T + np.asarray(self.origin)

    def world_to_index(self, world_lps_mm: Sequence[float] | np.ndarray) -> np.ndarray:
        """World LPS mm, shape (..., 3) → continuous voxel index (i, j, k), shape (..., 3)."""
        world = np.asarray(world_lps_mm, dtype=np.float64)
        # direction is orthonormal, so its inverse is its transpose.
        return ((world - np.asarray(self.origin)) @ self.direction) / np.asarray(self.spacing)

    def world_to_nearest_index(self, world_lps_mm: Sequence[float] | np.ndarray) -> np.ndarray:
        return np.rint(self.world_to_index(world_lps_mm)).astype(np.int64)

    def contains_world(self, world_lps_mm: Sequence[float] | np.ndarray) -> bool:
        """True when the point lies inside the grid's voxels (half a voxel beyond the centres)."""
        index = self.world_to_index(world_lps_mm)
        upper = np.asarray(self.shape_xyz, dtype=float) - 0.5
        return bool(np.all(index >= -0.5) and np.all(index <= upper))

    def world_grid(self) -> np.ndarray:
        """World coordinates of every voxel centre, shape (z, y, x, 3). Memory-hungry: for small grids."""
        k, j, i = np.meshgrid(*[np.arange(n) for n in self.shape], indexing="ij")
        return self.index_to_world(np.stack([i, j, k], axis=-1))


def as_grid(geometry: Grid | Volume) -> Grid:
    """The grid of a Grid or of a Volume, for functions that read only positions and take either."""
    if isinstance(geometry, Grid):
        return geometry
    grid = getattr(geometry, "grid", None)
    if not isinstance(grid, Grid):
        raise TypeError(f"expected a Grid or a Volume, got {type(geometry).__name__}")
    return grid
