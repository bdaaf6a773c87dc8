"""The weak label a radiologist gives for one lesion, validated against the image it refers to."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.core.errors import InputError
from services.core.volume import Volume


@dataclass(frozen=True)
class LesionPrompt:
    """Centre (world LPS mm) and maximum diameter (mm) of one lesion.

    ``axes_mm`` optionally gives three ellipsoid diameters and ``axes_direction`` (3×3, columns) their
    world directions, for the ellipsoid and RECIST forms.
    """

    center_mm: tuple[float, float, float]
    diameter_mm: float
    lesion_id: int = 1
    axes_mm: tuple[float, float, float] | None = None
    axes_direction: tuple[tuple[float, ...], ...] | None = None

    @property
    def radius_mm(self) -> float:
        return self.diameter_mm / 2

    @property
    def bounding_radius_mm(self) -> float:
        """Radius of a ball that surely holds the stated shape."""
        return (max(self.axes_mm) if self.axes_mm else self.diameter_mm) / 2


def validated_prompt(volume: Volume, prompt: LesionPrompt) -> LesionPrompt:
    """Refuse prompts that cannot describe a lesion in this image, naming the field."""
    center = np.asarray(prompt.center_mm, dtype=float)
    if center.shape != (3,) or not np.all(np.isfinite(center)):
        raise InputError(f"needs 3 finite numbers (LPS mm), got {list(prompt.center_mm)}", field="center_mm")
    if not isinstance(prompt.diameter_mm, (int, float)) or not math.isfinite(prompt.diameter_mm):
        raise InputError(f"must be a finite number of mm, got {prompt.diameter_mm!r}", field="diameter_mm")
    if prompt.diameter_mm <= 0:
        raise InputError(f"must be > 0 mm, got {prompt.diameter_mm}", field="diameter_mm")
    extent_mm = np.asarray(volume.shape_xyz) * np.asarray(volume.spacing)
    if prompt.diameter_mm > float(extent_mm.max()):
        raise InputError(
            f"{prompt.diameter_mm} mm is larger than the image ({float(extent_mm.max()):.1f} mm across)",
            field="diameter_mm",
        )
    if not volume.contains_world(center):
        index = volume.world_to_index(center)
        raise InputError(
            f"{[round(float(v), 2) for v in center]} mm (voxel {[round(float(v), 1) for v in index]}) "
            f"is outside the image of {list(volume.shape_xyz)} voxels",
            field="center_mm",
        )
    if prompt.axes_mm is not None:
        axes = np.asarray(prompt.axes_mm, dtype=float)
        if axes.shape != (3,) or not np.all(np.isfinite(axes)) or np.any(axes <= 0):
            raise InputError(f"needs 3 diameters > 0 mm, got {prompt.axes_mm}", field="axes_mm")
    if prompt.lesion_id < 1 or prompt.lesion_id > 65535:
        raise InputError(f"must be 1..65535, got {prompt.lesion_id}", field="lesion_id")
    return prompt


def prompt_from_voxel(
    volume: Volume, center_voxel: Sequence[float], diameter_mm: float, lesion_id: int = 1
) -> LesionPrompt:
    """Convert an (i, j, k) voxel centre, as viewers show it, into the world-mm prompt."""
    index = np.asarray(center_voxel, dtype=float)
    if index.shape != (3,) or not np.all(np.isfinite(index)):
        raise InputError(f"needs 3 finite numbers (i,j,k), got {list(center_voxel)}", field="center_voxel")
    world = volume.index_to_world(index)
    return LesionPrompt(tuple(float(v) for v in world), float(diameter_mm), lesion_id)
