"""Lesion shapes as analytic level functions, rasterised with supersampled partial volume.

Why analytic: a lesion defined by a continuous function ``f(x)`` (``f < 0`` inside, ``f = -1`` at the
core, ``f = 0`` on the surface) can be sampled at any grid — thick 5 mm slices, 0.4 mm MRA voxels, an
oblique real CT — and the painted mask is *exactly* the set of voxels at least half inside it, the
same partial-volume fractions that shaded the image. Only voxels near the surface are supersampled,
which keeps a 256×256×128 case within the time budget.

A shape is a (possibly rotated, anisotropic) ellipsoid whose radius is modulated by a smooth function
of direction (lobulation), narrow radial bumps (spiculae) and unioned satellite blobs (irregular
outgrowths). Families differ only in how those are drawn, so the sphere label built from
(centre, maximum diameter) fits them to very different degrees — that is the point of the phantoms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from services.core.errors import InputError
from services.core.grid import Grid, as_grid
from services.core.volume import Volume

FAMILIES = ("sphere", "ellipsoid", "lobulated", "spiculated", "irregular")
#: The families on which the sphere label is supposed to be a poor fit (sphere Dice ≈ 0.45–0.65).
IRREGULAR_FAMILIES = ("lobulated", "spiculated", "irregular")

_EMPTY = np.zeros((0, 3))


def _random_rotation(rng: np.random.Generator, planar: bool) -> np.ndarray:
    """A uniformly random rotation (columns = lesion axes in world); about z only when planar."""
    if planar:
        angle = rng.uniform(0, 2 * np.pi)
        c, s = np.cos(angle), np.sin(angle)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _random_directions(rng: np.random.Generator, n: int, planar: bool) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    if planar:
        v[:, 2] = 0.0
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)


@dataclass(frozen=True)
class LesionShape:
    """One lesion's geometry in world LPS mm. ``level`` is its implicit function (< 0 inside)."""

    family: str
    centre_mm: np.ndarray
    rotation: np.ndarray  # 3×3, columns = lesion axes in world
    radii_mm: np.ndarray  # semi-axes of the base ellipsoid
    lobe_dirs: np.ndarray = field(default_factory=lambda: _EMPTY)
    lobe_freq: np.ndarray = field(default_factory=lambda: np.zeros(0))
    lobe_amp: np.ndarray = field(default_factory=lambda: np.zeros(0))
    lobe_phase: np.ndarray = field(default_factory=lambda: np.zeros(0))
    spike_dirs: np.ndarray = field(default_factory=lambda: _EMPTY)
    spike_height: np.ndarray = field(default_factory=lambda: np.zeros(0))
    spike_sharpness: np.ndarray = field(default_factory=lambda: np.zeros(0))
    blob_offsets: np.ndarray = field(default_factory=lambda: _EMPTY)  # in normalised lesion frame
    blob_scales: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def level(self, points_mm: np.ndarray) -> np.ndarray:
        """f at world points (N, 3): −1 at the core, 0 on the surface, > 0 outside."""
        # float32 from here: the transcendental functions run several times faster vectorised.
        q = (((points_mm - self.centre_mm) @ self.rotation) / self.radii_mm).astype(np.float32)
        rho = np.sqrt(np.einsum("ij,ij->i", q, q))
        reach = np.float32(self._reach())
        f = rho / reach - 1.0  # a lower bound of the true f: exact enough where nothing can reach
        active = rho < reach
        if self.lobe_amp.size or self.spike_height.size:
            qa, ra = q[active], rho[active]
            u = qa / np.maximum(ra, np.float32(1e-9))[:, None]
            scale = np.ones_like(ra)
            if self.lobe_amp.size:
                f32 = np.float32
                arg = (u @ self.lobe_dirs.T.astype(f32)) * self.lobe_freq.astype(
                    f32
                ) + self.lobe_phase.astype(f32)
                scale += np.cos(arg) @ self.lobe_amp.astype(f32)
            if self.spike_height.size:
                # exp((cos − 1)·sharpness) is negligible away from the spike axis: evaluate it sparsely.
                dots = u @ self.spike_dirs.T.astype(np.float32)
                rows, cols = np.nonzero(dots > (1.0 - 8.0 / self.spike_sharpness).astype(np.float32))
                bumps = self.spike_height[cols] * np.exp(
                    (dots[rows, cols] - 1.0) * self.spike_sharpness[cols]
                )
                scale += np.bincount(rows, weights=bumps, minlength=len(ra)).astype(np.float32)
            f[active] = ra / np.maximum(scale, np.float32(0.3)) - np.float32(1.0)
        else:
            f = rho - 1.0
        for offset, blob_scale in zip(self.blob_offsets, self.blob_scales, strict=True):
            d = q - offset.astype(np.float32)
            f = np.minimum(f, np.sqrt(np.einsum("ij,ij->i", d, d)) / np.float32(blob_scale) - np.float32(1.0))
        return f

    def _reach(self) -> float:
        """Largest radial scale factor of the modulated ellipsoid (normalised units)."""
        # Spicules are narrow and rarely overlap: the tallest plus a little for neighbouring tails.
        spikes = float(self.spike_height.max()) + 0.15 if self.spike_height.size else 0.0
        return 1.0 + float(np.abs(self.lobe_amp).sum()) + spikes

    def bounding_radius_mm(self) -> float:
        """A radius around the centre that certainly contains the lesion (for the raster box)."""
        reach = self._reach()
        for offset, blob_scale in zip(self.blob_offsets, self.blob_scales, strict=True):
            reach = max(reach, float(np.linalg.norm(offset)) + float(blob_scale))
        return reach * float(self.radii_mm.max())

    def scaled(self, factor: float) -> LesionShape:
        """The same shape grown about its centre (oedema halo, dose envelope)."""
        return replace(self, radii_mm=self.radii_mm * factor)

    def moved(self, centre_mm: np.ndarray) -> LesionShape:
        return replace(self, centre_mm=np.asarray(centre_mm, dtype=float))


