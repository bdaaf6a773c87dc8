"""NIfTI reading and writing with nibabel, converting its RAS+ affine to wlcad's LPS geometry.

NIfTI stores ``RAS = A @ (i, j, k, 1)``; LPS flips the signs of the first two world axes, so
``LPS = diag(-1, -1, 1) @ A``. Spacing is the column norm of the 3×3 part and direction its
normalised columns. nibabel's array is indexed (i, j, k); wlcad's is (k, j, i).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from services.core.errors import InputError
from services.core.volume import Volume

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_nifti(path: Path) -> Volume:
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises many kinds on truncated/corrupt files
        raise InputError(
            f"{path.name} could not be read as NIfTI ({type(exc).__name__}: {exc})", field="image"
        ) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise InputError(f"{path.name}: expected a 3D image, got shape {data.shape}", field="image")
    affine_lps = _RAS_TO_LPS @ np.asarray(image.affine, dtype=np.float64)
    linear = affine_lps[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(linear)):
        raise InputError(f"{path.name}: the affine is degenerate (zero or invalid voxel size)", field="image")
    direction = linear / spacing[None, :]
    # Shears are not representable as spacing + direction: orthonormalise and let Volume check.
    u, _, vt = np.linalg.svd(direction)
    orthonormal = u @ vt
    if not np.allclose(orthonormal, direction, atol=1e-3):
        raise InputError(
            f"{path.name}: the affine has a shear; wlcad needs an orthogonal grid", field="image"
        )
    array = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    return Volume(array, tuple(spacing), tuple(affine_lps[:3, 3]), orthonormal, {"source_format": "nifti"})


def write_nifti(volume: Volume, path: Path) -> None:
    """Write with both sform and qform set (code 1, scanner), the form every viewer agrees on."""
    affine_ras = _RAS_TO_LPS @ volume.affine_lps
    array = volume.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = nib.Nifti1Image(np.transpose(array, (2, 1, 0)), affine_ras)
    image.header.set_xyzt_units("mm", "sec")
    image.set_sform(affine_ras, code=1)
    image.set_qform(affine_ras, code=1)
    nib.save(image, str(path))
