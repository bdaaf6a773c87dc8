"""Phantom cases of one split, preprocessed exactly as serving does and cached as grey levels.

Generating a head CT costs about a second, so each (task, seed, n) is generated once and kept as
``<cache>/<task>_s<seed>_n<n>_l<levels>.npz``: uint8 levels at the model shape, the presence label and the
finding type of every case (``normal`` for normals).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from services.anomaly.preprocess import normalised, quantise
from services.anomaly.tasks import anomaly_task
from training.anomaly.tasks import SPLITS, plan_for
from training.data.dataset import generate_case

_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_cache() -> Path:
    return Path(os.environ.get("WLCAD_ANOMALY_CACHE", _REPO_ROOT / ".cache" / "anomaly"))


@dataclass(frozen=True)
class Split:
    """One split's cases: ``levels`` (n, z, y, x) uint8, ``abnormal`` (n,), ``finding`` (n,) str."""

    task: str
    seed: int
    levels: np.ndarray
    abnormal: np.ndarray
    finding: np.ndarray
    case_ids: np.ndarray

    def normals(self) -> np.ndarray:
        return self.levels[~self.abnormal]


def load_split(task: str, seed: int, n: int, cache: Path | None = None, progress: bool = True) -> Split:
    """Cases 0..n−1 of (task, seed), from the cache or generated (and cached) now."""
    cache = cache or default_cache()
    spec = anomaly_task(task)
    path = cache / f"{task}_s{seed}_n{n}_l{spec.levels}.npz"  # the levels too: they change the cache
    if not path.is_file():
        levels = np.zeros((n, *spec.shape), np.uint8)
        abnormal = np.zeros(n, bool)
        finding = []
        for i in tqdm(range(n), desc=f"{task} seed {seed}", disable=not progress):
            case = generate_case(task, seed, i)
            levels[i] = quantise(normalised(case.image.array, spec), spec.levels)
            abnormal[i] = case.abnormal
            finding.append(case.lesions[0].lesion_type if case.lesions else "normal")
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = np.array([f"{task}-s{seed}-{i:04d}" for i in range(n)])
        staged = path.with_suffix(".tmp.npz")
        np.savez_compressed(staged, levels=levels, abnormal=abnormal, finding=np.array(finding), case_ids=ids)
        os.replace(staged, path)
    with np.load(path) as data:
        return Split(task, seed, data["levels"], data["abnormal"], data["finding"], data["case_ids"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate and cache an anomaly task's splits.")
    parser.add_argument("--task", required=True)
    args = parser.parse_args(argv)
    plan = plan_for(args.task)
    for split in SPLITS:
        data = load_split(args.task, plan.seeds.of(split), plan.cases[split])
        print(
            split,
            len(data.abnormal),
            "abnormal",
            int(data.abnormal.sum()),
            dict(zip(*np.unique(data.finding, return_counts=True), strict=True)),
        )


if __name__ == "__main__":
    main()
