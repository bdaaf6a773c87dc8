"""Volume ↔ ``wlcad.v1.Volume``, masks ↔ ``PackedMask`` and ``Measurements``: the messages every
capability shares, validating every field on the way in.

Field names in errors are the request's proto paths (``image.volume.shape_xyz``,
``lesions[2].center_mm``) so a client can tell exactly what to fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from services.api import limits
from services.api.pb import common_pb2, image_pb2
from services.core.errors import InputError
from services.core.lesion_measurements import Measurements
from services.core.volume import Volume

#: The voxel types a volume may travel as, by their numpy name.
DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")


def _finite_triplet(values: Sequence[float], field: str, default=None, positive: bool = False):
    if len(values) == 0 and default is not None:
        return default
    if len(values) != 3:
        raise InputError(f"needs 3 numbers, got {len(values)}", field=field)
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"must be finite, got {list(values)}", field=field)
    if positive and min(values) <= 0:
        raise InputError(f"must be > 0, got {list(values)}", field=field)
    return tuple(float(v) for v in values)


def volume_header(
    message: image_pb2.Volume, field: str = "image.volume"
) -> tuple[np.dtype, tuple[int, int, int]]:
    """Validated dtype and shape_xyz: voxels against ``MAX_VOXELS`` and bytes (shape × itemsize)
    against ``MAX_UPLOAD_BYTES``, from the header alone, so an upload's buffer is never sized from
    a header asking for more than an upload may carry."""
    if message.dtype not in DTYPES:
        raise InputError(
            f"must be one of {', '.join(DTYPES)}, got {message.dtype[:32]!r}", field=f"{field}.dtype"
        )
    shape = tuple(int(v) for v in message.shape_xyz)
    if len(shape) != 3:
        raise InputError(f"needs 3 numbers (x, y, z), got {len(shape)}", field=f"{field}.shape_xyz")
    if min(shape) < 1:
        raise InputError(f"every size must be >= 1, got {list(shape)}", field=f"{field}.shape_xyz")
    if math.prod(shape) > limits.MAX_VOXELS:
        raise InputError(
            f"{list(shape)} is {math.prod(shape)} voxels, above the limit of {limits.MAX_VOXELS}",
            field=f"{field}.shape_xyz",
        )
    dtype = np.dtype(message.dtype).newbyteorder("<")
    size = math.prod(shape) * dtype.itemsize
    if size > limits.MAX_UPLOAD_BYTES:  # the voxel limit alone lets float64 ask for 4 GiB
        raise InputError(
            f"{message.dtype} × {list(shape)} is {size} bytes, above the limit of {limits.MAX_UPLOAD_BYTES}",
            field=f"{field}.shape_xyz",
        )
    return dtype, shape  # type: ignore[return-value]


def expected_bytes(message: image_pb2.Volume, field: str = "image.volume") -> int:
    """The exact byte count of a volume's voxels (at most ``MAX_UPLOAD_BYTES``), from its header."""
    dtype, shape = volume_header(message, field)
    return math.prod(shape) * dtype.itemsize


def volume_from_proto(
    message: image_pb2.Volume, data: bytes | bytearray | memoryview | None = None, field: str = "image.volume"
) -> Volume:
    """A Volume viewing the message's bytes (no copy). ``data`` replaces ``message.data`` for uploads."""
    dtype, shape = volume_header(message, field)
    raw = message.data if data is None else data
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InputError(
            f"has {len(raw)} bytes; {message.dtype} × {list(shape)} needs {expected}", field=f"{field}.data"
        )
    spacing = _finite_triplet(message.spacing_mm, f"{field}.spacing_mm", positive=True)
    origin = _finite_triplet(message.origin_mm, f"{field}.origin_mm", default=(0.0, 0.0, 0.0))
    if len(message.direction) not in (0, 9):
        raise InputError(
            f"needs 9 numbers (row-major 3×3), got {len(message.direction)}", field=f"{field}.direction"
        )
    direction = np.asarray(message.direction, dtype=float).reshape(3, 3) if message.direction else np.eye(3)
    array = np.frombuffer(raw, dtype=dtype).reshape(shape[::-1])
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError("float voxels must be finite (no NaN/inf)", field=f"{field}.data")
    if dtype.byteorder not in ("=", "|") and not np.little_endian:  # pragma: no cover - big-endian hosts
        array = array.astype(dtype.newbyteorder("="))
    metadata = {"modality": message.modality[:16]} if message.modality else {}
    try:
        return Volume(array, spacing, origin, direction, metadata)
    except InputError as exc:
        raise InputError(exc.message, field=f"{field}.{exc.field}" if exc.field else field) from exc


def volume_to_proto(volume: Volume, with_data: bool = True) -> image_pb2.Volume:
    """The wire form; ``with_data=False`` gives the geometry only (the grid a result refers to)."""
    array = volume.array
    if array.dtype.name not in DTYPES:
        array = array.astype(np.float32)
    message = image_pb2.Volume(
        dtype=array.dtype.name,
        shape_xyz=list(volume.shape_xyz),
        spacing_mm=list(volume.spacing),
        origin_mm=list(volume.origin),
        direction=[float(v) for v in np.asarray(volume.direction).ravel()],
        modality=str(volume.metadata.get("modality", "") or ""),
    )
    if with_data:
        message.data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return message


def pack_mask(start_xyz: Sequence[int], mask_zyx: np.ndarray) -> image_pb2.PackedMask:
    z, y, x = mask_zyx.shape
    bits = np.packbits(np.ascontiguousarray(mask_zyx, dtype=bool).ravel(), bitorder="big").tobytes()
    return image_pb2.PackedMask(start_xyz=[int(v) for v in start_xyz], size_xyz=[x, y, z], bits=bits)


def unpack_mask(message: image_pb2.PackedMask) -> tuple[tuple[int, int, int], np.ndarray]:
    """(start_xyz, bool mask z,y,x) of a packed mask."""
    if len(message.start_xyz) != 3 or len(message.size_xyz) != 3:
        raise InputError("a packed mask needs 3 numbers in start_xyz and size_xyz", field="mask")
    size = [int(v) for v in message.size_xyz]
    count = math.prod(size)
    if len(message.bits) != (count + 7) // 8:
        raise InputError(f"has {len(message.bits)} bytes for {count} voxels", field="mask.bits")
    bits = np.unpackbits(np.frombuffer(message.bits, dtype=np.uint8), bitorder="big", count=count)
    start = (int(message.start_xyz[0]), int(message.start_xyz[1]), int(message.start_xyz[2]))
    return start, bits.astype(bool).reshape(size[2], size[1], size[0])


def measurements_to_proto(values: Measurements) -> common_pb2.Measurements:
    return common_pb2.Measurements(
        voxels=values.voxels,
        volume_mm3=values.volume_mm3,
        center_mm=list(values.center_mm or ()),
        max_diameter_mm=values.max_diameter_mm,
        axial_long_mm=values.axial_long_mm,
        axial_short_mm=values.axial_short_mm,
    )


def measurements_from_proto(message: common_pb2.Measurements) -> Measurements:
    center = tuple(float(v) for v in message.center_mm)
    return Measurements(
        voxels=int(message.voxels),
        volume_mm3=message.volume_mm3,
        center_mm=center if len(center) == 3 else None,  # type: ignore[arg-type]
        max_diameter_mm=message.max_diameter_mm,
        axial_long_mm=message.axial_long_mm,
        axial_short_mm=message.axial_short_mm,
    )
