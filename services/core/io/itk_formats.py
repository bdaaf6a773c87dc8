"""NRRD, MetaImage (MHA/MHD) and the other ITK formats, through SimpleITK's readers and writers."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from services.core.errors import InputError
from services.core.sitk_bridge import sitk_from_volume, volume_from_sitk
from services.core.volume import Volume


def read_itk(path: Path) -> Volume:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise InputError(f"{path.name} could not be read ({first_line})", field="image") from exc
    try:
        return volume_from_sitk(image, {"source_format": path.suffix.lstrip(".").lower()})
    except ValueError as exc:
        raise InputError(f"{path.name}: {exc}", field="image") from exc


def write_itk(volume: Volume, path: Path, *, compress: bool = True) -> None:
    sitk.WriteImage(sitk_from_volume(volume), str(path), useCompression=compress)
