"""What every generator returns, and the small numerical helpers they share.

A :class:`PhantomCase` holds the image, the exact label map on the image grid (voxel value =
lesion_id, 0 = background), one :class:`LesionRecord` per painted lesion, and non-identifying facts
about how it was made (noise sd, spacing choice, hard negatives) for tests and documentation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from services.core.grid import Grid
from services.core.volume import Volume
from training.data.painting import BlendMode, blend, overlaps, paint_label
from training.data.shapes import LesionShape, Profile, rasterize

#: Stored value ranges of the int16 images: 12-bit unsigned (MR magnitude, radiograph detector) and
#: 12-bit CT in HU (−1024 is air; what a scanner's rescale makes of 0..4095).
UNSIGNED_12BIT = (0, 4095)
CT_HU_12BIT = (-1024, 3071)
#: The synthetic scanners all store 12 bits, so the modality decides the range.
STORED_RANGE = {"CT": CT_HU_12BIT, "MR": UNSIGNED_12BIT, "DX": UNSIGNED_12BIT}

Candidate = TypeVar("Candidate")


@dataclass
class LesionRecord:
    """One painted lesion: its id in the mask, its kind, and the nominal contrast it was drawn with."""

    lesion_id: int
    lesion_type: str
    shape: LesionShape
    contrast_sd: float  # |lesion − background| / noise sd, as designed (the test re-measures it)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PhantomCase:
    """One generated case. ``extras`` holds additional volumes (e.g. the RT dose grid)."""

    task: str
    image: Volume
    mask: Volume
    lesions: list[LesionRecord]
    abnormal: bool
    info: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Volume] = field(default_factory=dict)


def centred_geometry(
    shape_zyx: tuple[int, int, int], spacing_xyz: tuple[float, float, float], z_centre_mm: float = 0.0
) -> Grid:
    """An axial LPS grid centred on the patient axis (identity direction), as scanners reconstruct.

    Geometry only: the generators draw their anatomy on it and put values on it with ``with_array``.
    """
    return Grid.centred_on((0.0, 0.0, z_centre_mm), shape_zyx, spacing_xyz)


def axis_coordinates_mm(geometry: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World x, y, z of voxel centres as broadcastable (1,1,nx), (1,ny,1), (nz,1,1) float32 arrays.

    Valid for the identity-direction grids the synthetic generators use; cheap to combine into
    analytic anatomy without materialising a (z, y, x, 3) coordinate array.
    """
    nz, ny, nx = geometry.shape
    ox, oy, oz = geometry.origin
    sx, sy, sz = geometry.spacing
    x = (ox + sx * np.arange(nx, dtype=np.float64)).astype(np.float32)[None, None, :]
    y = (oy + sy * np.arange(ny, dtype=np.float64)).astype(np.float32)[None, :, None]
    z = (oz + sz * np.arange(nz, dtype=np.float64)).astype(np.float32)[:, None, None]
    return x, y, z


def _gaussian_interpolation(n_out: int, n_coarse: int) -> np.ndarray:
    """(n_out × n_coarse) smooth interpolation weights: rows sum to 1."""
    if n_coarse == 1:
        return np.ones((n_out, 1), dtype=np.float32)
    positions = np.linspace(0, n_coarse - 1, n_out)[:, None]
    weights = np.exp(-0.5 * ((positions - np.arange(n_coarse)[None, :]) / 0.7) ** 2)
    return (weights / weights.sum(1, keepdims=True)).astype(np.float32)


def smooth_field(
    rng: np.random.Generator, shape_zyx: tuple[int, ...], coarse_zyx: tuple[int, int, int]
) -> np.ndarray:
    """Zero-mean, unit-sd low-frequency random field (texture, bias field) on the full grid.

    Built from a coarse random grid by separable smooth interpolation (three small matrix products),
    which costs a fraction of a full-volume Gaussian filter.
    """
    coarse = rng.standard_normal(coarse_zyx).astype(np.float32)
    mz, my, mx = (_gaussian_interpolation(n, c) for n, c in zip(shape_zyx, coarse_zyx, strict=True))
    field_ = np.einsum("zyx,Xx->zyX", coarse, mx)
    field_ = np.einsum("zyX,Yy->zYX", field_, my)
    field_ = np.tensordot(mz, field_, axes=(1, 0))
    field_ -= field_.mean()
    sd = field_.std()
    return (field_ / sd if sd > 0 else field_).astype(np.float32)


