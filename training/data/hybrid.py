"""Hybrid mode: the same lesions, painted into a *real* background image (the bundled samples).

Real anatomy, noise texture and geometry (oblique directions, 3 mm slices, an uncalibrated
radiograph) with an exact mask: the best of both. The lesion region is found with simple,
documented thresholds — good enough to keep lesions inside lung / brain, not a segmentation.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from services.core.errors import InputError
from services.core.io import read_image
from services.core.sample_data import sample_path
from services.core.volume import Volume
from training.data.brain_mr import insert_metastases
from training.data.case import CT_HU_12BIT, LesionRecord, PhantomCase, choose_point, place_lesions, to_int16
from training.data.chest_ct import insert_nodules
from training.data.cxr import add_opacity
from training.data.rtdose import dose_for_targets
from training.data.shapes import FAMILIES, random_shape

HYBRID_SAMPLES = {
    "chest-ct-nodule": "chest-ct-nifti",
    "brain-mr-metastasis": "brain-t1-nifti",
    "cxr-mass": "chest-xray",
}


def _noise_sd(image: np.ndarray, region: np.ndarray) -> float:
    """Robust noise sd from neighbour differences along x inside ``region`` (MAD / √2)."""
    diff = np.diff(image.astype(np.float64), axis=-1)[region[..., 1:] & region[..., :-1]]
    if diff.size == 0:
        return 1.0
    return float(max(1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2), 1e-3))


def _load(task: str) -> Volume:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the radiograph's missing PixelSpacing is known and documented
        return read_image(sample_path(HYBRID_SAMPLES[task]))


def _lung_region(hu: np.ndarray) -> np.ndarray:
    """Air inside the body: HU < −400 components that do not touch the volume's side faces."""
    labels, n = ndimage.label(hu < -400)
    touching = set(np.unique(labels[:, [0, -1], :])) | set(np.unique(labels[:, :, [0, -1]]))
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    keep = [lab for lab in np.argsort(sizes)[::-1] + 1 if lab not in touching][:2]
    return ndimage.binary_erosion(np.isin(labels, keep), iterations=1)


def generate(task: str, rng: np.random.Generator) -> PhantomCase:
    """Insert lesions into the real sample behind ``task``; the output keeps its real geometry."""
    if task not in HYBRID_SAMPLES:
        raise InputError(
            f"--hybrid is available for {', '.join(HYBRID_SAMPLES)}, not {task!r}", field="hybrid"
        )
    real = _load(task)
    image = np.asarray(real.array, dtype=np.float32).copy()
    if task == "chest-ct-nodule":
        lungs = _lung_region(image)
        noise_sd = _noise_sd(image, lungs)
        mask, records = insert_nodules(
            rng, image, real.grid, lungs.astype(np.float32), max(noise_sd, 5.0), int(rng.integers(1, 5))
        )
        out = to_int16(image, CT_HU_12BIT)
        extras = {}
    elif task == "brain-mr-metastasis":
        fg = image > 0.25 * float(image.max())
        brain = ndimage.binary_erosion(fg, iterations=6)
        wm_value = float(np.percentile(image[brain], 80))
        region = brain & (image > 0.5 * wm_value)
        noise_sd = max(_noise_sd(image, brain), 1.0)
        mask, records = insert_metastases(
            rng, image, real.grid, region, wm_value, noise_sd, int(rng.integers(1, 5))
        )
        out = to_int16(image, (0, 32767))
        extras = {
            "dose": dose_for_targets(
                rng, real.with_array(mask), [r.lesion_id for r in records if r.extra.get("treated")]
            )
        }
    else:
        smooth = ndimage.uniform_filter(image[0], size=25)
        rows, cols = smooth.shape
        central = np.zeros_like(smooth, dtype=bool)
        central[int(rows * 0.2) : int(rows * 0.75), int(cols * 0.15) : int(cols * 0.85)] = True
        lungs = (central & (smooth < np.percentile(smooth[central], 35)))[None]
        noise_sd = max(_noise_sd(image, lungs), 1.0)
        span = float(np.percentile(image, 99) - np.percentile(image, 1))
        mask = np.zeros(image.shape, dtype=np.uint16)

        def mass(centre: np.ndarray, lesion_id: int) -> LesionRecord | None:
            # Family before size here (the synthetic radiograph draws size first): kept as published.
            family = str(rng.choice(FAMILIES))
            shape = random_shape(
                rng, family, float(np.exp(rng.uniform(np.log(10), np.log(60)))), centre, planar=True
            )
            amplitude = rng.uniform(0.03, 0.25) * span
            if not add_opacity(rng, image, mask, real.grid, shape, lesion_id, amplitude, rng.uniform(0, 0.2)):
                return None
            return LesionRecord(lesion_id, "mass", shape, float(amplitude / noise_sd))

        records = place_lesions(
            int(rng.integers(1, 4)), 25, lambda: choose_point(rng, lungs, real.grid), mass
        )
        out = to_int16(image, (0, 32767))
        extras = {}
    metadata = {k: real.metadata[k] for k in ("modality",) if k in real.metadata}
    return PhantomCase(
        task,
        real.with_array(out, **metadata),
        real.with_array(mask),
        records,
        abnormal=bool(records),
        info={"noise_sd": noise_sd, "background": HYBRID_SAMPLES[task], "hybrid": True},
        extras=extras,
    )
