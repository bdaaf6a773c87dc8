"""Work near the lesion only: a voxel box around the prompt, and masks that know where they sit.

Every method computes inside a box of a few lesion radii, so a 512×512×300 CT costs the same as a
64³ crop. :class:`LesionMask` keeps the box and its boolean mask; the full-grid mask is made only
when a file on the input grid is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.core.volume import Volume


def box_around(
    volume: Volume, center_mm, radius_mm: float, margin_voxels: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(start_xyz, size_xyz) of the voxel box covering a ball, clipped to the image.

    The direction matrix is orthonormal, so a ball of radius r spans r / spacing voxels along every
    index axis, whatever the obliquity.
    """
    center_index = volume.world_to_index(center_mm)
    half = radius_mm / np.asarray(volume.spacing)
    low = np.floor(center_index - half).astype(int) - margin_voxels
    high = np.ceil(center_index + half).astype(int) + margin_voxels + 1
    shape = np.asarray(volume.shape_xyz)
    low = np.clip(low, 0, shape - 1)
    high = np.clip(high, low + 1, shape)
    return low, high - low


def world_coordinates(volume: Volume, start_xyz, size_xyz) -> np.ndarray:
    """World LPS mm of every voxel centre in a box, shape (z, y, x, 3)."""
    i, j, k = (np.arange(start_xyz[a], start_xyz[a] + size_xyz[a], dtype=float) for a in range(3))
    kk, jj, ii = np.meshgrid(k, j, i, indexing="ij")
    return volume.index_to_world(np.stack([ii, jj, kk], axis=-1))


@dataclass(frozen=True)
class LesionMask:
    """A boolean lesion mask inside a voxel box of the image it belongs to."""

    image: Volume
    start_xyz: tuple[int, int, int]
    mask_zyx: np.ndarray  # bool, shape (size_z, size_y, size_x)

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        z, y, x = self.mask_zyx.shape
        return (x, y, z)

    @property
    def voxel_count(self) -> int:
        return int(self.mask_zyx.sum())

    def tight(self) -> LesionMask:
        """The same mask in its tightest box (what CIRCUS labels and the API transmit)."""
        if not self.mask_zyx.any():
            return self
        nz = np.argwhere(self.mask_zyx)
        low, high = nz.min(0), nz.max(0) + 1
        start = tuple(int(self.start_xyz[a] + low[2 - a]) for a in range(3))
        return LesionMask(
            self.image, start, self.mask_zyx[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
        )

    def full(self) -> np.ndarray:
        """The mask on the whole input grid (z, y, x)."""
        out = np.zeros(self.image.array.shape, dtype=bool)
        x0, y0, z0 = self.start_xyz
        sz, sy, sx = self.mask_zyx.shape
        out[z0 : z0 + sz, y0 : y0 + sy, x0 : x0 + sx] = self.mask_zyx
        return out

    def voxel_indices(self) -> np.ndarray:
        """(i, j, k) indices of the mask's voxels on the input grid, shape (n, 3)."""
        kji = np.argwhere(self.mask_zyx)
        return kji[:, ::-1] + np.asarray(self.start_xyz)[None, :]
