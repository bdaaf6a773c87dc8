"""Dice overlap between an estimated mask and its reference mask.

Label estimation (a mask from a weak label) is scored by Dice per lesion, then by the mean per lesion
type with a bootstrap CI (:func:`services.evaluation.bootstrap.bootstrap_mean_dice`).
"""

from __future__ import annotations

import numpy as np

from services.core.errors import InputError


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap ``2|A∩B| / (|A| + |B|)`` of two masks on the same grid (nonzero = foreground).

    Both empty gives **1.0**: the estimate agrees exactly with a reference that holds nothing, so it
    must score as perfect agreement — 0.0 would punish a correct "nothing here", and NaN would poison
    every mean it enters. This is the convention of ``services.core.lesion_measurements.dice``, which
    this function replaces (same signature, same value on boolean input).

    Masks of different shapes are refused rather than broadcast: broadcasting a slice against a volume
    yields a number, but not the overlap of two masks.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise InputError(f"mask shapes differ: {a.shape} vs {b.shape}", field="b")
    a = a.astype(bool, copy=False)
    b = b.astype(bool, copy=False)
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return 1.0
    return 2.0 * float(np.count_nonzero(a & b)) / total
