"""The worklist as a reader sees it: ``DIR/worklist.html``, the cases ranked most-abnormal first with a
thumbnail each (the image in its reading window beside it under the anomaly map), and the cases that
could not be scored listed apart in red, so none drops silently off the list.

The page is one static file with relative links to ``DIR/thumbnails/<case_id>.jpg`` (written by the
batch as each case is scored, before its JSON), no script and no external resource: it opens from a
folder, an archive share or a browser without network. Every text from a manifest or an error is
HTML-escaped and every link URL-quoted.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np

from services.core.atomic import write_bytes_atomically
from services.core.volume import Volume

THUMBNAILS = "thumbnails"
PAGE = "worklist.html"
#: Each half of a thumbnail (image, image under the map) is at most this many pixels on its long side.
THUMB_PX = 160


def _fit(width_mm: float, height_mm: float) -> tuple[int, int]:
    scale = THUMB_PX / max(width_mm, height_mm)
    return max(1, round(width_mm * scale)), max(1, round(height_mm * scale))


def thumbnail_jpeg(image: Volume, score_map: Volume, task_name: str) -> bytes:
    """Image | image under the map (per-case colour scale, 2nd–99.8th percentile), side by side, on
    the axial slice where the map is highest on average (a radiograph has one)."""
    from matplotlib import colormaps
    from PIL import Image

    from services.core.overlay import BRAIN, PERCENTILE, apply_window

    heat_stack = np.asarray(score_map.array, dtype=np.float64)
    k_map = int(np.argmax(heat_stack.reshape(heat_stack.shape[0], -1).mean(axis=1)))
    z_image = image.array.shape[0]
    # the map covers the image's world box on its own grid: its slice k is centred on image slice
    k_image = min(z_image - 1, max(0, round((k_map + 0.5) * z_image / heat_stack.shape[0] - 0.5)))
    window = BRAIN if task_name == "head-ct-anomaly" else PERCENTILE
    grey = apply_window(np.asarray(image.array[k_image], dtype=np.float64), window)
    rows, columns = grey.shape
    size = _fit(columns * float(image.spacing[0]), rows * float(image.spacing[1]))
    grey_small = np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR), dtype=np.float64)
    heat = heat_stack[k_map]
    low, high = np.percentile(heat, [2.0, 99.8])
    scaled = np.clip((heat - low) / max(high - low, 1e-9), 0.0, 1.0)
    heat_small = (
        np.asarray(
            Image.fromarray((scaled * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR),
            np.float64,
        )
        / 255.0
    )
    colour = colormaps["inferno"](heat_small)[..., :3] * 255.0
    alpha = (0.25 + 0.6 * heat_small)[..., None]
    grey_rgb = np.repeat(grey_small[..., None], 3, axis=2)
    blended = (1.0 - alpha) * grey_rgb + alpha * colour
    gap = np.full((size[1], 4, 3), 255.0)
    both = np.concatenate([grey_rgb, gap, blended], axis=1)
    buffer = io.BytesIO()
    # JPEG: a navigation aid, not a reading image; 0.5 ms and ~11 kB (an optimised PNG: 100 ms, 50 kB)
    Image.fromarray(np.rint(both).astype(np.uint8), "RGB").save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


def write_thumbnail(out: Path, case: str, image: Volume, score_map: Volume, task_name: str) -> Path:
    return write_bytes_atomically(
        out / THUMBNAILS / f"{case}.jpg", thumbnail_jpeg(image, score_map, task_name)
    )


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
table { border-collapse: collapse; margin-top: 1rem; }
th, td { border-bottom: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; vertical-align: middle; }
th { background: #f0f0f0; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.above td.pct { font-weight: bold; color: #a00; }
#failed td { color: #a00; }
.note { color: #555; max-width: 60rem; }
"""


def render_page(
    title: str,
    scored: Sequence[dict],
    failed: dict[str, str],
    out: Path,
    n_normals: int | None,
) -> str:
    """The page's HTML. ``scored``: rows in rank order with case_id, score, percentile_among_normals,
    z; a row whose thumbnail file is missing shows a dash."""
    normals = f"{n_normals} validation normals" if n_normals else "the validation normals"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{len(scored)} case(s) ranked most-abnormal first by anomaly score (bits/dim); the '
        f"percentile is the share of {html.escape(normals)} scoring below the case (100 = above every one). "
        "Thumbnails: the image in its reading window, and the same under the anomaly map (colour scaled per "
        "case). A ranking to read first, not a diagnosis.</p>",
        '<table id="worklist"><thead><tr><th>rank</th><th>image | anomaly map</th><th>case</th>'
        "<th>score</th><th>percentile among normals</th><th>z</th></tr></thead><tbody>",
    ]
    for rank, row in enumerate(scored, start=1):
        case = str(row["case_id"])
        thumb = out / THUMBNAILS / f"{case}.jpg"
        cell = (
            f'<img src="{THUMBNAILS}/{quote(case)}.jpg" alt="{html.escape(case)}: image and anomaly map" '
            'loading="lazy">'
            if thumb.is_file()
            else "—"
        )
        above = ' class="above"' if float(row["percentile_among_normals"]) >= 100.0 else ""
        parts.append(
            f'<tr{above} data-case="{html.escape(case)}" data-score="{float(row["score"]):.6f}">'
            f'<td class="num">{rank}</td><td>{cell}</td><td>{html.escape(case)}</td>'
            f'<td class="num">{float(row["score"]):.4f}</td>'
            f'<td class="num pct">{float(row["percentile_among_normals"]):.1f}</td>'
            f'<td class="num">{float(row["z"]):+.2f}</td></tr>'
        )
    parts.append("</tbody></table>")
    if failed:
        parts.append(f"<h2>Not scored ({len(failed)})</h2>")
        parts.append('<table id="failed"><thead><tr><th>case</th><th>why</th></tr></thead><tbody>')
        for case in sorted(failed):
            parts.append(
                f'<tr data-case="{html.escape(case)}"><td>{html.escape(case)}</td>'
                f"<td>{html.escape(failed[case])}</td></tr>"
            )
        parts.append("</tbody></table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_page(
    out: Path, title: str, scored: Sequence[dict], failed: dict[str, str], n_normals: int | None
) -> Path:
    return write_bytes_atomically(out / PAGE, render_page(title, scored, failed, out, n_normals).encode())
