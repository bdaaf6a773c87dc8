"""``head-ct-anomaly``: non-contrast head CT, normal or with haemorrhage / infarct (presence labels).

Haemorrhage is hyperdense (50–90 HU against 25–40 HU parenchyma); an early infarct is a subtle
hypodense territory only 5–10 HU below parenchyma — about one to two noise sd, which is what makes
emergency head-CT triage hard. Half the cases are normal (one manifest row, empty lesion_id).
"""

from __future__ import annotations

import numpy as np

from training.data import case
from training.data.case import LesionRecord, PhantomCase
from training.data.head import compose, head_tissues
from training.data.shapes import constant_profile, random_shape

TASK = "head-ct-anomaly"
DEFAULT_SIZE_XYZ = (256, 256, 40)
CT_VALUES = {"scalp": 20.0, "skull": 1100.0, "csf": 6.0, "gm": 38.0, "wm": 28.0}
ABNORMALITIES = ("haemorrhage", "infarct")


def generate(
    rng: np.random.Generator, size_xyz: tuple[int, int, int] | None = None, abnormal: bool | None = None
) -> PhantomCase:
    """One head CT; ``abnormal`` None → a fair coin."""
    nx, ny, nz = size_xyz or DEFAULT_SIZE_XYZ
    spacing_xy = float(np.clip(rng.uniform(220, 250) / nx, 0.45, 1.2))
    spacing_z = float(rng.choice([2.5, 5.0], p=[0.4, 0.6]))
    geometry = case.centred_geometry((nz, ny, nx), (spacing_xy, spacing_xy, spacing_z), rng.uniform(-10, 20))
    tissues = head_tissues(rng, geometry)
    image = compose(tissues, CT_VALUES, air=-1000.0)
    noise_sd = float(rng.uniform(3.0, 6.0) * np.sqrt(5.0 / spacing_z))
    is_abnormal = bool(rng.random() < 0.5) if abnormal is None else abnormal
    mask = np.zeros(image.shape, dtype=np.uint16)
    records: list[LesionRecord] = []
    if is_abnormal:
        region = (tissues["wm"] + tissues["gm"]) > 0.95
        kind = str(rng.choice(ABNORMALITIES))

        def finding(centre: np.ndarray, lesion_id: int) -> LesionRecord | None:
            if kind == "haemorrhage":
                shape = random_shape(
                    rng,
                    str(rng.choice(["ellipsoid", "lobulated", "irregular"])),
                    case.log_uniform(rng, 5, 45),
                    centre,
                )
                value, margin = rng.uniform(50, 90), 0.05
                contrast = (value - CT_VALUES["gm"]) / noise_sd
            else:
                shape = random_shape(
                    rng, str(rng.choice(["irregular", "lobulated"])), rng.uniform(20, 60), centre
                )
                drop = rng.uniform(5, 10)
                value, margin = CT_VALUES["wm"] + 4.0 - drop, 0.25  # parenchyma − 5..10 HU
                contrast = drop / noise_sd
            if not case.place_lesion(
                rng, shape, geometry, image, mask, lesion_id, constant_profile(value), margin=margin
            ):
                return None
            return LesionRecord(lesion_id, kind, shape, float(contrast))

        records = case.place_lesions(1, 30, lambda: case.choose_point(rng, region, geometry), finding)
    case.add_noise(rng, image, noise_sd)
    info = {"noise_sd": noise_sd, "units": "HU"}
    return case.finish_case(TASK, geometry, image, mask, records, modality="CT", info=info)
