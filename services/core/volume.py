"""The one image type of wlcad: a voxel array that always knows where it is in the patient.

Conventions (stated once, used everywhere — see docs/architecture.md):

* World space is ITK/DICOM **LPS** in millimetres (x grows to the patient's Left, y to Posterior,
  z to Superior).
* ``array`` is indexed ``[k, j, i]`` = ``[z, y, x]`` (C order, slowest axis first), the order
  SimpleITK's ``GetArrayFromImage`` and pydicom stacks use.
* Every *index* or *size* in the API (``index_xyz``, ``size_xyz``, ``spacing``) is in ITK
  ``x, y, z`` = ``i, j, k`` order, the order the CLI prints and takes.
* ``origin`` is the world position (mm, LPS) of the **centre** of voxel ``(0, 0, 0)``.
* ``direction`` is a 3×3 matrix whose **columns** are the world unit vectors of the i, j, k axes.
  Hence ``world = origin + direction @ (spacing * index)``.

A 2D radiograph is a volume with one slice (``array.shape == (1, rows, cols)``).

The geometry alone is a :class:`services.core.grid.Grid` (``volume.grid``): pass a Grid, not a Volume
holding a placeholder array, wherever only positions matter (resampling targets, VOIs, dose grids).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from services.core.errors import InputError
from services.core.grid import Grid, as_grid

Interpolation = Literal["linear", "nearest", "bspline"]


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image with its physical geometry. Immutable: geometry-changing methods return new volumes.

    The geometry itself is a :class:`~services.core.grid.Grid` (:attr:`grid`); the coordinate methods
    here delegate to it, so a Volume and its grid can never disagree about where a voxel is.

    ``metadata`` carries non-identifying facts the pipelines need later (modality, the source
    series/instance UIDs to reference from a DICOM SEG, photometric interpretation). It must never
    hold patient identifiers: readers only copy an allow-list of keys.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    metadata: Mapping[str, Any] = field(default_factory=dict)
    if TYPE_CHECKING:  # set in __post_init__; not a dataclass field, so not in __init__, repr or asdict
        _grid: Grid

    def __post_init__(self) -> None:
        array = np.asarray(self.array)
        # The array is checked first and by its own name: "array" tells a caller more than "shape".
        if array.ndim != 3:
            raise InputError(f"must be 3D (z, y, x), got shape {array.shape}", field="array")
        if min(array.shape) < 1:
            raise InputError(f"has an empty axis: shape {array.shape}", field="array")
        grid = Grid(array.shape, self.spacing, self.origin, self.direction)
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "spacing", grid.spacing)
        object.__setattr__(self, "origin", grid.origin)
        object.__setattr__(self, "direction", grid.direction)
        object.__setattr__(self, "metadata", dict(self.metadata))
        object.__setattr__(self, "_grid", grid)

    # ------------------------------------------------------------------ basic facts
    @property
    def grid(self) -> Grid:
        """Where the voxels are, without the values (what resampling targets and VOIs need)."""
        return self._grid

    @property
    def shape_xyz(self) -> tuple[int, int, int]:
        """Size in voxels in ITK (x, y, z) order."""
        return self._grid.shape_xyz

    @property
    def affine_lps(self) -> np.ndarray:
        """4×4 matrix mapping homogeneous (i, j, k, 1) indices to LPS mm."""
        return self._grid.affine_lps

    @property
    def voxel_volume_mm3(self) -> float:
        return self._grid.voxel_volume_mm3

    def with_array(self, array: np.ndarray, **metadata_updates: Any) -> Volume:
        """The same grid holding other values (e.g. a mask). Shapes must agree."""
        return self._grid.with_array(array, **{**self.metadata, **metadata_updates})

    def same_grid(self, other: Volume | Grid, tolerance_mm: float = 1e-3) -> bool:
        """True when both volumes sample exactly the same world points."""
        return self._grid.same_grid(other, tolerance_mm)

    # ------------------------------------------------------------------ coordinates
    def index_to_world(self, index_xyz: Sequence[float] | np.ndarray) -> np.ndarray:
        """Continuous voxel index (i, j, k), shape (..., 3) → world LPS mm, shape (..., 3)."""
        return self._grid.index_to_world(index_xyz)

    def world_to_index(self, world_lps_mm: Sequence[float] | np.ndarray) -> np.ndarray:
        """World LPS mm, shape (..., 3) → continuous voxel index (i, j, k), shape (..., 3)."""
        return self._grid.world_to_index(world_lps_mm)

    def world_to_nearest_index(self, world_lps_mm: Sequence[float] | np.ndarray) -> np.ndarray:
        return self._grid.world_to_nearest_index(world_lps_mm)

    def contains_world(self, world_lps_mm: Sequence[float] | np.ndarray) -> bool:
        """True when the point lies inside the volume's voxels (half a voxel beyond the centres)."""
        return self._grid.contains_world(world_lps_mm)

    def world_grid(self) -> np.ndarray:
        """World coordinates of every voxel centre, shape (z, y, x, 3). Memory-hungry: for small volumes."""
        return self._grid.world_grid()

    # ------------------------------------------------------------------ geometry-keeping edits
    def crop(self, start_xyz: Sequence[int], size_xyz: Sequence[int]) -> Volume:
        """Sub-volume of ``size_xyz`` voxels from ``start_xyz``; it stays where it was in the world.

        Parts outside the image are an error: use :meth:`pad` first, or :meth:`crop_or_pad`.
        """
        start = np.asarray(start_xyz, dtype=np.int64)
        size = np.asarray(size_xyz, dtype=np.int64)
        stop = start + size
        if np.any(size < 1) or np.any(start < 0) or np.any(stop > np.asarray(self.shape_xyz)):
            raise InputError(
                f"crop start {start.tolist()} size {size.tolist()} leaves the image {list(self.shape_xyz)}",
                field="crop",
            )
        sub = self.array[start[2] : stop[2], start[1] : stop[1], start[0] : stop[0]]
        return self._grid.window(start, size).with_array(sub.copy(), **self.metadata)

    def pad(self, before_xyz: Sequence[int], after_xyz: Sequence[int], value: float = 0) -> Volume:
        """Grow the grid by whole voxels on each side; the existing voxels keep their world position."""
        before = np.asarray(before_xyz, dtype=np.int64)
        after = np.asarray(after_xyz, dtype=np.int64)
        if np.any(before < 0) or np.any(after < 0):
            raise InputError("pad widths must be ≥ 0", field="pad")
        widths = [
            (int(before[2]), int(after[2])),
            (int(before[1]), int(after[1])),
            (int(before[0]), int(after[0])),
        ]
        padded = np.pad(self.array, widths, mode="constant", constant_values=value)
        size = np.asarray(self.shape_xyz) + before + after
        return self._grid.window(-before, size).with_array(padded, **self.metadata)

    def crop_or_pad(self, start_xyz: Sequence[int], size_xyz: Sequence[int], value: float = 0) -> Volume:
        """Like :meth:`crop`, but voxels outside the image are filled with ``value``."""
        start = np.asarray(start_xyz, dtype=np.int64)
        size = np.asarray(size_xyz, dtype=np.int64)
        shape = np.asarray(self.shape_xyz, dtype=np.int64)
        before = np.maximum(0, -start)
        after = np.maximum(0, start + size - shape)
        padded = self.pad(before, after, value) if np.any(before) or np.any(after) else self
        return padded.crop(start + before, size)

    def resample(
        self,
        *,
        spacing: Sequence[float] | None = None,
        reference: Volume | Grid | None = None,
        interpolation: Interpolation = "linear",
        default_value: float = 0.0,
        output_dtype: np.dtype | type | None = None,
    ) -> Volume:
        """Resample onto another grid in world space (SimpleITK does the interpolation).

        Either ``reference`` (take its exact grid — a :class:`Grid`, or a Volume whose values are
        ignored: the usual way to put a mask back on an input image) or ``spacing`` (same origin,
        direction and physical extent, new voxel size; see :meth:`Grid.respaced`) is given.
        """
        import SimpleITK as sitk

        from services.core.sitk_bridge import sitk_from_volume, volume_from_sitk

        if (spacing is None) == (reference is None):
            raise InputError("give exactly one of spacing or reference", field="resample")
        target = self._grid.respaced(spacing) if reference is None else as_grid(reference)
        methods = {
            "linear": sitk.sitkLinear,
            "nearest": sitk.sitkNearestNeighbor,
            "bspline": sitk.sitkBSpline,
        }
        if interpolation not in methods:
            raise InputError(f"unknown interpolation {interpolation!r}", field="interpolation")
        resampler = sitk.ResampleImageFilter()
        resampler.SetSize(target.shape_xyz)
        resampler.SetOutputSpacing(target.spacing)
        resampler.SetOutputOrigin(target.origin)
        resampler.SetOutputDirection(tuple(target.direction.ravel()))
        resampler.SetInterpolator(methods[interpolation])
        resampler.SetDefaultPixelValue(float(default_value))
        source = sitk_from_volume(self)
        if interpolation != "nearest" and np.issubdtype(self.array.dtype, np.integer):
            source = sitk.Cast(source, sitk.sitkFloat32)
        out = volume_from_sitk(resampler.Execute(source), metadata=self.metadata)
        if output_dtype is not None:
            out = out.with_array(out.array.astype(output_dtype))
        elif interpolation == "nearest":
            out = out.with_array(out.array.astype(self.array.dtype))
        return out

    def describe(self) -> dict[str, Any]:
        """The geometry in ITK order, as ``wlcad inspect`` prints it."""
        return {
            **self._grid.describe(),
            "dtype": str(self.array.dtype),
            "modality": self.metadata.get("modality"),
        }
