"""The linear baseline every learned model must beat: PCA fitted on training normals, score = the
mean squared reconstruction residual (at the task's model shape: 64×64 radiographs, 32×64×64 head
CT). It shows how far "different from the normal subspace" already gets on these phantoms."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA

from services.anomaly.preprocess import dequantise_centre


@dataclass
class PcaBaseline:
    components: int = 20
    seed: int = 0

    def fit(self, levels: np.ndarray, n_levels: int = 256) -> PcaBaseline:
        x = dequantise_centre(levels, n_levels).reshape(len(levels), -1)
        self.pca = PCA(self.components, random_state=self.seed).fit(x)
        self.n_levels = n_levels
        return self

    def residual_map(self, levels: np.ndarray) -> np.ndarray:
        """Squared residual per voxel, shape of ``levels``."""
        x = dequantise_centre(levels, self.n_levels).reshape(len(levels), -1)
        rec = self.pca.inverse_transform(self.pca.transform(x))
        return ((x - rec) ** 2).reshape(levels.shape)

    def score(self, levels: np.ndarray) -> np.ndarray:
        """Mean squared residual per case (higher = more abnormal)."""
        return self.residual_map(levels).reshape(len(levels), -1).mean(1)
