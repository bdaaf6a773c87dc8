"""Weak labels of phantom lesions and the sphere-label Dice the realism bars are judged by.

The measurements themselves (centre of mass in LPS mm, edge-to-edge maximum 3D diameter, RECIST-like
axial pair, volume) live in :mod:`services.core.lesion_measurements`, the same code that measures
estimated masks in serving, so a phantom's weak label and a served mask are measured alike. The
sphere label is serving's :func:`services.label_estimation.shapes.sphere_mask`.
"""

from __future__ import annotations

import numpy as np

from services.core.lesion_measurements import WeakLabel, measure_lesion, weak_labels_from_mask
from services.core.lesion_prompt import LesionPrompt
from services.core.volume import Volume
from services.evaluation import dice
from services.label_estimation.shapes import sphere_mask

__all__ = ["WeakLabel", "measure_lesion", "sphere_dice", "weak_labels_from_mask"]


def sphere_dice(mask: Volume, lesion_id: int, label: WeakLabel) -> float:
    """Dice between the sphere label from (centre, max diameter) and the lesion's exact mask."""
    sphere = sphere_mask(mask, LesionPrompt(label.center_mm, label.diameter_mm, lesion_id))
    return dice(sphere.full(), np.asarray(mask.array) == lesion_id)
