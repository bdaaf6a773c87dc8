"""The shipped cxr-anomaly models, scored as ``wlcad score`` will: a phantom generated from its
seed, read as a Volume, scored through the embedded backend from model_repository."""

from __future__ import annotations

import numpy as np
import pytest

from services.anomaly.scoring import AnomalyScorer
from services.inference.card import ModelCard, sha256_file
from services.inference.factory import default_repository
from training.data.dataset import generate_case

VALIDATION_SEED, TEST_SEED = 1302, 1303  # training/anomaly/tasks.py


@pytest.mark.parametrize("model", ["glow", "two-flow"])
def test_shipped_card_matches_file_and_beats_the_baseline(model):
    model_dir = default_repository() / f"anomaly_cxr-anomaly_{model}"
    card = ModelCard.read(model_dir).versions["1"]
    onnx = model_dir / "1" / "model.onnx"
    assert card.sha256 == sha256_file(onnx)
    assert onnx.stat().st_size <= 20 * 2**20
    assert card.metrics["test_auc"] > card.metrics["baseline_test_auc"]
    assert card.metrics["test_auc_ci_low"] < card.metrics["test_auc"] < card.metrics["test_auc_ci_high"]
    assert card.extra["calibration"]["seed"] == VALIDATION_SEED


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
