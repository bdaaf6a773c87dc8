"""The false-positive-reduction stage: a small classifier re-scores candidate VOIs (the LUNA16 pipeline).

Stage one proposes: the heatmap U-Net's own candidates (good on nodules ≥ 10 mm) merged with blob
proposals inside the lungs (:mod:`services.cade.proposals`, which reach the small nodules the U-Net
ranks under vessels). Stage two decides: each proposal's VOI — the working image and the U-Net's
probability around it, ``voi_voxels``³ at the working spacing — goes through a classifier network
(``cade_<task>_fpr`` in the model repository) whose probability becomes the candidate's confidence.
The classifier sees both channels, so it keeps what the U-Net knows about large nodules and learns
what a small nodule looks like next to a vessel.

Training (``training/cade/fpr.py``) draws its VOIs with these same functions, so the classifier is
served on exactly the proposals and crops it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit

from services.cade.candidates import DetectionCandidate, find_candidates
from services.cade.proposals import ProposalSpec, blob_proposals
from services.core.errors import InputError
from services.core.grid import Grid
from services.core.volume import Volume
from services.core.work_budget import checkpoint
from services.inference.backend import InferFunction

__all__ = ["Proposal", "RerankSpec", "Reranker", "merged_proposals", "voi_batch"]


@dataclass(frozen=True)
class RerankSpec:
    """The second stage of a task (everything but the classifier's weights).

    ``first_stage_floor`` / ``first_stage_max``: the U-Net candidates proposed (far below any
    operating point: the classifier decides); ``merge_radius_mm``: a blob this close to a kept
    proposal is the same finding; ``voi_voxels``: the classifier's cube edge on the working grid;
    ``floor``: the least classifier probability reported.
    """

    voi_voxels: int = 32
    floor: float = 0.01
    first_stage_floor: float = 0.01
    first_stage_max: int = 100
    merge_radius_mm: float = 4.0
    proposals: ProposalSpec = field(default_factory=ProposalSpec)
    max_batch: int = 64

    def __post_init__(self) -> None:
        if self.voi_voxels < 8 or self.voi_voxels % 2:
            raise InputError("must be an even count ≥ 8", field="rerank.voi_voxels")
        if not (0.0 <= self.first_stage_floor <= 1.0 and 0.0 <= self.floor <= 1.0):
            raise InputError("floors must lie in [0, 1]", field="rerank.floor")
        if self.max_batch < 1:
            raise InputError("must be ≥ 1", field="rerank.max_batch")


@dataclass(frozen=True)
class Proposal:
    """A finding to classify, on the working grid: centre (continuous voxel index z, y, x), an
    estimated diameter in mm and the U-Net's peak probability (0 for a blob proposal)."""

    center_zyx: tuple[float, float, float]
    diameter_mm: float
    first_stage: float

    def voxel_zyx(self, shape: Sequence[int]) -> tuple[int, int, int]:
        rounded = np.clip(np.rint(self.center_zyx), 0, np.asarray(shape) - 1).astype(int)
        return (int(rounded[0]), int(rounded[1]), int(rounded[2]))


def merged_proposals(working: Volume, probability: Volume, spec: RerankSpec) -> list[Proposal]:
    """The U-Net's candidates, then each blob farther than ``merge_radius_mm`` from every kept one."""
    grid = working.grid
    first = find_candidates(
        probability.array,
        probability.grid,
        floor=spec.first_stage_floor,
        nms_radius_mm=spec.merge_radius_mm,
        max_count=spec.first_stage_max,
    )
    kept = [
        Proposal(_triplet(grid.world_to_index(c.center_mm)[::-1]), c.diameter_mm, c.confidence) for c in first
    ]
    kept_mm = [np.asarray(c.center_mm) for c in first]
    spacing_mm = float(min(grid.spacing))
    for blob in blob_proposals(np.asarray(working.array), spec.proposals):
        mm = np.asarray(grid.index_to_world(np.asarray(blob.index_zyx[::-1], dtype=float)))
        if kept_mm and np.min(np.linalg.norm(np.asarray(kept_mm) - mm, axis=1)) < spec.merge_radius_mm:
            continue
        kept.append(
            Proposal(tuple(float(v) for v in blob.index_zyx), blob.diameter_voxels() * spacing_mm, 0.0)
        )
        kept_mm.append(mm)
    return kept


def voi_batch(channels: Sequence[np.ndarray], centers_zyx: np.ndarray, size: int) -> np.ndarray:
    """Cubes of edge ``size`` around integer ``centers_zyx`` (n, 3) from each channel (z, y, x arrays of
    one shape), zero outside the image: float32 (n, channels, size, size, size). A cube spans
    ``[c - size/2, c + size/2)`` on each axis."""
    centers = np.asarray(centers_zyx, dtype=int).reshape(-1, 3)
    half = size // 2
    out = np.zeros((len(centers), len(channels), size, size, size), dtype=np.float32)
    for c, channel in enumerate(channels):
        padded = np.pad(np.asarray(channel, dtype=np.float32), half)
        for i, (z, y, x) in enumerate(centers):
            out[i, c] = padded[z : z + size, y : y + size, x : x + size]
    return out


def _triplet(values) -> tuple[float, float, float]:
    return (float(values[0]), float(values[1]), float(values[2]))


class Reranker:
    """The second stage bound to a classifier: ``infer`` maps (n, 2, s, s, s) float32 to logits (n, 1)."""

    def __init__(self, spec: RerankSpec, infer: InferFunction, model_version: str) -> None:
        self.spec = spec
        self._infer = infer
        self.model_version = model_version

    def scores(self, working: Volume, probability: Volume, proposals: Sequence[Proposal]) -> np.ndarray:
        """The classifier's probability for each proposal (the request's budget checked per batch)."""
        if not proposals:
            return np.zeros(0, dtype=np.float32)
        channels = (np.asarray(working.array), np.asarray(probability.array))
        centers = np.array([p.voxel_zyx(working.grid.shape) for p in proposals])
        out = []
        for start in range(0, len(centers), self.spec.max_batch):
            checkpoint("candidate classification")
            batch = voi_batch(channels, centers[start : start + self.spec.max_batch], self.spec.voi_voxels)
            logits = np.asarray(self._infer(batch), dtype=np.float32).reshape(len(batch), -1)[:, 0]
            out.append(expit(logits))
        scores = np.concatenate(out).astype(np.float32)
        if not np.all(np.isfinite(scores)):
            raise InputError("the candidate classifier answered non-finite scores", field="model")
        return scores

    def candidates(
        self,
        working: Volume,
        probability: Volume,
        report_grid: Grid,
        *,
        floor: float,
        nms_radius_mm: float,
        max_count: int,
    ) -> list[DetectionCandidate]:
        """Proposals re-scored by the classifier, strongest first, suppressed within ``nms_radius_mm``."""
        proposals = merged_proposals(working, probability, self.spec)
        scores = self.scores(working, probability, proposals)
        kept: list[DetectionCandidate] = []
        kept_mm: list[np.ndarray] = []
        for i in np.argsort(-scores, kind="stable"):
            if len(kept) >= max_count or scores[i] < floor:
                break
            proposal = proposals[i]
            mm = np.asarray(working.grid.index_to_world(np.asarray(proposal.center_zyx[::-1])))
            if kept_mm and np.min(np.linalg.norm(np.asarray(kept_mm) - mm, axis=1)) < nms_radius_mm:
                continue
            voxel = np.clip(np.rint(report_grid.world_to_index(mm)), 0, np.asarray(report_grid.shape_xyz) - 1)
            kept.append(
                DetectionCandidate(
                    center_mm=_triplet(mm),
                    center_voxel=(int(voxel[0]), int(voxel[1]), int(voxel[2])),
                    diameter_mm=float(proposal.diameter_mm),
                    confidence=float(scores[i]),
                )
            )
            kept_mm.append(mm)
        return kept
