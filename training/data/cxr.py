"""``cxr-mass`` and ``cxr-anomaly``: 2D PA chest radiographs built as X-ray line integrals.

The image is an attenuation map (body soft tissue, air-filled lungs subtracting, heart and
mediastinum, spine, posterior ribs as curved bands, clavicles) mapped to a 12-bit MONOCHROME2 value
(bone bright). Lesions *add* attenuation along the ray, so a mass over a rib or the heart is
genuinely harder to see. Masks are the lesion footprint in the image plane.

``cxr-anomaly`` draws normal and abnormal cases: mass, consolidation (large ill-defined airspace
opacity), pleural effusion (dependent opacity with a meniscus) and cardiomegaly (cardiothoracic
ratio > 0.5; the label is the enlarged heart).
"""

from __future__ import annotations

import numpy as np

from services.core.grid import Grid
from training.data import case
from training.data.case import LesionRecord, PhantomCase
from training.data.painting import paint_label
from training.data.shapes import FAMILIES, LesionShape, Raster, random_shape

TASKS = ("cxr-mass", "cxr-anomaly")
DEFAULT_SIZE_XYZ = (512, 512, 1)
ANOMALIES = ("mass", "consolidation", "effusion", "cardiomegaly")


def _thickness(x, y, cx, cy, ax, ay):
    """Chord length profile of an ellipsoid seen end-on: sqrt(1 − r²), 0 outside."""
    r2 = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2
    return np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))


def cxr_anatomy(
    rng: np.random.Generator, geometry: Grid, heart_scale: float = 1.0
) -> tuple[np.ndarray, dict]:
    """Attenuation map (1, H, W) float32 and the masks/parameters lesions are placed with."""
    x, y, _ = case.axis_coordinates_mm(geometry)
    x, y = x[0], y[0]
    a, b = rng.uniform(150, 175), rng.uniform(170, 200)
    yc = rng.uniform(-10, 10)
    att = 1.6 * _thickness(x, y, 0.0, yc + 40, a, b + 60)
    lung_ax, lung_ay = 0.36 * a, 0.42 * b
    lung_cx, lung_cy = 0.45 * a, yc - 0.05 * b
    lungs = np.maximum(
        _thickness(x, y, -lung_cx, lung_cy, lung_ax, lung_ay),
        _thickness(x, y, lung_cx, lung_cy, lung_ax, lung_ay),
    )
    heart_ax, heart_ay = 0.33 * a * heart_scale, 0.2 * b * heart_scale
    heart_c = (0.1 * a, lung_cy + 0.22 * b)
    heart = _thickness(x, y, heart_c[0], heart_c[1], heart_ax, heart_ay)
    lungs = lungs * (heart < 0.05)
    att -= 0.9 * lungs
    att += 0.55 * heart
    att += 0.5 * _thickness(x, y, 0.0, yc, 0.09 * a, 1.2 * b)  # mediastinum + spine
    # Posterior ribs: arcs y = y0 + k (|x| − x0)², ~10 per side, 8–10 mm wide.
    ribs = np.zeros_like(att)
    for n in range(10):
        y0 = lung_cy - lung_ay + n * (2.1 * lung_ay / 10) + rng.uniform(-3, 3)
        curve = y0 - 0.004 * (np.abs(x) - 20.0) ** 2 + 0.35 * np.abs(x)
        ribs += (
            np.clip(1.0 - np.abs(y - curve) / rng.uniform(4.0, 5.5), 0.0, 1.0)
            * (np.abs(x) > 15)
            * (np.abs(x) < a * 0.95)
        )
    att += 0.35 * np.minimum(ribs, 1.5)
    for sign in (-1.0, 1.0):  # clavicles
        cy = lung_cy - lung_ay + 10.0 + 0.25 * (sign * x - 0.0)
        att += 0.45 * np.clip(1.0 - np.abs(y - cy) / 6.0, 0.0, 1.0) * (sign * x > 10) * (sign * x < 0.75 * a)
    att += 0.04 * case.smooth_field(rng, (1, *att.shape), (1, 12, 12))[0]
    params = {
        "lungs": lungs > 0.15,
        "heart": heart,
        "heart_width_mm": 2 * heart_ax,
        "thorax_width_mm": 2 * (lung_cx + lung_ax),
        "lung_bottom_mm": lung_cy + lung_ay * 0.9,
        "ribs": ribs,
    }
    return att[None].astype(np.float32), params


def _to_detector(att: np.ndarray) -> np.ndarray:
    """Attenuation → 12-bit MONOCHROME2 (more attenuation = brighter, as on a lightbox)."""
    return 300.0 + 3600.0 * (1.0 - np.exp(-0.9 * att))


def _full_raster(fraction: np.ndarray, shaded: np.ndarray) -> Raster:
    full = (slice(0, fraction.shape[0]), slice(0, fraction.shape[1]), slice(0, fraction.shape[2]))
    return Raster(full, fraction.astype(np.float32), fraction.astype(np.float32), shaded.astype(np.float32))


def add_opacity(
    rng: np.random.Generator,
    att: np.ndarray,
    mask: np.ndarray,
    geometry: Grid,
    shape: LesionShape,
    lesion_id: int,
    amplitude: float,
    margin: float,
) -> bool:
    """Add a planar lesion's attenuation (a chord profile: thickest at its centre) and label it.

    Adding, not replacing, is what a projection does: the lesion sums with the ribs or heart behind
    it. Shared with the hybrid mode, which adds masses to a real radiograph the same way.
    """
    profile = lambda depth: amplitude * np.sqrt(np.clip(1.0 - (1.0 - depth) ** 2, 0.0, 1.0))  # noqa: E731
    return case.place_lesion(rng, shape, geometry, att, mask, lesion_id, profile, margin=margin, mode="add")


