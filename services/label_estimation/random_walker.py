"""Classic baseline: scikit-image's random walker seeded inside and outside the stated sphere.

It runs on the same size-normalised VOI as the U-Net (isotropic voxels, so thick slices do not
bias the walk), seeded with the inner 40 % of the sphere as lesion and everything beyond 1.3×
its radius as background; the probability map goes back onto the image grid like the U-Net's.
"""

from __future__ import annotations

import warnings

import numpy as np
from skimage.segmentation import random_walker

from services.core.components import component_at
from services.core.lesion_mask import LesionMask
from services.core.lesion_prompt import LesionPrompt
from services.core.volume import Volume
from services.label_estimation.voi import LESION_FRACTION, VOI_SIZE, extract_voi, probability_to_image

INNER_SEED_FRACTION = 0.4
OUTER_SEED_FRACTION = 1.3
BETA = 130.0


def random_walker_mask(image: Volume, prompt: LesionPrompt) -> LesionMask:
    voi = extract_voi(image, prompt, size=VOI_SIZE)
    size = VOI_SIZE
    radius_voxels = LESION_FRACTION * size / 2
    axis = np.arange(size) - (size - 1) / 2
    zz, yy, xx = np.meshgrid(axis, axis, axis, indexing="ij")
    distance = np.sqrt(xx**2 + yy**2 + zz**2)
    seeds = np.zeros((size,) * 3, dtype=np.int32)
    seeds[distance <= max(1.0, INNER_SEED_FRACTION * radius_voxels)] = 1
    seeds[distance >= OUTER_SEED_FRACTION * radius_voxels] = 2
    with warnings.catch_warnings():  # CG tolerance noise can leave probabilities a hair outside [0, 1]
        warnings.simplefilter("ignore", UserWarning)
        probability = random_walker(
            voi.image, seeds, beta=BETA, mode="cg_j", tol=1e-4, return_full_prob=True
        )[0]
    start, on_image = probability_to_image(image, prompt, voi, probability)
    center_zyx = image.world_to_index(prompt.center_mm)[::-1] - start[::-1]
    mask = component_at(on_image >= 0.5, center_zyx, np.asarray(image.spacing)[::-1])
    return LesionMask(image, tuple(int(v) for v in start), mask)
