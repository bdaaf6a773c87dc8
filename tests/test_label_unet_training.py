"""The U-Net training path end to end on a tiny budget: phantoms → VOIs → train → ONNX → served.

A smoke run (a few optimiser steps) cannot show accuracy — tests/test_label_unet_model.py judges the
shipped model — but it proves the training command produces a model the serving path accepts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from services.core.manifest import read_lesions
from services.inference.export import register_onnx_model
from services.label_estimation.model import UnetModel
from services.label_estimation.pipeline import LabelEstimator
from services.label_estimation.unet import MODEL_NAME
from services.label_estimation.voi import VOI_SIZE
from tests.conftest import run_cli
from training.data.dataset import write_dataset
from training.label_unet.augment import RandIntensityInversiond
from training.label_unet.samples import lesion_vois


def test_training_command_produces_a_servable_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli(
        "train", "label-unet", "--types", "liver-mr-lesion", "--cases", "1", "--steps", "3", "--batch-size", "2",
        "--variants", "1", "--workers", "0", "--out", str(out), timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "training.json").read_text())
    assert record["voi_count"] >= 1 and record["types"] == ["liver-mr-lesion"]
    repository = tmp_path / "repository"
    register_onnx_model(
        repository, MODEL_NAME, out / "model.onnx", command="test", data_manifest="test", seed=0, metrics={}
    )
    manifest = next((out / "data").glob("*/manifest.csv"))
    lesion = next(lesion for lesion in read_lesions(manifest) if lesion.prompt is not None)
    from services.core.io import read_image

    image = read_image(lesion.image)
    with UnetModel(setting="embedded", repository=repository) as model:
        estimate = LabelEstimator(model).estimate(image, [lesion.prompt], "unet")[0]
    assert estimate.model_version == f"{MODEL_NAME}/1"
    assert (
        estimate.qc.mean_probability_inside is not None and 0.0 <= estimate.qc.mean_probability_inside <= 1.0
    )
    assert estimate.mask.image is image


def test_training_vois_are_cut_like_serving_and_targets_match(tmp_path: Path) -> None:
    write_dataset("brain-mr-metastasis", 1, 77, tmp_path, size_xyz=(128, 128, 64))
    lesions = read_lesions(tmp_path / "manifest.csv")
    vois = lesion_vois(lesions, "brain-mr-metastasis", variants=2, seed=0)
    assert vois.images.shape[1:] == (1, VOI_SIZE, VOI_SIZE, VOI_SIZE)
    assert vois.images.dtype == np.float32 and vois.images.min() >= 0 and vois.images.max() <= 1
    # The exact-prompt VOI (variant 0) of a lesion holds it in its middle: the stated diameter spans half the VOI.
    exact = vois.targets[0, 0]
    assert exact.any()
    centre = np.argwhere(exact).mean(0)
    np.testing.assert_allclose(centre, (VOI_SIZE - 1) / 2, atol=VOI_SIZE / 8)
    assert np.ptp(np.argwhere(exact)[:, 2]) <= VOI_SIZE * 0.6


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_intensity_inversion_flips_polarity(prob: float) -> None:
    import torch

    image = torch.linspace(0, 1, 27).reshape(1, 3, 3, 3)
    out = RandIntensityInversiond("image", prob=prob)({"image": image})["image"]
    expected = 1 - image if prob == 1.0 else image
    assert torch.allclose(out, expected)
