"""The generic semi-automatic segmenter: a 3D U-Net on the size-normalised VOI around the prompt.

Trained on several lesion types with intensity inversion and gamma among its augmentations
(training/label_unet), it is served from ``model_repository/label_unet3d`` through whichever
:class:`InferenceBackend` is configured. Pre- and post-processing live here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.core.components import component_at
from services.core.lesion_mask import LesionMask
from services.core.lesion_prompt import LesionPrompt
from services.core.volume import Volume
from services.core.work_budget import checkpoint
from services.inference.backend import InferFunction
from services.label_estimation.voi import Voi, extract_voi, probability_to_image

MODEL_NAME = "label_unet3d"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
PROBABILITY_THRESHOLD = 0.5


@dataclass(frozen=True)
class UnetResult:
    mask: LesionMask
    mean_probability_inside: float


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))).astype(np.float32)


def mask_from_probability(
    image: Volume, prompt: LesionPrompt, voi: Voi, probability: np.ndarray
) -> UnetResult:
    start, on_image = probability_to_image(image, prompt, voi, probability)
    center_zyx = image.world_to_index(prompt.center_mm)[::-1] - start[::-1]
    mask = component_at(on_image >= PROBABILITY_THRESHOLD, center_zyx, np.asarray(image.spacing)[::-1])
    mean_inside = float(on_image[mask].mean()) if mask.any() else 0.0
    return UnetResult(LesionMask(image, tuple(int(v) for v in start), mask), mean_inside)


def unet_masks(
    image: Volume, prompts: Sequence[LesionPrompt], infer: InferFunction, max_batch: int = 8
) -> list[UnetResult]:
    """Segment several lesions of one image, batching their VOIs through the network."""
    vois = [extract_voi(image, prompt) for prompt in prompts]
    results: list[UnetResult] = []
    for first in range(0, len(vois), max_batch):
        checkpoint(f"U-Net batch {first // max_batch + 1}")
        chunk = vois[first : first + max_batch]
        batch = np.stack([voi.image[None] for voi in chunk]).astype(np.float32)
        probabilities = sigmoid(np.asarray(infer(batch)))
        for offset, voi in enumerate(chunk):
            results.append(
                mask_from_probability(image, prompts[first + offset], voi, probabilities[offset, 0])
            )
    return results
