"""CADe detector training (training/cade) on a tiny budget: phantoms in the working frame → sphere
targets → MONAI patches → U-Net → ONNX in a model-repository folder with its card.

A smoke run cannot show accuracy (the held-out FROC of a real run does, see the model card); it proves
the command yields a model the serving pipeline accepts, that runs are reproducible from their seeds,
and that test cases never come from training seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

from services.core.errors import InputError
from services.core.io import read_image
from services.inference.card import ModelCard, sha256_file
from training.cade.samples import manifest_cases, phantom_split, working_case, working_cases
from training.cade.settings import CadeTrainingSettings
from training.cade.tasks import SPLITS, TASKS, DataSeeds, get_task
from training.cade.train import (
    MAX_LESION_WEIGHT,
    PatchSampler,
    fit,
    lesion_weights,
    main,
    train_cade,
)

TASK = get_task("chest-ct-nodule")
TINY = (64, 64, 48)  # x, y, z voxels: small enough to train on in seconds, big enough to tile


@pytest.fixture(scope="module")
def train_manifest(tmp_path_factory) -> Path:
    return phantom_split(TASK, "train", 2, tmp_path_factory.mktemp("cade") / "data", TINY)


@pytest.fixture(scope="module")
def cases(train_manifest):
    return working_cases(TASK, train_manifest)


def test_smoke_run_registers_a_servable_onnx_with_a_complete_card(tmp_path: Path) -> None:
    import onnxruntime as ort

    argv = [
        "--out",
        str(tmp_path),
        "--cases",
        "2",
        "--size",
        *map(str, TINY),
        "--steps",
        "3",
        "--batch-size",
        "2",
    ]
    assert main(argv) == 0
    model_dir = tmp_path / "model_repository" / TASK.model_name
    onnx = model_dir / "1" / "model.onnx"
    assert onnx.is_file() and (model_dir / "config.pbtxt").is_file()
    assert onnx.stat().st_size < 20 * 2**20  # the bar for a shipped detector
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(0).random((3, 1, *TASK.tile), dtype=np.float32)  # batch ≠ the export's 1
    (logits,) = session.run(None, {session.get_inputs()[0].name: batch})
    assert logits.shape == batch.shape and np.all(np.isfinite(logits))

    version = ModelCard.read(model_dir).versions["1"]
    assert version.command.startswith("python -m training.cade.train") and "--steps 3" in version.command
    assert version.sha256 == sha256_file(onnx)
    seeds = TASK.seeds
    for seed in (seeds.train, seeds.test, seeds.validation):
        assert f"seed {seed}" in version.data_manifest
    for key in (
        "training_seconds",
        "training_final_loss",
        "training_first_loss",
        "frame_spacing_mm",
        "tile_z",
    ):
        assert key in version.metrics, key
    assert version.metrics["frame_spacing_mm"] == TASK.frame.spacing_mm
    record = json.loads((tmp_path / "training.json").read_text())
    assert len(record["losses"]) == 3 and record["seeds"]["test"] == seeds.test

    # The serving pipeline runs the exported model over a whole phantom and answers on its grid.
    from training.cade.evaluate import onnx_detector

    case = manifest_cases(Path(record["train_manifest"]))[0]
    image = read_image(case.image)
    result = onnx_detector(TASK, onnx, threads=1, model_version="cade_chest-ct-nodule/1").detect(image)
    assert result.task == TASK.name and result.model_version == "cade_chest-ct-nodule/1"
    confidences = [c.confidence for c in result.candidates]
    assert confidences == sorted(confidences, reverse=True)


def settings(tmp_path: Path, seed: int, steps: int = 2) -> CadeTrainingSettings:
    return CadeTrainingSettings(out=tmp_path, steps=steps, batch_size=2, seed=seed, threads=2, progress=False)


def test_the_same_seed_gives_the_same_first_loss(cases, tmp_path: Path) -> None:
    first = fit(TASK, cases, settings(tmp_path, 3, steps=1))[1]
    again = fit(TASK, cases, settings(tmp_path, 3, steps=1))[1]
    other = fit(TASK, cases, settings(tmp_path, 4, steps=1))[1]
    assert first == again
    assert first[0] != other[0]


def test_train_validation_and_test_seeds_are_disjoint() -> None:
    for task in TASKS.values():
        seeds = [task.seeds.of(split) for split in SPLITS]
        assert len(set(seeds)) == len(seeds), task.name
    with pytest.raises(InputError) as error:
        DataSeeds(train=1, validation=2, test=1, hybrid_test=3, hybrid_train=4, feedback=5)
    assert error.value.field == "seeds"


def test_sphere_targets_follow_centre_and_diameter_and_painted_masks_differ(train_manifest) -> None:
    case = next(c for c in manifest_cases(train_manifest) if c.prompts)
    sphere = working_case(TASK, case, "sphere")
    painted = working_case(TASK, case, "painted")
    assert sphere.image.shape == sphere.label.shape == painted.label.shape
    assert sphere.image.dtype == np.float32 and sphere.image.min() >= 0.0 and sphere.image.max() <= 1.0
    voxel_mm3 = TASK.frame.spacing_mm**3
    spheres_mm3 = sum(np.pi / 6 * p.diameter_mm**3 for p in case.prompts)  # lesions rarely overlap
    assert sphere.label.sum() * voxel_mm3 == pytest.approx(spheres_mm3, rel=0.35)
    # A sphere through a lesion's max diameter holds the painted lesion, and more.
    assert painted.label.sum() < sphere.label.sum()
    inside = np.logical_and(painted.label, sphere.label).sum() / max(1, painted.label.sum())
    assert inside > 0.8
    with pytest.raises(InputError) as error:
        working_case(TASK, case, "box")
    assert error.value.field == "target"


def test_patches_are_tiles_and_half_of_them_hold_a_lesion(cases) -> None:
    sampler = PatchSampler(TASK, cases, seed=0)
    images, labels = sampler.batch(16)
    assert images.shape == labels.shape == (16, 1, *TASK.tile)
    with_lesion = int((labels.flatten(1).sum(1) > 0).sum())
    assert 4 <= with_lesion <= 16  # pos = neg = 1: ~8 centred on a lesion, a background crop may hold one too


def test_a_small_lesion_weighs_in_the_loss_like_a_large_one() -> None:
    import torch

    labels = torch.zeros(2, 1, 32, 32, 32)
    labels[0, 0, 2:4, 2:4, 2:4] = 1  # 8 voxels: capped weight
    labels[0, 0, 10:30, 10:30, 10:30] = 1  # 8000 voxels: weight 1
    labels[1, 0, 5:10, 5:10, 5:10] = 1  # 125 voxels: 500 / 125 = 4
    weights = lesion_weights(labels, 500)
    assert weights.shape == labels.shape
    assert float(weights[0, 0, 0, 0, 0]) == 1.0  # background
    assert float(weights[0, 0, 2, 2, 2]) == MAX_LESION_WEIGHT
    assert float(weights[0, 0, 20, 20, 20]) == 1.0
    assert float(weights[1, 0, 7, 7, 7]) == pytest.approx(500 / 125)
    assert float(weights[1][labels[1] > 0].sum()) == pytest.approx(500)


@pytest.mark.parametrize(
    ("name", "value"), [("steps", 0), ("target", "box"), ("cases", 0), ("learning_rate", 0.0)]
)
def test_bad_settings_name_the_field(tmp_path: Path, name: str, value) -> None:
    bad = settings(tmp_path, 0)
    setattr(bad, name, value)
    with pytest.raises(InputError) as error:
        train_cade(TASK, bad)
    assert error.value.field == name
    assert not (tmp_path / "data").exists()  # refused before any phantom is written


def test_an_unknown_task_is_refused() -> None:
    with pytest.raises(InputError) as error:
        get_task("knee-mr-tear")
    assert error.value.field == "task"


def test_the_cli_options_load_without_torch() -> None:
    """``wlcad`` registers ``train cade`` from training.cade.settings: it must not need the train extra."""
    import subprocess
    import sys

    code = "import sys, training.cade.settings; sys.exit('torch' in sys.modules or 'monai' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


# ----------------------------------------------------------------------------- patch sampling pools
def test_every_lesion_is_a_patch_centre_equally_often_whatever_its_size() -> None:
    """A 1-voxel nodule and a 20³ mass get the same number of candidate centres (drawing from all
    lesion voxels would centre the big one 8000 times as often)."""
    from training.cade.train import FOREGROUND_PER_LESION, lesion_balanced

    label = np.zeros((40, 40, 40), np.uint8)
    label[2:22, 2:22, 2:22] = 1
    label[30, 30, 30] = 1
    picks = lesion_balanced(label, np.random.default_rng(0))
    small = np.ravel_multi_index((30, 30, 30), label.shape)
    assert picks.size == 2 * FOREGROUND_PER_LESION
    assert np.count_nonzero(picks == small) == FOREGROUND_PER_LESION
    assert np.all(label.ravel()[picks] == 1)
    assert lesion_balanced(np.zeros((8, 8, 8), np.uint8), np.random.default_rng(0)).size == 0


def test_background_pool_holds_no_lesion_voxel_and_favours_bright_structure() -> None:
    from training.cade.samples import WorkingCase
    from training.cade.train import BRIGHT_LEVEL, indexed_case

    image = np.zeros((1, 64, 64, 64), np.float32)
    image[0, :, 10:30, 10:30] = 0.9  # bright structure: 10 % of the volume, the whole body here
    label = np.zeros((1, 64, 64, 64), np.uint8)
    label[0, 40:44, 40:44, 40:44] = 1
    image[label > 0] = 0.9
    case = indexed_case(WorkingCase("c", image, label), (64, 64, 64), np.random.default_rng(0))
    assert not np.any(label.ravel()[case.bg])
    bright_share = np.mean(image.ravel()[case.bg] > BRIGHT_LEVEL)
    assert bright_share > 0.5  # the body and bright pools by design, against 10 % by volume


def test_a_volume_smaller_than_the_tile_is_padded_with_air() -> None:
    from training.cade.samples import WorkingCase
    from training.cade.train import indexed_case

    image = np.full((1, 10, 70, 30), 0.5, np.float32)
    label = np.zeros((1, 10, 70, 30), np.uint8)
    label[0, 5, 5, 5] = 1
    case = indexed_case(WorkingCase("c", image, label), (64, 64, 64), np.random.default_rng(0))
    assert tuple(case.image.shape) == (1, 64, 70, 64)
    assert float(case.image[0, 20, 0, 0]) == 0.0
    flat = np.ravel_multi_index((5, 5, 5), (64, 70, 64))
    assert np.all(case.fg == flat)


def test_more_levels_than_the_tile_can_halve_are_refused_naming_channels(tmp_path: Path) -> None:
    settings = CadeTrainingSettings(
        out=tmp_path, cases=1, steps=1, channels=(4, 8, 16, 32, 64, 128, 256, 512)
    )
    with pytest.raises(InputError) as caught:
        train_cade(TASK, settings)
    assert caught.value.field == "channels"
    assert not (tmp_path / "data").exists()


def test_operating_points_come_from_validation_cases_into_the_card(tmp_path: Path) -> None:
    """The card's cut-offs are measured on the validation seed (never trained or tested on) and read
    back by the serving model as its operating points."""
    from services.cade.model import CadeModel

    argv = ["--out", str(tmp_path), "--cases", "1", "--size", *map(str, TINY), "--steps", "1"]
    assert main([*argv, "--batch-size", "1", "--validation-cases", "1"]) == 0
    card = ModelCard.read(tmp_path / "model_repository" / TASK.model_name)
    points = card.versions["1"].extra["operating_points"]
    assert set(points) <= {"1", "2", "4"} and all(0.0 <= v <= 1.0 for v in points.values())
    validation = phantom_split(TASK, "validation", 1, tmp_path / "data", TINY)
    assert "s1102" in validation.read_text()
    assert (tmp_path / "evaluation" / "validation" / "froc.json").is_file()
    model = CadeModel(TASK.serving, repository=tmp_path / "model_repository")
    assert {f"{r:g}": t for r, t in model.operating_points.items()} == points


def test_a_finished_run_is_calibrated_on_validation_cases(tmp_path: Path) -> None:
    from training.cade.evaluate import calibrate_run

    argv = ["--out", str(tmp_path), "--cases", "1", "--size", *map(str, TINY), "--steps", "1"]
    assert main([*argv, "--batch-size", "1"]) == 0
    model_dir = tmp_path / "model_repository" / TASK.model_name
    assert "operating_points" not in ModelCard.read(model_dir).versions["1"].extra
    points = calibrate_run(tmp_path, 1, threads=1)
    entry = ModelCard.read(model_dir).versions["1"]
    assert entry.extra["operating_points"] == points
    assert "validation seed 1102 × 1 cases" in entry.data_manifest
    assert entry.sha256 == sha256_file(model_dir / "1" / "model.onnx")


def _with_hard_negative(manifest: Path, out: Path) -> Path:
    """``manifest`` plus one reader-rejected candidate (``wlcad feedback ingest``'s columns) on case 0,
    placed in the body but away from every lesion."""
    import csv

    rows = list(csv.DictReader(manifest.open()))
    first = rows[0]
    image = read_image(manifest.parent / first["image"])
    lesions = [
        np.array([float(r["center_x_mm"]), float(r["center_y_mm"]), float(r["center_z_mm"])])
        for r in rows
        if r["case_id"] == first["case_id"] and r["lesion_id"]
    ]
    world = image.grid.world_grid().reshape(-1, 3)
    inside = np.asarray(image.array).ravel() > -500
    far = np.min([np.linalg.norm(world - c, axis=1) for c in lesions], axis=0) > 25 if lesions else inside
    centre = tuple(float(v) for v in world[np.flatnonzero(inside & far)[0]])
    negative = {key: "" for key in first} | {
        "case_id": first["case_id"],
        "image": first["image"],
        "mask": first["mask"],
        "abnormal": first["abnormal"],
        "center_x_mm": f"{centre[0]:.3f}",
        "center_y_mm": f"{centre[1]:.3f}",
        "center_z_mm": f"{centre[2]:.3f}",
        "diameter_mm": "9.0",
        "label_source": "reader-fp",
        "hard_negative": "true",
    }
    grown = out / "grown.csv"
    with grown.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*first.keys(), "label_source", "hard_negative"])
        writer.writeheader()
        writer.writerows([{**r, "label_source": "", "hard_negative": ""} for r in rows] + [negative])
    for folder in ("images", "masks"):
        (out / folder).symlink_to(manifest.parent / folder)
    return grown


def test_hard_negatives_from_reader_feedback_get_a_quarter_of_the_background_patches(
    train_manifest, tmp_path: Path
) -> None:
    grown = _with_hard_negative(train_manifest, tmp_path)
    plain = working_cases(TASK, train_manifest)
    cases = working_cases(TASK, grown)
    assert [c.label.sum() for c in cases] == [c.label.sum() for c in plain]  # no label changed
    rejected = cases[0].hard_negative
    assert rejected.size > 0 and all(c.hard_negative.size == 0 for c in cases[1:])
    assert not cases[0].label.ravel()[rejected].any()
    sampler = PatchSampler(TASK, cases, seed=0)
    padded = sampler.cases[0].label.shape[1:]
    in_rejected = np.isin(
        sampler.cases[0].bg,
        np.ravel_multi_index(np.unravel_index(rejected, cases[0].label.shape[1:]), padded),
    )
    assert 0.2 < in_rejected.mean() < 0.3
    result = train_cade(TASK, _manifest_settings(tmp_path, grown))
    assert json.loads(result.training_json.read_text())["train_manifest"] == str(grown)


def _manifest_settings(tmp_path: Path, manifest: Path) -> CadeTrainingSettings:
    run = settings(tmp_path / "run", 0)
    run.train_manifest = manifest
    return run
