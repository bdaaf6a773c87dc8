"""``chest-ct-nodule``: non-contrast chest CT in HU with lungs, vessel tree, chest wall, mediastinum.

Anatomy is a few analytic ellipses (body, lungs, heart, spine) with one-voxel partial-volume ramps,
ribs as a sloping banded annulus, lung parenchyma at −870 HU with smooth texture and a gravity
gradient, and a bifurcating vessel tree from each hilum. Nodules 3–30 mm: solid, part-solid,
ground-glass, juxta-pleural (touching the chest wall) and juxta-vascular (touching a vessel) — the
last two are the classic hard cases for detectors. :func:`insert_nodules` is shared with the hybrid
mode, which puts the same nodules into a real CT.
"""

from __future__ import annotations

import numpy as np

from services.core.grid import Grid
from training.data import case
from training.data.case import LesionRecord, PhantomCase
from training.data.shapes import FAMILIES, constant_profile, core_rim_profile, random_shape
from training.data.vessels import TreeStyle, grow_tree, render_segments, segment_points

TASK = "chest-ct-nodule"
DEFAULT_SIZE_XYZ = (256, 256, 128)
SLICE_THICKNESSES_MM = (0.625, 1.0, 1.25, 2.0, 2.5, 5.0)
NODULE_TYPES = ("solid", "part-solid", "ground-glass", "juxta-pleural", "juxta-vascular")
_TYPE_WEIGHTS = (0.3, 0.15, 0.15, 0.2, 0.2)
LUNG_HU = -850.0


def _soft(distance_inside_mm: np.ndarray, ramp_mm: float) -> np.ndarray:
    """Partial-volume fraction from an (approximate) signed distance to a surface, inside > 0."""
    return np.clip(0.5 + distance_inside_mm / np.float32(ramp_mm), 0.0, 1.0).astype(np.float32, copy=False)


def _ellipse_fraction(x, y, cx, cy, ax, ay, ramp_mm):
    """Fraction inside an ellipse (ax, ay may broadcast along z), distance approximated radially."""
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return _soft((1.0 - r) * np.minimum(ax, ay), ramp_mm)


def _blend(base: np.ndarray, value, weight: np.ndarray) -> np.ndarray:
    """base + (value − base)·weight, in place and in float32 (the hot loop of the anatomy)."""
    delta = np.subtract(value, base, dtype=np.float32)
    delta *= weight.astype(np.float32, copy=False)
    base += delta
    return base


def chest_anatomy(rng: np.random.Generator, geometry: Grid) -> tuple[np.ndarray, np.ndarray, dict]:
    """HU image (float32) and lung fraction of a synthetic thorax on ``geometry``; plus its parameters."""
    x, y, z = case.axis_coordinates_mm(geometry)
    ramp = float(np.sqrt(geometry.spacing[0] * geometry.spacing[1]))
    a = rng.uniform(140, 170)  # half body width
    b = a * rng.uniform(0.62, 0.75)
    yc = rng.uniform(-5, 15)
    half_height = rng.uniform(110, 140)
    profile = np.sqrt(np.clip(1.0 - (z / half_height) ** 2, 0.0, 1.0)).astype(np.float32)
    lung_ax = a * rng.uniform(0.3, 0.36) * profile + 1e-3
    lung_ay = b * rng.uniform(0.68, 0.76) * profile + 1e-3
    lung_cx = a * rng.uniform(0.4, 0.46)
    lung_cy = yc + b * rng.uniform(-0.05, 0.08)

    body = _ellipse_fraction(x, y, 0.0, yc, a, b, ramp)
    tissue = np.full(geometry.shape, -100.0, dtype=np.float32)  # subcutaneous fat
    tissue = _blend(tissue, 45.0, _ellipse_fraction(x, y, 0.0, yc, a * 0.92, b * 0.9, ramp))
    # Ribs: a sloping banded annulus (each rib crosses the slice obliquely, so bands drift with angle).
    r_body = np.sqrt((x / a) ** 2 + ((y - yc) / b) ** 2)
    angle = np.arctan2(y - yc, x)
    rib_period = rng.uniform(30, 38)
    band = np.sin(2 * np.pi * (z + 25.0 * np.abs(np.sin(angle))) / rib_period)
    rib = np.clip((0.035 - np.abs(r_body - 0.85)) * a / ramp, 0.0, 1.0) * np.clip((band - 0.35) * 3, 0.0, 1.0)
    tissue = _blend(tissue, 650.0, rib * (y < yc + 0.75 * b))
    # Spine (vertebral body) and the descending aorta beside it.
    spine = _ellipse_fraction(x, y, 0.0, yc + 0.72 * b, 0.11 * a, 0.11 * a, ramp)
    tissue = _blend(tissue, 300.0, spine)
    heart_profile = np.clip(1.0 - ((z + 0.25 * half_height) / (0.55 * half_height)) ** 2, 0.0, 1.0) ** 0.5
    heart = _ellipse_fraction(
        x, y, 0.12 * a, yc - 0.22 * b, 0.34 * a * heart_profile + 1e-3, 0.36 * b * heart_profile + 1e-3, ramp
    )
    lungs = np.maximum(
        _ellipse_fraction(x, y, -lung_cx, lung_cy, lung_ax, lung_ay, ramp),
        _ellipse_fraction(x, y, lung_cx, lung_cy, lung_ax, lung_ay, ramp),
    ) * (1.0 - heart)
    lungs *= body
    texture = case.smooth_field(rng, lungs.shape, (6, 10, 10))
    lung_hu = LUNG_HU + 25.0 * texture + 35.0 * ((y - lung_cy) / b)  # dependent (posterior) density
    params = {
        "body_half_width_mm": a,
        "lung_centres_mm": [(-lung_cx, lung_cy), (lung_cx, lung_cy)],
        "lung_semi_axes_mm": (float(lung_ax.max()), float(lung_ay.max())),
        "lung_half_height_mm": half_height,
    }
    tissue = _blend(tissue, lung_hu, lungs)
    image = (-1000.0 + body * (tissue + 1000.0)).astype(np.float32)
    return image, lungs.astype(np.float32), params


