"""The shipped CADe detectors (model_repository/cade_<task>): complete cards, served as evaluated.

Accuracy itself is measured by the training command on the test seed and recorded in the card; these
tests check what must hold for any shipped detector: the card's provenance and operating points, the
≤ 20 MB rule, and that the served pipeline finds a large lesion in a held-out case (test seed, never
trained on) while refusing inputs of the wrong kind.
"""

from __future__ import annotations

import numpy as np
import pytest

from services.cade.cutoff import detect_at
from services.cade.model import CadeModel
from services.cade.tasks import TASKS
from services.core.errors import InputError
from services.core.grid import Grid
from services.inference.card import CARD_FILE, ModelCard, sha256_file
from services.inference.factory import default_repository
from training.cade.tasks import get_task

REPOSITORY = default_repository()
SHIPPED = [name for name, task in TASKS.items() if (REPOSITORY / task.model_name / CARD_FILE).is_file()]
MAX_MODEL_BYTES = 20 * 1024 * 1024
#: Held-out seeds: the test seed of each task (training/cade/tasks.py), never trained on.
TEST_SEEDS = {name: get_task(name).seeds.test for name in TASKS}


def test_every_detector_ships() -> None:
    assert set(SHIPPED) == set(TASKS)


@pytest.mark.parametrize("task_name", SHIPPED)
def test_the_card_records_provenance_metrics_and_operating_points(task_name: str) -> None:
    task = TASKS[task_name]
    model_dir = REPOSITORY / task.model_name
    card = ModelCard.read(model_dir)
    version, entry = max(card.versions.items(), key=lambda kv: int(kv[0]))
    onnx = model_dir / version / "model.onnx"
    assert onnx.stat().st_size <= MAX_MODEL_BYTES
    assert entry.sha256 == sha256_file(onnx)
    assert "training.cade" in entry.command or "wlcad train cade" in entry.command
    for key in ("test_cpm", "test_cpm_ci_low", "test_cpm_ci_high", "test_cases", "training_seconds"):
        assert key in entry.metrics, key
    assert entry.metrics["test_cpm_ci_low"] <= entry.metrics["test_cpm"] <= entry.metrics["test_cpm_ci_high"]
    assert str(TEST_SEEDS[task_name]) in entry.data_manifest
    points = entry.extra["operating_points"]
    assert {"1", "2", "4"} <= set(points)
    assert points["1"] >= points["2"] >= points["4"]  # more FP allowed → a lower cut-off
    with CadeModel(task, repository=REPOSITORY) as model:
        if model.classifier is not None:  # a two-stage detector ranks by its classifier: its card's points
            classifier = ModelCard.read(REPOSITORY / model.classifier.name).versions[
                str(model.classifier.number)
            ]
            points = classifier.extra["operating_points"]
            assert classifier.extra["first_stage_model"] == f"{task.model_name}/{version}"
        assert model.default_threshold() == pytest.approx(points[f"{task.default_fp_rate:g}"])


def _held_out_case_with_a_large_lesion(task_name: str, tmp_path):
    """The largest lesion among the first test-seed cases: (image path, centre mm, diameter mm)."""
    import csv

    from training.data.dataset import write_dataset

    folder = tmp_path / "data"
    write_dataset(task_name, 3, TEST_SEEDS[task_name], folder)
    with open(folder / "manifest.csv", newline="") as handle:
        lesions = [r for r in csv.DictReader(handle) if r["lesion_id"]]
    largest = max(lesions, key=lambda r: float(r["diameter_mm"]))
    centre_mm = np.array([float(largest[f"center_{axis}_mm"] or 0.0) for axis in "xyz"])
    return folder / largest["image"], centre_mm, float(largest["diameter_mm"])


@pytest.mark.parametrize("task_name", SHIPPED)
def test_a_large_held_out_lesion_is_among_the_top_candidates(task_name: str, tmp_path) -> None:
    from services.core.io import read_image

    image_path, centre_mm, diameter_mm = _held_out_case_with_a_large_lesion(task_name, tmp_path)
    task = TASKS[task_name]
    with CadeModel(task, repository=REPOSITORY) as model:
        result = detect_at(model, read_image(image_path), threshold=model.threshold_for(4.0))
    assert result.candidates, "no candidate at the 4 FP/case operating point"
    distances = [
        np.linalg.norm(np.asarray(c.center_mm)[: task.dims] - centre_mm[: task.dims])
        for c in result.candidates[:8]
    ]
    assert min(distances) <= diameter_mm / 2.0  # a hit by LUNA16 and ADAM alike: within the radius


@pytest.mark.parametrize("task_name", SHIPPED)
def test_an_image_of_the_other_kind_is_refused_naming_image(task_name: str) -> None:
    task = TASKS[task_name]
    shape = (1, 300, 300) if task.dims == 3 else (40, 64, 64)
    wrong = Grid(shape, (1.0, 1.0, 1.0)).with_array(np.zeros(shape, np.int16))
    with CadeModel(task, repository=REPOSITORY) as model, pytest.raises(InputError) as caught:
        detect_at(model, wrong, threshold=0.5)
    assert caught.value.field == "image"
