"""The simple baseline every CADe phantom benchmark is measured against: a linear model on sphere labels.

A logistic regression per voxel over fixed multi-scale features — the working-frame intensity, its
Gaussian blurs and scale-normalised Laplacian-of-Gaussian blob responses (the classic CADe blob
filter) — trained on the same weak targets, cases and lesion-balanced samples as the U-Net, and scored
through the same candidate extraction (:func:`services.cade.candidates.find_candidates`) and FROC
(:func:`services.evaluation.cade_report.evaluate_cade`). If this baseline scored near the U-Net the
phantom would be too easy to say anything; the card records both.

    python -m training.cade.baseline --task chest-ct-nodule --out runs/cade-baseline --cases 10 --test-cases 20
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.linear_model import LogisticRegression

from services.cade.candidates import find_candidates
from services.cade.preprocess import to_working
from services.core.io import read_image
from services.evaluation.cade_report import Predictions, evaluate_cade, read_truth, write_report
from training.cade.evaluate import report_metrics
from training.cade.samples import WorkingCase, manifest_cases, phantom_split, working_cases
from training.cade.tasks import CadeTask, get_task
from training.cade.train import indexed_case

#: Blur and blob scales in working voxels (1.5 mm in 3D: blobs of about 3–25 mm across).
BLUR_SIGMAS = (1.0, 2.0, 4.0)
BLOB_SIGMAS = (1.0, 1.5, 2.5, 4.0, 6.0)
#: Voxels drawn per case for fitting (half lesion-balanced, half background pool).
SAMPLES_PER_CASE = 4000


def features(image: np.ndarray) -> np.ndarray:
    """(F, *spatial) float32: intensity, blurs, and −σ²∇²G blob responses (bright blobs positive)."""
    image = np.asarray(image, dtype=np.float32)
    layers = [image]
    layers += [ndimage.gaussian_filter(image, s) for s in BLUR_SIGMAS]
    layers += [-(s**2) * ndimage.gaussian_laplace(image, s) for s in BLOB_SIGMAS]
    return np.stack(layers).astype(np.float32)


@dataclass(frozen=True)
class LinearBaseline:
    """Weights over :func:`features`; ``probability`` maps a working-frame image to a lesion map."""

    weights: tuple[float, ...]
    bias: float

    def probability(self, image: np.ndarray) -> np.ndarray:
        logit = np.tensordot(np.asarray(self.weights, np.float32), features(image), axes=1) + self.bias
        return (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)


def fit_baseline(cases: list[WorkingCase], tile: tuple[int, ...], seed: int) -> LinearBaseline:
    """Logistic regression on lesion-balanced positives and the hard-negative pool, as the U-Net samples."""
    rng = np.random.default_rng(seed)
    rows, targets = [], []
    for case in cases:
        indexed = indexed_case(case, tile, rng)
        image = np.asarray(indexed.image)[0]
        stack = features(image).reshape(len(BLUR_SIGMAS) + len(BLOB_SIGMAS) + 1, -1)
        half = SAMPLES_PER_CASE // 2
        for pool, target in ((indexed.fg, 1), (indexed.bg, 0)):
            if pool.size:
                picks = rng.choice(pool, half)
                rows.append(stack[:, picks].T)
                targets.append(np.full(half, target))
    model = LogisticRegression(max_iter=2000, C=1.0).fit(np.concatenate(rows), np.concatenate(targets))
    return LinearBaseline(tuple(float(w) for w in model.coef_[0]), float(model.intercept_[0]))


def evaluate_baseline(task: CadeTask, baseline: LinearBaseline, manifest: Path, out_dir: Path) -> dict:
    """FROC of the baseline over ``manifest`` through the served candidate extraction."""
    spec = task.detector_spec()
    case_ids, candidates = [], []
    for case in manifest_cases(manifest):
        image = read_image(case.image)
        working = to_working(image, spec.frame, spec.intensity)
        array = np.asarray(working.array)
        spatial = array[0] if task.dims == 2 else array
        probability = baseline.probability(spatial).reshape(array.shape)
        found = find_candidates(
            probability,
            working.grid,
            floor=spec.floor,
            nms_radius_mm=spec.nms_radius_for(working),
            max_count=spec.max_candidates,
            report_grid=image.grid,
        )
        case_ids.append(case.case_id)
        candidates += [c.to_candidate(case.case_id) for c in found]
    predictions = Predictions(task.name, "linear-baseline", "1", tuple(case_ids), tuple(candidates))
    report = evaluate_cade(read_truth(manifest), predictions)
    write_report(report, out_dir)
    return report_metrics(report, "test")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="chest-ct-nodule")
    parser.add_argument("--out", type=Path, required=True, help="folder for phantoms and baseline.json")
    parser.add_argument("--cases", type=int, default=10, help="training cases (the first of the train seed)")
    parser.add_argument("--test-cases", type=int, default=20, help="held-out test cases (test seed)")
    parser.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="phantom grid size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    size = tuple(args.size) if args.size else None
    task = get_task(args.task)
    data = args.out / "data"
    train = working_cases(task, phantom_split(task, "train", args.cases, data, size))
    baseline = fit_baseline(train, task.tile, args.seed)
    metrics = evaluate_baseline(
        task, baseline, phantom_split(task, "test", args.test_cases, data, size), args.out
    )
    record = {
        "task": task.name,
        "command": " ".join(["python -m training.cade.baseline", *(argv or sys.argv[1:])]),
        "train_seed": task.seeds.train,
        "test_seed": task.seeds.test,
        "weights": baseline.weights,
        "bias": baseline.bias,
        "metrics": metrics,
    }
    (args.out / "baseline.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
