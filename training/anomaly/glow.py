"""Glow (Kingma & Dhariwal 2018) for 2D and 3D images, written once with the dimension as a parameter.

A flow maps an image x to latents z with a tractable Jacobian, so ``log p(x)`` is exact: the sum of
the latents' Gaussian log-densities and every layer's log-determinant. Layers:

* :class:`Squeeze` — trades each 2×2 (2D) or 2×2×2 (3D) block of voxels for channels.
* :class:`ActNorm` — per-channel affine, initialised from the first batch to zero mean, unit sd.
* :class:`InvConvLU` — an invertible 1×1(×1) convolution ``W = P L (U + diag(sign · exp(log_s)))``:
  its log-determinant is ``Σ log_s × spatial size`` (no ``slogdet``), and :meth:`Glow.freeze`
  bakes ``W`` from the factors so the exported graph holds one constant weight.
* :class:`AffineCoupling` — half the channels scale and shift the other half (sigmoid scale).
* :class:`Glow` — L levels × K steps; after each level but the last, half the channels leave as
  latents whose Gaussian prior is predicted from the half that stays (a learned prior).

``forward`` is x → (latents, log-det) and ``reverse`` is latents → x; only ``log_prob`` (x → log p(x))
is exported to ONNX (:mod:`training.anomaly.export`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch spelling)
from torch import nn

LOG_2PI = math.log(2 * math.pi)


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv2d if dims == 2 else nn.Conv3d


def _spatial(x: torch.Tensor) -> int:
    """Voxels per channel of a (n, c, *spatial) tensor: the multiplier of per-channel log-dets."""
    return int(np.prod(x.shape[2:]))


def _sum_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(1)


def gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, log_sd: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(z; mean, exp(log_sd)²)."""
    return -0.5 * (LOG_2PI + 2.0 * log_sd + (z - mean) ** 2 * torch.exp(-2.0 * log_sd))


class Squeeze(nn.Module):
    """(n, c, *s) → (n, c·2^d, *s/2): each 2^d block of neighbours becomes channels (volume-preserving)."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, *s = x.shape
        if self.dims == 2:
            x = x.reshape(n, c, s[0] // 2, 2, s[1] // 2, 2)
            return x.permute(0, 1, 3, 5, 2, 4).reshape(n, c * 4, s[0] // 2, s[1] // 2)
        x = x.reshape(n, c, s[0] // 2, 2, s[1] // 2, 2, s[2] // 2, 2)
        return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(n, c * 8, s[0] // 2, s[1] // 2, s[2] // 2)

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        n, c, *s = y.shape
        if self.dims == 2:
            y = y.reshape(n, c // 4, 2, 2, s[0], s[1]).permute(0, 1, 4, 2, 5, 3)
            return y.reshape(n, c // 4, s[0] * 2, s[1] * 2)
        y = y.reshape(n, c // 8, 2, 2, 2, s[0], s[1], s[2]).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return y.reshape(n, c // 8, s[0] * 2, s[1] * 2, s[2] * 2)


class ActNorm(nn.Module):
    """y = (x + bias) · exp(log_scale) per channel; the first batch seen sets bias and scale so its
    output has zero mean and unit sd per channel (data-dependent initialisation)."""

    def __init__(self, channels: int, dims: int) -> None:
        super().__init__()
        shape = (1, channels) + (1,) * dims
        self.bias = nn.Parameter(torch.zeros(shape))
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def _initialise(self, x: torch.Tensor) -> None:
        axes = [0, *range(2, x.dim())]
        mean = x.mean(axes, keepdim=True)
        sd = x.std(axes, keepdim=True)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(sd + 1e-6))
        self.initialised.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not bool(self.initialised) and self.training:
            self._initialise(x)
        logdet = self.log_scale.sum() * _spatial(x)
        return (x + self.bias) * torch.exp(self.log_scale), logdet.expand(x.shape[0])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


class InvConvLU(nn.Module):
    """Invertible 1×1 convolution in LU form, initialised at a random rotation."""

    def __init__(self, channels: int, dims: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.dims = dims
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(torch.tril(lower, -1))
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))
        #: Set by :meth:`freeze` for export: W as one constant, so ONNX sees a plain convolution.
        self.frozen: torch.Tensor | None = None

    def weight(self) -> torch.Tensor:
        if self.frozen is not None:
            return self.frozen
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.p @ lower @ upper

    def _kernel(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(*w.shape, *(1,) * self.dims)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conv = F.conv2d if self.dims == 2 else F.conv3d
        logdet = self.log_s.sum() * _spatial(x)
        return conv(x, self._kernel(self.weight())), logdet.expand(x.shape[0])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        conv = F.conv2d if self.dims == 2 else F.conv3d
        return conv(y, self._kernel(torch.linalg.inv(self.weight())))


class ZeroConv(nn.Module):
    """3×3(×3) convolution starting at zero output, with a learned per-channel output scale
    (exp(3·logs), as in Glow): couplings start as the identity and priors as N(0, 1)."""

    def __init__(self, in_channels: int, out_channels: int, dims: int) -> None:
        super().__init__()
        self.conv = _conv(dims)(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros((1, out_channels) + (1,) * dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.exp(3.0 * self.logs)


class AffineCoupling(nn.Module):
    """x = (a, b) → (a, (b + shift(a)) · scale(a)), scale = sigmoid(raw + 2) ∈ (0, 1): bounded, so a
    step can never blow up, and log|det| = Σ log scale. log scale is computed as logsigmoid, never as
    log(sigmoid): on an image far from the training data (pure noise) sigmoid underflows to 0 in float32
    and log(0) = -inf, which the first shipped cxr-anomaly exports still do."""

    def __init__(self, channels: int, hidden: int, dims: int) -> None:
        super().__init__()
        conv = _conv(dims)
        half = channels // 2
        self.net = nn.Sequential(
            conv(half, hidden, 3, padding=1),
            nn.ReLU(),
            conv(hidden, hidden, 1),
            nn.ReLU(),
            ZeroConv(hidden, 2 * (channels - half), dims),
        )
        self.half = half

    def _log_scale_shift(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(a)
        shift, raw = h[:, 0::2], h[:, 1::2]
        return nn.functional.logsigmoid(raw + 2.0), shift

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x[:, : self.half], x[:, self.half :]
        log_scale, shift = self._log_scale_shift(a)
        return torch.cat([a, (b + shift) * torch.exp(log_scale)], 1), _sum_per_sample(log_scale)

    def forward_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``forward``, with the log-det per position (n, 1, *spatial) instead of per sample."""
        a, b = x[:, : self.half], x[:, self.half :]
        log_scale, shift = self._log_scale_shift(a)
        return torch.cat([a, (b + shift) * torch.exp(log_scale)], 1), log_scale.sum(1, keepdim=True)

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        a, b = y[:, : self.half], y[:, self.half :]
        log_scale, shift = self._log_scale_shift(a)
        return torch.cat([a, b * torch.exp(-log_scale) - shift], 1)