def random_shape(
    rng: np.random.Generator,
    family: str,
    diameter_mm: float,
    centre_mm: np.ndarray,
    *,
    planar: bool = False,
) -> LesionShape:
    """Draw a lesion of ``family`` whose base ellipsoid's long axis is ``diameter_mm``.

    ``planar`` keeps all modulations in the x–y plane (a 2D radiograph's lesion footprint).
    Parameter ranges were tuned so that on the irregular families a sphere from (centre, max
    diameter) scores Dice ≈ 0.5–0.6 against the painted mask, as measured on real tumours.
    """
    if family not in FAMILIES:
        raise InputError(f"unknown shape family {family!r}; known: {', '.join(FAMILIES)}", field="family")
    if not diameter_mm > 0:
        raise InputError(f"must be > 0 mm, got {diameter_mm}", field="diameter_mm")
    a = diameter_mm / 2.0
    rotation = _random_rotation(rng, planar)
    kwargs: dict[str, np.ndarray] = {}
    if family == "sphere":
        ratios = np.ones(3)
    elif family == "ellipsoid":
        ratios = np.array([1.0, rng.uniform(0.55, 0.9), rng.uniform(0.45, 0.8)])
    elif family == "lobulated":
        ratios = np.array([1.0, rng.uniform(0.7, 0.95), rng.uniform(0.6, 0.9)])
    elif family == "spiculated":
        ratios = np.array([1.0, rng.uniform(0.8, 1.0), rng.uniform(0.75, 0.95)])
    else:  # irregular
        ratios = np.array([1.0, rng.uniform(0.65, 0.9), rng.uniform(0.55, 0.8)])
    if planar:
        ratios[2] = ratios[1]
    if family in ("lobulated", "irregular", "spiculated"):
        n_lobes = int(rng.integers(3, 7))
        total = {"lobulated": rng.uniform(0.25, 0.4), "irregular": rng.uniform(0.1, 0.25)}.get(
            family, rng.uniform(0.05, 0.12)
        )
        amp = rng.dirichlet(np.ones(n_lobes)) * total
        kwargs.update(
            lobe_dirs=_random_directions(rng, n_lobes, planar),
            lobe_freq=rng.uniform(2.0, 4.5, n_lobes),
            lobe_amp=amp,
            lobe_phase=rng.uniform(0, 2 * np.pi, n_lobes),
        )
    if family == "spiculated":
        n_spikes = int(rng.integers(5, 12))
        kwargs.update(
            spike_dirs=_random_directions(rng, n_spikes, planar),
            spike_height=rng.uniform(0.2, 0.55, n_spikes),
            spike_sharpness=rng.uniform(25.0, 80.0, n_spikes),
        )
    if family == "irregular":
        n_blobs = int(rng.integers(1, 4))
        offsets = _random_directions(rng, n_blobs, planar) * rng.uniform(0.6, 0.95, (n_blobs, 1))
        kwargs.update(blob_offsets=offsets, blob_scales=rng.uniform(0.35, 0.55, n_blobs))
    return LesionShape(
        family=family,
        centre_mm=np.asarray(centre_mm, dtype=float),
        rotation=rotation,
        radii_mm=a * ratios,
        **kwargs,
    )


