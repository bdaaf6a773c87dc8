"""Candidates from a detector's probability map: local maxima, their size, and suppression in mm.

A heatmap or sphere-mask network answers with a probability per voxel; a reader (and FROC) wants a
short ranked list of points. Each candidate is a component scored by its peak: a local maximum above
a floor grows into the connected region above half its peak; the candidate's centre is that region's
probability-weighted centroid (a sphere-mask output is nearly flat inside a lesion, so the arg-max
voxel could sit anywhere on it; the centroid is sub-voxel exact for a symmetric blob) and its
diameter the region's equivalent sphere (circle, on a single slice). Suppression works in mm, so
anisotropic voxels do not change which candidates survive.

Known limit: two lesions whose half-peak regions touch are one region, reported at its centroid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from services.core.errors import InputError
from services.core.grid import Grid
from services.evaluation.matching import Candidate

#: The region that sizes a candidate is searched no farther than this from its peak (mm): a bound on
#: the work per candidate and on the largest diameter reported.
MAX_DIAMETER_MM = 80.0


@dataclass(frozen=True)
class DetectionCandidate:
    """One detection on an image's own grid.

    ``center_mm``: world LPS mm (x, y, z); ``center_voxel``: the nearest voxel index (i, j, k) = (x, y, z)
    of the image the candidate is reported on; ``diameter_mm``: equivalent-sphere (3D) or -circle (one
    slice) diameter of the region above half the peak; ``confidence``: the peak probability in [0, 1].
    """

    center_mm: tuple[float, float, float]
    center_voxel: tuple[int, int, int]
    diameter_mm: float
    confidence: float

    def to_candidate(self, case_id: str) -> Candidate:
        """The FROC input (:mod:`services.evaluation.matching`) for case ``case_id``."""
        return Candidate(case_id, self.center_mm, self.confidence)

    def as_dict(self) -> dict:
        """The JSON shape of ``wlcad detect``'s ``candidates`` entries."""
        return {
            "center_mm": list(self.center_mm),
            "center_voxel": list(self.center_voxel),
            "diameter_mm": self.diameter_mm,
            "confidence": self.confidence,
        }


@dataclass(frozen=True)
class _Region:
    """The connected region ≥ half a peak around it, in a crop of the map starting at ``offset``."""

    offset: np.ndarray  # (z, y, x) of the crop's first voxel
    mask: np.ndarray  # bool, the crop's shape
    center_zyx: np.ndarray  # probability-weighted centroid, continuous array index
    value: float

    def holds(self, voxel: np.ndarray) -> bool:
        local = voxel - self.offset
        if np.any(local < 0) or np.any(local >= self.mask.shape):
            return False
        return bool(self.mask[tuple(local)])


def _validated(probability: np.ndarray, grid: Grid) -> np.ndarray:
    prob = np.asarray(probability)
    if prob.shape != grid.shape:
        raise InputError(f"shape {prob.shape} differs from the grid's {grid.shape}", field="probability")
    if not np.all(np.isfinite(prob)):
        raise InputError("holds non-finite values", field="probability")
    return prob.astype(np.float32, copy=False)


def _footprint_zyx(grid: Grid, radius_mm: float) -> tuple[int, int, int]:
    """Window (odd voxel counts, z, y, x) of the local-maximum test: about the suppression radius."""
    spacing_zyx = np.asarray(grid.spacing)[::-1]
    half = np.maximum(1, np.floor(radius_mm / spacing_zyx)).astype(int)
    return tuple(int(2 * h + 1) for h in half)


def _seeds(prob: np.ndarray, grid: Grid, floor: float, radius_mm: float) -> np.ndarray:
    """Local maxima ≥ ``floor`` as (n, 3) voxel indices (z, y, x), strongest first. Tied maxima (a
    flat plateau) all appear; the region of the first one absorbs the rest."""
    maxed = ndimage.maximum_filter(prob, size=_footprint_zyx(grid, radius_mm), mode="nearest")
    voxels = np.argwhere((prob >= maxed) & (prob >= floor))
    order = np.argsort(-prob[tuple(voxels.T)], kind="stable")
    return voxels[order]


