"""The weak label a radiologist gives for one lesion, validated against the image it refers to."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.core.errors import InputError
from services.core.volume import Volume

#: The smallest diameter (and ellipsoid axis) a prompt may state. Below a tenth of a millimetre nothing
#: is physical — no scanner resolves it, no lesion is that small — and such values only arise from unit
#: mix-ups or hostile input; 1e-300 mm once overflowed inside the sphere maths and gave an empty mask
#: with exit 0, so it is refused here, where every prompt (CLI, manifest, gRPC) is made.
MIN_DIAMETER_MM = 0.1


@dataclass(frozen=True)
class LesionPrompt:
    """Centre (world LPS mm) and maximum diameter (mm) of one lesion.

    ``axes_mm`` optionally gives three ellipsoid diameters and ``axes_direction`` (3×3, columns) their
    world directions, for the ellipsoid and RECIST forms.

    Every value is checked here, on construction, so a prompt that exists is well-formed wherever it
    came from (CLI, manifest, API); whether it fits an image is :func:`validated_prompt`'s question.

    Raises:
        InputError: naming ``center_mm``, ``diameter_mm``, ``axes_mm`` or ``lesion_id``.
    """

    center_mm: tuple[float, float, float]
    diameter_mm: float
    lesion_id: int = 1
    axes_mm: tuple[float, float, float] | None = None
    axes_direction: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        center = np.asarray(self.center_mm, dtype=float) if _numeric(self.center_mm) else np.zeros(0)
        if center.shape != (3,) or not np.all(np.isfinite(center)):
            raise InputError(
                f"needs 3 finite numbers (LPS mm), got {list(self.center_mm)}", field="center_mm"
            )
        if isinstance(self.diameter_mm, bool) or not isinstance(self.diameter_mm, (int, float)):
            raise InputError(f"must be a number of mm, got {self.diameter_mm!r}", field="diameter_mm")
        if not math.isfinite(self.diameter_mm) or self.diameter_mm < MIN_DIAMETER_MM:
            raise InputError(
                f"must be a finite number of mm ≥ {MIN_DIAMETER_MM}, got {self.diameter_mm}",
                field="diameter_mm",
            )
        if self.axes_mm is not None:
            axes = np.asarray(self.axes_mm, dtype=float) if _numeric(self.axes_mm) else np.zeros(0)
            if axes.shape != (3,) or not np.all(np.isfinite(axes)) or np.any(axes < MIN_DIAMETER_MM):
                raise InputError(
                    f"needs 3 finite diameters ≥ {MIN_DIAMETER_MM} mm, got {self.axes_mm}", field="axes_mm"
                )
        if isinstance(self.lesion_id, bool) or not isinstance(self.lesion_id, (int, np.integer)):
            raise InputError(f"must be an integer, got {self.lesion_id!r}", field="lesion_id")
        if not 1 <= self.lesion_id <= 65535:
            raise InputError(f"must be 1..65535, got {self.lesion_id}", field="lesion_id")
        object.__setattr__(self, "center_mm", tuple(float(v) for v in center))
        object.__setattr__(self, "diameter_mm", float(self.diameter_mm))
        object.__setattr__(self, "lesion_id", int(self.lesion_id))
        if self.axes_mm is not None:
            object.__setattr__(self, "axes_mm", tuple(float(v) for v in self.axes_mm))

    @property
    def radius_mm(self) -> float:
        return self.diameter_mm / 2

    @property
    def bounding_radius_mm(self) -> float:
        """Radius of a ball that surely holds the stated shape."""
        return (max(self.axes_mm) if self.axes_mm else self.diameter_mm) / 2


def _numeric(values: object) -> bool:
    try:
        np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        return False
    return True


def validated_prompt(volume: Volume, prompt: LesionPrompt) -> LesionPrompt:
    """Refuse a (well-formed) prompt that cannot describe a lesion in this image, naming the field."""
    center = np.asarray(prompt.center_mm, dtype=float)
    across_mm = float((np.asarray(volume.shape_xyz) * np.asarray(volume.spacing)).max())
    if prompt.diameter_mm > across_mm:
        raise InputError(
            f"{prompt.diameter_mm} mm is larger than the image ({across_mm:.1f} mm across)",
            field="diameter_mm",
        )
    if prompt.axes_mm is not None and max(prompt.axes_mm) > across_mm:
        raise InputError(
            f"{max(prompt.axes_mm)} mm is larger than the image ({across_mm:.1f} mm across)", field="axes_mm"
        )
    if not volume.contains_world(center):
        index = volume.world_to_index(center)
        raise InputError(
            f"{[round(float(v), 2) for v in center]} mm (voxel {[round(float(v), 1) for v in index]}) "
            f"is outside the image of {list(volume.shape_xyz)} voxels",
            field="center_mm",
        )
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
