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
#: How much of an NRRD or MetaImage file its text header may take (real headers are < 4 KiB).
TEXT_HEADER_BYTES = 1 << 16
#: The dimensionalities a MetaImage may declare (2D, 3D, 3D + time or components).
_METAIMAGE_NDIMS = range(1, 5)


def header_fields(path: Path) -> dict[str, str]:
    """The ``key → value`` pairs of an NRRD (``key: value``, up to the blank line) or MetaImage
    (``Key = Value``, up to ``ElementDataFile``, its last header line: the voxels follow) text header,
    read from its first :data:`TEXT_HEADER_BYTES`; keys lower-cased, values stripped, the first of a
    repeated key kept."""
    with path.open("rb") as handle:
        text = handle.read(TEXT_HEADER_BYTES).decode("latin-1")
    fields: dict[str, str] = {}
    if path.suffix.lower() in (".nrrd", ".nhdr"):
        for line in text.split("\n\n", 1)[0].splitlines()[1:]:
            key, colon, value = line.partition(":")
            if colon:
                fields.setdefault(key.strip().lower(), value.strip())
        return fields
    for line in text.splitlines():
        key, equals, value = line.partition("=")
        if equals:
            fields.setdefault(key.strip().lower(), value.strip())
            if key.strip().lower() == "elementdatafile":
                break
    return fields


def _check_metaimage_header(path: Path) -> None:
    """ITK's MetaIO never returns from a header whose ``NDims`` is negative or overflows (found by
    the fuzzer: a 94-byte ``NDims =-3`` held a reader for good), so NDims is checked first."""
    ndims = header_fields(path).get("ndims")
    if ndims is None:
        return  # MetaIO itself refuses a header without NDims
    try:
        value = int(ndims)
    except ValueError:
        value = 0
    if value not in _METAIMAGE_NDIMS:
        raise InputError(
            f"{path.name}: NDims must be {_METAIMAGE_NDIMS.start}..{_METAIMAGE_NDIMS.stop - 1}, got {ndims[:16]!r}",
            field="image",
        )


def itk_reader(path: Path) -> sitk.ImageFileReader:
    """A reader for ``path`` pinned to the ImageIO its suffix names.

    Raises:
        InputError: naming ``image`` when the suffix is not an ITK format wlcad reads, or a
            MetaImage header declares a dimensionality ITK cannot parse safely.
    """
    image_io = _IMAGE_IO_BY_SUFFIX.get(path.suffix.lower())
    if image_io is None:
        raise InputError(
            f"{path.name}: not an ITK format wlcad reads (.nrrd, .nhdr, .mha, .mhd)", field="image"
        )
    if image_io == "MetaImageIO":
        _check_metaimage_header(path)
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