class FlowStep(nn.Module):
    """actnorm → invertible 1×1 convolution → affine coupling."""

    def __init__(self, channels: int, hidden: int, dims: int, generator: torch.Generator | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            ActNorm(channels, dims),
            InvConvLU(channels, dims, generator),
            AffineCoupling(channels, hidden, dims),
        ])  # fmt: skip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for layer in self.layers:
            x, logdet = layer(x)
            total = total + logdet
        return x, total

    def forward_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``forward``, with the log-det per position (n, 1, *spatial): actnorm's and the 1×1
        convolution's are the same at every position, the coupling's is its own log-scales."""
        actnorm, invconv, coupling = self.layers
        x, ld_a = actnorm(x)
        x, ld_w = invconv(x)
        x, ld_map = coupling.forward_map(x)
        constant = (ld_a + ld_w) / _spatial(x)
        return x, ld_map + constant.reshape(-1, *(1,) * (x.dim() - 1))

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            y = layer.reverse(y)
        return y


class Glow(nn.Module):
    """Multi-scale Glow on single-channel images (n, 1, *spatial) with ``dims`` = 2 or 3.

    Every spatial size must be divisible by 2^levels. ``log_prob(x)`` is the continuous log-density
    (nats) of x; the caller centres and dequantises (:mod:`training.anomaly.train`).
    """

    def __init__(
        self,
        dims: int,
        levels: int = 3,
        steps: int = 8,
        hidden: int = 64,
        in_channels: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        self.dims, self.levels, self.steps, self.hidden = dims, levels, steps, hidden
        generator = torch.Generator().manual_seed(seed)
        self.squeeze = Squeeze(dims)
        self.blocks = nn.ModuleList()
        self.priors = nn.ModuleList()
        channels = in_channels
        for level in range(levels):
            channels *= 2**dims
            self.blocks.append(
                nn.ModuleList([FlowStep(channels, hidden, dims, generator) for _ in range(steps)])
            )
            if level < levels - 1:
                keep = channels // 2
                self.priors.append(ZeroConv(keep, 2 * (channels - keep), dims))
                channels = keep
        self.top_channels = channels
        self.top_prior = nn.Parameter(torch.zeros((1, 2 * channels) + (1,) * dims))

    def config(self) -> dict[str, int]:
        return {"dims": self.dims, "levels": self.levels, "steps": self.steps, "hidden": self.hidden}

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """x → (latents per level, Σ log-det, Σ latent log-density), both sums per sample."""
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        log_pz = torch.zeros_like(logdet)
        latents: list[torch.Tensor] = []
        h = x
        for level, block in enumerate(self.blocks):
            h = self.squeeze(h)
            for step in block:
                h, ld = step(h)
                logdet = logdet + ld
            if level < self.levels - 1:
                keep = h.shape[1] // 2
                h, z = h[:, :keep], h[:, keep:]
                mean, log_sd = self._split_prior(level, h)
            else:
                z = h
                mean, log_sd = self._top_prior(h)
            log_pz = log_pz + _sum_per_sample(gaussian_log_density(z, mean, log_sd))
            latents.append(z)
        return latents, logdet, log_pz

    def _split_prior(self, level: int, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.priors[level](kept)
        return out[:, 0::2], out[:, 1::2]

    def _top_prior(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prior = self.top_prior.expand(like.shape[0], -1, *like.shape[2:])
        return prior[:, 0::2], prior[:, 1::2]

    def nll_map(self, x: torch.Tensor) -> torch.Tensor:
        """−log p(x) spread over the input pixels (n, 1, *spatial), nats; it sums to −log p(x).

        Each level's contributions (its latents' −log density and its steps' −log-dets, per
        position) are spread evenly over the block of input pixels that position was squeezed from,
        so a finding's excess NLL shows where it is, at the resolution of the level that explains it."""
        total = torch.zeros_like(x)
        h = x
        for level, block in enumerate(self.blocks):
            h = self.squeeze(h)
            contribution = torch.zeros_like(h[:, :1])
            for step in block:
                h, ld_map = step.forward_map(h)
                contribution = contribution + ld_map
            if level < self.levels - 1:
                keep = h.shape[1] // 2
                h, z = h[:, :keep], h[:, keep:]
                mean, log_sd = self._split_prior(level, h)
            else:
                z = h
                mean, log_sd = self._top_prior(h)
            contribution = contribution + gaussian_log_density(z, mean, log_sd).sum(1, keepdim=True)
            factor = 2 ** (level + 1)
            spread = F.interpolate(contribution, scale_factor=float(factor), mode="nearest")
            total = total - spread / factor**self.dims
        return total

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per sample, nats."""
        _, logdet, log_pz = self(x)
        return log_pz + logdet

    def reverse(self, latents: list[torch.Tensor]) -> torch.Tensor:
        """Latents (as ``forward`` returns them) → x: the exact inverse."""
        h = latents[-1]
        for level in reversed(range(self.levels)):
            if level < self.levels - 1:
                h = torch.cat([h, latents[level]], 1)
            for step in reversed(self.blocks[level]):
                h = step.reverse(h)
            h = self.squeeze.reverse(h)
        return h

    def sample_latents(self, n: int, shape: tuple[int, ...], temperature: float = 1.0) -> list[torch.Tensor]:
        """Latents drawn from the learned priors, level by level (top first), for an image of ``shape``."""
        sizes = []
        spatial = tuple(shape)
        channels = 1
        for level in range(self.levels):
            channels *= 2**self.dims
            spatial = tuple(s // 2 for s in spatial)
            out = channels // 2 if level < self.levels - 1 else channels
            sizes.append((out, spatial))
            channels = channels - out if level < self.levels - 1 else channels
        top_c, top_s = sizes[-1]
        mean, log_sd = self._top_prior(torch.zeros(n, top_c, *top_s))
        latents: list[torch.Tensor] = [None] * self.levels  # type: ignore[list-item]
        h = mean + temperature * torch.exp(log_sd) * torch.randn_like(mean)
        latents[-1] = h
        for level in reversed(range(self.levels - 1)):
            for step in reversed(self.blocks[level + 1]):
                h = step.reverse(h)
            h = self.squeeze.reverse(h)
            mean, log_sd = self._split_prior(level, h)
            z = mean + temperature * torch.exp(log_sd) * torch.randn_like(mean)
            latents[level] = z
            h = torch.cat([h, z], 1)
        return latents

    def freeze(self) -> Glow:
        """Bake every 1×1 weight from its LU factors (for export); returns self."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, InvConvLU):
                    module.frozen = None
                    module.frozen = module.weight().detach().clone()
        return self