def _region(prob: np.ndarray, grid: Grid, peak: np.ndarray) -> _Region:
    spacing_zyx = np.asarray(grid.spacing)[::-1]
    half = np.ceil(MAX_DIAMETER_MM / 2 / spacing_zyx).astype(int)
    lo = np.maximum(0, peak - half)
    hi = np.minimum(prob.shape, peak + half + 1)
    crop = prob[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    value = float(prob[tuple(peak)])
    labels, _ = ndimage.label(crop >= 0.5 * value)
    mask = labels == labels[tuple(peak - lo)]
    center = np.asarray(ndimage.center_of_mass(np.where(mask, crop, 0.0)), dtype=np.float64) + lo
    return _Region(lo, mask, center, value)


def _diameter_mm(region: _Region, grid: Grid) -> float:
    """Equivalent sphere diameter of the region; equivalent circle on a single slice."""
    spacing_zyx = np.asarray(grid.spacing)[::-1]
    count = int(np.count_nonzero(region.mask))
    if grid.shape[0] == 1:
        area = count * spacing_zyx[1] * spacing_zyx[2]
        return float(2.0 * math.sqrt(area / math.pi))
    volume = count * float(np.prod(spacing_zyx))
    return float((6.0 * volume / math.pi) ** (1.0 / 3.0))


def _kept_regions(
    prob: np.ndarray, grid: Grid, floor: float, radius_mm: float, max_count: int
) -> list[_Region]:
    """Strongest first: a seed inside a kept region is that lesion again and is skipped; a region whose
    centre lies closer than ``radius_mm`` to a kept centre is suppressed (greedy NMS in mm)."""
    kept: list[_Region] = []
    kept_mm: list[np.ndarray] = []
    for seed in _seeds(prob, grid, floor, radius_mm):
        if len(kept) >= max_count:
            break
        if any(region.holds(seed) for region in kept):
            continue
        region = _region(prob, grid, seed)
        mm = grid.index_to_world(region.center_zyx[::-1])
        if kept_mm and np.min(np.linalg.norm(np.asarray(kept_mm) - mm, axis=1)) < radius_mm:
            continue
        kept.append(region)
        kept_mm.append(mm)
    return kept


def find_candidates(
    probability: np.ndarray,
    grid: Grid,
    *,
    floor: float = 0.1,
    nms_radius_mm: float = 10.0,
    max_count: int = 100,
    report_grid: Grid | None = None,
) -> list[DetectionCandidate]:
    """Candidates of ``probability`` (array z, y, x on ``grid``), strongest first.

    ``floor``: the least peak kept; ``nms_radius_mm``: two candidates closer than this keep the stronger
    (it is also the radius of the local-maximum window); ``max_count``: the cap after suppression.
    ``report_grid``: the grid whose voxel indices ``center_voxel`` gives (the original image when the
    map was computed on a working grid covering the same world box); default ``grid``.
    """
    if not 0.0 <= floor <= 1.0:
        raise InputError(f"must lie in [0, 1], got {floor}", field="floor")
    if not nms_radius_mm > 0:
        raise InputError(f"must be > 0 mm, got {nms_radius_mm}", field="nms_radius_mm")
    if max_count < 0:
        raise InputError(f"must be ≥ 0, got {max_count}", field="max_count")
    prob = _validated(probability, grid)
    target = report_grid or grid
    out = []
    for region in _kept_regions(prob, grid, floor, nms_radius_mm, max_count):
        mm = grid.index_to_world(region.center_zyx[::-1])
        voxel = np.clip(np.rint(target.world_to_index(mm)), 0, np.asarray(target.shape_xyz) - 1)
        out.append(
            DetectionCandidate(
                center_mm=_triplet(mm),
                center_voxel=tuple(int(v) for v in voxel),
                diameter_mm=_diameter_mm(region, grid),
                confidence=region.value,
            )
        )
    return out


def _triplet(values: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    return (float(values[0]), float(values[1]), float(values[2]))
