"""NRRD, MetaImage (MHA/MHD) and the other ITK formats, through SimpleITK's readers and writers."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from services.core.errors import InputError
from services.core.sitk_bridge import sitk_from_volume, volume_from_sitk
from services.core.volume import Volume

# The one ImageIO per suffix. Left to itself ITK asks every registered ImageIO whether it can read
# the file, so a ".nrrd" holding DICOM bytes went to GDCM, which allocated a 4 GiB element its
# header declared (found by the fuzzer): a file named for a format is read as that format or refused.
_IMAGE_IO_BY_SUFFIX = {
    ".nrrd": "NrrdImageIO",
    ".nhdr": "NrrdImageIO",
    ".mha": "MetaImageIO",
    ".mhd": "MetaImageIO",
}


def itk_reader(path: Path) -> sitk.ImageFileReader:
    """A reader for ``path`` pinned to the ImageIO its suffix names.

    Raises:
        InputError: naming ``image`` when the suffix is not an ITK format wlcad reads.
    """
    image_io = _IMAGE_IO_BY_SUFFIX.get(path.suffix.lower())
    if image_io is None:
        raise InputError(
            f"{path.name}: not an ITK format wlcad reads (.nrrd, .nhdr, .mha, .mhd)", field="image"
        )
    reader = sitk.ImageFileReader()
    reader.SetImageIO(image_io)
    reader.SetFileName(str(path))
    return reader


def read_itk(path: Path) -> Volume:
    reader = itk_reader(path)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise InputError(f"{path.name} could not be read ({first_line})", field="image") from exc
    try:
        return volume_from_sitk(image, {"source_format": path.suffix.lstrip(".").lower()})
    except ValueError as exc:
        raise InputError(f"{path.name}: {exc}", field="image") from exc


def write_itk(volume: Volume, path: Path, *, compress: bool = True) -> None:
    sitk.WriteImage(sitk_from_volume(volume), str(path), useCompression=compress)
