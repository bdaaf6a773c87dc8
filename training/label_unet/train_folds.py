"""Train the leave-one-type-out fold models and the all-types model from prepared VOI sets.

This is the training half of ``wlcad experiment leave-one-type-out``, runnable where only numpy,
torch and MONAI exist (an accelerator machine without the DICOM/ITK stack): it reads the compact
VOI sets (``voi_set.VoiSet``), trains one network per held-out type plus one on every type, and
writes ``<name>.onnx`` files and ``training.json``. Evaluation then runs through the serving path
with :func:`training.label_unet.experiment.evaluate_fold_models`.

    python -m training.label_unet.train_folds --vois DIR --out DIR --steps 3000 --device cuda --workers 12
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from training.label_unet.network import export_onnx
from training.label_unet.train import TrainingSettings, train_segmenter
from training.label_unet.voi_set import VoiSet, concatenate

LESION_TYPES = ("chest-ct-nodule", "liver-mr-lesion", "brain-mr-metastasis")
ALL_TYPES = "all-types"


def load_sets(folder: Path) -> dict[str, VoiSet]:
    sets = {}
    for lesion_type in LESION_TYPES:
        files = sorted(folder.glob(f"vois-{lesion_type}-*.npz"))
        if not files:
            raise SystemExit(f"no VOI set for {lesion_type} in {folder}")
        sets[lesion_type] = VoiSet.load(files[-1])
    return sets


def train_all(
    sets: dict[str, VoiSet], settings: TrainingSettings, out: Path, only: list[str] | None = None
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"settings": asdict(settings), "device_name": _device_name(settings.device), "models": {}}
    plan = [(held, [t for t in LESION_TYPES if t != held]) for held in LESION_TYPES] + [
        (ALL_TYPES, list(LESION_TYPES))
    ]
    for name, types in plan:
        if only and name not in only:
            continue
        samples = concatenate([sets[t] for t in types])
        started = time.perf_counter()

        def progress(step: int, loss: float, name: str = name, started: float = started) -> None:
            if (step + 1) % 500 == 0:
                print(
                    f"{name}: step {step + 1}/{settings.steps} loss {loss:.3f} ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )

        network, history = train_segmenter(samples, settings, progress)
        (out / f"{name}.onnx").write_bytes(export_onnx(network))
        record["models"][name] = {
            "trained_on": types,
            "voi_count": len(samples),
            "seconds": round(history.seconds, 1),
            "final_loss": round(sum(history.losses[-100:]) / min(100, len(history.losses)), 4),
        }
        print(f"{name}: {record['models'][name]}", flush=True)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def settings_from_args(args: argparse.Namespace) -> TrainingSettings:
    """The training settings of a parsed command line (``--steps``, ``--batch-size``, ``--learning-rate``,
    ``--seed``, ``--device``, ``--workers``): one mapping for this script and ``wlcad train``/``experiment``,
    so an option means the same wherever a model is trained. Checking the values is the caller's job."""
    return TrainingSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        device=args.device,
        workers=args.workers,
    )


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vois", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--only", action="append", help="train only these models (fold names or all-types)")
    args = parser.parse_args()
    train_all(load_sets(args.vois), settings_from_args(args), args.out, args.only)


if __name__ == "__main__":
    main()
