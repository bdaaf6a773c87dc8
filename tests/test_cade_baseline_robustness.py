"""The CADe benchmark's two honesty checks: the linear baseline a detector must beat, and the
degradations (thick slices, more noise) a detector is reported on without retraining."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from services.core.grid import Grid
from services.core.io import read_image
from training.cade.baseline import BLOB_SIGMAS, BLUR_SIGMAS, features, fit_baseline
from training.cade.robustness import THICK_SLICE_MM, degraded_split, extra_noise, thick_slices
from training.cade.samples import WorkingCase, phantom_split
from training.cade.tasks import get_task


def _ball(shape: tuple[int, int, int], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    return ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) <= radius**2


def test_blob_features_peak_at_a_blob_centre() -> None:
    image = 0.1 + 0.6 * _ball((32, 32, 32), (16, 16, 16), 3.0).astype(np.float32)
    stack = features(image)
    assert stack.shape == (1 + len(BLUR_SIGMAS) + len(BLOB_SIGMAS), 32, 32, 32)
    blob = stack[1 + len(BLUR_SIGMAS) + 2]  # σ = 2.5 voxels, about a radius-3 ball's scale
    assert np.unravel_index(np.argmax(blob), blob.shape) == (16, 16, 16)


def test_the_linear_baseline_learns_blob_from_background() -> None:
    rng = np.random.default_rng(0)
    cases = []
    for n in range(2):
        image = (0.1 + 0.02 * rng.standard_normal((48, 48, 48))).astype(np.float32)
        image[:, 30:34, :] = 0.7  # a bright slab (vessel wall, chest wall): not a lesion
        lesion = _ball((48, 48, 48), (12 + n, 14, 20), 3.0)
        image[lesion] = 0.7
        cases.append(WorkingCase(f"c{n}", image[None], lesion[None].astype(np.uint8)))
    baseline = fit_baseline(cases, (48, 48, 48), seed=0)
    probability = baseline.probability(cases[0].image[0])
    assert probability[12, 14, 20] > 0.5
    assert probability[12, 14, 20] > probability[24, 32, 24] + 0.2  # blob beats slab


def test_thick_slices_keep_the_world_box_and_erase_small_detail() -> None:
    grid = Grid((60, 32, 32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    array = np.zeros(grid.shape, np.float32)
    array[_ball(grid.shape, (30, 16, 16), 1.5)] = 1000.0
    thick = thick_slices(grid.with_array(array))
    assert thick.spacing[2] == pytest.approx(THICK_SLICE_MM)
    assert thick.shape_xyz[2] == 12
    corner = grid.index_to_world(np.full(3, -0.5))
    assert np.allclose(thick.grid.index_to_world(np.full(3, -0.5)), corner)
    assert 0 < float(np.max(thick.array)) < 700.0  # partial volume over 5 mm
    already = grid.respaced([1.0, 1.0, 5.0]).with_array(np.zeros((12, 32, 32), np.float32))
    assert thick_slices(already) is already


def test_extra_noise_adds_the_stated_sd() -> None:
    grid = Grid((20, 40, 40), (1.0, 1.0, 1.0))
    noisy = extra_noise(grid.with_array(np.zeros(grid.shape, np.float32)), 40.0, np.random.default_rng(0))
    assert float(np.std(noisy.array)) == pytest.approx(40.0, rel=0.05)


def test_a_degraded_split_keeps_every_truth_row(tmp_path: Path) -> None:
    task = get_task("chest-ct-nodule")
    manifest = phantom_split(task, "test", 1, tmp_path / "data", (64, 64, 48))
    degraded = degraded_split(task, manifest, "low-dose", tmp_path / "low-dose")
    with open(manifest, newline="") as a, open(degraded, newline="") as b:
        before, after = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        assert {k: v for k, v in old.items() if k not in ("image", "mask")} == {
            k: v for k, v in new.items() if k not in ("image", "mask")
        }
    original = read_image(manifest.parent / before[0]["image"])
    noisier = read_image(after[0]["image"])
    assert noisier.grid.same_grid(original)
    assert (
        float(np.std(np.asarray(noisier.array, np.float32) - np.asarray(original.array, np.float32))) > 30.0
    )
