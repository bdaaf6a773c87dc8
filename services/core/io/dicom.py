"""DICOM readers: a series folder, an enhanced multi-frame object, or a single projection radiograph.

pydicom does the parsing and decoding (with pylibjpeg / pyjpegls for compressed transfer syntaxes);
this module does the geometry: slices are grouped by SeriesInstanceUID, sorted along the slice
normal by ImagePositionPatient, and refused with a message naming the problem when they do not form
one regular grid (mixed orientation, missing slices, unequal spacing, gantry tilt, mixed sizes).
Only non-identifying attributes are copied into ``Volume.metadata``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from services.core.errors import InputError
from services.core.volume import Volume
from services.core.work_budget import checkpoint

log = logging.getLogger(__name__)

#: Tolerances deciding whether slice gaps are equal. Scanners round ImagePositionPatient (often to
#: 0.1 mm), which makes real gaps jitter by up to ~0.12 mm (seen on a real 7 mm brain MR series), so
#: the absolute tolerance covers that; genuinely mixed spacing (e.g. 2.5 and 5 mm) is far outside it.
SLICE_GAP_RELATIVE_TOLERANCE = 0.01
SLICE_GAP_ABSOLUTE_TOLERANCE_MM = 0.15
DUPLICATE_POSITION_TOLERANCE_MM = 0.01
ORIENTATION_TOLERANCE = 1e-4


@dataclass
class _Frame:
    """One 2D plane with everything needed to place it in the world."""

    pixels: np.ndarray  # (rows, cols), modality LUT already applied
    position: np.ndarray  # ImagePositionPatient of the first transmitted pixel, LPS mm
    row_cosine: np.ndarray  # direction of increasing column index (i)
    column_cosine: np.ndarray  # direction of increasing row index (j)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) as DICOM orders it
    sop_instance_uid: str
    thickness_mm: float | None


def is_dicom_file(path: Path) -> bool:
    """True when the file has the DICOM Part 10 preamble ("DICM" at byte 128)."""
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _read_dataset(path: Path, *, stop_before_pixels: bool) -> Dataset:
    if path.stat().st_size == 0:
        raise InputError(f"{path.name} is an empty file", field="image")
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as exc:
        raise InputError(f"{path.name} is not a DICOM file", field="image") from exc
    except Exception as exc:  # pydicom raises many kinds on truncated or corrupt files
        raise InputError(
            f"{path.name} could not be parsed as DICOM ({type(exc).__name__}: {exc})", field="image"
        ) from exc


def _decode(dataset: Dataset, name: str) -> np.ndarray:
    if "PixelData" not in dataset and "FloatPixelData" not in dataset:
        raise InputError(
            f"{name} holds no image pixels (SOP class {dataset.get('SOPClassUID', '?')})", field="image"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dataset.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        syntax_name = getattr(syntax, "name", str(syntax))
        raise InputError(
            f"{name}: pixel data could not be decoded (transfer syntax {syntax_name}; {type(exc).__name__}: {exc})",
            field="image",
        ) from exc


def _floats(value: Any, count: int, what: str, name: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: {what} is not numeric: {value!r}", field="image") from exc
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        raise InputError(f"{name}: {what} needs {count} finite numbers, got {value!r}", field="image")
    return arr


def _rescaled(pixels: np.ndarray, source: Dataset) -> np.ndarray:
    """Apply the modality LUT (RescaleSlope/Intercept or LUT sequence): CT values become HU."""
    if "RescaleSlope" in source or "RescaleIntercept" in source or "ModalityLUTSequence" in source:
        return np.asarray(apply_modality_lut(pixels, source))
    return pixels


def compact_dtype(array: np.ndarray) -> np.ndarray:
    """Smallest faithful dtype: rescaled CT comes back from pydicom as float64 even when every value is
    a whole HU; int16 halves memory and matches what other tools (SimpleITK, dcm2niix) return."""
    if array.dtype.kind in "iub":
        return array
    if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
        return array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    for candidate in (np.int16, np.int32):
        info = np.iinfo(candidate)
        if info.min <= low and high <= info.max:
            return array.astype(candidate)
    return array.astype(np.float32)


def _metadata(dataset: Dataset) -> dict[str, Any]:
    """Non-identifying facts only (an allow-list: nothing about the patient, dates or institution)."""
    meta: dict[str, Any] = {"source_format": "dicom"}
    for keyword, key in (
        ("Modality", "modality"),
        ("StudyInstanceUID", "study_instance_uid"),
        ("SeriesInstanceUID", "series_instance_uid"),
        ("FrameOfReferenceUID", "frame_of_reference_uid"),
        ("SOPClassUID", "sop_class_uid"),
        ("PhotometricInterpretation", "photometric_interpretation"),
        ("BodyPartExamined", "body_part_examined"),
    ):
        value = dataset.get(keyword)
        if value not in (None, ""):
            meta[key] = str(value)
    return meta


def instance_uid(dataset: Dataset) -> str:
    """SOPInstanceUID, falling back to the file meta's copy (some anonymisers blank the data set's)."""
    uid = str(dataset.get("SOPInstanceUID") or "")
    if not uid and getattr(dataset, "file_meta", None) is not None:
        uid = str(dataset.file_meta.get("MediaStorageSOPInstanceUID") or "")
    return uid


def _frames_from_single_frame_files(datasets: Sequence[tuple[Path, Dataset]]) -> list[_Frame]:
    frames = []
    for path, ds in datasets:
        name = path.name
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if keyword not in ds:
                raise InputError(
                    f"{name} lacks {keyword}, so it cannot be placed in a 3D series", field="image"
                )
        orientation = _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", name)
        spacing = _floats(ds.PixelSpacing, 2, "PixelSpacing", name)
        pixels = _decode(ds, name)
        if pixels.ndim != 2:
            raise InputError(
                f"{name}: expected one grayscale frame, got pixel shape {pixels.shape}", field="image"
            )
        frames.append(
            _Frame(
                pixels=_rescaled(pixels, ds),
                position=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", name),
                row_cosine=orientation[:3],
                column_cosine=orientation[3:],
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                sop_instance_uid=instance_uid(ds),
                thickness_mm=float(ds.SliceThickness) if ds.get("SliceThickness") not in (None, "") else None,
            )
        )
    return frames


def _functional_item(ds: Dataset, index: int, sequence: str, attribute: str) -> Any:
    """Look an attribute up in the per-frame functional group, then in the shared one."""
    for group_name in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = ds.get(group_name)
        if not groups:
            continue
        group = groups[index] if group_name.startswith("PerFrame") else groups[0]
        inner = group.get(sequence)
        if inner and attribute in inner[0]:
            return inner[0].get(attribute)
    return None


def _frames_from_enhanced(path: Path, ds: Dataset) -> list[_Frame]:
    """Enhanced (and legacy-converted enhanced) multi-frame CT/MR/PET: geometry per frame."""
    name = path.name
    pixels = _decode(ds, name)
    count = int(ds.get("NumberOfFrames", 1))
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim != 3 or pixels.shape[0] != count:
        raise InputError(
            f"{name}: expected {count} grayscale frames, got pixel shape {pixels.shape}", field="image"
        )
    frames = []
    for index in range(count):
        position = _functional_item(ds, index, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _functional_item(ds, index, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _functional_item(ds, index, "PixelMeasuresSequence", "PixelSpacing")
        thickness = _functional_item(ds, index, "PixelMeasuresSequence", "SliceThickness")
        if position is None or orientation is None or spacing is None:
            raise InputError(
                f"{name}: frame {index + 1} lacks plane position, orientation or pixel spacing", field="image"
            )
        transform = Dataset()
        slope = _functional_item(ds, index, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional_item(ds, index, "PixelValueTransformationSequence", "RescaleIntercept")
        frame_pixels = pixels[index]
        if slope is not None or intercept is not None:
            transform.RescaleSlope = slope if slope is not None else 1
            transform.RescaleIntercept = intercept if intercept is not None else 0
            frame_pixels = _rescaled(frame_pixels, transform)
        orientation_arr = _floats(orientation, 6, "ImageOrientationPatient", name)
        spacing_arr = _floats(spacing, 2, "PixelSpacing", name)
        frames.append(
            _Frame(
                pixels=frame_pixels,
                position=_floats(position, 3, "ImagePositionPatient", name),
                row_cosine=orientation_arr[:3],
                column_cosine=orientation_arr[3:],
                pixel_spacing=(float(spacing_arr[0]), float(spacing_arr[1])),
                sop_instance_uid=instance_uid(ds),
                thickness_mm=float(thickness) if thickness not in (None, "") else None,
            )
        )
    return frames


def _stack(frames: list[_Frame], metadata: dict[str, Any]) -> Volume:
    """Sort frames along the slice normal and check they form one regular grid."""
    first = frames[0]
    for frame in frames[1:]:
        if not (
            np.allclose(frame.row_cosine, first.row_cosine, atol=ORIENTATION_TOLERANCE)
            and np.allclose(frame.column_cosine, first.column_cosine, atol=ORIENTATION_TOLERANCE)
        ):
            raise InputError(
                "mixed orientation: slices have different ImageOrientationPatient "
                f"({first.row_cosine.tolist() + first.column_cosine.tolist()} vs "
                f"{frame.row_cosine.tolist() + frame.column_cosine.tolist()})",
                field="image",
            )
        if frame.pixels.shape != first.pixels.shape:
            raise InputError(
                f"mixed image sizes in one series: {first.pixels.shape} vs {frame.pixels.shape}",
                field="image",
            )
        if not np.allclose(frame.pixel_spacing, first.pixel_spacing, rtol=1e-4):
            raise InputError(
                f"mixed PixelSpacing in one series: {first.pixel_spacing} vs {frame.pixel_spacing}",
                field="image",
            )
    row = first.row_cosine / np.linalg.norm(first.row_cosine)
    col = first.column_cosine / np.linalg.norm(first.column_cosine)
    if abs(float(np.dot(row, col))) > 1e-3:
        raise InputError(
            f"ImageOrientationPatient is not orthogonal: {row.tolist() + col.tolist()}", field="image"
        )
    normal = np.cross(row, col)
    distances = np.array([float(np.dot(f.position, normal)) for f in frames])
    order = np.argsort(distances, kind="stable")
    frames = [frames[i] for i in order]
    distances = distances[order]
    spacing_xy = (first.pixel_spacing[1], first.pixel_spacing[0])
    if len(frames) == 1:
        slice_spacing = first.thickness_mm if first.thickness_mm and first.thickness_mm > 0 else 1.0
    else:
        gaps = np.diff(distances)
        if np.any(gaps < DUPLICATE_POSITION_TOLERANCE_MM):
            duplicate = float(distances[1:][gaps < DUPLICATE_POSITION_TOLERANCE_MM][0])
            raise InputError(
                f"two slices share the position {duplicate:.3f} mm along the slice normal "
                "(several acquisitions, echoes or phases in one series?)",
                field="image",
            )
        typical_gap = float(np.median(gaps))
        tolerance = max(SLICE_GAP_ABSOLUTE_TOLERANCE_MM, SLICE_GAP_RELATIVE_TOLERANCE * typical_gap)
        irregular = np.abs(gaps - typical_gap) > tolerance
        if np.any(irregular):
            bad = int(np.argmax(irregular))
            ratio = gaps[bad] / typical_gap
            if abs(ratio - round(ratio)) * typical_gap <= tolerance and round(ratio) >= 2:
                raise InputError(
                    f"missing slices: a gap of {gaps[bad]:.3f} mm between slices at {distances[bad]:.3f} and "
                    f"{distances[bad + 1]:.3f} mm is {round(ratio)}× the usual {typical_gap:.3f} mm spacing",
                    field="image",
                )
            raise InputError(
                f"unequal slice spacing: gaps range {gaps.min():.3f}–{gaps.max():.3f} mm "
                f"(median {typical_gap:.3f} mm); resample the series first",
                field="image",
            )
        # The mean gap over the whole stack is the best estimate when positions are rounded.
        slice_spacing = float((distances[-1] - distances[0]) / (len(distances) - 1))
        # Slices must stack along the normal: an in-plane drift means a tilted gantry.
        expected = frames[0].position[None, :] + np.outer(distances - distances[0], normal)
        drift = np.linalg.norm(np.array([f.position for f in frames]) - expected, axis=1).max()
        if drift > max(0.2, 0.25 * min(spacing_xy)):
            raise InputError(
                f"slices do not stack along their normal (in-plane drift {drift:.2f} mm: gantry tilt?)",
                field="image",
            )
    array = compact_dtype(np.stack([f.pixels for f in frames], axis=0))
    direction = np.column_stack([row, col, normal])
    metadata = {**metadata, "sop_instance_uids": [f.sop_instance_uid for f in frames]}
    return Volume(
        array, (spacing_xy[0], spacing_xy[1], slice_spacing), tuple(frames[0].position), direction, metadata
    )


def _is_enhanced(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _projection_radiograph(path: Path, ds: Dataset) -> Volume:
    """CR/DX/MG and other images without patient-space geometry: one slice, spacing from the header."""
    name = path.name
    pixels = _decode(ds, name)
    if pixels.ndim != 2:
        raise InputError(
            f"{name}: expected one grayscale frame, got pixel shape {pixels.shape}", field="image"
        )
    pixels = compact_dtype(_rescaled(pixels, ds)[None])[0]
    metadata = _metadata(ds)
    spacing_source = None
    spacing_rc: tuple[float, float] = (1.0, 1.0)
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None:
            continue
        try:
            candidate = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if len(candidate) == 2 and all(np.isfinite(candidate)) and min(candidate) > 0:
            spacing_rc = (candidate[0], candidate[1])
            spacing_source = keyword
            break
    if spacing_source is None:
        warnings.warn(
            f"{name}: no usable PixelSpacing or ImagerPixelSpacing; assuming 1 mm pixels "
            "(sizes and coordinates in mm will be wrong)",
            UserWarning,
            stacklevel=3,
        )
        spacing_source = "assumed-1mm"
    metadata["pixel_spacing_source"] = spacing_source
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        # MONOCHROME1 shows low values white; flip so that every radiograph reads "higher = denser".
        as_float = pixels.astype(np.float64)
        pixels = compact_dtype(as_float.max() + as_float.min() - as_float)
        metadata["photometric_interpretation"] = "MONOCHROME2"
        metadata["inverted_from_monochrome1"] = True
    spacing = (spacing_rc[1], spacing_rc[0], 1.0)
    return Volume(np.asarray(pixels)[None], spacing, (0.0, 0.0, 0.0), np.eye(3), metadata)


def read_dicom_file(path: Path) -> Volume:
    """One DICOM file: an enhanced multi-frame volume, one positioned slice, or a projection radiograph."""
    ds = _read_dataset(path, stop_before_pixels=False)
    if _is_enhanced(ds):
        return _stack(_frames_from_enhanced(path, ds), _metadata(ds))
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise InputError(
            f"{path.name}: multi-frame {ds.get('Modality', '')} without per-frame geometry is not a volume wlcad can place",
            field="image",
        )
    if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and "PixelSpacing" in ds:
        return _stack(_frames_from_single_frame_files([(path, ds)]), _metadata(ds))
    return _projection_radiograph(path, ds)


def _candidate_files(folder: Path) -> Iterable[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and path.name.upper() != "DICOMDIR":
            yield path


def read_dicom_series(folder: Path, series_instance_uid: str | None = None) -> Volume:
    """All slices of one series in ``folder`` (searched recursively) as one volume.

    A folder holding several series is refused unless ``series_instance_uid`` picks one: silently
    choosing would give a volume the user did not mean.
    """
    headers: dict[str, list[tuple[Path, Dataset]]] = {}
    skipped = 0
    for path in _candidate_files(folder):
        if not is_dicom_file(path):
            skipped += 1
            continue
        checkpoint("reading DICOM headers")
        ds = _read_dataset(path, stop_before_pixels=True)
        if "Rows" not in ds:  # reports, structure sets, presentation states: no image to stack
            skipped += 1
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        headers.setdefault(uid, []).append((path, ds))
    if not headers:
        raise InputError(
            f"no DICOM image files in folder {folder.name} ({skipped} other files)", field="image"
        )
    if series_instance_uid is not None:
        if series_instance_uid not in headers:
            raise InputError(
                f"series {series_instance_uid} is not in the folder", field="series_instance_uid"
            )
        chosen = headers[series_instance_uid]
    elif len(headers) > 1:
        listing = ", ".join(f"{uid or '<no uid>'} ({len(files)} files)" for uid, files in headers.items())
        raise InputError(
            f"mixed series: the folder holds {len(headers)} series: {listing}; pick one", field="image"
        )
    else:
        chosen = next(iter(headers.values()))
    if len(chosen) == 1:
        return read_dicom_file(chosen[0][0])
    if any(_is_enhanced(ds) or int(ds.get("NumberOfFrames", 1) or 1) > 1 for _, ds in chosen):
        raise InputError(
            "a series of several multi-frame files is not supported; give one file", field="image"
        )
    full = []
    for path, _ in chosen:
        checkpoint("reading DICOM slices")  # an abandoned request stops between files
        full.append((path, _read_dataset(path, stop_before_pixels=False)))
    frames = _frames_from_single_frame_files(full)
    volume = _stack(frames, _metadata(full[0][1]))
    log.debug("read DICOM series: %d slices, shape %s", len(frames), volume.shape_xyz)
    return volume