def bias_field(rng: np.random.Generator, shape_zyx: tuple[int, ...], strength: float) -> np.ndarray:
    """Multiplicative MR receive-coil inhomogeneity: 1 ± ``strength``, very smooth."""
    return (1.0 + strength * np.tanh(smooth_field(rng, shape_zyx, (2, 3, 3)))).astype(np.float32)


def add_noise(rng: np.random.Generator, image: np.ndarray, sd: float, *, rician: bool = False) -> None:
    """Add white noise in place (Rician magnitude noise for MR, Gaussian otherwise)."""
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    noise *= np.float32(sd)
    if rician:
        imag = rng.standard_normal(image.shape, dtype=np.float32)
        imag *= np.float32(sd)
        image += noise
        np.hypot(image, imag, out=image)
    else:
        image += noise


def place_lesion(
    rng: np.random.Generator,
    shape: LesionShape,
    geometry: Grid,
    image: np.ndarray,
    mask: np.ndarray,
    lesion_id: int,
    profile: Profile,
    *,
    margin: float = 0.0,
    mode: BlendMode = "replace",
) -> bool:
    """Rasterise, refuse if it touches another lesion, then blend and paint. True when painted."""
    raster = rasterize(shape, geometry, margin=margin, profile=profile)
    if raster is None or overlaps(raster, mask, clearance=0.05):
        return False
    if paint_label(mask, raster, lesion_id) == 0:
        return False
    blend(image, raster, mode)
    return True


def place_lesions(
    count: int,
    attempts_per_lesion: int,
    propose: Callable[[], Candidate | None],
    attempt: Callable[[Candidate, int], LesionRecord | None],
) -> list[LesionRecord]:
    """Try to paint ``count`` lesions: the attempt budget, stop rules and id numbering every generator shares.

    ``propose()`` draws a candidate (a centre, a vessel joint) or returns None when nothing is left to
    draw from, which ends the search; ``attempt(candidate, lesion_id)`` draws and paints one lesion
    and returns its record, or None when it was refused (overlap, outside the grid). Ids are 1, 2, …
    in painting order. The checks come before each draw, in this order, because the phantoms (and
    the published model trained on them) depend on the exact sequence of random draws.
    """
    records: list[LesionRecord] = []
    for _ in range(count * attempts_per_lesion):
        if len(records) == count:
            break
        candidate = propose()
        if candidate is None:
            break
        record = attempt(candidate, len(records) + 1)
        if record is not None:
            records.append(record)
    return records


def mr_signal(
    rng: np.random.Generator, image: np.ndarray, noise_sd: float, bias_strength: tuple[float, float]
) -> None:
    """The MR acquisition, in place: a receive-coil bias field, then Rician magnitude noise.

    Applied after the lesions are painted, so lesions share the bias and noise of their surroundings
    (the strength is drawn first, then the field, then the noise).
    """
    image *= bias_field(rng, image.shape, rng.uniform(*bias_strength))
    add_noise(rng, image, noise_sd, rician=True)


def to_int16(image: np.ndarray, stored_range: tuple[int, int]) -> np.ndarray:
    """Round and clip to the modality's stored range (:data:`UNSIGNED_12BIT`, :data:`CT_HU_12BIT`)."""
    return np.clip(np.rint(image), *stored_range).astype(np.int16)


def finish_case(
    task: str,
    geometry: Grid,
    image: np.ndarray,
    mask: np.ndarray,
    records: list[LesionRecord],
    *,
    modality: str,
    info: dict[str, Any],
    extras: dict[str, Volume] | None = None,
) -> PhantomCase:
    """The case as written to disk: int16 image (:data:`STORED_RANGE` of ``modality``) and label map
    on the grid; abnormal iff a lesion was painted."""
    return PhantomCase(
        task,
        geometry.with_array(to_int16(image, STORED_RANGE[modality]), modality=modality),
        geometry.with_array(mask),
        records,
        abnormal=bool(records),
        info=info,
        extras=extras or {},
    )


def choose_point(rng: np.random.Generator, region: np.ndarray, geometry: Grid) -> np.ndarray | None:
    """A random voxel centre (world mm) of a boolean region on the grid; None when it is empty."""
    flat = np.flatnonzero(region)
    if flat.size == 0:
        return None
    k, j, i = np.unravel_index(int(flat[rng.integers(flat.size)]), region.shape)
    jitter = rng.uniform(-0.5, 0.5, 3)
    return geometry.index_to_world(np.array([i, j, k], dtype=float) + jitter)


def log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """Lesion sizes: small lesions are more common than large ones, as in screening cohorts."""
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))
