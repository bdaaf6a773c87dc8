"""The manifest: one CSV row per lesion (one row with an empty lesion_id for a lesion-free case).

The same format carries real user data (centre + size from a reading report, or presence only), so
training code never needs to know whether a case was a phantom. ``docs/manifest.schema.json``
describes a row; :func:`read_manifest` validates one and names the offending column.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.atomic import atomic_output
from services.core.errors import InputError
from services.core.lesion_prompt import LesionPrompt

REQUIRED_COLUMNS = (
    "case_id", "image", "mask", "lesion_id", "center_x_mm", "center_y_mm", "center_z_mm",
    "diameter_mm", "lesion_type", "abnormal",
)  # fmt: skip
OPTIONAL_COLUMNS = (
    "axial_long_mm", "axial_short_mm", "volume_mm3", "shape_family", "contrast_sd", "treated", "dose", "rtdose",
)  # fmt: skip
COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
_FLOAT_COLUMNS = (
    "center_x_mm",
    "center_y_mm",
    "center_z_mm",
    "diameter_mm",
    "axial_long_mm",
    "axial_short_mm",
    "volume_mm3",
    "contrast_sd",
)


#: Characters a case id may not hold: path separators (either OS's) and control characters (NUL too).
_UNSAFE_IN_CASE_ID = re.compile(r"[/\\\x00-\x1f\x7f]")
#: The longest file name most file systems accept, in bytes.
_MAX_NAME_BYTES = 255


def check_case_id(case_id: str, line: int) -> None:
    """Refuse a case id that is not one plain folder name: outputs go to ``<out>/<case_id>/``, so
    ``../../x``, an absolute path or a NUL would write outside ``--out`` (or fail half-way).

    Raises:
        InputError: naming ``case_id`` and the manifest line.
    """
    if not case_id:
        return  # an empty id is the row's own error (see _parse_row), recorded by a batch
    if _UNSAFE_IN_CASE_ID.search(case_id) or ".." in case_id or case_id == ".":
        raise InputError(
            f"line {line}: {case_id!r} is not a plain folder name (no '/', '\\', '..', '.' or control "
            "characters): outputs are written to <out>/<case_id>/",
            field="case_id",
        )
    if len(case_id.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES:
        raise InputError(f"line {line}: longer than {_MAX_NAME_BYTES} bytes", field="case_id")


def format_float(value: float | None) -> str:
    """Fixed 3-decimal text: stable bytes for the same seed, sub-voxel precision for coordinates."""
    return "" if value is None else f"{value:.3f}"


def write_manifest(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write rows (missing columns left empty) atomically."""
    with atomic_output(path) as temporary, temporary.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in COLUMNS})
    return path


def _bool(text: str, column: str, line: int) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise InputError(f"line {line}: expected true/false, got {text!r}", field=column)


def _parse_row(raw: dict[str, str], line: int, folder: Path, check_files: bool) -> dict[str, Any]:
    """One validated row: paths absolute, numbers parsed. Raises InputError naming the column."""
    row: dict[str, Any] = dict(raw)
    if not raw["case_id"]:
        raise InputError(f"line {line}: empty", field="case_id")
    for column in ("image", "mask"):
        if raw[column]:
            full = (folder / raw[column]).resolve()
            if check_files and not full.exists():
                raise InputError(f"line {line}: {raw[column]} does not exist", field=column)
            row[column] = full
        else:
            row[column] = None
    if row["image"] is None:
        raise InputError(f"line {line}: empty", field="image")
    row["abnormal"] = (
        _bool(raw["abnormal"], "abnormal", line) if raw.get("abnormal") else bool(raw["lesion_id"])
    )
    if raw["lesion_id"]:
        try:
            row["lesion_id"] = int(raw["lesion_id"])
        except ValueError:
            raise InputError(
                f"line {line}: not an integer: {raw['lesion_id']!r}", field="lesion_id"
            ) from None
        if row["lesion_id"] < 1:
            raise InputError(f"line {line}: must be ≥ 1", field="lesion_id")
    else:
        row["lesion_id"] = None
    for column in _FLOAT_COLUMNS:
        text = raw.get(column) or ""
        if text:
            try:
                row[column] = float(text)
            except ValueError:
                raise InputError(f"line {line}: not a number: {text!r}", field=column) from None
            if not math.isfinite(row[column]):
                raise InputError(f"line {line}: not finite", field=column)
        else:
            row[column] = None
    if row["lesion_id"] is not None and (row["center_x_mm"] is None or row["diameter_mm"] is None):
        raise InputError(f"line {line}: a lesion needs a centre and a diameter", field="center_x_mm")
    return row


def read_manifest(
    path: str | os.PathLike[str], *, check_files: bool = True, strict: bool = True
) -> list[dict[str, Any]]:
    """Parse and validate a manifest; paths come back absolute (they are relative to the manifest).

    ``strict`` raises on the first bad row; otherwise a bad row comes back as ``{"case_id", "lesion_id",
    "line", "error"}`` so a batch can record it and go on with the others. An unsafe ``case_id``
    (:func:`check_case_id`) always raises: it names where a row's outputs go, so there is no safe
    place to record that row's error.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist", field="manifest")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"missing columns: {', '.join(missing)}", field="manifest")
        rows = []
        for line, raw in enumerate(reader, start=2):
            check_case_id(raw["case_id"] or "", line)
            try:
                rows.append(_parse_row(raw, line, path.parent, check_files))
            except InputError as exc:
                if strict:
                    raise
                rows.append(
                    {
                        "case_id": raw.get("case_id", ""),
                        "lesion_id": raw.get("lesion_id", ""),
                        "line": line,
                        "error": str(exc),
                    }
                )
    return rows


@dataclass(frozen=True)
class ManifestLesion:
    """One lesion row of a manifest as every capability reads it: its weak label (``prompt``), the exact
    mask file if known (``truth``), or the row's error for a batch to record and skip."""

    case_id: str
    image: Path
    truth: Path | None
    lesion_type: str
    prompt: LesionPrompt | None
    error: str | None = None
    raw_lesion_id: str = ""


def read_lesions(path: str | os.PathLike[str]) -> list[ManifestLesion]:
    """Rows with a lesion (an empty lesion_id is a lesion-free case, skipped). Bad rows carry their error."""
    lesions = []
    for row in read_manifest(path, check_files=False, strict=False):
        if "error" in row:
            lesion_id = str(row["lesion_id"])
            if lesion_id.strip():
                lesions.append(
                    ManifestLesion(row["case_id"], Path(path), None, "", None, row["error"], lesion_id)
                )
            continue
        if row["lesion_id"] is None:
            continue
        try:
            prompt = LesionPrompt(
                (row["center_x_mm"], row["center_y_mm"], row["center_z_mm"]),
                row["diameter_mm"],
                row["lesion_id"],
            )
        except InputError as exc:  # e.g. a diameter of 0: the row's error, the batch goes on
            error = f"line {row.get('line', '?')}: {exc}"
            lesions.append(
                ManifestLesion(row["case_id"], Path(path), None, "", None, error, str(row["lesion_id"]))
            )
            continue
        lesions.append(
            ManifestLesion(row["case_id"], row["image"], row["mask"], row.get("lesion_type") or "", prompt)
        )
    return lesions
