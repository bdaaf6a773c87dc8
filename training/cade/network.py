"""The detector network: a small MONAI U-Net emitting one logit per voxel (the lesion heatmap).

2D or 3D from the task's frame, so ``cxr-mass`` uses the same code with ``dims=2``. Exported to ONNX
with the tensor names serving binds (``image`` → ``logits``), input (n, 1, *tile) with a dynamic
batch and the tile fixed, which is what :mod:`services.cade.tiling` feeds it.
"""

from __future__ import annotations

import math

import torch
from monai.networks.nets import UNet

from training.cade.settings import CHANNELS
from training.onnx_export import export_onnx as export_network

#: The lesion fraction the output layer starts at (RetinaNet's prior): background begins near 0, so the
#: first steps are not spent pushing a whole image's worth of voxels down from p = 0.5.
PRIOR_PROBABILITY = 0.01


def build_network(dims: int, channels: tuple[int, ...] = CHANNELS, norm: str = "instance") -> torch.nn.Module:
    """A residual U-Net; ``len(channels) - 1`` stride-2 levels, so tiles must divide by 2**that."""
    network = UNet(
        spatial_dims=dims,
        in_channels=1,
        out_channels=1,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=1,
        norm=norm,
        dropout=0.0,
    )
    last = [m for m in network.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)][-1]
    if last.bias is not None and last.out_channels == 1:
        torch.nn.init.constant_(last.bias, -math.log((1.0 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
    return network


def export_onnx(network: torch.nn.Module, tile: tuple[int, ...]) -> bytes:
    """ONNX bytes: input ``image`` (batch, 1, *tile) float32, output ``logits`` of the same shape."""
    return export_network(network, tile)
