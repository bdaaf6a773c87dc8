"""CIRCUS DB case labels → wlcad weak labels (:class:`~services.core.lesion_prompt.LesionPrompt`).

CIRCUS keeps a case's labels per series (``revisions[n].series[m].labels``, schema
``packages/circus-api/src/schemas/label.yaml`` of utrad-ical/circus). The solid ones hold positions in
CIRCUS *volume coordinates*: millimetres from the corner of the stored volume along its axes, so
voxel ``i`` spans ``[i·s, (i+1)·s)`` and its centre is ``(i + 0.5)·s`` (``getCenterOfLabel`` in
``circus-web-ui/src/pages/case-detail/labelData.ts``). We read:

* ``ellipsoid`` (and ``cuboid``) ``{"min": [x,y,z], "max": [x,y,z]}``: the box of the shape. Its
  centre is the lesion's centre, its three extents the ellipsoid's diameters along the volume axes,
  the largest the prompt's diameter.
* ``ruler`` ``{"start", "end", "section"}``: a measured diameter. A ``point`` ``{"location"}`` takes the
  nearest unused ruler that passes within half its length of the point (centre = the point, diameter =
  the ruler's length); a ruler no point claims is its own lesion (centre = its midpoint). A point no
  ruler measures has no size and is skipped, as are the 2D (``rectangle``, ``ellipse``, ``polyline``)
  and ``voxel`` labels (a voxel label is already a mask).

Malformed labels raise :class:`InputError` naming ``labels[i]``; unsupported ones are reported, not
fatal, so one free-hand outline does not block a case's other labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.core.errors import InputError
from services.core.lesion_prompt import MIN_DIAMETER_MM, LesionPrompt, validated_prompt
from services.core.volume import Volume

__all__ = ["SkippedLabel", "WeakLabel", "WeakLabels", "circus_mm_to_voxel", "weak_labels"]

SOLID_TYPES = ("ellipsoid", "cuboid")
UNSUPPORTED_TYPES = ("rectangle", "ellipse", "polyline", "voxel")


@dataclass(frozen=True)
class WeakLabel:
    """One lesion found in the labels: its prompt (world LPS mm of ``volume``) and where it came from
    (``source``: label indices; ``kind``: ``ellipsoid``, ``cuboid``, ``point+ruler`` or ``ruler``)."""

    prompt: LesionPrompt
    kind: str
    source: tuple[int, ...]
    center_voxel: tuple[float, float, float]


@dataclass(frozen=True)
class SkippedLabel:
    index: int
    type: str
    reason: str


@dataclass(frozen=True)
class WeakLabels:
    lesions: tuple[WeakLabel, ...]
    skipped: tuple[SkippedLabel, ...]


def circus_mm_to_voxel(volume: Volume, circus_mm: Sequence[float]) -> np.ndarray:
    """CIRCUS volume coordinates (mm from the volume's corner) → continuous voxel index (x, y, z)."""
    return np.asarray(circus_mm, dtype=float) / np.asarray(volume.spacing, dtype=float) - 0.5


def _triple(value: Any, field: str) -> np.ndarray:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        or not all(math.isfinite(v) for v in value)
    ):
        raise InputError(f"needs 3 finite numbers (CIRCUS volume mm), got {value!r:.80}", field=field)
    return np.asarray(value, dtype=float)


def _world(volume: Volume, circus_mm: np.ndarray) -> tuple[tuple[float, float, float], np.ndarray]:
    index = circus_mm_to_voxel(volume, circus_mm)
    world = volume.index_to_world(index)
    return (float(world[0]), float(world[1]), float(world[2])), index


def _checked(volume: Volume, prompt: LesionPrompt, field: str) -> LesionPrompt:
    try:
        return validated_prompt(volume, prompt)
    except InputError as exc:
        raise InputError(f"{exc}", field=field) from None


def _prompt(
    volume: Volume,
    center_mm: np.ndarray,
    diameter_mm: float,
    lesion_id: int,
    field: str,
    axes_mm: np.ndarray | None = None,
) -> tuple[LesionPrompt, np.ndarray]:
    world, index = _world(volume, center_mm)
    try:
        prompt = LesionPrompt(
            world,
            float(diameter_mm),
            lesion_id,
            axes_mm=None if axes_mm is None else tuple(float(v) for v in axes_mm),
            axes_direction=None
            if axes_mm is None
            else tuple(tuple(float(v) for v in row) for row in np.asarray(volume.direction, dtype=float)),
        )
    except InputError as exc:
        raise InputError(str(exc), field=field) from None
    return _checked(volume, prompt, field), index


