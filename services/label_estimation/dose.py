"""Lesion labels from a radiotherapy plan: the RT Dose grid, resampled onto the image in world space,
thresholded at a prescription isodose and split into one label per treated target.

Stereotactic (Gamma Knife) plans prescribe to the ~50 % isodose of each target's own maximum, with
a steep fall-off outside: the prescription isodose surface hugs the treated lesion. Targets get
different maxima, so a "% of max" isodose is taken per target (per dose peak), not of the global max.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from scipy import ndimage
from skimage.feature import peak_local_max

from services.core.errors import InputError
from services.core.volume import Volume

#: Dose peaks below this fraction of the plan's maximum are scatter, not targets.
MIN_PEAK_FRACTION = 0.1
#: Two targets' peaks are at least this far apart (mm).
MIN_PEAK_DISTANCE_MM = 4.0


@dataclass(frozen=True)
class Isodose:
    """``50%`` (of each target's maximum) or ``12Gy`` (absolute)."""

    value: float
    relative: bool

    @classmethod
    def parse(cls, text: str) -> Isodose:
        raw = text.strip().lower().replace(" ", "")
        try:
            if raw.endswith("%"):
                value = float(raw[:-1])
                if not 0 < value < 100:
                    raise ValueError
                return cls(value / 100, True)
            if raw.endswith("gy"):
                value = float(raw[:-2])
                if not value > 0:
                    raise ValueError
                return cls(value, False)
        except ValueError:
            pass
        raise InputError(
            f"expected e.g. '50%' (0–100, of each target's max) or '12Gy' (> 0), got {text!r}",
            field="isodose",
        )


def read_rtdose(path: Path) -> Volume:
    """An RT Dose object as a Volume of Gy (float32) with its own (often coarser) grid."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise InputError(
            f"{Path(path).name} is not a readable DICOM file ({type(exc).__name__})", field="dose"
        ) from exc
    if ds.get("Modality") != "RTDOSE":
        raise InputError(
            f"{Path(path).name} is {ds.get('Modality', 'no modality')}, not RTDOSE", field="dose"
        )
    if str(ds.get("DoseUnits", "GY")).upper() != "GY":
        raise InputError(
            f"dose units {ds.DoseUnits} are not Gy (relative dose cannot be prescribed)", field="dose"
        )
    try:
        frames = np.asarray(ds.pixel_array, dtype=np.float32)
        scaling = float(ds.get("DoseGridScaling", 1.0))
        position = np.asarray([float(v) for v in ds.ImagePositionPatient])
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        offsets = (
            np.asarray([float(v) for v in ds.GridFrameOffsetVector])
            if "GridFrameOffsetVector" in ds
            else np.zeros(1)
        )
    except (AttributeError, ValueError, TypeError) as exc:
        raise InputError(f"RT Dose lacks geometry or pixels ({exc})", field="dose") from exc
    if frames.ndim == 2:
        frames = frames[None]
    if len(offsets) != frames.shape[0]:
        raise InputError(
            f"GridFrameOffsetVector has {len(offsets)} entries for {frames.shape[0]} frames", field="dose"
        )
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    # Offsets are relative to the first frame (offsets[0] == 0) or absolute along the normal.
    if offsets[0] != 0:
        offsets = offsets - offsets[0]
    gaps = np.diff(offsets)
    if len(gaps) and (np.any(gaps <= 0) and np.any(gaps >= 0)):
        raise InputError("GridFrameOffsetVector is not monotonic", field="dose")
    if len(gaps) and not np.allclose(gaps, gaps[0], rtol=1e-3, atol=1e-3):
        raise InputError("unequal dose frame spacing is not supported", field="dose")
    slice_step = float(gaps[0]) if len(gaps) else 1.0
    slice_axis = normal if slice_step > 0 else -normal
    direction = np.column_stack([row, col, slice_axis])
    dose = frames * scaling
    return Volume(
        dose,
        (column_spacing, row_spacing, abs(slice_step)),
        tuple(position),
        direction,
        {"modality": "RTDOSE"},
    )


def dose_labels(image: Volume, dose: Volume, isodose: Isodose) -> tuple[np.ndarray, list[dict]]:
    """Label map on the image grid (0 = background, 1..n = targets) and one summary per target."""
    on_image = dose.resample(
        reference=image, interpolation="linear", default_value=0.0, output_dtype=np.float32
    ).array
    maximum = float(on_image.max())
    if maximum <= 0:
        raise InputError("the dose grid does not overlap the image (no dose on the image grid)", field="dose")
    spacing_zyx = np.asarray(image.spacing)[::-1]
    min_distance = max(1, round(MIN_PEAK_DISTANCE_MM / float(spacing_zyx.max())))
    peaks = peak_local_max(
        on_image, min_distance=min_distance, threshold_abs=MIN_PEAK_FRACTION * maximum, exclude_border=False
    )
    peaks = sorted((tuple(p) for p in peaks), key=lambda p: -on_image[p])
    labels = np.zeros(on_image.shape, dtype=np.uint16)
    summaries: list[dict] = []
    for peak in peaks:
        if labels[peak]:  # inside an already labelled target: a secondary maximum of the same one
            continue
        level = isodose.value * float(on_image[peak]) if isodose.relative else isodose.value
        if on_image[peak] < level:
            continue
        regions, _ = ndimage.label(on_image >= level)
        region = (regions == regions[peak]) & (labels == 0)
        if not region.any():
            continue
        label = len(summaries) + 1
        labels[region] = label
        summaries.append(
            {
                "label": label,
                "peak_dose_gy": float(on_image[peak]),
                "isodose_gy": float(level),
                "peak_mm": [float(v) for v in image.index_to_world(np.asarray(peak[::-1], float))],
                "voxels": int(region.sum()),
            }
        )
    return labels, summaries
