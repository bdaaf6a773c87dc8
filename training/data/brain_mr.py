"""``brain-mr-metastasis``: contrast-enhanced T1 brain with solid and ring-enhancing metastases.

Metastases 2–30 mm (small ones dominate, as in the clinic), each with a hypointense oedema halo that
is *not* labelled; ring-enhancing ones have a necrotic core inside the label. The case also carries a
Gamma-Knife-like RT dose on a coarser grid (see :mod:`training.data.rtdose`): most targets treated,
some not. :func:`insert_metastases` is shared with the hybrid mode.
"""

from __future__ import annotations

import numpy as np

from services.core.grid import Grid
from training.data import case
from training.data.case import LesionRecord, PhantomCase
from training.data.head import compose, head_tissues
from training.data.rtdose import dose_for_targets
from training.data.shapes import FAMILIES, constant_profile, core_rim_profile, random_shape, rasterize

TASK = "brain-mr-metastasis"
DEFAULT_SIZE_XYZ = (256, 256, 128)
T1_VALUES = {"scalp": 900.0, "skull": 120.0, "csf": 250.0, "gm": 550.0, "wm": 750.0}


def insert_metastases(
    rng: np.random.Generator,
    image: np.ndarray,
    geometry: Grid,
    region: np.ndarray,
    white_matter_value: float,
    noise_sd: float,
    count: int,
) -> tuple[np.ndarray, list[LesionRecord]]:
    """Paint ``count`` metastases (+ oedema) whose centres fall in ``region``; returns mask, records."""
    mask = np.zeros(image.shape, dtype=np.uint16)

    def metastasis(centre: np.ndarray, lesion_id: int) -> LesionRecord | None:
        diameter = case.log_uniform(rng, 2.0, 30.0)
        ring = diameter > 8.0 and rng.random() < 0.5
        family = str(rng.choice(FAMILIES, p=[0.3, 0.25, 0.25, 0.05, 0.15]))
        shape = random_shape(rng, family, diameter, centre)
        cnr = rng.uniform(1.5, 15.0)
        enhancing = white_matter_value + cnr * noise_sd
        if ring:
            profile = core_rim_profile(enhancing, white_matter_value * 0.4, rng.uniform(0.25, 0.5))
        else:
            profile = constant_profile(enhancing)
        growth = rng.uniform(1.4, 2.5) if diameter < 15 else rng.uniform(1.3, 1.8)
        halo = rasterize(
            shape.scaled(growth),
            geometry,
            margin=0.4,
            profile=constant_profile(white_matter_value * 0.75),
            supersample=False,
        )
        if halo is not None and np.any(mask[halo.slices][halo.weight > 0.05]):
            return None  # the oedema would touch another lesion
        trial = image.copy() if halo is not None else image
        if halo is not None and diameter > 5.0:
            view = trial[halo.slices]
            view *= 1.0 - halo.weight
            view += halo.shaded
        if not case.place_lesion(
            rng, shape, geometry, trial, mask, lesion_id, profile, margin=rng.uniform(0.0, 0.1)
        ):
            return None
        image[...] = trial
        kind = "ring-enhancing" if ring else "solid"
        return LesionRecord(lesion_id, kind, shape, float(cnr), {"treated": bool(rng.random() < 0.75)})

    return mask, case.place_lesions(count, 20, lambda: case.choose_point(rng, region, geometry), metastasis)


def generate(rng: np.random.Generator, size_xyz: tuple[int, int, int] | None = None) -> PhantomCase:
    """One T1 post-contrast brain with 1–5 metastases and its RT dose."""
    nx, ny, nz = size_xyz or DEFAULT_SIZE_XYZ
    spacing_xy = float(np.clip(rng.uniform(220, 250) / nx, 0.5, 1.2))
    spacing_z = float(rng.choice([1.0, 1.5, 3.0, 5.0], p=[0.45, 0.15, 0.15, 0.25]))
    geometry = case.centred_geometry((nz, ny, nx), (spacing_xy, spacing_xy, spacing_z), rng.uniform(-20, 20))
    tissues = head_tissues(rng, geometry)
    image = compose(tissues, T1_VALUES, air=0.0)
    noise_sd = float(rng.uniform(12, 35))
    region = (tissues["wm"] + tissues["gm"]) > 0.95
    mask, records = insert_metastases(
        rng, image, geometry, region, T1_VALUES["wm"], noise_sd, int(rng.integers(1, 6))
    )
    case.mr_signal(rng, image, noise_sd, (0.05, 0.2))
    treated = [r.lesion_id for r in records if r.extra.get("treated")]
    dose = dose_for_targets(rng, geometry.with_array(mask), treated)
    info = {"noise_sd": noise_sd, "units": "a.u. (T1 post-contrast)"}
    return case.finish_case(
        TASK, geometry, image, mask, records, modality="MR", info=info, extras={"dose": dose}
    )
