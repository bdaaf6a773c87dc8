"""Sphere and ellipsoid labels, exact in world mm on any grid (anisotropic, oblique, thick-slice).

A voxel belongs to the label when its *centre* lies inside the shape in world coordinates — the
rule that makes the label independent of how the image was sampled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.core.errors import InputError
from services.core.lesion_mask import LesionMask, box_around, world_coordinates
from services.core.lesion_prompt import LesionPrompt
from services.core.volume import Volume


def ellipsoid_mask(
    volume: Volume,
    center_mm: Sequence[float],
    diameters_mm: Sequence[float],
    axes_direction: np.ndarray | None = None,
) -> LesionMask:
    """Voxels whose centre lies in the ellipsoid; ``axes_direction`` columns are its world axes."""
    diameters = np.asarray(diameters_mm, dtype=float)
    axes = np.eye(3) if axes_direction is None else np.asarray(axes_direction, dtype=float).reshape(3, 3)
    if not np.allclose(axes.T @ axes, np.eye(3), atol=1e-3):
        raise InputError("ellipsoid axes must be orthonormal", field="axes_direction")
    start, size = box_around(volume, center_mm, float(diameters.max()) / 2)
    offsets = world_coordinates(volume, start, size) - np.asarray(center_mm, dtype=float)
    local = offsets @ axes  # coordinates along the ellipsoid's own axes
    inside = np.sum((local / (diameters / 2)) ** 2, axis=-1) <= 1.0
    return LesionMask(volume, tuple(int(v) for v in start), inside)


def sphere_mask(volume: Volume, prompt: LesionPrompt) -> LesionMask:
    return ellipsoid_mask(volume, prompt.center_mm, [prompt.diameter_mm] * 3)


def prompt_ellipsoid_mask(volume: Volume, prompt: LesionPrompt) -> LesionMask:
    """The prompt's ellipsoid when it has axes, else its sphere."""
    if prompt.axes_mm is None:
        return sphere_mask(volume, prompt)
    direction = None if prompt.axes_direction is None else np.asarray(prompt.axes_direction, dtype=float)
    return ellipsoid_mask(volume, prompt.center_mm, prompt.axes_mm, direction)


def prompt_from_recist(
    long_axis_start_mm: Sequence[float],
    long_axis_end_mm: Sequence[float],
    short_diameter_mm: float,
    lesion_id: int = 1,
) -> LesionPrompt:
    """An ellipsoid from a RECIST measurement: the long axis as drawn (two points on an axial slice) and
    the perpendicular short diameter. The unmeasured craniocaudal axis takes the short diameter, the
    usual assumption when only the axial pair is reported."""
    start = np.asarray(long_axis_start_mm, dtype=float)
    end = np.asarray(long_axis_end_mm, dtype=float)
    if start.shape != (3,) or end.shape != (3,) or not np.all(np.isfinite(np.r_[start, end])):
        raise InputError("long axis needs two finite 3D points (LPS mm)", field="long_axis_mm")
    length = float(np.linalg.norm(end - start))
    if length <= 0:
        raise InputError("long axis end points coincide", field="long_axis_mm")
    if not np.isfinite(short_diameter_mm) or short_diameter_mm <= 0 or short_diameter_mm > length * 1.0001:
        raise InputError(f"must be > 0 and ≤ the long axis ({length:.1f} mm)", field="short_axis_mm")
    u = (end - start) / length
    superior = np.array([0.0, 0.0, 1.0])
    v = np.cross(superior, u)
    if np.linalg.norm(v) < 1e-6:  # long axis along z: any axial direction will do
        v = np.array([1.0, 0.0, 0.0])
    v /= np.linalg.norm(v)
    w = np.cross(u, v)
    axes = np.column_stack([u, v, w])
    center = (start + end) / 2
    return LesionPrompt(
        tuple(float(c) for c in center),
        length,
        lesion_id,
        axes_mm=(length, float(short_diameter_mm), float(short_diameter_mm)),
        axes_direction=tuple(tuple(float(x) for x in row) for row in axes),
    )


def prompt_from_circus_ellipsoid(
    min_mm: Sequence[float], max_mm: Sequence[float], lesion_id: int = 1
) -> LesionPrompt:
    """A CIRCUS DB ellipsoid label: the axis-aligned box ``{min, max}`` (mm) the ellipsoid is inscribed in."""
    low = np.asarray(min_mm, dtype=float)
    high = np.asarray(max_mm, dtype=float)
    if low.shape != (3,) or high.shape != (3,) or not np.all(np.isfinite(np.r_[low, high])):
        raise InputError("min and max need 3 finite numbers each (mm)", field="ellipsoid")
    diameters = high - low
    if np.any(diameters <= 0):
        raise InputError(
            f"max must exceed min on every axis, got min {low.tolist()} max {high.tolist()}",
            field="ellipsoid",
        )
    return LesionPrompt(
        tuple(float(c) for c in (low + high) / 2),
        float(diameters.max()),
        lesion_id,
        axes_mm=tuple(float(d) for d in diameters),
    )
