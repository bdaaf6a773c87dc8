"""Branching vessel trees as chains of capsules (cylinders with round ends), rendered analytically.

Why capsules: the distance from a voxel centre to a line segment is closed-form, so a tube of any
calibre renders at any spacing with a partial-volume ramp one voxel wide, only inside each segment's
bounding box — fast, and free of the staircase a voxelised centreline would leave on thick slices.
Vessels are the main source of false positives for nodule and aneurysm detectors, so they matter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from services.core.grid import Grid


@dataclass(frozen=True)
class Segment:
    """A straight piece of vessel: from ``start_mm`` to ``end_mm`` (world LPS), radius in mm."""

    start_mm: np.ndarray
    end_mm: np.ndarray
    radius_mm: float
    generation: int
    branch_start: bool = False  # first piece of a child branch: its start is a bifurcation


def _perturb(rng: np.random.Generator, direction: np.ndarray, angle_sd: float) -> np.ndarray:
    v = direction + rng.normal(0.0, angle_sd, 3)
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class TreeStyle:
    """How one anatomy's vessels branch and where they may go; each trunk draws its own calibre and length.

    Kept apart from the trunk so an anatomy states its style once for all its trunks (three carotid /
    basilar roots, three hilar trunks per lung, three hepatic/portal stems).
    """

    min_radius_mm: float  # branching stops below this calibre
    inside: Callable[[np.ndarray], bool]  # a branch ends at the first piece leaving the organ
    tortuosity: float = 0.15  # sd of each piece's bend (radians)
    branch_angle: float = 0.6  # children leave at ± this (radians) around the parent's direction
    pieces_per_branch: int = 3
    max_segments: int = 400


def grow_tree(
    rng: np.random.Generator,
    root_mm: np.ndarray,
    direction: np.ndarray,
    radius_mm: float,
    length_mm: float,
    style: TreeStyle,
) -> list[Segment]:
    """Grow a bifurcating tree (Murray-like calibre ratio ≈ 0.79) while it stays ``style.inside``.

    Each branch is ``style.pieces_per_branch`` slightly bent pieces; children leave at
    ±``style.branch_angle`` around the parent's direction.
    """
    segments: list[Segment] = []
    stack = [
        (
            np.asarray(root_mm, float),
            np.asarray(direction, float) / np.linalg.norm(direction),
            radius_mm,
            length_mm,
            0,
        )
    ]
    while stack and len(segments) < style.max_segments:
        start, heading, radius, length, generation = stack.pop()
        point = start
        for piece in range(style.pieces_per_branch):
            heading = _perturb(rng, heading, style.tortuosity)
            end = point + heading * (length / style.pieces_per_branch)
            if not style.inside(end):
                break
            segments.append(Segment(point, end, radius, generation, piece == 0 and generation > 0))
            point = end
        else:
            child_radius = radius * 0.79
            if child_radius >= style.min_radius_mm:
                normal = np.cross(heading, rng.standard_normal(3))
                normal /= max(np.linalg.norm(normal), 1e-9)
                for sign in (1.0, -1.0):
                    angle = style.branch_angle * rng.uniform(0.7, 1.3)
                    child = np.cos(angle) * heading + sign * np.sin(angle) * normal
                    stack.append((point, child, child_radius, length * rng.uniform(0.7, 0.9), generation + 1))
    return segments


def render_segments(segments: list[Segment], geometry: Grid) -> np.ndarray:
    """Fraction (0..1) of each voxel filled by any vessel, on ``geometry``'s grid (float32).

    Partial volume is a linear ramp across one (geometric-mean) voxel width at the wall — the
    analytic equivalent of supersampling for a surface with a known distance function.
    """
    shape = geometry.shape
    fraction = np.zeros(shape, dtype=np.float32)
    spacing = np.asarray(geometry.spacing)
    ramp = float(np.prod(spacing) ** (1 / 3))
    step = geometry.direction * spacing[None, :]
    size = np.asarray(geometry.shape_xyz)
    for seg in segments:
        reach = seg.radius_mm + ramp
        ends = geometry.world_to_index(np.stack([seg.start_mm, seg.end_mm]))
        pad = reach / spacing
        lo = np.clip(np.floor(ends.min(0) - pad).astype(int), 0, size)
        hi = np.clip(np.ceil(ends.max(0) + pad).astype(int) + 1, 0, size)
        if np.any(hi <= lo):
            continue
        kk_, jj_, ii_ = np.meshgrid(
            *(np.arange(lo[a], hi[a], dtype=np.float32) for a in (2, 1, 0)), indexing="ij"
        )
        origin = geometry.index_to_world(lo.astype(float))
        # World offsets from the box corner, then from the segment start: all float32, no (N,3) copies.
        px = ii_ - lo[0]
        py = jj_ - lo[1]
        pz = kk_ - lo[2]
        rel = origin - seg.start_mm
        wx = rel[0] + step[0, 0] * px + step[0, 1] * py + step[0, 2] * pz
        wy = rel[1] + step[1, 0] * px + step[1, 1] * py + step[1, 2] * pz
        wz = rel[2] + step[2, 0] * px + step[2, 1] * py + step[2, 2] * pz
        axis = seg.end_mm - seg.start_mm
        length_sq = float(axis @ axis)
        t = np.clip((wx * axis[0] + wy * axis[1] + wz * axis[2]) / max(length_sq, 1e-9), 0.0, 1.0)
        dx = wx - t * axis[0]
        dy = wy - t * axis[1]
        dz = wz - t * axis[2]
        distance = np.sqrt(dx * dx + dy * dy + dz * dz)
        filled = np.clip(0.5 + (seg.radius_mm - distance) / ramp, 0.0, 1.0).astype(np.float32)
        view = fraction[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]
        np.maximum(view, filled, out=view)
    return fraction


def segment_points(segments: list[Segment], min_radius_mm: float = 0.0) -> np.ndarray:
    """Midpoints of segments at least ``min_radius_mm`` thick (for juxta-vascular placement)."""
    pts = [(s.start_mm + s.end_mm) / 2 for s in segments if s.radius_mm >= min_radius_mm]
    return np.array(pts) if pts else np.zeros((0, 3))