def _vessel_tree(rng: np.random.Generator, geometry: Grid, params: dict) -> list:
    """Pulmonary arteries/veins: three trunks per hilum, branching towards the periphery."""
    lung_ax, lung_ay = params["lung_semi_axes_mm"]
    height = params["lung_half_height_mm"]
    segments = []
    min_radius = max(0.6, 0.35 * min(geometry.spacing[:2]))
    for cx, cy in params["lung_centres_mm"]:
        lateral = np.sign(cx)

        def inside(p, cx=cx, cy=cy):
            s = 1.0 - (p[2] / height) ** 2
            if s <= 0:
                return False
            return ((p[0] - cx) / (lung_ax * np.sqrt(s))) ** 2 + (
                (p[1] - cy) / (lung_ay * np.sqrt(s))
            ) ** 2 < 0.95

        hilum = np.array([cx - lateral * 0.55 * lung_ax, cy, rng.uniform(-15, 10)])
        style = TreeStyle(min_radius, inside, tortuosity=0.2, max_segments=120)
        for dz in (0.8, 0.0, -0.8):
            heading = np.array([lateral * 0.8, rng.uniform(-0.3, 0.3), dz])
            segments += grow_tree(rng, hilum, heading, rng.uniform(4.0, 6.0), rng.uniform(35, 50), style)
    return segments


def _nodule(
    rng: np.random.Generator,
    kind: str,
    diameter_mm: float,
    centre_mm: np.ndarray,
    lung_hu: float,
    noise_sd: float,
):
    """Shape, intensity profile, margin and nominal contrast (in noise sd) of one nodule type."""
    if kind == "ground-glass":
        family = str(rng.choice(["ellipsoid", "lobulated", "irregular"]))
        value = min(lung_hu + rng.uniform(1.2, 8.0) * noise_sd, -300.0)
        profile, margin, core = constant_profile(value), rng.uniform(0.1, 0.3), value
    elif kind == "part-solid":
        family = str(rng.choice(["lobulated", "irregular", "spiculated"]))
        ggo, core = rng.uniform(-680, -380), rng.uniform(-20, 50)
        profile, margin = core_rim_profile(ggo, core, rng.uniform(0.35, 0.65)), rng.uniform(0.05, 0.2)
    else:
        family = str(rng.choice(FAMILIES, p=[0.15, 0.2, 0.25, 0.2, 0.2]))
        core = rng.uniform(-20, 60)
        profile, margin = constant_profile(core), rng.uniform(0.0, 0.12)
    shape = random_shape(rng, family, diameter_mm, centre_mm)
    return shape, profile, margin, abs(core - lung_hu) / noise_sd


