"""Glow in 2D and 3D: every layer and the whole flow invert exactly, the log-determinants equal a
brute-force Jacobian, and the ONNX export (no slogdet, no inverse) equals torch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from training.anomaly.export import export_glow, export_two_flow
from training.anomaly.glow import ActNorm, AffineCoupling, Glow, InvConvLU, Squeeze

torch.set_num_threads(1)
SHAPES = {2: (4, 4), 3: (4, 4, 4)}


def _perturbed(flow: Glow, x: torch.Tensor, seed: int = 0) -> Glow:
    """Initialise actnorm on ``x``, then move every parameter off its (identity-like) start, so the
    couplings and priors are not trivially zero."""
    flow.train()
    flow(x)
    flow.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return flow


@pytest.mark.parametrize("dims", [2, 3])
def test_each_layer_inverts(dims):
    torch.manual_seed(0)
    x = torch.randn(2, 8, *SHAPES[dims])
    squeeze = Squeeze(dims)
    assert squeeze(x).shape == (2, 8 * 2**dims, *(s // 2 for s in SHAPES[dims]))
    assert torch.equal(squeeze.reverse(squeeze(x)), x)
    layers = [ActNorm(8, dims), InvConvLU(8, dims), AffineCoupling(8, 16, dims)]
    for layer in layers:
        layer.train()
        layer(x)  # actnorm's data-dependent initialisation
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.1 * torch.randn_like(p))
        y, logdet = layer(x)
        assert not torch.allclose(y, x, atol=1e-3), type(layer).__name__
        assert torch.allclose(layer.reverse(y), x, atol=1e-5), type(layer).__name__
        assert logdet.shape == (2,)


def test_a_saturated_coupling_keeps_a_finite_log_determinant():
    """Far from the training data the coupling's raw scale can reach -200: sigmoid is 0 in float32 there,
    log(sigmoid) would be -inf; the log-determinant must stay the finite -198 per scaled element."""
    coupling = AffineCoupling(2, 4, 2).eval()
    with torch.no_grad():
        coupling.net[-1].conv.bias[1::2] = -202.0  # raw + 2 = -200 for the scale channel
    _, logdet = coupling(torch.zeros(1, 2, 4, 4))
    assert torch.isfinite(logdet).all()
    assert logdet.item() == pytest.approx(-200.0 * 16, rel=1e-4)


def test_actnorm_initialises_from_the_first_batch():
    x = 3.0 + 5.0 * torch.randn(16, 4, 8, 8)
    layer = ActNorm(4, 2).train()
    y, _ = layer(x)
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(y.std((0, 2, 3)), torch.ones(4), atol=1e-3)
    y2, _ = layer(x + 1.0)  # initialised once: a second batch does not re-initialise
    assert torch.allclose(y2, y + torch.exp(layer.log_scale), atol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_lu_logdet_is_slogdet_of_the_weight(dims):
    layer = InvConvLU(6, dims)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(1, 6, *SHAPES[dims])
    _, logdet = layer(x)
    expected = torch.linalg.slogdet(layer.weight())[1] * int(np.prod(SHAPES[dims]))
    assert torch.allclose(logdet[0], expected, atol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_flow_inverts_both_ways(dims):
    torch.manual_seed(1)
    x = torch.rand(3, 1, *SHAPES[dims]) - 0.5
    flow = _perturbed(Glow(dims, levels=2, steps=2, hidden=8), x)
    latents, _, _ = flow(x)
    assert torch.allclose(flow.reverse(latents), x, atol=1e-5)  # x → z → x
    with torch.no_grad():
        drawn = [0.5 * torch.randn_like(z) for z in latents]
        again, _, _ = flow(flow.reverse(drawn))  # z → x → z
    for a, b in zip(drawn, again, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_logdet_equals_brute_force_jacobian(dims):
    torch.manual_seed(2)
    shape = SHAPES[dims]
    x = torch.rand(2, 1, *shape, dtype=torch.float64) - 0.5
    flow = _perturbed(Glow(dims, levels=2, steps=2, hidden=8).double(), x)

    def f(v: torch.Tensor) -> torch.Tensor:
        latents, _, _ = flow(v.reshape(1, 1, *shape))
        return torch.cat([z.reshape(-1) for z in latents])

    jacobian = torch.autograd.functional.jacobian(f, x[0].reshape(-1))
    _, logdet, _ = flow(x[:1])
    assert torch.allclose(logdet[0], torch.linalg.slogdet(jacobian)[1], atol=1e-8)


def _ops(onnx_bytes: bytes) -> set[str]:
    return {node.op_type for node in onnx.load_from_string(onnx_bytes).graph.node}


@pytest.mark.parametrize("dims,shape", [(2, (16, 16)), (3, (8, 8, 8))])
def test_onnx_export_equals_torch(dims, shape):
    torch.manual_seed(3)
    x = torch.rand(3, 1, *shape)
    flow = _perturbed(Glow(dims, levels=2, steps=2, hidden=8), x - 0.5)
    onnx_bytes = export_glow(flow, shape)
    assert not _ops(onnx_bytes) & {"Inverse", "Det", "Loop", "If"}
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (got,) = session.run(["log_px"], {"image": x.numpy()})
    with torch.no_grad():
        expected = flow.log_prob(x - 0.5).numpy()
    assert got.shape == (3, 1)
    np.testing.assert_allclose(got[:, 0], expected, rtol=1e-5, atol=1e-3)
    assert flow.blocks[0][0].layers[1].frozen is None  # the export froze a copy, not the flow
    (nll_map,) = session.run(["nll_map"], {"image": x.numpy()})
    assert nll_map.shape == (3, 1, *shape)
    np.testing.assert_allclose(nll_map.reshape(3, -1).sum(1), -expected, rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("dims", [2, 3])
def test_nll_map_sums_to_the_nll_and_localises(dims):
    torch.manual_seed(5)
    shape = (16, 16) if dims == 2 else (8, 8, 8)
    x = torch.rand(2, 1, *shape) - 0.5
    flow = _perturbed(Glow(dims, levels=3, steps=1, hidden=8), x)
    with torch.no_grad():
        nll_map = flow.nll_map(x)
        np.testing.assert_allclose(nll_map.reshape(2, -1).sum(1), -flow.log_prob(x), rtol=1e-5)
        changed = x.clone()
        changed[(0, 0, *(slice(0, 2),) * dims)] += 3.0  # one corner block far off the data
        delta = (flow.nll_map(changed) - nll_map)[0, 0]
    corner = delta[(slice(0, 4),) * dims].abs().sum()
    opposite = delta[(slice(-4, None),) * dims].abs().sum()
    assert corner > 10 * opposite  # the excess NLL sits where the image changed


def test_two_flow_export_returns_both_densities():
    torch.manual_seed(4)
    x = torch.rand(2, 1, 8, 8)
    a = _perturbed(Glow(2, levels=2, steps=1, hidden=8), x - 0.5, seed=1)
    b = _perturbed(Glow(2, levels=2, steps=1, hidden=8), x - 0.5, seed=2)
    session = ort.InferenceSession(export_two_flow(a, b, (8, 8)), providers=["CPUExecutionProvider"])
    mixture, normal, score_map = session.run(None, {"image": x.numpy()})
    np.testing.assert_allclose(
        score_map.reshape(2, -1).sum(1), (mixture - normal)[:, 0], rtol=1e-4, atol=1e-2
    )
    with torch.no_grad():
        np.testing.assert_allclose(mixture[:, 0], a.log_prob(x - 0.5).numpy(), rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(normal[:, 0], b.log_prob(x - 0.5).numpy(), rtol=1e-5, atol=1e-3)
    assert not np.allclose(mixture, normal)