def generate(
    rng: np.random.Generator,
    size_xyz: tuple[int, int, int] | None = None,
    task: str = "cxr-mass",
    abnormal: bool | None = None,
) -> PhantomCase:
    """One radiograph: ``cxr-mass`` always has 1–3 masses; ``cxr-anomaly`` is normal or has one finding."""
    nx, ny, _ = size_xyz or DEFAULT_SIZE_XYZ
    spacing = float(rng.uniform(380, 430) / max(nx, ny))
    geometry = case.centred_geometry((1, ny, nx), (spacing, spacing, 1.0), 0.0)
    finding = None
    if task == "cxr-anomaly":
        is_abnormal = bool(rng.random() < 0.5) if abnormal is None else abnormal
        finding = str(rng.choice(ANOMALIES)) if is_abnormal else None
    heart_scale = rng.uniform(1.35, 1.6) if finding == "cardiomegaly" else rng.uniform(0.85, 1.05)
    att, params = cxr_anatomy(rng, geometry, heart_scale)
    noise_sd = float(rng.uniform(15, 40))
    mask = np.zeros(att.shape, dtype=np.uint16)
    records: list[LesionRecord] = []
    if task == "cxr-mass" or finding == "mass":
        count = int(rng.integers(1, 4)) if task == "cxr-mass" else 1
        records = _masses(rng, att, mask, geometry, params, count, noise_sd)
    elif finding == "consolidation":
        lungs = params["lungs"][None]
        for _ in range(25):
            centre = case.choose_point(rng, lungs, geometry)
            shape = random_shape(
                rng, str(rng.choice(["irregular", "lobulated"])), rng.uniform(40, 110), centre, planar=True
            )
            amplitude = rng.uniform(0.1, 0.35)
            if add_opacity(rng, att, mask, geometry, shape, 1, amplitude, rng.uniform(0.2, 0.4)):
                records.append(LesionRecord(1, "consolidation", shape, float(amplitude * 1000 / noise_sd)))
                break
    elif finding == "effusion":
        x, y, _ = case.axis_coordinates_mm(geometry)
        side = float(rng.choice([-1.0, 1.0]))
        level = params["lung_bottom_mm"] - rng.uniform(25, 70)
        meniscus = level - 0.004 * (side * x[0] - 40.0) ** 2 * (side * x[0] > 0) + 8.0
        fraction = np.clip(0.5 + (y[0] - meniscus) / spacing, 0, 1) * (side * x[0] > 10) * params["lungs"]
        amplitude = rng.uniform(0.3, 0.6)
        raster = _full_raster(fraction[None], amplitude * fraction[None])
        if paint_label(mask, raster, 1):
            att += raster.shaded
            records.append(
                LesionRecord(1, "effusion", _dummy_shape(geometry, mask), float(amplitude * 1000 / noise_sd))
            )
    elif finding == "cardiomegaly":
        fraction = (params["heart"] > 0.02).astype(np.float32)
        raster = _full_raster(fraction[None], np.zeros_like(fraction)[None])
        if paint_label(mask, raster, 1):
            ctr = params["heart_width_mm"] / params["thorax_width_mm"]
            records.append(
                LesionRecord(
                    1, "cardiomegaly", _dummy_shape(geometry, mask), 0.0, {"cardiothoracic_ratio": float(ctr)}
                )
            )
    image = _to_detector(att)
    image += rng.standard_normal(image.shape).astype(np.float32) * np.float32(noise_sd)
    info = {"noise_sd": noise_sd, "units": "12-bit detector value (MONOCHROME2)"}
    return case.finish_case(task, geometry, image, mask, records, modality="DX", info=info)


def _masses(
    rng: np.random.Generator,
    att: np.ndarray,
    mask: np.ndarray,
    geometry: Grid,
    params: dict,
    count: int,
    noise_sd: float,
) -> list[LesionRecord]:
    """Up to ``count`` masses 10–60 mm in the lungs, each recording what it overlies (rib, heart, lung).

    The nominal contrast uses the detector's local slope: the same added attenuation shows less
    behind the dense heart than in aerated lung.
    """

    def mass(centre: np.ndarray, lesion_id: int) -> LesionRecord | None:
        diameter = float(np.exp(rng.uniform(np.log(10), np.log(60))))
        shape = random_shape(rng, str(rng.choice(FAMILIES)), diameter, centre, planar=True)
        amplitude = rng.uniform(0.04, 0.5)
        if not add_opacity(rng, att, mask, geometry, shape, lesion_id, amplitude, rng.uniform(0.0, 0.2)):
            return None
        i, j, _ = geometry.world_to_nearest_index(centre)
        where = (
            "over-rib"
            if params["ribs"][j, i] > 0.3
            else "over-heart"
            if params["heart"][j, i] > 0.05
            else "lung"
        )
        slope = 3600.0 * 0.9 * np.exp(-0.9 * float(att[0, j, i]))
        return LesionRecord(lesion_id, "mass", shape, float(amplitude * slope / noise_sd), {"site": where})

    lungs = params["lungs"][None]
    return case.place_lesions(count, 25, lambda: case.choose_point(rng, lungs, geometry), mass)


def _dummy_shape(geometry: Grid, mask: np.ndarray) -> LesionShape:
    """A stand-in shape record for findings painted from a region rather than a shape model."""
    k, j, i = np.argwhere(mask).mean(0)
    return LesionShape("region", geometry.index_to_world([i, j, k]), np.eye(3), np.ones(3))
