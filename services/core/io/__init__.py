"""Read any supported medical image into a :class:`Volume`, and write volumes atomically.

Supported inputs: a DICOM series folder, a single DICOM file (enhanced multi-frame, one slice, or a
CR/DX radiograph), NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``,
``.mhd``) and the CIRCUS CS input volume (``N.mhd`` beside ``N.json``, or the folder holding them).
"""

from __future__ import annotations

import os
from pathlib import Path

from services.core.atomic import atomic_output
from services.core.errors import InputError
from services.core.io.circus import is_circus_volume, read_circus_input, read_circus_volume
from services.core.io.dicom import is_dicom_file, read_dicom_file, read_dicom_series
from services.core.io.itk_formats import read_itk, write_itk
from services.core.io.nifti import read_nifti, write_nifti
from services.core.volume import Volume

__all__ = ["image_format", "read_image", "writable_suffix", "write_image"]

_ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
WRITABLE_SUFFIXES = (*_NIFTI_SUFFIXES, ".nrrd", ".mha")


def image_format(path: Path) -> str:
    """Name the reader for ``path`` without reading pixels: dicom-series, dicom, nifti, itk, circus."""
    name = path.name.lower()
    if path.is_dir():
        return "circus" if (path / "0.mhd").is_file() and (path / "0.json").is_file() else "dicom-series"
    if name.endswith(_NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(".mhd") and is_circus_volume(path):
        return "circus"
    if name.endswith(_ITK_SUFFIXES):
        return "itk"
    if is_dicom_file(path) or name.endswith((".dcm", ".dicom")):
        return "dicom"
    raise InputError(
        f"{path.name}: unrecognised format (expected a DICOM folder or file, NIfTI, NRRD, MHA/MHD)",
        field="image",
    )


def read_image(path: str | os.PathLike[str], *, series_instance_uid: str | None = None) -> Volume:
    """Read ``path`` into a Volume. Every failure caused by the input is an :class:`InputError`."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist", field="image")
    kind = image_format(path)
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(f"{path.name} is an empty file", field="image")
    if kind == "dicom-series":
        return read_dicom_series(path, series_instance_uid)
    if kind == "circus":
        return read_circus_input(path) if path.is_dir() else read_circus_volume(path)
    if kind == "nifti":
        return read_nifti(path)
    if kind == "itk":
        return read_itk(path)
    return read_dicom_file(path)


def writable_suffix(path: str | os.PathLike[str]) -> str:
    """The image format suffix :func:`write_image` will write ``path`` in; asked before computing too,
    so a wrong ``--out`` name is refused before any other output is written.

    Raises:
        InputError: naming ``out`` when the name has no writable suffix.
    """
    name = Path(path).name.lower()
    suffix = next((s for s in WRITABLE_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        raise InputError(
            f"cannot write {Path(path).name}: use one of {', '.join(WRITABLE_SUFFIXES)}", field="out"
        )
    return suffix


def write_image(volume: Volume, path: str | os.PathLike[str]) -> Path:
    """Write NIfTI / NRRD / MHA atomically: a temporary file renamed into place, never a partial file."""
    path = Path(path)
    suffix = writable_suffix(path)
    with atomic_output(path, suffix=suffix) as temporary:
        if suffix in _NIFTI_SUFFIXES:
            write_nifti(volume, temporary)
        else:
            write_itk(volume, temporary)
    return path
