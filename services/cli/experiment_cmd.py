"""``wlcad experiment sphere-vs-painted``: the report's label experiment for a CADe task.

Registered torch-free (the options are plain argparse; :mod:`training.cade.experiment` is imported by
the handler, and torch only when an arm trains). ``wlcad experiment`` itself is created by
:mod:`services.cli.train_cmd` (its leave-one-type-out protocol); this module adds a protocol to it,
so it must be registered after ``train_cmd``.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path

from services.core.errors import InputError


def _protocols(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-commands of ``wlcad experiment`` (created here if train_cmd did not)."""
    experiment = commands.choices.get("experiment")
    if experiment is None:
        experiment = commands.add_parser("experiment", help="run a published evaluation protocol")
        return experiment.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    for action in experiment._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return experiment.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)


def register(commands: argparse._SubParsersAction) -> None:
    parser = _protocols(commands).add_parser(
        "sphere-vs-painted",
        help="train on sphere and on painted labels at several training-set sizes; CPM vs cases",
        description=(
            "For each training-set size, train the CADe detector on sphere labels (centre + max "
            "diameter) and on exact painted masks (same seed, cases and budget), evaluate both on one "
            "held-out test set, and report CPM with 95 % CIs per shape family and the cases spheres need "
            "to match painted labels. Resumable: an arm whose result.json exists is not rerun. CPU time: "
            "about 0.55 s per step (batch 4, 64³) on 2 free cores, 1.6-1.9 s with other work beside it "
            "(measured: 300 steps = 484-570 s per arm); 600 steps ≈ 6-20 min per arm, 8 arms ≈ 1-3 h; "
            "raise --steps/--batch-size with --device cuda on an accelerator."
        ),
    )
    parser.add_argument("--task", default="chest-ct-nodule", help="CADe task (default chest-ct-nodule)")
    parser.add_argument(
        "--cases", default="10,20,40,80", help="comma-separated training-set sizes (default 10,20,40,80)"
    )
    parser.add_argument("--out", type=Path, required=True, help="experiment folder (resumable)")
    parser.add_argument("--test-cases", type=int, default=30, help="held-out test cases (default 30)")
    parser.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="phantom grid size")
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps per arm (default 600)")
    parser.add_argument("--batch-size", type=int, default=4, help="patches per step (default 4)")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument(
        "--patch", type=int, nargs="+", metavar="N", help="training patch (default: the tile)"
    )
    parser.add_argument(
        "--norm", choices=("instance", "batch"), default="instance", help="U-Net normalisation"
    )
    parser.add_argument("--seed", type=int, default=0, help="network and patch seed, the same for every arm")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--device", default="cpu", help="torch device for training, e.g. cpu or cuda")
    parser.set_defaults(handler=run_sphere_vs_painted)


def _require_training_extra() -> None:
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("monai") is None:
        raise InputError("training needs torch and monai: pip install -e '.[train]'", field="command")


def run_sphere_vs_painted(args: argparse.Namespace) -> int:
    from training.cade.experiment import ExperimentSettings, parse_cases, run_sphere_vs_painted

    settings = ExperimentSettings(
        task=args.task,
        cases=parse_cases(args.cases),
        test_cases=args.test_cases,
        size_xyz=tuple(args.size) if args.size else None,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        patch=tuple(args.patch) if args.patch else None,
        norm=args.norm,
        seed=args.seed,
        n_resamples=args.resamples,
        threads=args.threads,
        device=args.device,
        command="wlcad " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    settings.check()  # bad options fail before anything is written or torch is looked for
    _require_training_extra()
    result = run_sphere_vs_painted(
        args.out, settings, progress=lambda line: print(line, file=sys.stderr, flush=True)
    )
    print(result.table.read_text(), end="")
    print(f"wrote {result.json}, {result.table}, {result.plot} ({result.trained} arm(s) trained this run)")
    return 0
