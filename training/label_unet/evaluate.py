"""Dice of every label-estimation method on held-out lesions, and overlay pictures of the results.

Every method runs through :class:`services.label_estimation.pipeline.LabelEstimator` on the full
image, exactly as a user would call it; Dice is against the exact painted mask of that lesion.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from services.core.io import read_image
from services.core.manifest import ManifestLesion
from services.core.volume import Volume
from services.evaluation import dice
from services.label_estimation.pipeline import LabelEstimator

#: Overlay colours: correct (both) yellow, missed (truth only) green, extra (estimate only) red.
COLOURS = {"correct": (255, 220, 0), "missed": (0, 200, 0), "extra": (230, 0, 0)}


def evaluate(
    lesions: Sequence[ManifestLesion],
    methods: Sequence[str],
    estimator: LabelEstimator,
    overlay_dir: Path | None = None,
    max_overlays: int = 12,
) -> list[dict]:
    rows: list[dict] = []
    by_image: dict[Path, list[ManifestLesion]] = {}
    for lesion in lesions:
        if lesion.prompt is not None and lesion.truth is not None:
            by_image.setdefault(lesion.image, []).append(lesion)
    overlays = 0
    for image_path, group in by_image.items():
        image = read_image(image_path)
        truth_map = read_image(group[0].truth)
        for lesion in group:
            truth = truth_map.array == lesion.prompt.lesion_id
            masks = {}
            for method in methods:
                estimate = estimator.estimate(image, [lesion.prompt], method)[0]
                masks[method] = estimate.mask.full()
                rows.append(
                    {
                        "case_id": lesion.case_id,
                        "lesion_id": lesion.prompt.lesion_id,
                        "lesion_type": lesion.lesion_type,
                        "method": method,
                        "diameter_mm": lesion.prompt.diameter_mm,
                        "dice": dice(masks[method], truth),
                    }
                )
            if overlay_dir is not None and overlays < max_overlays:
                overlay_panel(
                    image,
                    truth,
                    masks,
                    lesion,
                    overlay_dir / f"{lesion.lesion_type}-{lesion.case_id}-{lesion.prompt.lesion_id}.png",
                )
                overlays += 1
    return rows


def summarise(rows: Sequence[dict]) -> dict[tuple[str, str], tuple[float, float, int]]:
    """(lesion_type, method) → (mean Dice, sd, n)."""
    groups: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        groups.setdefault((row["lesion_type"], row["method"]), []).append(row["dice"])
    return {key: (float(np.mean(v)), float(np.std(v)), len(v)) for key, v in groups.items()}


def _window(slice_2d: np.ndarray) -> np.ndarray:
    low, high = np.percentile(slice_2d, (1, 99))
    return (np.clip((slice_2d - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)


def overlay_panel(
    image: Volume, truth: np.ndarray, masks: dict[str, np.ndarray], lesion: ManifestLesion, path: Path
) -> Path:
    """One axial slice through the lesion centre, one tile per method, coloured by agreement."""
    center = image.world_to_nearest_index(lesion.prompt.center_mm)
    k = int(np.clip(center[2], 0, image.array.shape[0] - 1))
    radius_voxels = (lesion.prompt.diameter_mm / np.asarray(image.spacing[:2])).astype(int) + 4
    y0, y1 = max(0, center[1] - radius_voxels[1]), min(image.array.shape[1], center[1] + radius_voxels[1] + 1)
    x0, x1 = max(0, center[0] - radius_voxels[0]), min(image.array.shape[2], center[0] + radius_voxels[0] + 1)
    gray = _window(image.array[k, y0:y1, x0:x1].astype(np.float32))
    scale = max(1, 160 // max(gray.shape))
    tiles = []
    for method, mask in masks.items():
        rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
        t, m = truth[k, y0:y1, x0:x1], mask[k, y0:y1, x0:x1]
        for name, where in (("correct", t & m), ("missed", t & ~m), ("extra", ~t & m)):
            rgb[where] = 0.45 * rgb[where] + 0.55 * np.asarray(COLOURS[name], np.float32)
        tile = Image.fromarray(rgb.astype(np.uint8)).resize(
            (gray.shape[1] * scale, gray.shape[0] * scale), Image.NEAREST
        )
        canvas = Image.new("RGB", (tile.width, tile.height + 14), (0, 0, 0))
        canvas.paste(tile, (0, 14))
        ImageDraw.Draw(canvas).text((2, 1), f"{method} {dice(mask, truth):.2f}", fill=(255, 255, 255))
        tiles.append(canvas)
    sheet = Image.new(
        "RGB",
        (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), max(t.height for t in tiles)),
        (40, 40, 40),
    )
    offset = 0
    for tile in tiles:
        sheet.paste(tile, (offset, 0))
        offset += tile.width + 4
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