def _pleural_point(
    rng: np.random.Generator, lungs: np.ndarray, geometry: Grid, start_mm: np.ndarray, inset_mm: float
):
    """Walk from a lung point along a random in-plane direction to the pleura, then step back inside."""
    direction = np.array([*rng.standard_normal(2), 0.0])
    direction /= max(np.linalg.norm(direction), 1e-9)
    step = 0.5 * min(geometry.spacing[:2])
    point = np.asarray(start_mm, float)
    for _ in range(2000):
        nxt = point + direction * step
        if not geometry.contains_world(nxt):
            break
        i, j, k = geometry.world_to_nearest_index(nxt)
        if lungs[k, j, i] < 0.5:
            break
        point = nxt
    return point - direction * inset_mm


def insert_nodules(
    rng: np.random.Generator,
    image: np.ndarray,
    geometry: Grid,
    lungs: np.ndarray,
    noise_sd: float,
    count: int,
    vessel_points_mm: np.ndarray | None = None,
) -> tuple[np.ndarray, list[LesionRecord]]:
    """Paint ``count`` nodules into the lung region of ``image`` (in place); returns mask and records."""
    mask = np.zeros(image.shape, dtype=np.uint16)
    records: list[LesionRecord] = []
    core_region = lungs > 0.99
    for _ in range(count * 20):
        if len(records) == count:
            break
        kind = str(rng.choice(NODULE_TYPES, p=_TYPE_WEIGHTS))
        if kind == "juxta-vascular" and (vessel_points_mm is None or len(vessel_points_mm) == 0):
            kind = "solid"
        diameter = case.log_uniform(rng, 3.0, 30.0)
        centre = case.choose_point(rng, core_region, geometry)
        if centre is None:
            break
        if kind == "juxta-pleural":
            centre = _pleural_point(rng, lungs, geometry, centre, 0.45 * diameter)
        elif kind == "juxta-vascular":
            anchor = vessel_points_mm[rng.integers(len(vessel_points_mm))]
            offset = rng.standard_normal(3)
            centre = anchor + offset / np.linalg.norm(offset) * 0.45 * diameter
        if not geometry.contains_world(centre):
            continue
        i, j, k = geometry.world_to_nearest_index(centre)
        if lungs[k, j, i] < 0.5:
            continue
        local = float(image[k, j, i]) if kind != "juxta-vascular" else LUNG_HU
        shape, profile, margin, contrast = _nodule(rng, kind, diameter, centre, min(local, -700.0), noise_sd)
        lesion_id = len(records) + 1
        if case.place_lesion(rng, shape, geometry, image, mask, lesion_id, profile, margin=margin):
            records.append(LesionRecord(lesion_id, kind, shape, float(contrast)))
    return mask, records


def generate(rng: np.random.Generator, size_xyz: tuple[int, int, int] | None = None) -> PhantomCase:
    """One synthetic chest CT with 1–4 nodules (int16 HU)."""
    nx, ny, nz = size_xyz or DEFAULT_SIZE_XYZ
    fov = rng.uniform(340, 400)
    spacing_xy = float(np.clip(fov / nx, 0.55, 1.6))
    spacing_z = float(rng.choice(SLICE_THICKNESSES_MM, p=[0.1, 0.2, 0.15, 0.15, 0.15, 0.25]))
    geometry = case.centred_geometry((nz, ny, nx), (spacing_xy, spacing_xy, spacing_z), rng.uniform(-40, 40))
    image, lungs, params = chest_anatomy(rng, geometry)
    segments = _vessel_tree(rng, geometry, params)
    vessels = render_segments(segments, geometry)
    vessels *= lungs
    image += (40.0 - image) * vessels
    # Thin slices are noisier (fewer photons per voxel); standard dose, standard kernel.
    noise_sd = float(rng.uniform(15, 35) * np.sqrt(1.25 / spacing_z))
    mask, records = insert_nodules(
        rng, image, geometry, lungs, noise_sd, int(rng.integers(1, 5)), segment_points(segments, 1.0)
    )
    case.add_noise(rng, image, noise_sd)
    info = {"noise_sd": noise_sd, "units": "HU", "lung_fraction": "lungs>0.5", **_json_params(params)}
    extras = {"lungs": geometry.with_array((lungs > 0.5).astype(np.uint8))}
    return case.finish_case(TASK, geometry, image, mask, records, modality="CT", info=info, extras=extras)


def _json_params(params: dict) -> dict:
    return {"lung_half_height_mm": float(params["lung_half_height_mm"])}
