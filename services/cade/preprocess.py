"""A detector's view of an image: its working grid and its normalised intensities.

Shared by serving and training (training/cade imports these), so a model sees at serving time exactly
the frame and the intensity scale it was trained on.

* **3D** detectors work at one isotropic spacing (mm) over the image's own world box and direction
  (:meth:`Grid.respaced`), so a network learns one lesion size in voxels whatever the scanner's
  voxel size and slice thickness.
* **2D** detectors (radiographs) work in a *normalised frame*: the image resized so its long side
  has a fixed number of pixels, keeping its aspect ratio. A radiograph often carries no usable pixel
  spacing, so the result must not depend on a guessed mm scale: the frame is defined by the image.

Both frames cover the same world box as the image, so a point found on the working grid is a point
on the original image (``grid.index_to_world`` on one, ``world_to_index`` on the other).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from services.core.errors import InputError
from services.core.grid import Grid
from services.core.volume import Volume


@dataclass(frozen=True)
class Intensity:
    """How raw values become the network's [0, 1] input.

    ``window``: clip to ``[low, high]`` in the image's own units (CT: HU) and scale — CT numbers are
    calibrated, so a fixed window is the same tissue on every scanner. ``percentile``: map the
    image's own ``low``-th..``high``-th percentiles to [0, 1] (MR and radiographs have no absolute scale).
    """

    kind: Literal["window", "percentile"]
    low: float
    high: float

    def __post_init__(self) -> None:
        if self.kind not in ("window", "percentile"):
            raise InputError(f"unknown intensity normalisation {self.kind!r}", field="intensity.kind")
        if not self.low < self.high:
            raise InputError(f"low {self.low} must be below high {self.high}", field="intensity")
        if self.kind == "percentile" and not (self.low >= 0.0 and self.high <= 100.0):
            raise InputError("percentiles must lie in [0, 100]", field="intensity")

    def apply(self, array: np.ndarray) -> np.ndarray:
        values = np.asarray(array, dtype=np.float32)
        if self.kind == "window":
            low, high = self.low, self.high
        else:
            low, high = (float(v) for v in np.percentile(values, [self.low, self.high]))
        if high <= low:  # a flat image: nothing to see, and no division by zero
            return np.zeros_like(values)
        return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class WorkingFrame:
    """The working grid of a detector: ``spacing_mm`` (3D, isotropic) or ``long_side`` pixels (2D)."""

    dims: Literal[2, 3]
    spacing_mm: float | None = None
    long_side: int | None = None

    def __post_init__(self) -> None:
        if self.dims == 3 and not (self.spacing_mm is not None and self.spacing_mm > 0):
            raise InputError("a 3D detector needs a working spacing > 0 mm", field="frame.spacing_mm")
        if self.dims == 2 and not (self.long_side is not None and self.long_side >= 8):
            raise InputError("a 2D detector needs a long side of ≥ 8 pixels", field="frame.long_side")
        if self.dims not in (2, 3):
            raise InputError(f"must be 2 or 3, got {self.dims}", field="frame.dims")

    def grid_for(self, image: Grid) -> Grid:
        """The working grid covering ``image``'s world box; in 3D its axes run along L, P and S.

        The detectors were trained on volumes stored with their axes along L, P, S; an image stored
        head-first (negative z spacing in CIRCUS CS, a flipped NRRD) or as RAS NIfTI reached them
        mirrored, and an 18.9 mm nodule found at confidence 0.9997 was missed when the same phantom
        was stored head-first. Candidates are reported on the image's own grid, so the caller sees no
        difference but the result."""
        if self.dims == 3:
            if np.allclose(image.direction, np.eye(3)):
                return image.respaced([self.spacing_mm] * 3)
            return _lps_aligned(image, self.spacing_mm)
        rows, cols = image.shape[1], image.shape[2]
        scale = max(rows, cols) / float(self.long_side)
        sx, sy, sz = image.spacing
        return image.respaced([sx * scale, sy * scale, sz])


def _lps_aligned(image: Grid, spacing_mm: float) -> Grid:
    """The grid with axes along L, P, S and ``spacing_mm`` voxels whose box holds ``image``'s box
    (the same box for a flipped or permuted image; the bounding box of an oblique one)."""
    corner_index_xyz = np.array(list(np.ndindex(2, 2, 2))) * np.asarray(image.shape_xyz) - 0.5
    corners = np.array([image.index_to_world(corner) for corner in corner_index_xyz])
    low, high = corners.min(axis=0), corners.max(axis=0)
    size_xyz = np.maximum(1, np.round((high - low) / spacing_mm)).astype(int)
    origin = low + spacing_mm / 2
    return Grid(tuple(int(n) for n in size_xyz[::-1]), (spacing_mm,) * 3, tuple(origin), np.eye(3))


def _anti_aliased(image: Volume, target: Grid) -> np.ndarray:
    """The image smoothed before downsampling (σ ≈ half the shrink factor per axis), so fine noise
    does not alias into blobs a detector would mistake for lesions."""
    factor = np.asarray(target.spacing)[::-1] / np.asarray(image.spacing)[::-1]
    sigma = np.where(factor > 1.0, 0.5 * factor, 0.0)
    if image.shape_xyz[2] == 1:
        sigma[0] = 0.0
    array = np.asarray(image.array, dtype=np.float32)
    return ndimage.gaussian_filter(array, sigma) if np.any(sigma > 0) else array


def to_working(image: Volume, frame: WorkingFrame, intensity: Intensity) -> Volume:
    """``image`` resampled onto the detector's working grid, intensities normalised to [0, 1].

    Normalisation comes first, on the original values: a percentile of the resampled image would
    count the padding outside the box."""
    target = frame.grid_for(image.grid)
    normalised = image.with_array(intensity.apply(_anti_aliased(image, target)))
    return normalised.resample(reference=target, interpolation="linear", output_dtype=np.float32)
