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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from services.core.errors import InputError

Interpolation = Literal["linear", "nearest", "bspline"]

_ORTHONORMAL_TOLERANCE = 1e-3


def _as_triplet(values: Sequence[float] | np.ndarray, name: str) -> tuple[float, float, float]:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.shape != (3,):
        raise InputError(f"needs 3 numbers, got {arr.size}", field=name)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"must be finite, got {arr.tolist()}", field=name)
    return (float(arr[0]), float(arr[1]), float(arr[2]))


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image with its physical geometry. Immutable: geometry-changing methods return new volumes.

    ``metadata`` carries non-identifying facts the pipelines need later (modality, the source
    series/instance UIDs to reference from a DICOM SEG, photometric interpretation). It must never
    hold patient identifiers: readers only copy an allow-list of keys.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        array = np.asarray(self.array)
        if array.ndim != 3:
            raise InputError(f"must be 3D (z, y, x), got shape {array.shape}", field="array")
        if min(array.shape) < 1:
            raise InputError(f"has an empty axis: shape {array.shape}", field="array")
        spacing = _as_triplet(self.spacing, "spacing")
        if min(spacing) <= 0:
            raise InputError(f"must be > 0 mm, got {list(spacing)}", field="spacing")
        origin = _as_triplet(self.origin, "origin")
        direction = np.asarray(self.direction, dtype=np.float64)
        if direction.size != 9:
            raise InputError(f"needs 9 numbers, got {direction.size}", field="direction")
        direction = direction.reshape(3, 3)
        if not np.all(np.isfinite(direction)):
            raise InputError("must be finite", field="direction")
        if not np.allclose(direction.T @ direction, np.eye(3), atol=_ORTHONORMAL_TOLERANCE):
            raise InputError(f"must be orthonormal, got {direction.ravel().tolist()}", field="direction")
        direction = direction.copy()
        direction.setflags(write=False)
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "metadata", dict(self.metadata))

    # ------------------------------------------------------------------ basic facts
    @property
    def shape_xyz(self) -> tuple[int, int, int]:
        """Size in voxels in ITK (x, y, z) order."""
        z, y, x = self.array.shape
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

    def with_array(self, array: np.ndarray, **metadata_updates: Any) -> Volume:
        """The same grid holding other values (e.g. a mask). Shapes must agree."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise InputError(f"shape {array.shape} differs from the grid's {self.array.shape}", field="array")
        return Volume(array, self.spacing, self.origin, self.direction, {**self.metadata, **metadata_updates})

    def same_grid(self, other: Volume, tolerance_mm: float = 1e-3) -> bool:
        """True when both volumes sample exactly the same world points."""
        if self.array.shape != other.array.shape:
            return False
        corners = np.array(
            [[0, 0, 0], [s - 1 for s in self.shape_xyz], [self.shape_xyz[0] - 1, 0, 0], [0, 0, 1]],
            dtype=float,
        )
        return bool(
            np.allclose(self.index_to_world(corners), other.index_to_world(corners), atol=tolerance_mm)
        )

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
        """True when the point lies inside the volume's voxels (half a voxel beyond the centres)."""
        index = self.world_to_index(world_lps_mm)
        upper = np.asarray(self.shape_xyz, dtype=float) - 0.5
        return bool(np.all(index >= -0.5) and np.all(index <= upper))

    def world_grid(self) -> np.ndarray:
        """World coordinates of every voxel centre, shape (z, y, x, 3). Memory-hungry: for small volumes."""
        k, j, i = np.meshgrid(*[np.arange(n) for n in self.array.shape], indexing="ij")
        return self.index_to_world(np.stack([i, j, k], axis=-1))

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
        origin = self.index_to_world(start.astype(float))
        return Volume(sub.copy(), self.spacing, origin, self.direction, self.metadata)

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
        origin = self.index_to_world(-before.astype(float))
        return Volume(padded, self.spacing, origin, self.direction, self.metadata)

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
        reference: Volume | None = None,
        interpolation: Interpolation = "linear",
        default_value: float = 0.0,
        output_dtype: np.dtype | type | None = None,
    ) -> Volume:
        """Resample onto another grid in world space (SimpleITK does the interpolation).

        Either ``reference`` (take its exact grid: the usual way to put a mask back on an input image)
        or ``spacing`` (same origin, direction and physical extent, new voxel size) is given.
        """
        import SimpleITK as sitk

        from services.core.sitk_bridge import sitk_from_volume, volume_from_sitk

        if (spacing is None) == (reference is None):
            raise InputError("give exactly one of spacing or reference", field="resample")
        if reference is None:
            new_spacing = np.asarray(_as_triplet(spacing, "spacing"))
            if np.any(new_spacing <= 0):
                raise InputError("must be > 0 mm", field="spacing")
            extent = np.asarray(self.shape_xyz) * np.asarray(self.spacing)
            new_size = np.maximum(1, np.round(extent / new_spacing)).astype(int)
            # Keep the physical box: the first new voxel centre sits half a new voxel inside the old edge.
            corner = self.index_to_world(np.full(3, -0.5))
            origin = corner + self.direction @ (new_spacing * 0.5)
            reference = Volume(
                np.zeros((1, 1, 1), dtype=np.uint8),
                tuple(new_spacing),
                tuple(origin),
                self.direction,
            )
            target_size = tuple(int(n) for n in new_size)
        else:
            target_size = reference.shape_xyz
        methods = {
            "linear": sitk.sitkLinear,
            "nearest": sitk.sitkNearestNeighbor,
            "bspline": sitk.sitkBSpline,
        }
        if interpolation not in methods:
            raise InputError(f"unknown interpolation {interpolation!r}", field="interpolation")
        resampler = sitk.ResampleImageFilter()
        resampler.SetSize(target_size)
        resampler.SetOutputSpacing(reference.spacing)
        resampler.SetOutputOrigin(reference.origin)
        resampler.SetOutputDirection(tuple(reference.direction.ravel()))
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
            "shape": list(self.shape_xyz),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": [float(v) for v in self.direction.ravel()],
            "dtype": str(self.array.dtype),
            "modality": self.metadata.get("modality"),
        }
