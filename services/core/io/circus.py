"""The CIRCUS CS plug-in input folder: ``N.mhd`` + ``N.raw`` + ``N.json`` per volume (N = 0, 1, …).

CIRCUS CS writes a deliberately minimal MetaImage header (only ``DimSize``, ``ElementType`` and
``ElementSpacing``; no ``Offset``/``TransformMatrix``), and its z spacing is *negative* when the
slices are stored from head to feet. The patient-space geometry lives in ``N.json``, an anonymised
DICOM tag dump ``{"common": {...}, "unique": [{...} per slice]}``. This reader rebuilds the full
LPS geometry from both: orientation from ImageOrientationPatient, the first stored slice's
ImagePositionPatient as origin, and the slice direction from the sign of the z spacing (or, better,
from the per-slice positions when they are present). Tags are accepted as keywords
(``ImagePositionPatient``), as hex (``00200032``, ``(0020,0032)``, ``x00200032``) and as DICOM-JSON
``{"vr": .., "Value": [..]}`` objects, because dump tools differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from services.core.errors import InputError
from services.core.volume import Volume

_ELEMENT_TYPES = {
    "MET_CHAR": np.int8,
    "MET_UCHAR": np.uint8,
    "MET_SHORT": np.int16,
    "MET_USHORT": np.uint16,
    "MET_INT": np.int32,
    "MET_UINT": np.uint32,
    "MET_FLOAT": np.float32,
    "MET_DOUBLE": np.float64,
}
_TAGS = {"ImagePositionPatient": "00200032", "ImageOrientationPatient": "00200037", "Modality": "00080060"}


def is_circus_volume(mhd_path: Path) -> bool:
    """A ``N.mhd`` with a sibling ``N.json`` and a purely numeric stem is a CIRCUS CS input volume."""
    return (
        mhd_path.suffix.lower() == ".mhd"
        and mhd_path.stem.isdigit()
        and mhd_path.with_suffix(".json").is_file()
    )


def _parse_header(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="ascii", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path.name} is not a readable MetaImage header", field="image") from exc
    header: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            header[key.strip().lower()] = value.strip()
    return header


def _numbers(header: dict[str, str], key: str, kind: type, name: str) -> list:
    if key.lower() not in header:
        raise InputError(f"{name} lacks {key}", field="image")
    try:
        values = [kind(v) for v in header[key.lower()].split()]
    except ValueError as exc:
        raise InputError(f"{name}: {key} is not numeric: {header[key.lower()]!r}", field="image") from exc
    if len(values) != 3:
        raise InputError(f"{name}: {key} needs 3 values, got {len(values)}", field="image")
    return values


def _lookup(entry: dict[str, Any], keyword: str) -> Any:
    tag = _TAGS[keyword]
    for key in (keyword, tag, tag.upper(), f"({tag[:4]},{tag[4:]})", f"x{tag}"):
        if key in entry:
            value = entry[key]
            if isinstance(value, dict):
                value = value.get("Value", value.get("value"))
            if isinstance(value, str) and "\\" in value:
                value = value.split("\\")
            return value
    return None


def _vector(value: Any, count: int, what: str) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} in the JSON tag dump is not numeric: {value!r}", field="image") from exc
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        raise InputError(f"{what} in the JSON tag dump needs {count} finite numbers", field="image")
    return arr


def read_circus_volume(mhd_path: Path) -> Volume:
    name = mhd_path.name
    header = _parse_header(mhd_path)
    size = _numbers(header, "DimSize", int, name)
    spacing = _numbers(header, "ElementSpacing", float, name)
    element_type = header.get("elementtype", "")
    if element_type not in _ELEMENT_TYPES:
        raise InputError(f"{name}: unsupported ElementType {element_type!r}", field="image")
    if min(size) < 1 or any(abs(s) == 0 or not np.isfinite(s) for s in spacing):
        raise InputError(f"{name}: DimSize {size} / ElementSpacing {spacing} are invalid", field="image")
    big_endian = (
        header.get("elementbyteordermsb", header.get("binarydatabyteordermsb", "false")).lower() == "true"
    )
    dtype = np.dtype(_ELEMENT_TYPES[element_type]).newbyteorder(">" if big_endian else "<")
    data_file = header.get("elementdatafile", mhd_path.with_suffix(".raw").name)
    raw_path = mhd_path.parent / data_file
    expected = int(np.prod(size)) * dtype.itemsize
    if not raw_path.is_file():
        raise InputError(f"{name}: data file {data_file} is missing", field="image")
    if raw_path.stat().st_size != expected:
        raise InputError(
            f"{raw_path.name} holds {raw_path.stat().st_size} bytes, DimSize {size} × {element_type} needs {expected}",
            field="image",
        )
    array = (
        np.fromfile(raw_path, dtype=dtype).reshape(size[2], size[1], size[0]).astype(dtype.newbyteorder("="))
    )

    try:
        tags = json.loads(mhd_path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{mhd_path.with_suffix('.json').name} is not valid JSON", field="image") from exc
    common = tags.get("common", {}) if isinstance(tags, dict) else {}
    unique = tags.get("unique", []) if isinstance(tags, dict) else []
    unique = [u for u in unique if isinstance(u, dict)]
    first = unique[0] if unique else {}

    orientation = _vector(
        _lookup(common, "ImageOrientationPatient") or _lookup(first, "ImageOrientationPatient"),
        6,
        "ImageOrientationPatient",
    )
    row, col = (orientation[:3], orientation[3:]) if orientation is not None else (np.eye(3)[0], np.eye(3)[1])
    normal = np.cross(row, col)
    positions = [_vector(_lookup(u, "ImagePositionPatient"), 3, "ImagePositionPatient") for u in unique]
    slice_axis = normal if spacing[2] > 0 else -normal
    origin = np.zeros(3)
    origin_known = False
    if positions and all(p is not None for p in positions) and len(positions) == size[2]:
        origin = positions[0]
        origin_known = True
        if size[2] > 1:
            travel = float(np.dot(positions[-1] - positions[0], normal))
            if travel != 0:
                slice_axis = normal if travel > 0 else -normal
    elif positions and positions[0] is not None:
        origin = positions[0]
        origin_known = True
    direction = np.column_stack([row, col, slice_axis])
    modality = _lookup(common, "Modality") or _lookup(first, "Modality")
    metadata = {"source_format": "circus", "origin_known": origin_known}
    if modality:
        metadata["modality"] = str(modality[0] if isinstance(modality, list) else modality)
    return Volume(array, (spacing[0], spacing[1], abs(spacing[2])), tuple(origin), direction, metadata)


def read_circus_input(folder: Path, volume_id: int = 0) -> Volume:
    mhd = folder / f"{volume_id}.mhd"
    if not mhd.is_file():
        raise InputError(f"CIRCUS input folder {folder.name} has no {mhd.name}", field="volume_id")
    return read_circus_volume(mhd)
