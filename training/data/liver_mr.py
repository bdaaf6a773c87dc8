"""``liver-mr-lesion``: gadoxetate (EOB) hepatobiliary-phase T1 with lesions *darker* than liver.

In the hepatobiliary phase functioning hepatocytes take up contrast, so the liver is the brightest
organ and metastases / HCC are hypointense — the opposite polarity to enhancing brain metastases.
Training on both is what intensity-inversion augmentation is for. Hepatic and portal veins are dark
tubes through the liver (the usual mimics of small lesions).
"""

from __future__ import annotations

import numpy as np

from training.data import case
from training.data.case import LesionRecord, PhantomCase
from training.data.shapes import FAMILIES, constant_profile, core_rim_profile, random_shape
from training.data.vessels import TreeStyle, grow_tree, render_segments

TASK = "liver-mr-lesion"
DEFAULT_SIZE_XYZ = (256, 256, 64)
VALUES = {
    "fat": 250.0,
    "muscle": 330.0,
    "liver": 800.0,
    "spleen": 420.0,
    "kidney": 480.0,
    "vessel": 220.0,
    "bone": 300.0,
}


def _ellipsoid(x, y, z, c, s, ramp):
    r = np.sqrt(
        ((x - float(c[0])) / float(s[0])) ** 2
        + ((y - float(c[1])) / float(s[1])) ** 2
        + ((z - float(c[2])) / float(s[2])) ** 2
    )
    return np.clip(0.5 + (1.0 - r) * (float(min(s)) / ramp), 0.0, 1.0)


def generate(rng: np.random.Generator, size_xyz: tuple[int, int, int] | None = None) -> PhantomCase:
    """One HBP liver MR with 1–5 hypointense lesions."""
    nx, ny, nz = size_xyz or DEFAULT_SIZE_XYZ
    spacing_xy = float(np.clip(rng.uniform(340, 400) / nx, 0.7, 1.8))
    spacing_z = float(rng.choice([2.0, 3.0, 4.0, 5.0], p=[0.2, 0.3, 0.2, 0.3]))
    geometry = case.centred_geometry((nz, ny, nx), (spacing_xy, spacing_xy, spacing_z), rng.uniform(-30, 30))
    x, y, z = case.axis_coordinates_mm(geometry)
    ramp = float(np.sqrt(spacing_xy * spacing_xy))
    a, b = rng.uniform(150, 175), rng.uniform(100, 125)
    body = _ellipse2d(x, y, a, b, ramp)
    image = np.broadcast_to(body * VALUES["fat"], geometry.shape).astype(np.float32)
    image += (VALUES["muscle"] - VALUES["fat"]) * _ellipse2d(x, y, a - 15, b - 12, ramp)
    liver_c = (-0.35 * a, -0.15 * b, 0.0)
    liver_s = (0.5 * a, 0.6 * b, rng.uniform(80, 100))
    liver = _ellipsoid(x, y, z, liver_c, liver_s, ramp)
    spleen = _ellipsoid(x, y, z, (0.55 * a, 0.3 * b, 20.0), (0.18 * a, 0.3 * b, 55.0), ramp)
    kidneys = np.maximum(
        _ellipsoid(x, y, z, (-0.35 * a, 0.55 * b, -40.0), (28.0, 32.0, 55.0), ramp),
        _ellipsoid(x, y, z, (0.35 * a, 0.55 * b, -35.0), (28.0, 32.0, 55.0), ramp),
    )
    spine = _ellipse2d(x, y - 0.7 * b, 22.0, 22.0, ramp)
    for fraction, value in ((spleen, "spleen"), (kidneys, "kidney"), (spine, "bone"), (liver, "liver")):
        image += (VALUES[value] - image) * fraction
    # Hepatic / portal veins: dark branching tubes inside the liver.
    semi = np.asarray(liver_s)

    def in_liver(p: np.ndarray) -> bool:
        return float((((p - np.asarray(liver_c)) / semi) ** 2).sum()) < 0.8

    segments = []
    style = TreeStyle(max(1.0, 0.5 * spacing_xy), in_liver, max_segments=60)
    for _ in range(3):
        start = np.asarray(liver_c) + rng.uniform(-0.2, 0.2, 3) * semi
        segments += grow_tree(rng, start, rng.standard_normal(3), rng.uniform(3.5, 6.0), 45.0, style)
    veins = render_segments(segments, geometry) * liver
    image += (VALUES["vessel"] - image) * veins
    noise_sd = float(rng.uniform(15, 45))
    region = (liver > 0.99) & (veins < 0.01)
    mask = np.zeros(image.shape, dtype=np.uint16)

    def hypointense_lesion(centre: np.ndarray, lesion_id: int) -> LesionRecord | None:
        diameter = case.log_uniform(rng, 4.0, 40.0)
        family = str(rng.choice(FAMILIES, p=[0.2, 0.25, 0.25, 0.1, 0.2]))
        cnr = rng.uniform(1.3, 14.0)
        value = VALUES["liver"] - cnr * noise_sd
        target = rng.random() < 0.2 and diameter > 15  # targetoid: brighter centre in a dark rim
        profile = (
            core_rim_profile(value, value + 0.4 * (VALUES["liver"] - value), 0.5)
            if target
            else constant_profile(value)
        )
        shape = random_shape(rng, family, diameter, centre)
        if not case.place_lesion(
            rng, shape, geometry, image, mask, lesion_id, profile, margin=rng.uniform(0.0, 0.15)
        ):
            return None
        return LesionRecord(lesion_id, "targetoid" if target else "hypointense", shape, float(cnr))

    records = case.place_lesions(
        int(rng.integers(1, 6)), 20, lambda: case.choose_point(rng, region, geometry), hypointense_lesion
    )
    case.mr_signal(rng, image, noise_sd, (0.1, 0.25))
    info = {"noise_sd": noise_sd, "units": "a.u. (EOB hepatobiliary phase)"}
    return case.finish_case(TASK, geometry, image, mask, records, modality="MR", info=info)


def _ellipse2d(x, y, a, b, ramp):
    r = np.sqrt((x / float(a)) ** 2 + (y / float(b)) ** 2)
    return np.clip(0.5 + (1.0 - r) * (float(min(a, b)) / ramp), 0.0, 1.0)
