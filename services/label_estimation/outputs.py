"""Write a set of lesion estimates: label map on the input grid, DICOM SEG and SR, CIRCUS labels, JSON.

Every file is written to a temporary name and renamed into place, so an interrupted or failed run
never leaves a partial output that a resumed batch would mistake for a finished one.
:func:`check_writable` is asked before computing, so an output that cannot be written is the user's
clear error (exit 2) up front rather than an internal error after the work.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from services.core.atomic import write_bytes_atomically
from services.core.errors import InputError
from services.core.io import write_image
from services.core.io.dicom_seg import SegLesion, seg_bytes
from services.core.io.dicom_sr import SrLesion, estimation_sr_bytes
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


def seg_lesions(
    estimates: Sequence[LesionEstimate], lesion_types: Mapping[int, str] | None = None
) -> list[SegLesion]:
    """The SEG's segments, in order (segment number = position + 1): each non-empty estimate, its
    algorithm version the model's (``label_unet3d/1``) or, without a model, the method's name, and
    its lesion type from the prompt or manifest (``lesion_types``: lesion id → type)."""
    types = dict(lesion_types or {})
    return [
        SegLesion(e.lesion_id, e.method, e.model_version or e.method, types.get(e.lesion_id, ""))
        for e in estimates
        if e.mask.voxel_count
    ]


def dicom_seg_bytes(
    image: Volume,
    estimates: Sequence[LesionEstimate],
    source: Path,
    lesion_types: Mapping[int, str] | None = None,
) -> bytes:
    """The DICOM SEG of ``estimates`` on the DICOM source ``source`` as Part 10 bytes (for a service).

    Raises:
        InputError: naming ``seg`` (not DICOM, anonymised UIDs, no non-empty lesion).
    """
    return seg_bytes(
        source,
        image,
        label_map(image, estimates),
        seg_lesions(estimates, lesion_types),
        software_version=software_version(),
    )


def write_dicom_seg(
    image: Volume,
    estimates: Sequence[LesionEstimate],
    source: Path,
    path: Path,
    lesion_types: Mapping[int, str] | None = None,
) -> Path:
    """:func:`dicom_seg_bytes` written atomically to ``path``.

    Raises:
        InputError: as :func:`dicom_seg_bytes`.
    """
    return write_bytes_atomically(path, dicom_seg_bytes(image, estimates, source, lesion_types))


def dicom_sr_bytes(
    image: Volume,
    estimates: Sequence[LesionEstimate],
    source: Path,
    seg: bytes | Path,
    lesion_types: Mapping[int, str] | None = None,
) -> bytes:
    """The TID 1500 SR of ``estimates`` (volume, maximum diameter, axial long/short per lesion),
    each referencing its segment in ``seg`` (the SEG :func:`dicom_seg_bytes` made of the same
    estimates, as bytes or a file), as Part 10 bytes.

    Raises:
        InputError: naming ``sr`` (not DICOM, a SEG of other images or without the segment) or
            ``measurements``.
    """
    lesions = [
        SrLesion(s.lesion_id, number, e.measurements, s.method, s.algorithm_version, s.lesion_type)
        for number, (s, e) in enumerate(
            zip(
                seg_lesions(estimates, lesion_types),
                [e for e in estimates if e.mask.voxel_count],
                strict=True,
            ),
            start=1,
        )
    ]
    return estimation_sr_bytes(lesions, seg, image, source)


def write_dicom_sr(
    image: Volume,
    estimates: Sequence[LesionEstimate],
    source: Path,
    seg: bytes | Path,
    path: Path,
    lesion_types: Mapping[int, str] | None = None,
) -> Path:
    """:func:`dicom_sr_bytes` written atomically to ``path``.

    Raises:
        InputError: as :func:`dicom_sr_bytes`.
    """
    return write_bytes_atomically(path, dicom_sr_bytes(image, estimates, source, seg, lesion_types))


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