def weak_labels(labels: Any, volume: Volume, first_lesion_id: int = 1) -> WeakLabels:
    """The weak labels among one series' CIRCUS ``labels`` on ``volume`` (the series' grid).

    Lesion ids run from ``first_lesion_id`` in label order (solid labels, then point+ruler pairs, then
    lone rulers), so the same labels always give the same ids.
    """
    if not isinstance(labels, list):
        raise InputError(f"must be a list of CIRCUS labels, got {type(labels).__name__}", field="labels")
    lesions: list[WeakLabel] = []
    skipped: list[SkippedLabel] = []
    points: list[tuple[int, np.ndarray]] = []
    rulers: list[tuple[int, np.ndarray, np.ndarray]] = []
    next_id = first_lesion_id
    for i, label in enumerate(labels):
        field = f"labels[{i}]"
        if not isinstance(label, dict) or not isinstance(label.get("type"), str):
            raise InputError("must be an object with a string 'type'", field=field)
        kind = label["type"]
        data = label.get("data")
        if not isinstance(data, dict):
            raise InputError("needs a 'data' object", field=f"{field}.data")
        if kind in SOLID_TYPES:
            low = _triple(data.get("min"), f"{field}.data.min")
            high = _triple(data.get("max"), f"{field}.data.max")
            axes = high - low
            if np.any(axes < MIN_DIAMETER_MM):
                raise InputError(
                    f"max must exceed min by ≥ {MIN_DIAMETER_MM} mm on every axis, got extents "
                    f"{[round(float(v), 3) for v in axes]}",
                    field=f"{field}.data.max",
                )
            prompt, index = _prompt(volume, (low + high) / 2, float(axes.max()), next_id, field, axes)
            lesions.append(WeakLabel(prompt, kind, (i,), tuple(float(v) for v in index)))
            next_id += 1
        elif kind == "point":
            points.append((i, _triple(data.get("location"), f"{field}.data.location")))
        elif kind == "ruler":
            start = _triple(data.get("start"), f"{field}.data.start")
            end = _triple(data.get("end"), f"{field}.data.end")
            if float(np.linalg.norm(end - start)) < MIN_DIAMETER_MM:
                raise InputError(f"start and end are < {MIN_DIAMETER_MM} mm apart", field=f"{field}.data.end")
            rulers.append((i, start, end))
        elif kind in UNSUPPORTED_TYPES:
            why = "already a mask" if kind == "voxel" else "a 2D outline, not a weak 3D label"
            skipped.append(SkippedLabel(i, kind, why))
        else:
            skipped.append(SkippedLabel(i, kind[:32], "unknown label type"))
    used: set[int] = set()
    for i, location in points:
        best: tuple[float, int] | None = None
        for j, (_, start, end) in enumerate(rulers):
            if j in used:
                continue
            length = float(np.linalg.norm(end - start))
            gap = _distance_to_segment(location, start, end)
            if gap <= length / 2 and (best is None or gap < best[0]):
                best = (gap, j)
        if best is None:
            skipped.append(SkippedLabel(i, "point", "no ruler measures it (no diameter)"))
            continue
        used.add(best[1])
        r, start, end = rulers[best[1]]
        prompt, index = _prompt(volume, location, float(np.linalg.norm(end - start)), next_id, f"labels[{i}]")
        lesions.append(WeakLabel(prompt, "point+ruler", (i, r), tuple(float(v) for v in index)))
        next_id += 1
    for j, (r, start, end) in enumerate(rulers):
        if j in used:
            continue
        prompt, index = _prompt(
            volume, (start + end) / 2, float(np.linalg.norm(end - start)), next_id, f"labels[{r}]"
        )
        lesions.append(WeakLabel(prompt, "ruler", (r,), tuple(float(v) for v in index)))
        next_id += 1
    return WeakLabels(tuple(lesions), tuple(skipped))


def _distance_to_segment(point: np.ndarray, start: np.ndarray, end: np.ndarray) -> float:
    direction = end - start
    t = float(np.clip(np.dot(point - start, direction) / np.dot(direction, direction), 0.0, 1.0))
    return float(np.linalg.norm(point - (start + t * direction)))
