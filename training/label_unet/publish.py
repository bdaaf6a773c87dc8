"""Ship a trained segmenter: register its ONNX in the model repository with a complete model card.

The card records how to reproduce the model (commands, phantom data and seeds, where it was
trained), the leave-one-type-out Dice of the protocol run with the same settings, and — written by
:func:`services.inference.export.register_onnx_model` — the git commit and the file's sha256.

    python -m training.label_unet.publish --onnx models/all-types.onnx --training models/training.json \\
        --summary runs/loto/summary.json --command "..."
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path

from services.inference.export import register_onnx_model
from services.inference.factory import default_repository
from services.label_estimation.unet import MODEL_NAME
from services.label_estimation.voi import VOI_SIZE

ALL_TYPES = "all-types"


def loto_dice_metrics(dice: Mapping[str, Mapping[str, float]], *, with_counts: bool) -> dict[str, float]:
    """Model-card entries for the leave-one-type-out Dice of a summary.json, in ``dice``'s order.

    The names (``loto_dice_mean/<key>``, ``loto_dice_sd/<key>``, ``loto_n/<key>``) are those of the
    shipped card (model_repository/label_unet3d); one definition keeps its two writers from drifting
    apart. ``wlcad train label-unet --metrics`` has never recorded the counts; this module's cards do.
    """
    metrics: dict[str, float] = {}
    for key, value in dice.items():
        metrics[f"loto_dice_mean/{key}"] = round(value["mean"], 4)
        metrics[f"loto_dice_sd/{key}"] = round(value["sd"], 4)
        if with_counts:
            metrics[f"loto_n/{key}"] = value["n"]
    return metrics


def card_metrics(summary: dict, training: dict) -> dict[str, float]:
    """The card's metrics: per-type Dice (sorted by type) with counts, then the all-types model's training."""
    metrics = loto_dice_metrics(dict(sorted(summary["dice"].items())), with_counts=True)
    model = training["models"][ALL_TYPES]
    metrics["training_final_loss"] = model["final_loss"]
    metrics["training_seconds"] = model["seconds"]
    metrics["training_voi_count"] = model["voi_count"]
    return metrics


def publish(onnx: Path, training: dict, summary: dict, command: str, data: str, repository: Path) -> Path:
    settings = training["settings"]
    description = (
        f"Generic 3D U-Net lesion segmenter (MONAI UNet, channels {settings['channels']}) on size-normalised "
        f"{VOI_SIZE}³ VOIs, IJCARS 2021 protocol; input 'image' (n,1,{VOI_SIZE},{VOI_SIZE},{VOI_SIZE}) in [0,1], "
        f"output 'logits'. Trained on {', '.join(training['models'][ALL_TYPES]['trained_on'])} phantoms, "
        f"{settings['steps']} steps × batch {settings['batch_size']} on {training['device_name']}."
    )
    return register_onnx_model(
        repository,
        MODEL_NAME,
        onnx,
        command=command,
        data_manifest=data,
        seed=settings["seed"],
        metrics=card_metrics(summary, training),
        description=description,
        max_batch_size=16,
        preferred_batch_sizes=(4, 8, 16),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--training", type=Path, required=True, help="training.json written by train_folds")
    parser.add_argument(
        "--summary", type=Path, required=True, help="summary.json of the leave-one-type-out run"
    )
    parser.add_argument("--command", required=True, help="the commands that reproduce the model")
    parser.add_argument("--data", required=True, help="the data the model was trained on (manifests, seeds)")
    parser.add_argument("--repository", type=Path, default=None)
    args = parser.parse_args()
    path = publish(
        args.onnx,
        json.loads(args.training.read_text()),
        json.loads(args.summary.read_text()),
        args.command,
        args.data,
        args.repository or default_repository(),
    )
    print(f"registered {path}")


if __name__ == "__main__":
    main()
