"""Whole-image inference of a heatmap network, tile by tile, blended: numpy only, any backend.

A detector sees the whole image, but a network (and a Triton request) takes fixed-size patches, so
the image is cut into overlapping tiles, run in batches through ``infer`` (the same
``float32 (n, 1, …) → logits (n, 1, …)`` callable the label-estimation U-Net uses, bound to an
:class:`~services.inference.backend.InferenceBackend` by the caller) and stitched with Gaussian
weights — the scheme of MONAI's ``sliding_window_inference`` and nnU-Net, which down-weights each
tile's border where zero padding makes a conv net wrong. Serving never imports torch.

Between batches the request's budget is checked (:func:`services.core.work_budget.checkpoint`), so
an abandoned or expired request stops after at most one batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from services.core.errors import InputError
from services.core.work_budget import checkpoint
from services.inference.backend import InferFunction
from services.inference.errors import InferenceError

Blend = Literal["gaussian", "constant"]

#: Gaussian sigma as a fraction of the tile size (MONAI's default and nnU-Net's choice).
SIGMA_SCALE = 0.125
#: A tile with fewer than this share of voxels above ``TilingSpec.skip_below`` holds nothing a
#: lesion could be in (air around the body, padding): it is not sent to the network.
SKIP_FRACTION = 1e-3
#: The logit of voxels only skipped tiles cover (p ≈ 2e-9: never a candidate).
SKIPPED_LOGIT = -20.0


@dataclass(frozen=True)
class TilingSpec:
    """How a network is run over a whole image.

    ``tile``: the network's patch in array order — (z, y, x) for a 3D net, (y, x) for a 2D one;
    ``min_shape``: the smallest image (same order) worth tiling — smaller axes are padded with
    ``pad_value`` up to the tile, below ``min_shape`` the image is refused (an InputError, not an empty
    answer); ``overlap``: fraction of a tile shared with its neighbour; ``max_batch``: tiles per call;
    ``skip_below``: when set, a tile with under ``SKIP_FRACTION`` of its voxels above this working
    intensity is not run (CT: air outside the body), saving its share of the time.
    """

    tile: tuple[int, ...]
    min_shape: tuple[int, ...] | None = None
    overlap: float = 0.25
    max_batch: int = 4
    blend: Blend = "gaussian"
    pad_value: float = 0.0
    skip_below: float | None = None

    def __post_init__(self) -> None:
        tile = tuple(int(t) for t in self.tile)
        if len(tile) not in (2, 3) or min(tile) < 1:
            raise InputError(f"needs 2 or 3 positive sizes, got {self.tile}", field="tile")
        minimum = tile if self.min_shape is None else tuple(int(m) for m in self.min_shape)
        if len(minimum) != len(tile) or any(m < 1 or m > t for m, t in zip(minimum, tile, strict=True)):
            raise InputError(f"needs {len(tile)} sizes in [1, tile], got {self.min_shape}", field="min_shape")
        if not 0.0 <= self.overlap < 1.0:
            raise InputError(f"must lie in [0, 1), got {self.overlap}", field="overlap")
        if self.max_batch < 1:
            raise InputError(f"must be ≥ 1, got {self.max_batch}", field="max_batch")
        if self.blend not in ("gaussian", "constant"):
            raise InputError(f"unknown blend {self.blend!r}", field="blend")
        object.__setattr__(self, "tile", tile)
        object.__setattr__(self, "min_shape", minimum)

    @property
    def dims(self) -> int:
        return len(self.tile)


def check_image(image: np.ndarray, spec: TilingSpec, field: str = "image") -> np.ndarray:
    """The image as the net's spatial array (z, y, x for 3D, y, x for 2D), or an InputError naming ``field``.

    Images arrive as (z, y, x) arrays; a radiograph is one slice (z = 1). A 3D detector refuses a
    single slice and a 2D detector refuses a stack: running either would return confident nonsense.
    """
    array = np.asarray(image)
    if array.ndim != 3:
        raise InputError(f"must be a (z, y, x) array, got shape {array.shape}", field=field)
    if spec.dims == 3 and array.shape[0] == 1:
        raise InputError("is a single slice (a 2D image) but the detector is 3D", field=field)
    if spec.dims == 2 and array.shape[0] != 1:
        raise InputError(f"has {array.shape[0]} slices but the detector is 2D (one slice)", field=field)
    if not np.all(np.isfinite(array)):
        raise InputError(f"holds {int(np.count_nonzero(~np.isfinite(array)))} non-finite voxels", field=field)
    spatial = array[0] if spec.dims == 2 else array
    if any(s < m for s, m in zip(spatial.shape, spec.min_shape, strict=True)):
        raise InputError(
            f"is {list(spatial.shape)} voxels at the working resolution, smaller than the least "
            f"the detector can tile ({list(spec.min_shape)})",
            field=field,
        )
    return spatial.astype(np.float32, copy=False)


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Tile origins along one axis, spread evenly from 0 to ``size - tile`` at most ``tile·(1−overlap)``
    apart (nnU-Net's placement). A last tile merely pushed flush with the end would nearly coincide
    with its neighbour, whose wrong border values would then weigh almost as much as its centre."""
    if size <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    count = int(np.ceil((size - tile) / stride)) + 1
    return sorted(set(np.rint(np.linspace(0, size - tile, count)).astype(int).tolist()))


