"""``head-mra-aneurysm``: TOF-MRA with a bright tortuous arterial tree and saccular aneurysms.

Time-of-flight suppresses static tissue, so vessels (fresh inflowing blood) are the brightest thing
in the image; the in-plane resolution is 0.4–0.8 mm. Aneurysms (2–10 mm, ADAM-like) sit at
bifurcations and on the outer side of bends, joined to the parent artery by a neck. Hard negatives
that are *not* labelled: tight vessel loops and crossing (overlapping) vessels, which look like
aneurysms on maximum-intensity projections.
"""

from __future__ import annotations

import numpy as np

from training.data import case
from training.data.case import LesionRecord, PhantomCase
from training.data.head import compose, head_tissues
from training.data.shapes import constant_profile, random_shape
from training.data.vessels import Segment, TreeStyle, grow_tree, render_segments

TASK = "head-mra-aneurysm"
DEFAULT_SIZE_XYZ = (256, 256, 128)
TOF_VALUES = {"scalp": 380.0, "skull": 60.0, "csf": 90.0, "gm": 160.0, "wm": 190.0}
VESSEL_VALUE = 900.0


def _loop(centre: np.ndarray, radius_mm: float, vessel_radius_mm: float, normal: np.ndarray) -> list[Segment]:
    """A tight vessel loop (a hard negative): a ring of short segments."""
    u = np.cross(normal, [0.0, 0.0, 1.0] if abs(normal[2]) < 0.9 else [1.0, 0.0, 0.0])
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    angles = np.linspace(0, 2 * np.pi, 13)
    pts = [centre + radius_mm * (np.cos(t) * u + np.sin(t) * v) for t in angles]
    return [Segment(pts[n], pts[n + 1], vessel_radius_mm, 9) for n in range(12)]


def generate(rng: np.random.Generator, size_xyz: tuple[int, int, int] | None = None) -> PhantomCase:
    """One TOF-MRA slab with 1–3 aneurysms and unlabelled loops / crossings."""
    nx, ny, nz = size_xyz or DEFAULT_SIZE_XYZ
    spacing_xy = float(rng.uniform(0.4, 0.8))
    spacing_z = float(rng.choice([0.5, 0.6, 0.8, 1.0]))
    geometry = case.centred_geometry((nz, ny, nx), (spacing_xy, spacing_xy, spacing_z), 0.0)
    extent = np.asarray(geometry.shape_xyz) * np.asarray(geometry.spacing) / 2
    tissues = head_tissues(rng, geometry)
    image = compose(tissues, TOF_VALUES, air=0.0)

    def inside(p: np.ndarray) -> bool:
        return bool(np.all(np.abs(p) < extent * 0.95))

    segments: list[Segment] = []
    roots = [(-12.0, -5.0), (12.0, -5.0), (0.0, 15.0)]  # two carotids and the basilar artery
    style = TreeStyle(max(0.45, 0.6 * spacing_xy), inside, tortuosity=0.35, branch_angle=0.8, max_segments=90)
    for rx, ry in roots:
        root = np.array([rx, ry, -extent[2] * 0.95])
        heading = np.array([rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), 1.0])
        segments += grow_tree(rng, root, heading, rng.uniform(1.8, 2.4), rng.uniform(25, 35), style)
    hard_negatives = []
    for _ in range(int(rng.integers(1, 3))):
        anchor = segments[int(rng.integers(len(segments)))]
        normal = rng.standard_normal(3)
        normal /= np.linalg.norm(normal)
        segments += _loop(anchor.end_mm, rng.uniform(2.0, 4.0), max(0.5, anchor.radius_mm * 0.8), normal)
        hard_negatives.append({"kind": "loop", "center_mm": [float(v) for v in anchor.end_mm]})
    vessels = render_segments(segments, geometry)
    image += (VESSEL_VALUE - image) * vessels
    noise_sd = float(rng.uniform(12, 30))
    mask = np.zeros(image.shape, dtype=np.uint16)
    # Bifurcations: the start of a first piece of any child branch; bends: any other joint.
    joints = [s for s in segments if s.generation < 9 and s.radius_mm >= 0.8 * 0.79 * 1.8 * 0.5]

    def pick_joint() -> Segment | None:
        return joints[int(rng.integers(len(joints)))] if joints else None

    def aneurysm(seg: Segment, lesion_id: int) -> LesionRecord | None:
        diameter = case.log_uniform(rng, 2.0, 10.0)
        axis = seg.end_mm - seg.start_mm
        axis /= max(np.linalg.norm(axis), 1e-9)
        side = np.cross(axis, rng.standard_normal(3))
        side /= max(np.linalg.norm(side), 1e-9)
        centre = seg.start_mm + side * (seg.radius_mm + 0.35 * diameter)
        if not geometry.contains_world(centre):
            return None
        family = str(rng.choice(["sphere", "ellipsoid", "lobulated", "irregular"], p=[0.35, 0.3, 0.2, 0.15]))
        shape = random_shape(rng, family, diameter, centre)
        value = VESSEL_VALUE * rng.uniform(0.55, 1.0)  # slow flow in the dome loses inflow signal
        if not case.place_lesion(rng, shape, geometry, image, mask, lesion_id, constant_profile(value)):
            return None
        kind = "bifurcation" if seg.branch_start else "bend"
        return LesionRecord(
            lesion_id, f"saccular-{kind}", shape, float((value - TOF_VALUES["wm"]) / noise_sd)
        )

    records = case.place_lesions(int(rng.integers(1, 4)), 25, pick_joint, aneurysm)
    case.mr_signal(rng, image, noise_sd, (0.05, 0.2))
    info = {"noise_sd": noise_sd, "units": "a.u. (TOF)", "hard_negatives": hard_negatives}
    return case.finish_case(TASK, geometry, image, mask, records, modality="MR", info=info)
