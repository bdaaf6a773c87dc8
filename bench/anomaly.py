"""Anomaly scoring speed (issue 13: goal ≤ 50 ms, bar ≤ 100 ms per radiograph on 2 cores; per head CT
volume reported): the shipped ``anomaly_<task>_<model>`` models through :class:`AnomalyScorer`
(embedded onnxruntime, what ``wlcad score`` will run), on full-size phantoms generated in memory.
Preprocessing (intensity scale + resize + quantisation) and the network are timed apart.
``--setting triton://host:port`` runs the same code against a Triton server (e.g. ``wlcad triton``);
docs/anomaly.md has both columns, run one after the other on the same cores.

The process is pinned to ``--cores`` CPUs. No asserts on speed: the numbers are printed for the note.

Usage: .venv/bin/python bench/anomaly.py [--repeats 20] [--cores 2] [--setting embedded]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from services.anomaly.preprocess import model_input
from services.anomaly.scoring import AnomalyScorer
from services.anomaly.tasks import MODELS, TASKS
from services.core.errors import InputError
from training.data.dataset import generate_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--setting", default="embedded")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(min(args.cores, os.cpu_count() or 1))))
    for task_name, task in TASKS.items():
        cases = [generate_case(task_name, 9999, i).image for i in range(min(args.repeats, 10))]
        for model in MODELS:
            try:
                scorer = AnomalyScorer(task_name, model, setting=args.setting)
            except InputError:
                print(f"{task_name} {model}: not in the model repository")
                continue
            with scorer:
                scorer.score(cases[0])  # warm-up: session creation
                pre, total = [], []
                for i in range(args.repeats):
                    volume = cases[i % len(cases)]
                    t0 = time.perf_counter()
                    model_input(volume, task)
                    t1 = time.perf_counter()
                    scorer.score(volume)
                    t2 = time.perf_counter()
                    pre.append(t1 - t0)
                    total.append(t2 - t1)
            shape = "×".join(str(s) for s in cases[0].shape_xyz)
            print(
                f"{task_name} {model} ({shape} input): score {1e3 * np.median(total):.1f} ms median "
                f"(of which preprocessing {1e3 * np.median(pre):.1f} ms), p90 {1e3 * np.percentile(total, 90):.1f} ms"
            )


if __name__ == "__main__":
    main()
