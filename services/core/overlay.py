"""Overlay PNGs a radiologist can read: the full slice next to a zoomed crop around each finding, in a
window that fits the modality, with the finding's id drawn on the picture and its mask as a contour.

Capability-neutral on purpose: a *finding* is "something at a place, with outlines to show" —
a label-estimation mask, a CADe detection or an anomaly region — so label estimation, CADe and
anomaly scoring draw the same pictures and a reader learns one layout.

Why these choices:

* **Windows, not percentiles, for CT.** Hounsfield units are absolute; a percentile window makes
  lung look like soft tissue and hides the nodule. Lung W1500/L−600, soft tissue W400/L40 and
  brain W80/L40 are the presets radiologists use. MR and uncalibrated radiographs have no absolute
  scale, so they get a percentile window over the body (the background excluded).
* **Physical aspect, enough pixels.** The slice is resampled so one screen pixel is the same number
  of millimetres along both axes, and upsampled to ≥ 512 px on its long side; a 122×101 thumbnail
  of 3 mm voxels is unreadable.
* **Display orientation.** Axial slices are flipped (never transposed) into the radiological
  convention (patient left on the viewer's right, anterior up), whatever the storage order: a NIfTI
  stored RAS would otherwise show upside down.
* **Contours, not fills.** A filled mask hides the very edge the reader has to judge. Contours are
  drawn on the nearest-neighbour-upsampled mask, so every contour pixel lies on a boundary voxel of
  the mask (tested), never on a smoothed guess. A reference (ground truth, a stored outline) is
  drawn just outside its region, so a matching estimate and its reference stay both visible.

Every PNG is written through :func:`services.core.atomic.atomic_output`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from services.core.atomic import atomic_output
from services.core.volume import Volume

Colour = tuple[int, int, int]

#: Outline colours: the estimate (what the software produced) and a reference (what it is compared with).
ESTIMATE: Colour = (255, 64, 64)
REFERENCE: Colour = (0, 210, 255)
#: Lesion ids, crop frames and prompt marks.
LABEL: Colour = (255, 225, 0)
TEXT: Colour = (235, 235, 235)
BACKGROUND: Colour = (0, 0, 0)

FULL_PANEL_PX = 720  # long side of the full-slice panel
CROP_PANEL_PX = 352  # long side of each zoomed crop
GAP_PX = 8
MIN_FIELD_MM = 30.0  # smallest zoom field: smaller crops lose the context a reader needs
FIELD_PER_DIAMETER = 2.5

# Pillow's bundled font has Latin-1 glyphs only; these would print as boxes.
_PLAIN = str.maketrans({"—": "-", "–": "-", "−": "-", "×": "x", "→": "->", "≥": ">=", "≤": "<=", "µ": "u"})
_RADIOGRAPHS = {"CR", "DX", "DR", "RG", "MG", "XA", "RF", "PX", "IO"}
# Display growth direction per world axis: toward patient Left (x), Posterior (y), Inferior (z).
_DESIRED_SIGN = np.array([1.0, 1.0, -1.0])
_LETTERS = {(0, 1): "L", (0, -1): "R", (1, 1): "P", (1, -1): "A", (2, 1): "S", (2, -1): "I"}


@dataclass(frozen=True)
class Window:
    """A grey-level window: fixed level/width (CT, Hounsfield units) or percentiles of the slice."""

    name: str
    level: float | None = None
    width: float | None = None
    percentiles: tuple[float, float] | None = None

    def bounds(self, plane: np.ndarray) -> tuple[float, float]:
        """(value shown black, value shown white) for this slice."""
        if self.percentiles is None:
            assert self.level is not None and self.width is not None
            return self.level - self.width / 2, self.level + self.width / 2
        values = np.asarray(plane, dtype=np.float64).ravel()
        body = values[values > values.min()]
        # Air around an MR head is most of the slice; percentiles over it would wash out the anatomy.
        sample = body if body.size >= 0.05 * values.size else values
        low, high = np.percentile(sample, self.percentiles)
        return float(low), float(max(high, low + 1e-6))

    def describe(self) -> str:
        if self.percentiles is None:
            return f"{self.name} window W{self.width:g} L{self.level:g}"
        low, high = self.percentiles
        return f"{self.name} window {low:g}–{high:g} % of the body (no absolute scale)"


LUNG = Window("lung", level=-600.0, width=1500.0)
SOFT_TISSUE = Window("soft-tissue", level=40.0, width=400.0)
BRAIN = Window("brain", level=40.0, width=80.0)
PERCENTILE = Window("percentile", percentiles=(1.0, 99.5))


def window_for(modality: str | None, region: str | None = None) -> Window:
    """The radiologist's default window: by region for CT (HU are absolute), percentiles otherwise."""
    if (modality or "").upper() != "CT":
        return PERCENTILE
    region = (region or "").lower()
    if any(word in region for word in ("head", "brain", "skull")):
        return BRAIN
    if any(word in region for word in ("chest", "lung", "thorax")):
        return LUNG
    return SOFT_TISSUE


