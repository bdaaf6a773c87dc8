"""Blend a rasterised lesion into an image and paint its label — the one place both happen together.

Why together: the mask must be *exactly* the voxels whose intensity the lesion changed by at least
half a voxel's worth, so image and label come from the same :class:`~training.data.shapes.Raster`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from training.data.shapes import Raster

BlendMode = Literal["replace", "add"]


def overlaps(raster: Raster, mask: np.ndarray, *, clearance: float = 0.0) -> bool:
    """True when the new lesion would touch an already painted one (lesions must stay separate)."""
    existing = mask[raster.slices] != 0
    return bool(np.any(existing & (raster.occupancy > clearance)))


def blend(image: np.ndarray, raster: Raster, mode: BlendMode = "replace") -> None:
    """Shade the lesion into ``image`` in place.

    ``replace``: the lesion's tissue takes the place of the background (CT, MR).
    ``add``: the lesion adds attenuation along the ray (a radiograph's line integral).
    """
    if raster.shaded is None:
        raise ValueError("raster has no intensity profile")
    view = image[raster.slices]
    if mode == "replace":
        view *= 1.0 - raster.weight
        view += raster.shaded
    else:
        view += raster.shaded


def paint_label(mask: np.ndarray, raster: Raster, lesion_id: int) -> int:
    """Write ``lesion_id`` where the voxel is at least half inside; returns the voxel count.

    A lesion smaller than half of every voxel it touches (3 mm on 5 mm slices) still gets its most
    occupied voxel, as a radiologist would still mark it.
    """
    view = mask[raster.slices]
    inside = (raster.occupancy >= 0.5) & (view == 0)
    if not inside.any():
        candidates = np.where(view == 0, raster.occupancy, 0.0)
        if candidates.max() <= 0:
            return 0
        inside = np.zeros_like(inside)
        inside.flat[int(np.argmax(candidates))] = True
    view[inside] = lesion_id
    return int(inside.sum())
