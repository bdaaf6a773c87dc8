"""Training samples: size-normalised VOIs cut exactly as serving cuts them, with jittered prompts.

A radiologist's centre and diameter are never exact, so each lesion yields several VOIs whose
prompt is perturbed (centre moved by up to ``CENTER_JITTER`` of the diameter, diameter scaled by
``DIAMETER_SCALE``). The VOI comes from :func:`services.label_estimation.voi.extract_voi` and the
target from the exact mask resampled onto the same VOI grid — training sees what serving will see.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.core.io import read_image
from services.core.lesion_prompt import LesionPrompt
from services.core.manifest import ManifestLesion, read_lesions
from services.label_estimation.voi import VOI_SIZE, extract_voi
from training.label_unet.voi_set import VoiSet, concatenate

CENTER_JITTER = 0.10
DIAMETER_SCALE = (0.85, 1.2)


def _jittered(prompt: LesionPrompt, rng: np.random.Generator) -> LesionPrompt:
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    shift = direction * rng.uniform(0, CENTER_JITTER) * prompt.diameter_mm
    scale = rng.uniform(*DIAMETER_SCALE)
    return LesionPrompt(
        tuple(np.asarray(prompt.center_mm) + shift), prompt.diameter_mm * scale, prompt.lesion_id
    )


def lesion_vois(
    lesions: list[ManifestLesion], group: str, variants: int, seed: int, size: int = VOI_SIZE
) -> VoiSet:
    """``variants`` VOIs per lesion (the first with the exact prompt, the rest jittered), all of ``group``
    (the lesion type the leave-one-type-out protocol holds out, e.g. a phantom task)."""
    rng = np.random.default_rng(seed)
    images, targets, types = [], [], []
    by_image: dict[Path, list[ManifestLesion]] = {}
    for lesion in lesions:
        if lesion.prompt is not None and lesion.truth is not None:
            by_image.setdefault(lesion.image, []).append(lesion)
    for image_path, image_lesions in by_image.items():
        image = read_image(image_path)
        truth = read_image(image_lesions[0].truth)
        for lesion in image_lesions:
            target_volume = truth.with_array((truth.array == lesion.prompt.lesion_id).astype(np.float32))
            for variant in range(variants):
                prompt = lesion.prompt if variant == 0 else _jittered(lesion.prompt, rng)
                voi = extract_voi(image, prompt, size=size)
                target = target_volume.resample(
                    reference=voi.grid, interpolation="linear", output_dtype=np.float32
                )
                images.append(voi.image[None])
                targets.append((target.array >= 0.5).astype(np.float32)[None])
                types.append(group)
    return VoiSet(np.stack(images), np.stack(targets), types)


def vois_from_manifests(manifests: dict[str, Path], variants: int, seed: int) -> VoiSet:
    """VOIs of every lesion of each ``group → manifest``."""
    return concatenate(
        [
            lesion_vois(read_lesions(path), group, variants, seed + i)
            for i, (group, path) in enumerate(manifests.items())
        ]
    )
