"""Write a set of lesion estimates: label map on the input grid, DICOM SEG, CIRCUS labels, JSON.

Every file is written to a temporary name and renamed into place, so an interrupted or failed run
never leaves a partial output that a resumed batch would mistake for a finished one.
:func:`check_writable` is asked before computing, so an output that cannot be written is the user's
clear error (exit 2) up front rather than an internal error after the work.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from services.core.atomic import write_bytes_atomically
from services.core.errors import InputError
from services.core.io import write_image
from services.core.io.dicom_seg import write_seg
from services.core.version import software_version
from services.core.volume import Volume
from services.label_estimation.circus_label import circus_voxel_label
from services.label_estimation.pipeline import LesionEstimate, label_map


def check_writable(path: Path, field: str, *, folder: bool = False) -> None:
    """Refuse, before any work, an output ``path`` (a file, or with ``folder`` a folder) that cannot be
    written: a parent that is a file, a folder where a file is wanted, or a folder (the nearest one that
    exists, as the writers create the rest) where no file can be created. Writes nothing that stays:
    the probe is an unnamed temporary file, and no missing folder is created.

    Raises:
        InputError: naming ``field``.
    """
    path = Path(path)
    try:
        if not folder and path.is_dir():
            raise InputError(f"{path} is a folder; give a file name", field=field)
        existing = path if folder else path.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise InputError(f"cannot create {path}: {existing} is not a folder", field=field)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}", field=field) from None


def write_json(path: Path, payload: object) -> Path:
    return write_bytes_atomically(path, (json.dumps(payload, indent=2) + "\n").encode())


def write_mask(image: Volume, estimates: Sequence[LesionEstimate], path: Path) -> Path:
    """Label map (voxel = lesion_id) on exactly the input grid."""
    return write_image(image.with_array(label_map(image, estimates)), path)


def write_dicom_seg(image: Volume, estimates: Sequence[LesionEstimate], source: Path, path: Path) -> Path:
    lesions = [{"lesion_id": e.lesion_id, "method": e.method} for e in estimates if e.mask.voxel_count]
    return write_seg(
        source, image, label_map(image, estimates), lesions, path, software_version=software_version()
    )


def write_circus_labels(estimates: Sequence[LesionEstimate], folder: Path) -> list[Path]:
    """``lesion-<id>.json`` (the CIRCUS label) plus the packed voxels stored under their sha1."""
    written = []
    for estimate in estimates:
        if not estimate.mask.voxel_count:
            continue
        label, packed = circus_voxel_label(estimate.mask)
        write_bytes_atomically(folder / label["data"]["voxels"], packed)
        written.append(write_json(folder / f"lesion-{estimate.lesion_id}.json", label))
    return written