@dataclass(frozen=True)
class Raster:
    """A shape sampled on a grid box: partial-volume fractions and the shaded lesion intensity.

    ``occupancy`` is the fraction of each voxel inside the surface (the mask is ``≥ 0.5``);
    ``weight`` the fraction of the lesion's intensity that shows (equal to ``occupancy`` for a sharp
    margin, smeared across the surface for an ill-defined one); ``shaded`` the sum of weight ×
    intensity profile, so ``image = image · (1 − weight) + shaded`` blends the lesion in.
    """

    slices: tuple[slice, slice, slice]
    occupancy: np.ndarray
    weight: np.ndarray
    shaded: np.ndarray | None


Profile = Callable[[np.ndarray], np.ndarray]
"""Lesion intensity as a function of depth t = −f (0 on the surface, 1 at the core)."""


def _subsample_offsets(spacing: tuple[float, float, float]) -> np.ndarray:
    """Sub-voxel offsets (index units, x,y,z), more along thick axes: ~1 mm or finer everywhere."""
    counts = [int(min(6, max(2, np.ceil(s / 1.0)))) for s in spacing]
    axes = [((np.arange(n) + 0.5) / n - 0.5) for n in counts]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1)


def rasterize(
    shape: LesionShape,
    geometry: Grid | Volume,
    *,
    margin: float = 0.0,
    profile: Profile | None = None,
    supersample: bool = True,
) -> Raster | None:
    """Sample ``shape`` on ``geometry``'s grid (any spacing/direction); None when it misses the grid.

    ``margin`` (in units of f) widens the surface into an ill-defined edge for the *intensity* only;
    the mask stays at f = 0. ``supersample=False`` skips the edge refinement (soft halos, where the
    ramp already hides the voxel staircase). A Volume is accepted for its grid (values are not read).
    """
    geometry = as_grid(geometry)
    radius = shape.bounding_radius_mm()
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
    corners_idx = geometry.world_to_index(shape.centre_mm + radius * (1.0 + margin) * corners)
    lo = np.floor(corners_idx.min(0)).astype(int) - 1
    hi = np.ceil(corners_idx.max(0)).astype(int) + 2
    size = np.asarray(geometry.shape_xyz)
    lo = np.clip(lo, 0, size)
    hi = np.clip(hi, 0, size)
    if np.any(hi <= lo):
        return None
    ii, jj, kk = (np.arange(lo[a], hi[a]) for a in range(3))
    kk_, jj_, ii_ = np.meshgrid(kk, jj, ii, indexing="ij")
    index = np.stack([ii_.ravel(), jj_.ravel(), kk_.ravel()], axis=1).astype(float)
    step = geometry.direction * np.asarray(geometry.spacing)[None, :]
    centres = index @ step.T + np.asarray(geometry.origin)
    f = shape.level(centres)
    band = margin + 1.5 * max(geometry.spacing) / float(shape.radii_mm.min())
    occupancy = (f < 0).astype(np.float32)
    soft_width = max(margin, 1e-6)

    def weight_of(values: np.ndarray) -> np.ndarray:
        return (
            np.clip(0.5 - values / (2 * soft_width), 0.0, 1.0) if margin > 0 else (values < 0).astype(float)
        )

    weight = weight_of(f).astype(np.float32)
    shaded = (weight * profile(np.clip(-f, 0.0, 1.0))).astype(np.float32) if profile is not None else None
    near = np.abs(f) < band
    if supersample and np.any(near):
        offsets_world = _subsample_offsets(geometry.spacing) @ step.T
        sub_points = centres[near][:, None, :] + offsets_world[None, :, :]
        sub_f = shape.level(sub_points.reshape(-1, 3)).reshape(sub_points.shape[:2])
        occupancy[near] = (sub_f < 0).mean(1)
        sub_w = weight_of(sub_f)
        weight[near] = sub_w.mean(1)
        if shaded is not None:
            shaded[near] = (sub_w * profile(np.clip(-sub_f, 0.0, 1.0))).mean(1)
    box = (hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0])
    slices = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    return Raster(
        slices,
        occupancy.reshape(box),
        weight.reshape(box),
        shaded.reshape(box) if shaded is not None else None,
    )


def constant_profile(value: float) -> Profile:
    """A uniform lesion (solid nodule, haemorrhage)."""
    return lambda depth: np.full(depth.shape, value, dtype=np.float64)


def core_rim_profile(rim_value: float, core_value: float, rim_depth: float) -> Profile:
    """Rim of one intensity around a core of another: ring enhancement, part-solid nodules."""
    return lambda depth: np.where(depth < rim_depth, rim_value, core_value)
