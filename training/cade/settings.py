"""Settings of a CADe training run and their command-line options: torch-free, so the ``wlcad`` CLI can
register ``wlcad train cade`` without importing the ``train`` extra."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from services.core.errors import InputError
from training.cade.samples import TARGETS, Target

#: The U-Net's channels per level (training.cade.network builds it).
CHANNELS = (16, 32, 64, 128)
NORMS = ("instance", "batch")


@dataclass
class CadeTrainingSettings:
    """Everything a run depends on (recorded in training.json). CPU-friendly defaults: 2 threads."""

    out: Path = Path("runs/cade")
    cases: int = 40
    #: A manifest to train on instead of the phantom train split (e.g. one grown by ``wlcad feedback
    #: ingest``: reader-confirmed lesions as spheres, reader-rejected candidates as hard negatives).
    train_manifest: Path | None = None
    test_cases: int = 0
    #: Validation cases the card's operating points are measured on (0: no operating points).
    validation_cases: int = 0
    hybrid_test_cases: int = 0
    size_xyz: tuple[int, int, int] | None = None
    target: Target = "sphere"
    steps: int = 600
    batch_size: int = 4
    learning_rate: float = 2e-3
    seed: int = 0
    channels: tuple[int, ...] = CHANNELS
    #: Training patch (array order); None → the serving tile. A smaller patch shows the network many
    #: more lesions per second; with ``norm="batch"`` the served tile size does not change what it computes.
    patch: tuple[int, ...] | None = None
    #: "instance" (statistics of each tile) or "batch" (running statistics, fixed at export).
    norm: str = "instance"
    #: > 0: every lesion weighs in the BCE as if it had at least this many voxels (0: plain BCE).
    lesion_weight_voxels: int = 0
    threads: int = 2
    device: str = "cpu"
    #: Where the model is registered; None → ``out/model_repository`` (never the shipped one by default).
    repository: Path | None = None
    command: str = ""
    progress: bool = True

    def check(self) -> None:
        for name in ("cases", "steps", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise InputError(f"must be ≥ 1, got {getattr(self, name)}", field=name)
        for name in ("test_cases", "validation_cases", "hybrid_test_cases"):
            if getattr(self, name) < 0:
                raise InputError(f"must be ≥ 0, got {getattr(self, name)}", field=name)
        if self.train_manifest is not None and not Path(self.train_manifest).is_file():
            raise InputError(f"{self.train_manifest} does not exist", field="train_manifest")
        if self.lesion_weight_voxels < 0:
            raise InputError(f"must be ≥ 0, got {self.lesion_weight_voxels}", field="lesion_weight_voxels")
        if self.target not in TARGETS:
            raise InputError(f"choose from {', '.join(TARGETS)}, got {self.target!r}", field="target")
        if not self.learning_rate > 0:
            raise InputError("must be > 0", field="learning_rate")
        if self.norm not in NORMS:
            raise InputError(f"choose from {', '.join(NORMS)}, got {self.norm!r}", field="norm")
        if self.patch is not None and min(self.patch) < 8:
            raise InputError(f"needs sizes ≥ 8, got {list(self.patch)}", field="patch")
        if len(self.channels) < 2 or min(self.channels) < 1:
            raise InputError(f"need ≥ 2 levels of ≥ 1 channel, got {list(self.channels)}", field="channels")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``wlcad train cade`` (and of this module's ``main``)."""
    parser.add_argument("--task", default="chest-ct-nodule", help="CADe task (default chest-ct-nodule)")
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for phantoms, model.onnx, training.json"
    )
    parser.add_argument("--cases", type=int, default=40, help="training phantom cases (default 40)")
    parser.add_argument(
        "--lesion-weight-voxels",
        type=int,
        default=0,
        help="weigh each lesion in the BCE as if it had at least N voxels (default 0: plain BCE)",
    )
    parser.add_argument(
        "--train-manifest",
        type=Path,
        help="train on this manifest instead of the phantom train split (hard_negative rows are used)",
    )
    parser.add_argument("--test-cases", type=int, default=0, help="held-out test cases to evaluate (FROC)")
    parser.add_argument(
        "--validation-cases",
        type=int,
        default=0,
        help="validation cases the card's operating points (cut-offs at 1/2/4 FP per case) are measured on",
    )
    parser.add_argument("--hybrid-test-cases", type=int, default=0, help="held-out hybrid cases to evaluate")
    parser.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="phantom grid size")
    parser.add_argument("--target", choices=TARGETS, default="sphere", help="weak spheres or exact masks")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--channels",
        type=int,
        nargs="+",
        default=list(CHANNELS),
        help=f"U-Net channels per level (default {' '.join(map(str, CHANNELS))}; one more level = twice the context)",
    )
    parser.add_argument(
        "--patch",
        type=int,
        nargs="+",
        metavar="N",
        help="training patch, array order (default: the serving tile)",
    )
    parser.add_argument("--norm", choices=NORMS, default="instance", help="U-Net normalisation")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--repository", type=Path, help="model repository (default OUT/model_repository)")


def settings_from_args(args: argparse.Namespace, command: str = "") -> CadeTrainingSettings:
    return CadeTrainingSettings(
        out=args.out,
        cases=args.cases,
        train_manifest=args.train_manifest,
        test_cases=args.test_cases,
        validation_cases=args.validation_cases,
        hybrid_test_cases=args.hybrid_test_cases,
        size_xyz=tuple(args.size) if args.size else None,
        target=args.target,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        channels=tuple(args.channels),
        patch=tuple(args.patch) if args.patch else None,
        norm=args.norm,
        lesion_weight_voxels=args.lesion_weight_voxels,
        threads=args.threads,
        device=args.device,
        repository=args.repository,
        command=command,
    )
