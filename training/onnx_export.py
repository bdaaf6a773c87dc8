"""The one ONNX export of a training package's network: the tensor names serving binds
(``image`` → ``logits``), a dynamic batch axis and a fixed spatial shape, opset 17."""

from __future__ import annotations

import io

import torch

from services.label_estimation.unet import INPUT_NAME, OUTPUT_NAME


def export_onnx(network: torch.nn.Module, spatial_shape: tuple[int, ...], channels: int = 1) -> bytes:
    """ONNX bytes: input ``image`` (batch, ``channels``, *spatial_shape) float32, output ``logits``
    (a heatmap network's: (batch, 1, *spatial_shape); a classifier's: (batch, 1))."""
    network = network.eval().cpu()
    example = torch.zeros(1, channels, *spatial_shape)
    buffer = io.BytesIO()
    torch.onnx.export(
        network,
        (example,),
        buffer,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return buffer.getvalue()
