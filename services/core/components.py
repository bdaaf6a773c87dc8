"""Post-processing every data-driven method shares: keep the lesion the prompt points at, fill it."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def component_at(mask: np.ndarray, center_zyx: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """The connected component containing the centre voxel, else the one nearest to it (in mm).

    A ring-enhancing metastasis has a dark necrotic core, so the centre voxel may be outside the
    thresholded ring: "nearest component" then picks the ring, and hole filling restores the core.
    """
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    center = np.clip(np.rint(center_zyx).astype(int), 0, np.asarray(mask.shape) - 1)
    chosen = labels[tuple(center)]
    if chosen == 0:
        # Distance (mm) from the centre to the nearest voxel of each component.
        points = np.argwhere(labels > 0)
        distance = np.linalg.norm((points - center_zyx) * spacing_zyx, axis=1)
        chosen = labels[tuple(points[int(np.argmin(distance))])]
    component = labels == chosen
    return fill_holes(component)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes in 3D and, for cavities open across slices, slice by slice.

    Holes lie inside the mask's bounding box, so only that box is processed (the per-slice pass is
    the costliest step of post-processing otherwise).
    """
    boxes = ndimage.find_objects(mask.astype(np.uint8))
    if not boxes or boxes[0] is None:
        return mask.astype(bool)
    box = boxes[0]
    filled = mask.astype(bool).copy()
    inner = ndimage.binary_fill_holes(filled[box])
    for z in range(inner.shape[0]):
        inner[z] = ndimage.binary_fill_holes(inner[z])
    filled[box] = inner
    return filled