def apply_window(values: np.ndarray, window: Window, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """Grey levels 0..255 (uint8): the window's low bound black, its high bound white, level mid-grey."""
    low, high = bounds if bounds is not None else window.bounds(values)
    scaled = (np.asarray(values, dtype=np.float64) - low) / (high - low)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


@dataclass(frozen=True)
class Outline:
    """One region drawn as a contour: a mask on the volume's grid, its colour and its legend text.

    ``outside`` draws the contour on the pixels just outside the region instead of its boundary
    pixels: references are drawn that way, so an estimate that matches its reference shows as a red
    line lined with cyan instead of one colour hiding the other.
    """

    mask: np.ndarray  # bool, (z, y, x) on the volume's grid
    colour: Colour
    legend: str
    outside: bool = False


@dataclass(frozen=True)
class Finding:
    """Something at a place: its id (drawn on the picture), centre, size (sets the zoom) and outlines."""

    lesion_id: int
    center_mm: Sequence[float]
    diameter_mm: float
    outlines: Sequence[Outline] = ()
    caption: str = ""  # one short line under the crop, e.g. "Dice 0.84 vs overlay outline"
    mark_center: bool = True  # reticle at the centre (the prompt a method was given)


@dataclass(frozen=True)
class Panel:
    """Where one panel sits in the PNG and which source pixels it shows, for tests and image maps.

    ``rows``/``cols`` index the slice *after* the display flips; pixel (x, y) of the PNG inside
    ``box`` shows source pixel ``source_index(x, y)`` (nearest neighbour, centre-aligned).
    """

    kind: str  # "full" or "crop"
    slice_index: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in the PNG
    row0: int
    col0: int
    rows: int
    cols: int
    flip_rows: bool
    flip_cols: bool
    slice_shape: tuple[int, int]  # (rows, cols) of the stored slice
    lesion_id: int | None = None

    def source_index(self, x: int, y: int) -> tuple[int, int]:
        """(row, col) in the stored slice (flips undone) shown at PNG pixel (x, y); it may lie outside
        the slice for a crop that reaches past the image edge."""
        x0, y0, x1, y1 = self.box
        row = self.row0 + _nearest(y - y0, y1 - y0, self.rows)
        col = self.col0 + _nearest(x - x0, x1 - x0, self.cols)
        if self.flip_rows:
            row = self.slice_shape[0] - 1 - row
        if self.flip_cols:
            col = self.slice_shape[1] - 1 - col
        return row, col


@dataclass(frozen=True)
class RenderedOverlay:
    path: Path
    size: tuple[int, int]  # width, height
    window: str
    panels: tuple[Panel, ...]
    label_boxes: tuple[tuple[int, tuple[int, int, int, int]], ...]  # (lesion id, x0, y0, x1, y1)


def _nearest(offset: int | np.ndarray, out_size: int, in_size: int) -> np.ndarray | int:
    """Centre-aligned nearest-neighbour source index of output pixel ``offset``."""
    index = np.minimum(((np.asarray(offset) + 0.5) * in_size / out_size).astype(np.int64), in_size - 1)
    return int(index) if np.ndim(index) == 0 else index


def _resize_nearest(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    rows = _nearest(np.arange(height), height, plane.shape[0])
    cols = _nearest(np.arange(width), width, plane.shape[1])
    return plane[np.ix_(rows, cols)]


def _contour(mask: np.ndarray, thickness: int, outside: bool = False) -> np.ndarray:
    """Inner (or, with ``outside``, outer) boundary of a display-resolution mask, ``thickness`` px wide."""
    if not mask.any():
        return mask
    if outside:
        return ndimage.binary_dilation(mask, iterations=thickness) & ~mask
    return mask & ~ndimage.binary_erosion(mask, iterations=thickness, border_value=0)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font (no font files to ship); a bitmap fallback without FreeType."""
    return ImageFont.load_default(size=size)


def display_flips(volume: Volume) -> tuple[bool, bool]:
    """(flip rows, flip columns) that put the slice in radiological display orientation.

    Each in-plane index axis should grow toward patient Left (x), Posterior (y) or Inferior (z), the
    world axis it mostly follows: for an axial slice patient left ends on the viewer's right and
    anterior at the top; for a coronal one superior at the top.
    """
    flips = []
    for axis in (1, 0):  # rows follow j, columns follow i
        column = volume.direction[:, axis]
        world = int(np.argmax(np.abs(column)))
        flips.append(bool(np.sign(column[world]) != _DESIRED_SIGN[world]))
    return flips[0], flips[1]


def _orientation_letters(volume: Volume) -> dict[str, str]:
    letters = {}
    for axis, (low, high) in ((0, ("left", "right")), (1, ("top", "bottom"))):
        world = int(np.argmax(np.abs(volume.direction[:, axis])))
        sign = int(_DESIRED_SIGN[world])
        letters[low], letters[high] = _LETTERS[(world, -sign)], _LETTERS[(world, sign)]
    return letters


def _oriented(plane: np.ndarray, flip_rows: bool, flip_cols: bool) -> np.ndarray:
    if flip_rows:
        plane = plane[::-1]
    if flip_cols:
        plane = plane[:, ::-1]
    return plane


def _fit(width_mm: float, height_mm: float, long_side: int) -> tuple[int, int]:
    scale = long_side / max(width_mm, height_mm)
    return max(1, round(width_mm * scale)), max(1, round(height_mm * scale))


def _nice_length(target: float) -> float:
    """1, 2 or 5 × 10^n just below ``target``: scale bars read at a glance."""
    if target <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(target))
    return max(m * power for m in (1, 2, 5) if m * power <= target)


class _Canvas:
    """The PNG being drawn, with text helpers that keep a record of where each lesion id went."""

    def __init__(self, width: int, height: int) -> None:
        self.image = Image.new("RGB", (width, height), BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self.label_boxes: list[tuple[int, tuple[int, int, int, int]]] = []

    def text(
        self, xy: tuple[float, float], text: str, size: int, colour: Colour = TEXT, boxed: bool = True
    ) -> tuple[int, int, int, int]:
        font = _font(size)
        text = text.translate(_PLAIN)
        x, y = int(xy[0]), int(xy[1])
        left, top, right, bottom = self.draw.textbbox((x, y), text, font=font)
        box = (left - 3, top - 2, right + 3, bottom + 2)
        if boxed:
            self.draw.rectangle(box, fill=BACKGROUND)
        self.draw.text((x, y), text, fill=colour, font=font)
        return box

    def text_size(self, text: str, size: int) -> tuple[int, int]:
        left, top, right, bottom = self.draw.textbbox((0, 0), text.translate(_PLAIN), font=_font(size))
        return right - left, bottom - top

    def lesion_label(self, lesion_id: int, xy: tuple[float, float], size: int, bounds) -> None:
        """The lesion id, kept inside ``bounds`` (x0, y0, x1, y1) so it is never cut off."""
        text = str(lesion_id)
        width, height = self.text_size(text, size)
        x = min(max(xy[0], bounds[0] + 4), bounds[2] - width - 6)
        y = min(max(xy[1], bounds[1] + 4), bounds[3] - height - 10)
        box = self.text((x, y), text, size, LABEL)
        self.label_boxes.append((lesion_id, box))


def _wrap(canvas: _Canvas, text: str, size: int, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and canvas.text_size(candidate, size)[0] > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return [*lines, current] if current else lines


def _slice_of(volume: Volume, center_mm: Sequence[float]) -> int:
    return int(np.clip(round(float(volume.world_to_index(center_mm)[2])), 0, volume.array.shape[0] - 1))


def _draw_panel(
    canvas: _Canvas,
    grey: np.ndarray,
    masks: Sequence[tuple[np.ndarray, Colour, bool]],
    origin: tuple[int, int],
    size: tuple[int, int],
    thickness: int,
) -> None:
    """Paste the windowed slice (bilinear, antialiased) and draw the contours on top."""
    width, height = size
    picture = Image.fromarray(grey, mode="L").resize((width, height), Image.Resampling.BILINEAR)
    rgb = np.repeat(np.asarray(picture)[..., None], 3, axis=2)
    for mask, colour, outside in masks:
        if mask.any():
            rgb[_contour(_resize_nearest(mask, width, height), thickness, outside)] = colour
    canvas.image.paste(Image.fromarray(rgb, mode="RGB"), origin)


def _scale_bar(canvas: _Canvas, box, mm_per_px: float, units: str) -> None:
    x0, _, x1, y1 = box
    length_mm = _nice_length((x1 - x0) * mm_per_px / 5)
    length_px = round(length_mm / mm_per_px)
    text = f"{length_mm:g} {units}"
    text_width, text_height = canvas.text_size(text, 14)
    right, bottom = x1 - 10, y1 - 10
    canvas.draw.rectangle(
        (right - max(length_px, text_width) - 6, bottom - text_height - 16, right + 4, bottom + 4),
        fill=BACKGROUND,
    )
    canvas.draw.line((right - length_px, bottom, right, bottom), fill=TEXT, width=3)
    canvas.text((right - text_width, bottom - text_height - 12), text, 14, boxed=False)


def _reticle(canvas: _Canvas, x: float, y: float, gap: int = 5, arm: int = 7) -> None:
    """Four ticks around the centre with a gap, so the mark never covers the lesion's middle."""
    for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        canvas.draw.line(
            (x + dx * gap, y + dy * gap, x + dx * (gap + arm), y + dy * (gap + arm)), fill=LABEL, width=2
        )


def render_overlay(
    volume: Volume,
    findings: Sequence[Finding],
    path: str | Path,
    *,
    title: str,
    window: Window | None = None,
    notes: Sequence[str] = (),
    slice_index: int | None = None,
    units: str | None = None,
    orientation: bool | None = None,
) -> RenderedOverlay:
    """Write the overlay PNG and describe its layout.

    One row per slice holding a finding's centre: the full slice (all outlines on it, a frame and
    the id of each finding) and, beside it, a zoomed crop per finding. Without findings, one full
    slice (``slice_index``, default the middle one) and the notes: what is *not* shown matters too.
    ``units`` is ``"px"`` where the pixel spacing is unknown; ``orientation`` draws R/L/A/P letters
    (default: not for radiographs, whose stored orientation is a reader's default, not a fact).
    """
    modality = str(volume.metadata.get("modality") or "").upper()
    window = window or window_for(modality, str(volume.metadata.get("body_part_examined") or ""))
    if units is None:
        units = "px" if volume.metadata.get("pixel_spacing_source") == "assumed-1mm" else "mm"
    if orientation is None:
        orientation = modality not in _RADIOGRAPHS
    flip_rows, flip_cols = display_flips(volume)
    spacing_x, spacing_y = volume.spacing[0], volume.spacing[1]
    n_slices, n_rows, n_cols = volume.array.shape

    groups: dict[int, list[Finding]] = {}
    for finding in findings:
        groups.setdefault(_slice_of(volume, finding.center_mm), []).append(finding)
    if not groups:
        default = n_slices // 2 if slice_index is None else int(np.clip(slice_index, 0, n_slices - 1))
        groups[default] = []

    full_size = _fit(n_cols * spacing_x, n_rows * spacing_y, FULL_PANEL_PX)
    row_layouts = []
    for z, group in sorted(groups.items()):
        columns = math.ceil(len(group) / 2)
        crop_rows = min(len(group), 2)
        width = full_size[0] + columns * (CROP_PANEL_PX + GAP_PX)
        height = max(full_size[1], crop_rows * CROP_PANEL_PX + (crop_rows - 1) * GAP_PX)
        row_layouts.append((z, group, width, height))

    probe = _Canvas(1, 1)
    content_width = max(FULL_PANEL_PX, *(w for _, _, w, _ in row_layouts))
    canvas_width = content_width + 2 * GAP_PX
    legend_items: list[tuple[str, Colour | str]] = []  # (text, outline colour or a symbol's name)
    for finding in findings:
        for outline in finding.outlines:
            if (outline.legend, outline.colour) not in legend_items:
                legend_items.append((outline.legend, outline.colour))
    if findings:
        if any(f.mark_center for f in findings):
            legend_items.append(("centre given to the method", "reticle"))
        legend_items.append(("zoomed field; yellow number = lesion id", "frame"))
    legend_lines: list[list[tuple[str, Colour | str]]] = []
    used = content_width + 1
    for text, symbol in legend_items:
        width = 34 + probe.text_size(text, 16)[0] + 20
        if used + width > content_width:
            legend_lines.append([])
            used = 0
        legend_lines[-1].append((text, symbol))
        used += width
    footer_lines = [line for note in notes for line in _wrap(probe, note, 16, content_width)]
    title_lines = _wrap(probe, title, 22, content_width)
    line_height = probe.text_size("Ag", 16)[1] + 8
    title_height = len(title_lines) * (probe.text_size("Ag", 22)[1] + 10) + GAP_PX
    legend_height = line_height * len(legend_lines)
    footer_height = legend_height + len(footer_lines) * line_height + GAP_PX
    body_height = sum(h for *_, h in row_layouts) + GAP_PX * (len(row_layouts) - 1)
    canvas = _Canvas(canvas_width, GAP_PX + title_height + body_height + GAP_PX + footer_height)

    y = GAP_PX
    for line in title_lines:
        canvas.text((GAP_PX, y), line, 22)
        y += canvas.text_size("Ag", 22)[1] + 10
    y = GAP_PX + title_height

    panels: list[Panel] = []
    for z, group, _, row_height in row_layouts:
        plane = _oriented(volume.array[z], flip_rows, flip_cols)
        bounds = window.bounds(plane)
        grey = apply_window(plane, window, bounds)
        masks = [
            (_oriented(outline.mask[z], flip_rows, flip_cols), outline.colour, outline.outside)
            for finding in findings
            for outline in finding.outlines
        ]
        x0, y0 = GAP_PX, y
        full_box = (x0, y0, x0 + full_size[0], y0 + full_size[1])
        # Two-pixel contours only where a voxel spans two pixels: thicker ones would reach inner voxels.
        thickness = 2 if min(full_size[0] / n_cols, full_size[1] / n_rows) >= 2 else 1
        _draw_panel(canvas, grey, masks, (x0, y0), full_size, thickness)
        panels.append(
            Panel("full", z, full_box, 0, 0, n_rows, n_cols, flip_rows, flip_cols, (n_rows, n_cols))
        )
        mm_per_px_full = n_cols * spacing_x / full_size[0]
        canvas.text((x0 + 6, y0 + 6), f"slice {z + 1}/{n_slices} · {window.describe()}", 14)
        if orientation:
            letters = _orientation_letters(volume)
            cx, cy = x0 + full_size[0] / 2, y0 + full_size[1] / 2
            canvas.text((x0 + 8, cy - 10), letters["left"], 18)
            canvas.text((full_box[2] - 22, cy - 10), letters["right"], 18)
            canvas.text((cx - 6, y0 + 28), letters["top"], 18)
            canvas.text((cx - 6, full_box[3] - 52), letters["bottom"], 18)
        _scale_bar(canvas, full_box, mm_per_px_full, units)

        for index, finding in enumerate(group):
            ci, cj = (float(v) for v in volume.world_to_index(finding.center_mm)[:2])
            col = (n_cols - 1 - ci) if flip_cols else ci
            row = (n_rows - 1 - cj) if flip_rows else cj
            field_mm = max(FIELD_PER_DIAMETER * finding.diameter_mm, MIN_FIELD_MM)
            crop_cols = max(2, min(round(field_mm / spacing_x), 4 * n_cols))
            crop_rows = max(2, min(round(field_mm / spacing_y), 4 * n_rows))
            col0 = round(col - (crop_cols - 1) / 2)
            row0 = round(row - (crop_rows - 1) / 2)

            # Frame and id on the full slice, where the crop comes from.
            scale_x, scale_y = full_size[0] / n_cols, full_size[1] / n_rows
            frame = (
                x0 + col0 * scale_x,
                y0 + row0 * scale_y,
                x0 + (col0 + crop_cols) * scale_x,
                y0 + (row0 + crop_rows) * scale_y,
            )
            canvas.draw.rectangle(
                (
                    max(frame[0], x0),
                    max(frame[1], y0),
                    min(frame[2], full_box[2] - 1),
                    min(frame[3], full_box[3] - 1),
                ),
                outline=LABEL,
                width=1,
            )
            label_height = canvas.text_size("0", 22)[1]
            canvas.lesion_label(finding.lesion_id, (frame[0], frame[1] - label_height - 8), 22, full_box)

            # The zoomed crop, padded with the window's black where it leaves the image.
            crop_size = _fit(crop_cols * spacing_x, crop_rows * spacing_y, CROP_PANEL_PX)
            columns = math.ceil(len(group) / 2)  # reading order: 1 2 / 3 4
            cx0 = x0 + full_size[0] + GAP_PX + (index % columns) * (CROP_PANEL_PX + GAP_PX)
            cy0 = y0 + (index // columns) * (CROP_PANEL_PX + GAP_PX)
            rows_idx = np.arange(row0, row0 + crop_rows)
            cols_idx = np.arange(col0, col0 + crop_cols)
            inside = (rows_idx[:, None] >= 0) & (rows_idx[:, None] < n_rows)
            inside = inside & (cols_idx[None, :] >= 0) & (cols_idx[None, :] < n_cols)
            r_clip = np.clip(rows_idx, 0, n_rows - 1)
            c_clip = np.clip(cols_idx, 0, n_cols - 1)
            crop_grey = np.where(inside, grey[np.ix_(r_clip, c_clip)], 0).astype(np.uint8)
            crop_masks = [(np.where(inside, m[np.ix_(r_clip, c_clip)], False), c, o) for m, c, o in masks]
            zoom_px = min(crop_size[0] / crop_cols, crop_size[1] / crop_rows)
            _draw_panel(canvas, crop_grey, crop_masks, (cx0, cy0), crop_size, 2 if zoom_px >= 2 else 1)
            crop_box = (cx0, cy0, cx0 + crop_size[0], cy0 + crop_size[1])
            panels.append(
                Panel(
                    "crop",
                    z,
                    crop_box,
                    row0,
                    col0,
                    crop_rows,
                    crop_cols,
                    flip_rows,
                    flip_cols,
                    slice_shape=(n_rows, n_cols),
                    lesion_id=finding.lesion_id,
                )
            )
            if finding.mark_center:
                _reticle(
                    canvas,
                    cx0 + (col - col0 + 0.5) * crop_size[0] / crop_cols,
                    cy0 + (row - row0 + 0.5) * crop_size[1] / crop_rows,
                )
            canvas.draw.rectangle(crop_box, outline=LABEL, width=1)
            canvas.lesion_label(finding.lesion_id, (cx0 + 6, cy0 + 6), 26, crop_box)
            zoom = (crop_size[0] / crop_cols) / (full_size[0] / n_cols)
            canvas.text((cx0 + 44, cy0 + 10), f"{zoom:.1f}× the full view", 14)
            if finding.caption:
                lines = _wrap(canvas, finding.caption, 14, crop_size[0] - 16)
                for k, line in enumerate(lines):
                    canvas.text((cx0 + 8, crop_box[3] - 64 - (len(lines) - 1 - k) * 18), line, 14)
            _scale_bar(canvas, crop_box, crop_cols * spacing_x / crop_size[0], units)
        y += row_height + GAP_PX

    y = canvas.image.height - footer_height
    for items in legend_lines:
        x = GAP_PX
        for text, symbol in items:
            if symbol == "reticle":
                _reticle(canvas, x + 14, y + 10, gap=3, arm=5)
            elif symbol == "frame":
                canvas.draw.rectangle((x + 5, y + 1, x + 23, y + 19), outline=LABEL, width=1)
            else:
                canvas.draw.line((x, y + 10, x + 28, y + 10), fill=symbol, width=3)
            box = canvas.text((x + 34, y), text, 16, boxed=False)
            x = box[2] + 20
        y += line_height
    for line in footer_lines:
        canvas.text((GAP_PX, y), line, 16, boxed=False)
        y += line_height

    target = Path(path)
    with atomic_output(target, suffix=".png") as temporary:
        canvas.image.save(temporary, format="PNG")
    return RenderedOverlay(
        target, canvas.image.size, window.describe(), tuple(panels), tuple(canvas.label_boxes)
    )
