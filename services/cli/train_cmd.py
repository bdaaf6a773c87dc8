"""``wlcad train label-unet`` and ``wlcad experiment leave-one-type-out`` (needs the ``train`` extra)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from services.core.errors import InputError

LESION_TYPES = ("chest-ct-nodule", "liver-mr-lesion", "brain-mr-metastasis")


def _require_training_extra() -> None:
    try:
        import monai  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise InputError(
            "training needs torch and monai: pip install -e '.[train]'", field="command"
        ) from exc


def _types(text: str) -> list[str]:
    types = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in types if t not in LESION_TYPES]
    if not types or unknown:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(LESION_TYPES)}; got {text!r}")
    return types


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=1500, help="optimiser steps per model (default 1500)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", type=int, default=4, help="jittered prompts per training lesion")
    parser.add_argument("--workers", type=int, default=1, help="augmentation worker processes")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def register(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a model (needs the train extra)")
    models = train.add_subparsers(dest="model", metavar="MODEL", required=True)
    unet = models.add_parser(
        "label-unet", help="the generic lesion segmenter on phantom (and user) manifests"
    )
    unet.add_argument(
        "--types", type=_types, default=list(LESION_TYPES), help="comma-separated phantom lesion types"
    )
    unet.add_argument("--cases", type=int, default=40, help="phantom cases per type")
    unet.add_argument(
        "--manifest",
        type=Path,
        action="append",
        default=[],
        help="extra weak-label manifest with exact masks",
    )
    unet.add_argument(
        "--out", type=Path, required=True, help="folder for model.onnx, training.json and phantoms"
    )
    unet.add_argument("--export", action="store_true", help="also register the model in the model repository")
    unet.add_argument(
        "--metrics", type=Path, help="experiment summary.json whose Dice go into the model card"
    )
    _add_training_options(unet)
    unet.set_defaults(handler=run_train)
    from training.cade.settings import add_arguments as add_cade_arguments  # torch-free

    cade = models.add_parser("cade", help="a CADe detector on phantoms, sphere labels (chest-ct-nodule)")
    add_cade_arguments(cade)
    cade.set_defaults(handler=run_train_cade)

    experiment = commands.add_parser("experiment", help="run a published evaluation protocol")
    protocols = experiment.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    loto = protocols.add_parser(
        "leave-one-type-out", help="train on two lesion types, test on the third (all folds)"
    )
    loto.add_argument("--out", type=Path, required=True)
    loto.add_argument("--train-cases", type=int, default=40)
    loto.add_argument("--test-cases", type=int, default=15)
    loto.add_argument(
        "--prepare-only", action="store_true", help="write phantoms and VOI sets, train nothing"
    )
    loto.add_argument(
        "--models",
        type=Path,
        help="evaluate fold models trained elsewhere (python -m training.label_unet.train_folds)",
    )
    _add_training_options(loto)
    loto.set_defaults(handler=run_experiment)


def _settings(args: argparse.Namespace):
    from training.label_unet.train_folds import settings_from_args

    if args.steps < 1 or args.batch_size < 1:
        raise InputError("must be ≥ 1", field="steps")
    return settings_from_args(args)


def run_experiment(args: argparse.Namespace) -> int:
    _require_training_extra()
    from training.label_unet.experiment import ExperimentSettings, run_leave_one_type_out

    settings = ExperimentSettings(
        train_cases=args.train_cases,
        test_cases=args.test_cases,
        variants=args.variants,
        seed=args.seed,
        training=_settings(args),
    )
    run_leave_one_type_out(
        args.out,
        settings,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        models=args.models,
        prepare_only=args.prepare_only,
    )
    if not args.prepare_only:
        print((args.out / "dice_table.md").read_text(), end="")
    return 0


def run_train_cade(args: argparse.Namespace) -> int:
    _require_training_extra()
    from training.cade.train import run

    return run(args, "wlcad " + " ".join(shlex.quote(a) for a in sys.argv[1:]))


def run_train(args: argparse.Namespace) -> int:
    _require_training_extra()
    from tqdm import tqdm

    from services.core.manifest import read_lesions
    from training.label_unet.experiment import phantom_manifests, type_vois
    from training.label_unet.network import export_onnx
    from training.label_unet.samples import lesion_vois
    from training.label_unet.train import train_segmenter
    from training.label_unet.voi_set import concatenate

    settings = _settings(args)
    args.out.mkdir(parents=True, exist_ok=True)
    manifests = phantom_manifests(args.out / "data", args.types, args.cases, args.seed)
    sets = list(type_vois(manifests, args.variants, args.seed, args.out / "cache").values())
    sets += [lesion_vois(read_lesions(path), path.stem, args.variants, args.seed) for path in args.manifest]
    samples = concatenate(sets)
    with tqdm(total=settings.steps, unit="step", file=sys.stderr, disable=None) as bar:

        def progress(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        network, history = train_segmenter(samples, settings, progress)
    onnx = export_onnx(network)
    (args.out / "model.onnx").write_bytes(onnx)
    record = {
        "types": args.types,
        "cases_per_type": args.cases,
        "manifests": {k: str(v) for k, v in manifests.items()} | {p.stem: str(p) for p in args.manifest},
        "voi_count": len(samples),
        "seconds": round(history.seconds, 1),
        "final_loss": round(sum(history.losses[-50:]) / min(50, len(history.losses)), 4),
        "settings": vars(settings) | {"channels": list(settings.channels)},
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"trained on {len(samples)} VOIs in {history.seconds:.0f} s → {args.out / 'model.onnx'}")
    if args.export:
        _export(args, onnx, record)
    return 0


def _export(args: argparse.Namespace, onnx: bytes, record: dict) -> None:
    from services.inference.export import register_onnx_model
    from services.inference.factory import default_repository
    from services.label_estimation.unet import MODEL_NAME
    from services.label_estimation.voi import VOI_SIZE
    from training.label_unet.publish import loto_dice_metrics

    metrics: dict[str, float] = {
        "training_final_loss": record["final_loss"],
        "training_seconds": record["seconds"],
    }
    if args.metrics is not None:
        summary = json.loads(args.metrics.read_text())
        metrics |= loto_dice_metrics(summary["dice"], with_counts=False)
    command = "wlcad " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    path = register_onnx_model(
        default_repository(),
        MODEL_NAME,
        onnx,
        command=command,
        data_manifest=", ".join(f"{k}: phantoms seed {args.seed}, {args.cases} cases" for k in args.types),
        seed=args.seed,
        metrics=metrics,
        description=f"Generic 3D U-Net lesion segmenter on size-normalised {VOI_SIZE}³ VOIs (IJCARS 2021 protocol); "
        f"input 'image' (n,1,{VOI_SIZE},{VOI_SIZE},{VOI_SIZE}) in [0,1], output 'logits'.",
        max_batch_size=16,
        preferred_batch_sizes=(4, 8, 16),
    )
    print(f"registered {path}")
