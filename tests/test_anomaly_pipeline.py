"""The anomaly serving pipeline: input errors name ``image``, calibration arithmetic, and an
exported flow scored end to end through the embedded InferenceBackend from a model repository."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.anomaly.calibration import Calibration
from services.anomaly.preprocess import model_input, normalised
from services.anomaly.scoring import AnomalyScorer, bits_per_dim, scores_from_outputs
from services.anomaly.tasks import TASKS, anomaly_task
from services.core.errors import InputError
from services.core.volume import Volume
from services.inference.export import register_onnx_model
from training.anomaly import fanogan
from training.anomaly.export import export_glow, export_two_flow
from training.anomaly.glow import Glow

torch.set_num_threads(1)
CXR, CT = TASKS["cxr-anomaly"], TASKS["head-ct-anomaly"]


def _radiograph(seed: int = 0, rows: int = 96, cols: int = 80) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:rows, :cols]
    body = 2000.0 * np.exp(-(((x - cols / 2) / 25) ** 2 + ((y - rows / 2) / 30) ** 2))
    return (300.0 + body + rng.normal(0, 30, (rows, cols)))[None].astype(np.float32)


@pytest.mark.parametrize(
    "array,task,message",
    [
        (np.full((1, 64, 64), np.nan, np.float32), CXR, "non-finite"),
        (np.where(np.eye(64)[None] > 0, np.inf, 1.0).astype(np.float32), CXR, "non-finite"),
        (np.random.default_rng(0).random((12, 64, 64)), CXR, "2D radiographs"),
        (np.random.default_rng(0).random((1, 64, 64)), CT, "3D volumes"),
        (np.random.default_rng(0).random((1, 4, 64)), CXR, "≥ 8"),
        (np.full((1, 64, 64), 1234.0), CXR, "constant"),
        (
            np.full((16, 32, 32), -1000.0) + np.random.default_rng(0).random((16, 32, 32)),
            CT,
            "after the intensity",
        ),
        (np.zeros((64, 64)), CXR, "got 2D"),
    ],
)
def test_bad_images_are_refused_naming_the_field(array, task, message):
    with pytest.raises(InputError, match=message) as info:
        model_input(array, task)
    assert info.value.field == "image"


def test_preprocessing_fixes_shape_range_and_levels():
    x = model_input(Volume(_radiograph(), (0.7, 0.7, 1.0)), CXR)
    assert x.shape == (1, 1, 64, 64) and x.dtype == np.float32
    levels = x * 256 - 0.5
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)  # level centres
    assert 0.0 < x.min() < 0.05 and 0.95 < x.max() < 1.0
    ct = np.full((40, 128, 128), -1000.0, np.float32)
    ct[5:35, 20:108, 20:108] = 35.0  # parenchyma inside a 0–100 HU window: 0.35
    assert normalised(ct, CT).shape == (32, 64, 64)
    assert abs(float(np.median(normalised(ct, CT)[10:22, 20:44, 20:44])) - 0.35) < 1e-3


def test_calibration_percentile_and_z():
    cal = Calibration.from_scores([1.0, 2.0, 3.0, 4.0], seed=7)
    assert cal.percentile(0.0) == 0.0
    assert cal.percentile(5.0) == 100.0
    assert cal.percentile(2.0) == pytest.approx(37.5)  # one below, one tie counting half
    assert cal.z(2.5) == pytest.approx(0.0)
    assert cal.z(2.5 + cal.sd) == pytest.approx(1.0)
    again = Calibration.from_json(cal.to_json())
    assert again == cal and again.seed == 7
    with pytest.raises(InputError, match="at least two"):
        Calibration.from_scores([1.0])
    with pytest.raises(InputError, match="finite"):
        Calibration.from_scores([1.0, math.nan])
    with pytest.raises(InputError):
        Calibration.from_json({"normal_scores": "x"})


def test_two_flow_score_is_the_difference_of_nlls():
    task = anomaly_task("cxr-anomaly")
    log_px = np.array([[-1000.0], [2000.0]])
    same = scores_from_outputs("two-flow", {"log_px_mixture": log_px, "log_px_normal": log_px}, task)
    np.testing.assert_allclose(same, 0.0)
    worse = scores_from_outputs("two-flow", {"log_px_mixture": log_px, "log_px_normal": log_px - 4096}, task)
    np.testing.assert_allclose(worse, 4096 / (4096 * math.log(2)))  # 1 nat/dim = 1/ln 2 bits/dim
    assert bits_per_dim(np.array([0.0]), 4096)[0] == pytest.approx(8.0)  # uniform density = 8 bits


@pytest.fixture(scope="module")
def tiny_repository(tmp_path_factory):
    """A tiny 2D Glow, two-flow pair and f-AnoGAN (untrained), registered with calibration as
    training ships them."""
    root = tmp_path_factory.mktemp("anomaly_repo")
    torch.manual_seed(0)
    x = torch.rand(8, 1, 64, 64) - 0.5
    flows = []
    for seed in (0, 1):
        flow = Glow(2, levels=2, steps=1, hidden=8, seed=seed).train()
        flow(x)
        flows.append(flow.eval())
    calibration = Calibration.from_scores([5.0, 6.0, 7.0], seed=1302).to_json()
    torch.manual_seed(0)
    gan = fanogan.FAnoGanScore(fanogan.Generator(8, 4), fanogan.Critic(4), fanogan.Encoder(8, 4)).eval()
    for name, onnx_bytes in (
        ("glow", export_glow(flows[0], (64, 64))),
        ("two-flow", export_two_flow(flows[0], flows[1], (64, 64))),
        ("gan", fanogan.export_fanogan(gan, (64, 64))),
    ):
        register_onnx_model(
            root,
            CXR.model_name(name),
            onnx_bytes,
            command="test",
            data_manifest="test",
            seed=0,
            metrics={},
            git_commit="0" * 40,
            instance_kind="KIND_CPU",
            extra={"calibration": calibration},
        )
    return root, flows, gan


def test_scorer_scores_through_the_backend(tiny_repository):
    root, flows, _ = tiny_repository
    volume = Volume(_radiograph(3, 128, 120), (1.0, 1.0, 1.0))
    x = model_input(volume, CXR)
    with torch.no_grad():
        expected = bits_per_dim(flows[0].log_prob(torch.from_numpy(x) - 0.5).numpy(), 64 * 64)[0]
    with AnomalyScorer("cxr-anomaly", "glow", repository=root, setting="embedded") as scorer:
        result = scorer.score(volume)
        assert result.model_version == 1 and result.units == "bits/dim"
        assert result.score == pytest.approx(expected, rel=1e-4)
        assert result.percentile_among_normals == scorer.calibration.percentile(result.score)
        assert result.z == pytest.approx((result.score - 6.0) / 1.0)
        assert set(result.to_json()) >= {
            "task",
            "model",
            "model_version",
            "score",
            "percentile_among_normals",
            "z",
        }
        with pytest.raises(InputError, match="2D radiographs"):
            scorer.score(Volume(np.random.default_rng(0).random((8, 64, 64)), (1.0, 1.0, 1.0)))
        _, score_map = scorer.score_with_map(volume)
    assert score_map.array.shape == CXR.shape
    assert float(score_map.array.mean()) == pytest.approx(result.score, rel=1e-5)
    centre = lambda v: v.index_to_world((np.asarray(v.shape_xyz) - 1) / 2)  # noqa: E731
    np.testing.assert_allclose(centre(score_map), centre(volume), atol=1e-6)  # same world box
    np.testing.assert_allclose(np.asarray(score_map.spacing[:2]) * 64, [120.0, 128.0])
    with AnomalyScorer("cxr-anomaly", "two-flow", repository=root, setting="embedded") as scorer:
        posterior, posterior_map = scorer.score_with_map(volume)
    assert float(posterior_map.array.mean()) == pytest.approx(posterior.score, rel=1e-4, abs=1e-6)
    nll = posterior.components
    assert posterior.score == pytest.approx(
        nll["nll_normal_bits_per_dim"] - nll["nll_mixture_bits_per_dim"], abs=1e-6
    )
    assert nll["nll_mixture_bits_per_dim"] == pytest.approx(expected, rel=1e-4)


def test_fanogan_scores_through_the_backend_as_torch_does(tiny_repository):
    """The served f-AnoGAN is the trained module: score = image + κ × critic-feature residual (so at
    least the map's mean, the image term), the map the per-pixel squared residual on [−1, 1]."""
    root, _, gan = tiny_repository
    volume = Volume(_radiograph(5, 128, 120), (1.0, 1.0, 1.0))
    x = torch.from_numpy(model_input(volume, CXR))
    with torch.no_grad():
        expected, residual = (t.numpy() for t in gan(x))
        scaled = x * 2 - 1
        image_term = float(((scaled - gan.generator(gan.encoder(scaled))) ** 2).mean())
    with AnomalyScorer("cxr-anomaly", "gan", repository=root, setting="embedded") as scorer:
        result, score_map = scorer.score_with_map(volume)
    assert result.units == "squared residual" and result.components == {}
    assert result.score == pytest.approx(float(expected[0]), rel=1e-5)
    assert float(score_map.array.mean()) == pytest.approx(image_term, rel=1e-4)
    assert result.score > float(score_map.array.mean()) > 0.0  # the feature term adds, never subtracts
    np.testing.assert_allclose(score_map.array, residual[0], rtol=1e-4, atol=1e-6)


def test_unknown_model_and_task_are_input_errors(tiny_repository):
    root, _, _ = tiny_repository
    with pytest.raises(InputError) as info:
        AnomalyScorer("cxr-anomaly", "vae", repository=root)
    assert info.value.field == "model"
    with pytest.raises(InputError) as info:
        AnomalyScorer("knee-mr", "glow", repository=root)
    assert info.value.field == "task"
    with pytest.raises(InputError) as info:
        AnomalyScorer("head-ct-anomaly", "glow", repository=root)
    assert info.value.field == "model"


def test_constant_input_to_the_raw_model_is_finite(tiny_repository):
    """What the pipeline refuses still has a defined value in the graph: never NaN."""
    root, _, _ = tiny_repository
    session = ort.InferenceSession(str(root / CXR.model_name("glow") / "1" / "model.onnx"))
    for value in (0.5 / 256, 0.5, 255.5 / 256):
        log_px, nll_map = session.run(
            ["log_px", "nll_map"], {"image": np.full((1, 1, 64, 64), value, np.float32)}
        )
        assert np.all(np.isfinite(log_px)) and np.all(np.isfinite(nll_map))


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(6, 48),
    cols=st.integers(6, 48),
    scale=st.sampled_from([1e-6, 1.0, 4095.0, 1e30]),
    seed=st.integers(0, 2**16),
    special=st.sampled_from(["none", "nan", "inf", "constant", "one-hot"]),
)
def test_every_input_is_a_finite_score_or_an_input_error(tiny_repository, rows, cols, scale, seed, special):
    root, _, _ = tiny_repository
    session = _session(root)
    array = (np.random.default_rng(seed).random((1, rows, cols)) * scale).astype(np.float32)
    if special == "nan":
        array.flat[seed % array.size] = np.nan
    elif special == "inf":
        array.flat[seed % array.size] = -np.inf
    elif special == "constant":
        array[:] = scale
    elif special == "one-hot":
        array[:] = 0.0
        array.flat[seed % array.size] = scale
    try:
        x = model_input(array, CXR)
    except InputError as exc:
        assert exc.field == "image"
        return
    (log_px,) = session.run(["log_px"], {"image": x})
    assert np.all(np.isfinite(scores_from_outputs("glow", {"log_px": log_px}, CXR)))


_SESSIONS: dict = {}


def _session(root):
    if root not in _SESSIONS:
        _SESSIONS[root] = ort.InferenceSession(str(root / CXR.model_name("glow") / "1" / "model.onnx"))
    return _SESSIONS[root]
