"""Training samples: size-normalised VOIs cut exactly as serving cuts them, with jittered prompts.

A radiologist's centre and diameter are never exact, so each lesion yields several VOIs whose
prompt is perturbed (centre moved by up to ``CENTER_JITTER`` of the diameter, diameter scaled by
``DIAMETER_SCALE``). The VOI comes from :func:`services.label_estimation.voi.extract_voi` and the
target from the exact mask resampled onto the same VOI grid — training sees what serving will see.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.core.io import read_image
from services.label_estimation.batch import ManifestLesion, read_manifest
from services.label_estimation.prompt import LesionPrompt
from services.label_estimation.voi import VOI_SIZE, extract_voi

CENTER_JITTER = 0.10
DIAMETER_SCALE = (0.85, 1.2)


@dataclass
class VoiSet:
    """Stacked VOIs: images and targets (n, 1, s, s, s) float32, one lesion type per row."""

    images: np.ndarray
    targets: np.ndarray
    lesion_types: list[str]

    def __len__(self) -> int:
        return len(self.lesion_types)

    def save(self, path: Path) -> None:
        np.savez_compressed(
            path, images=self.images, targets=self.targets, lesion_types=np.array(self.lesion_types)
        )

    @classmethod
    def load(cls, path: Path) -> VoiSet:
        data = np.load(path)
        return cls(data["images"], data["targets"], [str(t) for t in data["lesion_types"]])

    def subset(self, keep: Iterable[str]) -> VoiSet:
        wanted = set(keep)
        rows = [i for i, t in enumerate(self.lesion_types) if t in wanted]
        return VoiSet(self.images[rows], self.targets[rows], [self.lesion_types[i] for i in rows])


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


def concatenate(sets: list[VoiSet]) -> VoiSet:
    return VoiSet(
        np.concatenate([s.images for s in sets]),
        np.concatenate([s.targets for s in sets]),
        [t for s in sets for t in s.lesion_types],
    )


def vois_from_manifests(manifests: dict[str, Path], variants: int, seed: int) -> VoiSet:
    """VOIs of every lesion of each ``group → manifest``."""
    return concatenate(
        [
            lesion_vois(read_manifest(path), group, variants, seed + i)
            for i, (group, path) in enumerate(manifests.items())
        ]
    )
