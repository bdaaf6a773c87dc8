"""The size-normalised volume of interest (VOI) the generic U-Net and the random walker see.

Following the published protocol (IJCARS 2021;16:1901), the crop is resampled isotropically so that
the *stated* diameter always spans the same fraction of the VOI: a 4 mm nodule and a 40 mm liver
lesion look alike in size to the network, which is what lets one model serve every lesion type.
Training imports these functions, so a model is served exactly as it was trained and evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.core.grid import Grid
from services.core.lesion_mask import box_around
from services.core.lesion_prompt import LesionPrompt
from services.core.volume import Volume

#: Voxels along each VOI edge (the network's input size): 32³ keeps CPU training within 30 minutes
#: and per-lesion inference within a few milliseconds; the lesion still spans 16 voxels.
VOI_SIZE = 32
#: The stated diameter spans this fraction of the VOI edge (lesion ≈ half of the VOI).
LESION_FRACTION = 0.5
#: Intensity percentiles mapped to 0 and 1 (robust to calcifications, metal, air).
NORMALISATION_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class Voi:
    """A normalised VOI and the geometry that maps it back onto the image."""

    image: np.ndarray  # float32 (VOI_SIZE,)*3, values in [0, 1]
    grid: Volume  # the VOI's grid holding the raw resampled intensities (before normalisation)


def voi_grid(
    image: Volume, prompt: LesionPrompt, size: int = VOI_SIZE, fraction: float = LESION_FRACTION
) -> Grid:
    """The VOI's grid: centred on the prompt, axes parallel to the image's, isotropic spacing.

    Parallel axes make the resample a scale and shift of the image lattice (no rotation); the spacing
    makes the stated diameter span ``fraction`` of the edge whatever the lesion's size.
    """
    spacing = prompt.diameter_mm / (fraction * size)
    return Grid.centred_on(prompt.center_mm, (size, size, size), (spacing,) * 3, image.direction)


def normalise(raw: np.ndarray) -> np.ndarray:
    """Robust per-VOI min-max: percentiles → [0, 1]. Polarity is kept (inversion is an augmentation)."""
    low, high = np.percentile(raw, NORMALISATION_PERCENTILES)
    scale = high - low if high > low else 1.0
    return np.clip((raw.astype(np.float32) - low) / scale, 0.0, 1.0).astype(np.float32)


def extract_voi(
    image: Volume, prompt: LesionPrompt, size: int = VOI_SIZE, fraction: float = LESION_FRACTION
) -> Voi:
    """Resample the neighbourhood of the prompt onto the VOI grid (linear), then normalise.

    Only a box around the VOI is cut from the image first, so the cost does not grow with the image.
    Outside the image the VOI takes the image's minimum (air in CT, background in MR).
    """
    grid = voi_grid(image, prompt, size, fraction)
    half_diagonal = grid.spacing[0] * size * np.sqrt(3) / 2
    start, extent = box_around(image, prompt.center_mm, half_diagonal, margin_voxels=2)
    local = image.crop(start, extent)
    fill = float(local.array.min())
    raw = local.resample(reference=grid, interpolation="linear", default_value=fill, output_dtype=np.float32)
    return Voi(normalise(raw.array), raw)


def probability_to_image(
    image: Volume, prompt: LesionPrompt, voi: Voi, probability: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a VOI probability map onto the image voxels it covers.

    Returns (start_xyz, probability_zyx) for the image box around the VOI.
    """
    half_extent = voi.grid.spacing[0] * voi.grid.shape_xyz[0] / 2
    start, extent = box_around(image, prompt.center_mm, half_extent, margin_voxels=1)
    target = image.grid.window(start, extent)
    on_image = voi.grid.with_array(probability.astype(np.float32)).resample(
        reference=target, interpolation="linear", default_value=0.0, output_dtype=np.float32
    )
    return start, on_image.array
