"""Export the x → log p(x) direction of one or two flows to ONNX.

The graph holds no ``slogdet`` or matrix inverse (neither exports): :meth:`Glow.freeze` bakes each
1×1 weight from its LU factors into a constant, and every log-determinant is already a sum of
log|s| (or log-scales) times the spatial size. Input ``image`` (n, 1, *spatial) in [0, 1] (the
serving preprocessing's dequantised levels, :func:`services.anomaly.preprocess.model_input`);
outputs ``log_px`` (n, 1) in nats per flow — the services turn it into bits/dim — and the per-pixel
map: ``nll_map`` (Glow) or ``score_map`` (two-flow: NLL_normal − NLL_mixture), nats per pixel.
"""

from __future__ import annotations

import copy
import io
import warnings

import torch
from torch import nn

from services.anomaly.scoring import INPUT_NAME, LOG_PX, LOG_PX_MIXTURE, LOG_PX_NORMAL, NLL_MAP, SCORE_MAP
from training.anomaly.glow import Glow


class LogDensity(nn.Module):
    """image ∈ [0, 1] → (log p(image) (n, 1), −log p spread over the pixels (n, 1, *spatial)), nats.

    The flow sees image − 0.5, as in training. ``log_px`` is the map's sum, so the two outputs can
    never disagree (:meth:`Glow.nll_map`)."""

    def __init__(self, flow: Glow) -> None:
        super().__init__()
        self.flow = copy.deepcopy(flow).eval().freeze()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nll_map = self.flow.nll_map(image - 0.5)
        return -nll_map.reshape(nll_map.shape[0], -1).sum(1, keepdim=True), nll_map


class TwoFlowLogDensity(nn.Module):
    """Both flows of the posterior on the same input (one model file, one request): their log p(x)
    and the posterior's map NLL_normal − NLL_mixture per pixel (nats)."""

    def __init__(self, mixture: Glow, normal: Glow) -> None:
        super().__init__()
        self.mixture = LogDensity(mixture)
        self.normal = LogDensity(normal)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_px_mixture, map_mixture = self.mixture(image)
        log_px_normal, map_normal = self.normal(image)
        return log_px_mixture, log_px_normal, map_normal - map_mixture


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
    return export_log_density(LogDensity(flow), spatial, [LOG_PX, NLL_MAP])


def export_two_flow(mixture: Glow, normal: Glow, spatial: tuple[int, ...]) -> bytes:
    return export_log_density(
        TwoFlowLogDensity(mixture, normal), spatial, [LOG_PX_MIXTURE, LOG_PX_NORMAL, SCORE_MAP]
    )
