"""Export the x → log p(x) direction of one or two flows to ONNX.

The graph holds no ``slogdet`` or matrix inverse (neither exports): :meth:`Glow.freeze` bakes each
1×1 weight from its LU factors into a constant, and every log-determinant is already a sum of
log|s| (or log-scales) times the spatial size. Input ``image`` (n, 1, *spatial) in [0, 1] (the
serving preprocessing's dequantised levels, :func:`services.anomaly.preprocess.model_input`);
outputs ``log_px`` (n, 1) in nats per flow — the services turn it into bits/dim.
"""

from __future__ import annotations

import copy
import io
import warnings

import torch
from torch import nn

from services.anomaly.scoring import INPUT_NAME, LOG_PX, LOG_PX_MIXTURE, LOG_PX_NORMAL
from training.anomaly.glow import Glow


class LogDensity(nn.Module):
    """image ∈ [0, 1] → log p(image) (n, 1): the flow sees image − 0.5, as in training."""

    def __init__(self, flow: Glow) -> None:
        super().__init__()
        self.flow = copy.deepcopy(flow).eval().freeze()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.flow.log_prob(image - 0.5).reshape(-1, 1)


class TwoFlowLogDensity(nn.Module):
    """Both flows of the posterior on the same input: one model file, one request."""

    def __init__(self, mixture: Glow, normal: Glow) -> None:
        super().__init__()
        self.mixture = LogDensity(mixture)
        self.normal = LogDensity(normal)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mixture(image), self.normal(image)


def export_log_density(module: nn.Module, spatial: tuple[int, ...], output_names: list[str]) -> bytes:
    """ONNX bytes, dynamic batch axis, fixed spatial shape, opset 17 (as :mod:`training.onnx_export`)."""
    buffer = io.BytesIO()
    axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
    with torch.no_grad(), warnings.catch_warnings():
        # Shapes and the actnorm flag are constants of the exported graph (fixed spatial size): intended.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module.eval(),
            (torch.full((1, 1, *spatial), 0.5),),
            buffer,
            input_names=[INPUT_NAME],
            output_names=output_names,
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return buffer.getvalue()


def export_glow(flow: Glow, spatial: tuple[int, ...]) -> bytes:
    return export_log_density(LogDensity(flow), spatial, [LOG_PX])


def export_two_flow(mixture: Glow, normal: Glow, spatial: tuple[int, ...]) -> bytes:
    return export_log_density(TwoFlowLogDensity(mixture, normal), spatial, [LOG_PX_MIXTURE, LOG_PX_NORMAL])
