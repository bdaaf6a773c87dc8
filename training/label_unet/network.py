"""The generic lesion segmenter: MONAI's residual 3D U-Net, small enough for CPU serving (< 50 ms)."""

from __future__ import annotations

import torch
from monai.networks.nets import UNet

from services.label_estimation.voi import VOI_SIZE
from training.onnx_export import export_onnx as export_network

CHANNELS = (16, 32, 64, 128)


def build_network(channels: tuple[int, ...] = CHANNELS) -> torch.nn.Module:
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=1,
        norm="instance",
        dropout=0.0,
    )


def export_onnx(network: torch.nn.Module) -> bytes:
    """ONNX with a dynamic batch axis and the tensor names the serving pipeline uses."""
    return export_network(network, (VOI_SIZE,) * 3)
