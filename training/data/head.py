"""Shared analytic head anatomy (scalp, skull, CSF, grey and white matter, ventricles) as fractions.

Brain MR, head CT and TOF-MRA differ only in how these tissues map to intensity, so one model keeps
their anatomy consistent. Fractions carry one-voxel partial-volume ramps.
"""

from __future__ import annotations

import numpy as np

from services.core.grid import Grid
from training.data.case import axis_coordinates_mm, smooth_field


def _ellipsoid_fraction(x, y, z, centre, semi, ramp_mm) -> np.ndarray:
    # Python floats only: a NumPy float64 scalar would promote the float32 grids (2× slower).
    cx, cy, cz = (float(v) for v in centre)
    sx, sy, sz = (float(v) for v in semi)
    r = np.sqrt(((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2 + ((z - cz) / sz) ** 2)
    return np.clip(0.5 + (1.0 - r) * (min(sx, sy, sz) / ramp_mm), 0.0, 1.0)


def head_tissues(rng: np.random.Generator, geometry: Grid) -> dict[str, np.ndarray]:
    """Tissue fractions summing to ≤ 1 per voxel: scalp, skull, csf, gm, wm (the rest is air)."""
    x, y, z = axis_coordinates_mm(geometry)
    ramp = float(np.prod(geometry.spacing) ** (1 / 3))
    semi = np.array([rng.uniform(68, 78), rng.uniform(88, 98), rng.uniform(70, 80)])
    centre = (0.0, rng.uniform(-5, 5), 0.0)
    head = _ellipsoid_fraction(x, y, z, centre, semi, ramp)
    inner_skull = _ellipsoid_fraction(x, y, z, centre, semi - 6.0, ramp)
    inside_skull = _ellipsoid_fraction(x, y, z, centre, semi - 12.0, ramp)
    brain = _ellipsoid_fraction(x, y, z, centre, semi - 14.0, ramp)
    # Gyri: the cortex depth wobbles with a smooth random field, so the GM/WM border folds.
    folds = smooth_field(rng, brain.shape, (8, 10, 10))
    wx, wy, wz = (float(v) for v in semi - 14.0 - rng.uniform(5, 7))
    r_wm = np.sqrt((x / wx) ** 2 + ((y - centre[1]) / wy) ** 2 + (z / wz) ** 2)
    wm = np.clip(0.5 + ((1.0 - r_wm) * min(wx, wy, wz) + 2.5 * folds) / ramp, 0.0, 1.0) * brain
    vent = np.maximum(
        _ellipsoid_fraction(x, y, z, (-8.0, centre[1] - 5, 8.0), (5.0, 22.0, 9.0), ramp),
        _ellipsoid_fraction(x, y, z, (8.0, centre[1] - 5, 8.0), (5.0, 22.0, 9.0), ramp),
    )
    wm = wm * (1.0 - vent)
    gm = brain - wm - brain * vent
    csf = inside_skull - brain + brain * vent
    return {
        "scalp": head - inner_skull,
        "skull": inner_skull - inside_skull,
        "csf": csf,
        "gm": np.clip(gm, 0.0, 1.0),
        "wm": wm,
        "brain": brain,
    }


def compose(tissues: dict[str, np.ndarray], values: dict[str, float], air: float) -> np.ndarray:
    """Intensity = Σ fraction × tissue value, with air filling the rest."""
    image = np.full(tissues["brain"].shape, air, dtype=np.float32)
    for name in ("scalp", "skull", "csf", "gm", "wm"):
        image += tissues[name] * np.float32(values[name] - air)
    return image
