"""The figure a reader sees beside an anomaly score: the image, and the image under its anomaly map.

One rendering for ``wlcad score --overlay``, the demo and the CIRCUS CS plug-in's Gallery image, so
the picture a reader judges is the same wherever the score was computed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from services.anomaly.scoring import MAP_UNITS
from services.core.volume import Volume

__all__ = ["render_score_figure", "write_score_figure"]


def _display_slice(image: Volume, score_map: Volume) -> int:
    """The axial slice shown: the one whose map is highest on average (a radiograph has one)."""
    return int(np.argmax(score_map.array.reshape(score_map.array.shape[0], -1).mean(axis=1)))


def render_score_figure(image: Volume, score_map: Volume, document: dict, n_normals: int) -> bytes:
    """The image in its reading window beside the same image under the anomaly map (in the model's
    map units, colour bar), titled with the score, its percentile among the validation normals and z."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from services.core.overlay import BRAIN, PERCENTILE, apply_window

    k = _display_slice(image, score_map)
    plane = np.asarray(image.array[k], dtype=np.float64)
    window = BRAIN if document["task"] == "head-ct-anomaly" else PERCENTILE
    grey = apply_window(plane, window)
    heat = np.asarray(score_map.array[k], dtype=np.float64)
    low, high = np.percentile(heat, [2.0, 99.8])
    spacing = np.asarray(image.spacing, dtype=np.float64)
    aspect = float(spacing[1] / spacing[0])
    figure = Figure(figsize=(10.0, 5.6))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    left.imshow(grey, cmap="gray", vmin=0, vmax=255, aspect=aspect)
    left.set_title("image" + ("" if image.array.shape[0] == 1 else f" (slice {k})"), fontsize=9)
    right.imshow(grey, cmap="gray", vmin=0, vmax=255, aspect=aspect)
    shown = right.imshow(
        heat, cmap="inferno", vmin=low, vmax=max(high, low + 1e-9), alpha=0.55, aspect=aspect
    )
    if document.get("model") == "gan":
        right.set_title(f"anomaly map ({MAP_UNITS['gan']})", fontsize=9)
    else:
        right.set_title(f"anomaly map ({MAP_UNITS['glow']}; mean = score)", fontsize=9)
    figure.colorbar(shown, ax=right, fraction=0.046, pad=0.04)
    for axes in (left, right):
        axes.set_axis_off()
    figure.suptitle(
        f"wlcad score {document['task']} · {document['model_version']}\n"
        f"score {document['score']:.4f} {document['units']} · above "
        f"{document['percentile_among_normals']:.1f} % of {n_normals} validation normals · z "
        f"{document['z']:+.2f} · not a diagnosis",
        fontsize=10,
    )
    figure.tight_layout(rect=(0.0, 0.0, 1.0, 0.9))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_score_figure(image: Volume, score_map: Volume, document: dict, n_normals: int, path: Path) -> Path:
    """:func:`render_score_figure` written atomically to ``path``."""
    from services.core.atomic import write_bytes_atomically

    return write_bytes_atomically(Path(path), render_score_figure(image, score_map, document, n_normals))
