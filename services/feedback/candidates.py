"""The candidates a reader judged: ``wlcad detect`` JSON or a CIRCUS plug-in's ``results.json``.

Each becomes a :class:`ReviewedCandidate` with its CIRCUS ``id`` (0-based: its own ``id`` or its index,
as CIRCUS's ``normalizeCandidates`` assigns), its ``rank`` (1-based) and its centre in world LPS mm.

* ``wlcad detect``: ``{"candidates": [{"center_mm", "diameter_mm", "confidence", ...}]}``; rank = list
  order (the detector's, strongest first).
* CIRCUS ``results.json``: ``{"results": {"lesionCandidates": [{"rank", "confidence", "volumeId",
  "location", "volumeSize"}]}, "metadata": {...}}``. ``location`` is a voxel index of the volume as the
  plug-in read it, so it needs that volume's geometry (:class:`~services.core.volume.Volume`) to become
  mm. The diameter is the plug-in's own (``metadata.diameters_mm``, as wlcad's plug-in writes it) or
  else the equivalent sphere of ``volumeSize`` (mm³). Only volume 0 is one image; other volumes are
  refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.core.errors import InputError
from services.core.volume import Volume


@dataclass(frozen=True)
class ReviewedCandidate:
    id: int
    rank: int
    center_mm: tuple[float, float, float]
    diameter_mm: float
    confidence: float


def _number(value: Any, field: str, least: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"must be a finite number, got {str(value)[:32]!r}", field=field)
    if least is not None and value < least:
        raise InputError(f"must be ≥ {least}, got {value}", field=field)
    return float(value)


def _triple(value: Any, field: str) -> tuple[float, float, float]:
    if not isinstance(value, list) or len(value) != 3:
        raise InputError("needs 3 numbers", field=field)
    a, b, c = (_number(v, field) for v in value)
    return (a, b, c)


def is_circus_results(document: Any) -> bool:
    return isinstance(document, dict) and isinstance(document.get("results"), dict)


def detect_candidates(document: Any) -> list[ReviewedCandidate]:
    """Candidates of a ``wlcad detect`` JSON."""
    items = document.get("candidates") if isinstance(document, dict) else None
    if not isinstance(items, list):
        raise InputError("a wlcad detect JSON needs a 'candidates' list", field="candidates")
    out = []
    for i, item in enumerate(items):
        where = f"candidates[{i}]"
        if not isinstance(item, dict):
            raise InputError("must be an object", field=where)
        confidence = _number(item.get("confidence"), f"{where}.confidence", 0.0)
        out.append(
            ReviewedCandidate(
                i,
                i + 1,
                _triple(item.get("center_mm"), f"{where}.center_mm"),
                _number(item.get("diameter_mm"), f"{where}.diameter_mm", 0.0),
                confidence,
            )
        )
    return out


def circus_candidates(document: Any, volume: Volume) -> list[ReviewedCandidate]:
    """Candidates of a CIRCUS ``results.json``, their voxel locations placed on ``volume``."""
    items = document["results"].get("lesionCandidates")
    if not isinstance(items, list):
        raise InputError("needs results.lesionCandidates (a list)", field="candidates")
    metadata = document.get("metadata") if isinstance(document.get("metadata"), dict) else {}
    diameters = metadata.get("diameters_mm")
    diameters = diameters if isinstance(diameters, list) and len(diameters) == len(items) else None
    out, ids, ranks = [], set(), set()
    for i, item in enumerate(items):
        where = f"lesionCandidates[{i}]"
        if not isinstance(item, dict):
            raise InputError("must be an object", field=where)
        volume_id = item.get("volumeId", 0)
        if volume_id != 0:
            raise InputError(f"volumeId {volume_id!r}: only volume 0 maps onto the case's image", field=where)
        cid = item.get("id", i)
        rank = item.get("rank", i + 1)
        for name, value, seen in (("id", cid, ids), ("rank", rank, ranks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "id" else 1):
                raise InputError(f"{name} must be an integer, got {value!r}", field=f"{where}.{name}")
            if value in seen:
                raise InputError(f"{name} {value} appears twice", field=f"{where}.{name}")
            seen.add(value)
        location = np.asarray(_triple(item.get("location"), f"{where}.location"))
        if np.any(location < 0) or np.any(location > np.asarray(volume.shape_xyz) - 1):
            raise InputError(
                f"voxel {location.tolist()} is outside the image of {list(volume.shape_xyz)} voxels",
                field=f"{where}.location",
            )
        world = volume.index_to_world(location)
        if diameters is not None:
            diameter = _number(diameters[i], f"metadata.diameters_mm[{i}]", 0.0)
        else:
            size = _number(item.get("volumeSize"), f"{where}.volumeSize", 0.0)
            diameter = (6.0 * size / math.pi) ** (1.0 / 3.0)
        out.append(
            ReviewedCandidate(
                cid,
                rank,
                (float(world[0]), float(world[1]), float(world[2])),
                diameter,
                _number(item.get("confidence"), f"{where}.confidence", 0.0),
            )
        )
    return out
