"""Image → model input for an anomaly task, identical for training and serving.

Order matters: the intensity scale is computed on the original values (a percentile of the resized
image would be a different number), then the image is resized with anti-aliasing to the model's
array shape (the model sees the whole field of view whatever the matrix and voxel size), clipped to
[0, 1] and quantised to the task's grey levels.
"""

from __future__ import annotations

import numpy as np
from skimage.transform import resize

from services.anomaly.tasks import AnomalyTask
from services.core.errors import InputError
from services.core.volume import Volume

#: Smallest axis accepted (a 2D image's rows/cols, a 3D volume's slices too): smaller is not an image
#: the model can say anything about.
MIN_AXIS = 8


def check_image(array: np.ndarray, task: AnomalyTask) -> None:
    """Refuse what the model cannot score, naming ``image``: non-finite values, the wrong
    dimensionality, a tiny image, a constant image.

    A constant image (every pixel equal, or equal after the intensity scale, e.g. a CT entirely
    outside the 0–100 HU window) is refused rather than scored: it holds no anatomy, and a flow
    gives such smooth images a *high* likelihood (Nalisnick et al. 2019), so its score would read
    "very normal"."""
    if array.ndim != 3:
        raise InputError(f"must be a 3D (z, y, x) array, got {array.ndim}D", field="image")
    if not np.all(np.isfinite(array)):
        raise InputError("has non-finite pixel values (NaN or infinity)", field="image")
    z, y, x = array.shape
    if task.dims == 2 and z != 1:
        raise InputError(f"{task.name} scores 2D radiographs (one slice); got {z} slices", field="image")
    if task.dims == 3 and z < MIN_AXIS:
        raise InputError(f"{task.name} scores 3D volumes of ≥ {MIN_AXIS} slices; got {z}", field="image")
    if min(y, x) < MIN_AXIS:
        raise InputError(f"rows and columns must be ≥ {MIN_AXIS}, got {y}×{x}", field="image")
    if float(np.max(array)) == float(np.min(array)):
        raise InputError("is constant: nothing to score", field="image")


def normalised(array: np.ndarray, task: AnomalyTask) -> np.ndarray:
    """[0, 1] float32 at the model's array shape (before quantisation)."""
    check_image(array, task)
    scaled = task.intensity.apply(array)
    if float(scaled.max()) == float(scaled.min()):
        raise InputError(
            f"is constant after the intensity scale ({task.intensity.kind} "
            f"{task.intensity.low}..{task.intensity.high}): nothing to score",
            field="image",
        )
    out = resize(scaled, task.shape, order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def quantise(x: np.ndarray, levels: int) -> np.ndarray:
    """Grey level index 0..levels−1 (uint8 for 256 levels: what the training cache stores)."""
    return np.clip(np.floor(x * levels), 0, levels - 1).astype(np.uint8 if levels <= 256 else np.uint16)


def dequantise_centre(levels_array: np.ndarray, levels: int) -> np.ndarray:
    """Each level's centre in [0, 1]: the deterministic dequantisation used at serving time."""
    return ((levels_array.astype(np.float32) + 0.5) / levels).astype(np.float32)


def model_input(volume: Volume | np.ndarray, task: AnomalyTask) -> np.ndarray:
    """(1, 1, *task.spatial) float32 in (0, 1): what the exported flows take as ``image``."""
    array = np.asarray(volume.array if isinstance(volume, Volume) else volume)
    x = dequantise_centre(quantise(normalised(array, task), task.levels), task.levels)
    return x.reshape(1, 1, *task.spatial)
