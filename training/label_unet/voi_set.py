"""A stack of training VOIs and targets, stored compactly (numpy only, so it travels anywhere).

On disk images are quantised to uint8 (they are normalised to [0, 1] already; 1/255 steps are far
below the noise) and targets are bit-packed: 36 KB per 32³ VOI instead of 256 KB.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


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
            path,
            images=np.rint(np.clip(self.images, 0, 1) * 255).astype(np.uint8),
            targets=np.packbits(self.targets.astype(bool).ravel()),
            shape=np.asarray(self.targets.shape),
            lesion_types=np.array(self.lesion_types),
        )

    @classmethod
    def load(cls, path: Path) -> VoiSet:
        data = np.load(path)
        shape = tuple(int(v) for v in data["shape"])
        targets = np.unpackbits(data["targets"], count=int(np.prod(shape))).reshape(shape).astype(np.float32)
        images = data["images"].astype(np.float32) / 255.0
        return cls(images, targets, [str(t) for t in data["lesion_types"]])

    def subset(self, keep: Iterable[str]) -> VoiSet:
        wanted = set(keep)
        rows = [i for i, t in enumerate(self.lesion_types) if t in wanted]
        return VoiSet(self.images[rows], self.targets[rows], [self.lesion_types[i] for i in rows])


def concatenate(sets: list[VoiSet]) -> VoiSet:
    return VoiSet(
        np.concatenate([s.images for s in sets]),
        np.concatenate([s.targets for s in sets]),
        [t for s in sets for t in s.lesion_types],
    )
