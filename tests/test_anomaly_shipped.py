"""The shipped cxr-anomaly models, scored as ``wlcad score`` will: a phantom generated from its
seed, read as a Volume, scored through the embedded backend from model_repository."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from services.anomaly.scoring import AnomalyScorer
from services.core.volume import Volume
from services.inference.card import ModelCard, sha256_file
from services.inference.factory import default_repository
from training.anomaly.stabilise import hostile_inputs
from training.data.dataset import generate_case

VALIDATION_SEED, TEST_SEED = 1302, 1303  # training/anomaly/tasks.py


def _newest(model_dir):
    version, entry = max(ModelCard.read(model_dir).versions.items(), key=lambda kv: int(kv[0]))
    return model_dir / version / "model.onnx", entry


@pytest.mark.parametrize("model", ["glow", "two-flow"])
def test_shipped_card_matches_file_and_beats_the_baseline(model):
    model_dir = default_repository() / f"anomaly_cxr-anomaly_{model}"
    onnx, card = _newest(model_dir)
    assert card.sha256 == sha256_file(onnx)
    assert onnx.stat().st_size <= 20 * 2**20
    assert card.metrics["test_auc"] > card.metrics["baseline_test_auc"]
    assert card.metrics["test_auc_ci_low"] < card.metrics["test_auc"] < card.metrics["test_auc_ci_high"]
    assert card.extra["calibration"]["seed"] == VALIDATION_SEED


@pytest.mark.parametrize("model", ["glow", "two-flow"])
def test_the_served_graph_is_finite_far_from_any_radiograph(model):
    """Pure noise at the model's own resolution drove Log(Sigmoid) to -inf in the first export; the
    served graph (training/anomaly/stabilise.py) gives finite log p(x) there and on the extremes."""
    onnx, _ = _newest(default_repository() / f"anomaly_cxr-anomaly_{model}")
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(None, {"image": hostile_inputs((64, 64), seed=3)})
    for name, value in zip(names, outputs, strict=True):
        assert np.isfinite(value).all(), name
    with AnomalyScorer("cxr-anomaly", model, setting="embedded") as scorer:
        noise = Volume(
            np.random.default_rng(4).random((1, 64, 64)).astype(np.float32) * 4000, (1.0, 1.0, 1.0)
        )
        result = scorer.score(noise)
    assert np.isfinite([result.score, result.z]).all() and result.percentile_among_normals == 100.0


def test_shipped_two_flow_reproduces_its_calibration_and_ranks_an_effusion_high():
    with AnomalyScorer("cxr-anomaly", "two-flow", setting="embedded") as scorer:
        # Validation case 0 is normal: its score is one of the card's calibration normals.
        normal = scorer.score(generate_case("cxr-anomaly", VALIDATION_SEED, 0).image)
        assert np.min(np.abs(np.asarray(scorer.calibration.normal_scores) - normal.score)) < 1e-5
        assert 0.0 < normal.percentile_among_normals < 100.0
        # Test case 11 has a pleural effusion (test AUC for effusion ≈ 1).
        effusion = scorer.score(generate_case("cxr-anomaly", TEST_SEED, 11).image)
    assert effusion.score > normal.score
    assert effusion.percentile_among_normals == 100.0 and effusion.z > 3.0
    assert np.isfinite([effusion.score, effusion.z, *effusion.components.values()]).all()
