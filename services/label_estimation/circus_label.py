"""CIRCUS DB voxel labels: a bounding box plus the mask packed one bit per voxel.

CIRCUS stores a voxel label as its box (``origin`` = first voxel index, ``size`` in voxels, both
x, y, z) and the box's mask in z, y, x order packed with ``np.packbits(..., bitorder='big')``; the
packed bytes are stored under their sha1, which the label's JSON names.
"""

from __future__ import annotations

import hashlib

import numpy as np

from services.core.lesion_mask import LesionMask


def circus_voxel_label(mask: LesionMask) -> tuple[dict, bytes]:
    """(label JSON, packed bytes) for one lesion; the box is the mask's tightest."""
    tight = mask.tight()
    packed = np.packbits(np.ascontiguousarray(tight.mask_zyx, dtype=bool).ravel(), bitorder="big").tobytes()
    label = {
        "type": "voxel",
        "data": {
            "origin": [int(v) for v in tight.start_xyz],
            "size": [int(v) for v in tight.size_xyz],
            "voxels": hashlib.sha1(packed).hexdigest(),
        },
    }
    return label, packed


def unpack_circus_voxels(packed: bytes, size_xyz: list[int]) -> np.ndarray:
    """The inverse: packed bytes → bool mask (z, y, x) of the box."""
    count = int(np.prod(size_xyz))
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), bitorder="big", count=count)
    return bits.astype(bool).reshape(size_xyz[2], size_xyz[1], size_xyz[0])
