"""Lesion measurements read off a mask the way a radiologist records them.

Per lesion: centre of mass (world LPS mm), maximum 3D diameter, the longest axial diameter and the
longest diameter perpendicular to it on the same slice (RECIST-like), and the volume. Diameters are
edge to edge: the distance between the farthest voxel centres plus the voxel's own extent along that
line — what calipers on a screen measure, and why thick slices inflate the craniocaudal size.
Phantom weak labels (training) and estimated-mask QC (serving) both use these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from services.core.volume import Volume


@dataclass(frozen=True)
class WeakLabel:
    """What a reader writes down for one lesion (all in mm, world LPS)."""

    lesion_id: int
    center_mm: tuple[float, float, float]
    diameter_mm: float
    axial_long_mm: float
    axial_short_mm: float
    volume_mm3: float
    n_voxels: int


@dataclass(frozen=True)
class Measurements:
    """A mask's measurements as every capability reports them (mm, world LPS; rounded to 0.001 so a
    report is stable text). ``center_mm`` is ``None`` for an empty mask, whose sizes are 0."""

    voxels: int
    volume_mm3: float = 0.0
    center_mm: tuple[float, float, float] | None = None
    max_diameter_mm: float = 0.0
    axial_long_mm: float = 0.0
    axial_short_mm: float = 0.0

    @classmethod
    def of(cls, label: WeakLabel) -> Measurements:
        return cls(
            voxels=label.n_voxels,
            volume_mm3=round(label.volume_mm3, 3),
            center_mm=(
                round(label.center_mm[0], 3),
                round(label.center_mm[1], 3),
                round(label.center_mm[2], 3),
            ),
            max_diameter_mm=round(label.diameter_mm, 3),
            axial_long_mm=round(label.axial_long_mm, 3),
            axial_short_mm=round(label.axial_short_mm, 3),
        )


def measure_mask(mask_region: np.ndarray, offset_zyx: tuple[int, int, int], geometry: Volume) -> Measurements:
    """:class:`Measurements` of a boolean region (a box of the image grid at ``offset_zyx``)."""
    if not mask_region.any():
        return Measurements(voxels=0)
    return Measurements.of(measure_lesion(mask_region, offset_zyx, geometry, 0))


def _hull_points(points: np.ndarray) -> np.ndarray:
    """The convex-hull vertices (fewer pairs to compare); all points when the hull is degenerate."""
    if len(points) < 5:
        return points
    dims = points.shape[1]
    spread = points.max(0) - points.min(0)
    keep = spread > 1e-6
    if keep.sum() < dims:
        if keep.sum() <= 1:
            return (
                points[[int(np.argmin(points @ keep)), int(np.argmax(points @ keep))]]
                if keep.any()
                else points[:1]
            )
        sub = points[:, keep]
        try:
            return points[ConvexHull(sub).vertices]
        except QhullError:
            return points
    try:
        return points[ConvexHull(points).vertices]
    except QhullError:
        return points


def _max_caliper(points_mm: np.ndarray, voxel_step: np.ndarray) -> tuple[float, np.ndarray]:
    """Longest edge-to-edge distance through a point set and its unit direction.

    ``voxel_step`` (3×3, columns = world step of one voxel along i, j, k) gives each voxel's extent
    along the measured line.
    """
    hull = _hull_points(points_mm)
    if len(hull) < 2:
        extent = np.linalg.norm(voxel_step, axis=0)
        axis = int(np.argmax(extent[:2])) if voxel_step.shape[1] > 1 else 0
        return float(extent[axis]), voxel_step[:, axis] / extent[axis]
    diff = hull[:, None, :] - hull[None, :, :]
    dist = np.sqrt((diff**2).sum(-1))
    a, b = np.unravel_index(int(np.argmax(dist)), dist.shape)
    length = float(dist[a, b])
    direction = diff[a, b] / max(length, 1e-9)
    extent = float(np.abs(direction @ voxel_step).sum())
    return length + extent, direction


def _boundary(region: np.ndarray) -> np.ndarray:
    """Surface voxels only: the farthest pair always lies on the surface."""
    if region.sum() < 64:
        return region
    return region & ~ndimage.binary_erosion(region)


def measure_lesion(
    mask_region: np.ndarray, offset_zyx: tuple[int, int, int], geometry: Volume, lesion_id: int
) -> WeakLabel:
    """Weak label of one lesion from its boolean region (a box of the label map at ``offset_zyx``)."""
    step = geometry.direction * np.asarray(geometry.spacing)[None, :]
    kji = np.argwhere(mask_region) + np.asarray(offset_zyx)
    centre_idx = kji.mean(0)[::-1]
    center_mm = geometry.index_to_world(centre_idx)
    surface = np.argwhere(_boundary(mask_region)) + np.asarray(offset_zyx)
    diameter, _ = _max_caliper(geometry.index_to_world(surface[:, ::-1].astype(float)), step)
    # Axial (in-plane) measurements, slice by slice: RECIST long axis and its perpendicular.
    best_long, best_short = 0.0, 0.0
    for z in np.unique(kji[:, 0]):
        in_slice = kji[kji[:, 0] == z][:, 1:][:, ::-1].astype(float)  # (i, j)
        pts = in_slice @ step[:2, :2].T  # in-plane mm (x, y)
        long_len, direction = _max_caliper(pts, step[:2, :2])
        if long_len > best_long:
            perp = np.array([-direction[1], direction[0]])
            proj = pts @ perp
            short = float(proj.max() - proj.min()) + float(np.abs(perp @ step[:2, :2]).sum())
            best_long, best_short = long_len, min(short, long_len)
    n = len(kji)
    return WeakLabel(
        lesion_id=lesion_id,
        center_mm=(float(center_mm[0]), float(center_mm[1]), float(center_mm[2])),
        diameter_mm=float(diameter),
        axial_long_mm=float(best_long),
        axial_short_mm=float(best_short),
        volume_mm3=float(n * geometry.voxel_volume_mm3),
        n_voxels=n,
    )


def weak_labels_from_mask(mask: Volume) -> list[WeakLabel]:
    """One weak label per lesion id present in the label map, in id order."""
    labels = np.asarray(mask.array)
    boxes = ndimage.find_objects(labels.astype(np.int32))
    out = []
    for index, box in enumerate(boxes):
        if box is None:
            continue
        lesion_id = index + 1
        region = labels[box] == lesion_id
        out.append(measure_lesion(region, tuple(s.start for s in box), mask, lesion_id))
    return out
