"""Blob proposals for the two-stage CT detector: multi-scale Laplacian-of-Gaussian peaks inside the lungs.

Why a second source of candidates: the heatmap U-Net ranks small nodules far below vessels (a 6.7 mm
solid nodule peaks at p ≈ 0.001 while thousands of vessel voxels exceed 0.5), so no cut-off on its map
finds them. A scale-normalised LoG responds to any compact bright blob whatever its contrast; on 8
validation phantoms the U-Net's own candidates hold 10 of 20 nodules and the union with 300 LoG peaks
per case 16 of 20 (see docs/cade.md). The false-positive-reduction stage
(:mod:`services.cade.reranking`) then sorts the few hundred proposals per case.

The search is limited to the lungs (dilated, so juxta-pleural nodules whose centre lies in the wall
stay in): a chest CT's lungs are the low-density regions that do not touch the in-plane border (the
air around the patient does). Classic lung segmentation, cheap, and no model to ship.

Everything is in working-grid voxels (z, y, x) of the isotropic working frame; callers convert to mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from services.core.errors import InputError
from services.core.work_budget import checkpoint

__all__ = ["BlobProposal", "ProposalSpec", "blob_proposals", "lung_mask"]


@dataclass(frozen=True)
class ProposalSpec:
    """How blob proposals are drawn on the working image (intensities in [0, 1]).

    ``sigmas_voxels``: LoG scales; a sphere of radius r answers most at σ = r/√3, so σ 0.8–5.8
    voxels at 1.5 mm covers diameters of about 4–30 mm. ``lung_below``: working intensity under which
    a voxel is air or lung (CT window −1000..400 HU: 0.25 is −650 HU). ``lung_margin_voxels``: the
    lung mask's dilation. ``max_count``: proposals kept per image, strongest response first.
    ``min_lung_voxels``: low-density components smaller than this are not lung (bowel gas, noise).
    """

    sigmas_voxels: tuple[float, ...] = (0.8, 1.1, 1.6, 2.3, 3.2, 4.5, 5.8)
    lung_below: float = 0.25
    lung_margin_voxels: int = 4
    max_count: int = 300
    min_response: float = 0.02
    min_lung_voxels: int = 2000
    peak_window_voxels: int = 5

    def __post_init__(self) -> None:
        if not self.sigmas_voxels or any(not s > 0 for s in self.sigmas_voxels):
            raise InputError("needs at least one scale > 0", field="proposals.sigmas_voxels")
        if self.max_count < 1:
            raise InputError("must be ≥ 1", field="proposals.max_count")
        if self.peak_window_voxels < 3 or self.peak_window_voxels % 2 == 0:
            raise InputError("must be an odd count ≥ 3", field="proposals.peak_window_voxels")


@dataclass(frozen=True)
class BlobProposal:
    """One LoG peak: ``index_zyx`` on the working grid, the answering scale and its response."""

    index_zyx: tuple[int, int, int]
    sigma_voxels: float
    response: float

    def diameter_voxels(self) -> float:
        """The diameter of the sphere that answers most at this scale (2√3 σ)."""
        return float(2.0 * np.sqrt(3.0) * self.sigma_voxels)


def lung_mask(image: np.ndarray, spec: ProposalSpec) -> np.ndarray:
    """The dilated lungs of a working chest CT (z, y, x), bool: low-density components not touching
    the in-plane border (the volume may cut through the lungs in z), holes filled slice by slice
    (vessels and nodules inside the lung), dilated by ``lung_margin_voxels``."""
    low = np.asarray(image) < spec.lung_below
    labels, count = ndimage.label(low)
    if count == 0:
        return np.zeros(low.shape, dtype=bool)
    border = np.unique(
        np.concatenate(
            [labels[:, 0].ravel(), labels[:, -1].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]
        )
    )
    sizes = ndimage.sum_labels(low, labels, index=np.arange(count + 1))
    keep = sizes >= spec.min_lung_voxels
    keep[border] = False
    keep[0] = False
    lungs = keep[labels]
    lungs = np.stack([ndimage.binary_fill_holes(plane) for plane in lungs])
    if spec.lung_margin_voxels > 0 and lungs.any():
        lungs = ndimage.binary_dilation(lungs, iterations=spec.lung_margin_voxels)
    return lungs


def blob_proposals(
    image: np.ndarray, spec: ProposalSpec, mask: np.ndarray | None = None
) -> list[BlobProposal]:
    """Scale-space LoG peaks of ``image`` (z, y, x) inside ``mask`` (default: :func:`lung_mask`),
    strongest first, at most ``spec.max_count``. An image without lungs gives no proposals."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 3:
        raise InputError(f"needs a 3D working image, got {array.ndim} axes", field="image")
    region = lung_mask(array, spec) if mask is None else np.asarray(mask, dtype=bool)
    if not region.any():
        return []
    best = np.full(array.shape, -np.inf, dtype=np.float32)
    scale = np.zeros(array.shape, dtype=np.float32)
    for sigma in spec.sigmas_voxels:
        checkpoint("blob proposals")  # one scale of a large CT takes seconds: stop between them
        response = (-(sigma**2) * ndimage.gaussian_laplace(array, sigma)).astype(np.float32)
        better = response > best
        best = np.where(better, response, best)
        scale = np.where(better, np.float32(sigma), scale)
    peaks = ndimage.maximum_filter(best, size=spec.peak_window_voxels, mode="nearest")
    voxels = np.argwhere((best >= peaks) & region & (best > spec.min_response))
    values = best[tuple(voxels.T)]
    order = np.argsort(-values, kind="stable")[: spec.max_count]
    return [
        BlobProposal(
            index_zyx=(int(voxels[i, 0]), int(voxels[i, 1]), int(voxels[i, 2])),
            sigma_voxels=float(scale[tuple(voxels[i])]),
            response=float(values[i]),
        )
        for i in order
    ]
