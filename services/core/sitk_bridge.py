"""Lossless conversion between :class:`Volume` and ``SimpleITK.Image``.

SimpleITK is wlcad's resampler and its NRRD/MHA/MHD codec; both sides use the same conventions
(LPS, direction columns = axis vectors, arrays z,y,x), so the bridge copies numbers without flips.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import SimpleITK as sitk

from services.core.volume import Volume


def sitk_from_volume(volume: Volume) -> sitk.Image:
    """The volume as an ITK image with the same geometry (bool becomes uint8: ITK has no bool pixel)."""
    array = volume.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(tuple(float(v) for v in volume.direction.ravel()))
    return image


def volume_from_sitk(image: sitk.Image, metadata: Mapping[str, Any] | None = None) -> Volume:
    """The ITK image as a Volume; a 2D image becomes one slice (1 mm, identity in z), vectors are refused."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("multi-component (vector/RGB) images are not supported")
    dimension = image.GetDimension()
    array = sitk.GetArrayFromImage(image)
    spacing = list(image.GetSpacing())
    origin = list(image.GetOrigin())
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dimension, dimension)
    if dimension == 2:
        array = array[None, ...]
        spacing.append(1.0)
        origin.append(0.0)
        full = np.eye(3)
        full[:2, :2] = direction
        direction = full
    elif dimension != 3:
        raise ValueError(f"{dimension}D images are not supported (2D or 3D only)")
    return Volume(array, tuple(spacing), tuple(origin), direction, dict(metadata or {}))