def blend_weights(tile: Sequence[int], blend: Blend) -> np.ndarray:
    """Per-voxel weight of a tile's output: a separable Gaussian.

    Each axis's profile is floored (not the product), so no voxel weighs zero at the image border,
    while a tile's edge still weighs ~1e-3 of a neighbour's centre along the axis where they meet —
    flooring the product instead would give a corner of two tiles equal weights, the wrong one included.
    """
    if blend == "constant":
        return np.ones(tuple(tile), dtype=np.float32)
    weights = np.ones((), dtype=np.float64)
    for n in tile:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        sigma = max(SIGMA_SCALE * n, 1e-3)
        profile = np.exp(-0.5 * (x / sigma) ** 2)
        weights = np.multiply.outer(weights, np.maximum(profile / profile.max(), 1e-3))
    return weights.astype(np.float32)


def _padded(spatial: np.ndarray, spec: TilingSpec) -> np.ndarray:
    widths = [(0, max(0, t - s)) for s, t in zip(spatial.shape, spec.tile, strict=True)]
    if not any(after for _, after in widths):
        return spatial
    return np.pad(spatial, widths, mode="constant", constant_values=spec.pad_value)


def _run_batch(infer: InferFunction, tiles: list[np.ndarray]) -> np.ndarray:
    batch = np.stack(tiles)[:, None].astype(np.float32)
    out = np.asarray(infer(batch))
    if out.shape != batch.shape:
        raise InferenceError(f"the detector returned shape {out.shape} for a batch of shape {batch.shape}")
    if not np.all(np.isfinite(out)):
        raise InferenceError("the detector returned non-finite logits")
    return out[:, 0]


def sliding_window(image: np.ndarray, infer: InferFunction, spec: TilingSpec) -> np.ndarray:
    """Logits over the whole ``image`` (z, y, x; one slice for a 2D net), same shape as ``image``."""
    spatial = check_image(image, spec)
    padded = _padded(spatial, spec)
    weights = blend_weights(spec.tile, spec.blend)
    total = np.zeros(padded.shape, dtype=np.float32)
    weight_sum = np.zeros(padded.shape, dtype=np.float32)
    axes = [tile_starts(s, t, spec.overlap) for s, t in zip(padded.shape, spec.tile, strict=True)]
    windows = [
        tuple(slice(a, a + t) for a, t in zip(start, spec.tile, strict=True))
        for start in itertools.product(*axes)
    ]
    windows = [w for w in windows if not _skippable(padded[w], spec)]
    for first in range(0, len(windows), spec.max_batch):
        checkpoint(
            f"detection tiles {first + 1}–{min(first + spec.max_batch, len(windows))} of {len(windows)}"
        )
        chunk = windows[first : first + spec.max_batch]
        logits = _run_batch(infer, [padded[w] for w in chunk])
        for window, out in zip(chunk, logits, strict=True):
            total[window] += out * weights
            weight_sum[window] += weights
    covered = weight_sum > 0
    logits = np.full(padded.shape, SKIPPED_LOGIT, dtype=np.float32)
    np.divide(total, weight_sum, out=logits, where=covered)
    logits = logits[tuple(slice(0, s) for s in spatial.shape)]
    return logits[None] if spec.dims == 2 else logits


def _skippable(tile: np.ndarray, spec: TilingSpec) -> bool:
    if spec.skip_below is None:
        return False
    return np.count_nonzero(tile > spec.skip_below) < SKIP_FRACTION * tile.size
