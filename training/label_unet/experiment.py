"""The published protocol as one command: leave one lesion type out, train on the other two, test on it.

Types: chest-ct-nodule, liver-mr-lesion (dark lesions, EOB phase) and brain-mr-metastasis (bright,
ring-enhancing). Train and test phantoms come from different seeds, so no test case was ever seen.
Each fold's network is exported to ONNX and evaluated through the *serving* path (a model
repository + the embedded backend), next to the sphere, threshold and random-walker baselines.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from services.core.manifest import read_lesions
from services.inference.export import register_onnx_model
from services.label_estimation.model import UnetModel
from services.label_estimation.pipeline import LabelEstimator
from services.label_estimation.unet import MODEL_NAME
from services.label_estimation.voi import VOI_SIZE
from training.data.dataset import write_dataset
from training.label_unet.evaluate import evaluate, summarise
from training.label_unet.network import export_onnx
from training.label_unet.samples import lesion_vois
from training.label_unet.train import TrainingSettings, train_segmenter
from training.label_unet.voi_set import VoiSet, concatenate

log = logging.getLogger(__name__)

LESION_TYPES = ("chest-ct-nodule", "liver-mr-lesion", "brain-mr-metastasis")
BASELINES = ("sphere", "threshold", "random-walker")
TEST_SEED_OFFSET = 1000


@dataclass
class ExperimentSettings:
    train_cases: int = 40
    test_cases: int = 15
    variants: int = 4
    seed: int = 0
    training: TrainingSettings = None  # type: ignore[assignment]
    case_size_xyz: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.training is None:
            self.training = TrainingSettings(seed=self.seed)


def phantom_manifests(
    out: Path, types: Sequence[str], cases: int, seed: int, size_xyz=None
) -> dict[str, Path]:
    """Generate (or reuse) one phantom set per type; returns type → manifest path."""
    manifests = {}
    for index, lesion_type in enumerate(types):
        folder = out / f"{lesion_type}-s{seed + index}-n{cases}"
        manifest = folder / "manifest.csv"
        if not manifest.is_file():
            write_dataset(lesion_type, cases, seed + index, folder, size_xyz=size_xyz)
        manifests[lesion_type] = manifest
    return manifests


def type_vois(manifests: dict[str, Path], variants: int, seed: int, cache: Path) -> dict[str, VoiSet]:
    sets = {}
    for index, (lesion_type, manifest) in enumerate(manifests.items()):
        path = cache / f"vois-{lesion_type}-{manifest.parent.name}-v{variants}-{VOI_SIZE}-u8.npz"
        if path.is_file():
            sets[lesion_type] = VoiSet.load(path)
        else:
            sets[lesion_type] = lesion_vois(read_lesions(manifest), lesion_type, variants, seed + index)
            path.parent.mkdir(parents=True, exist_ok=True)
            sets[lesion_type].save(path)
    return sets


def evaluate_onnx(
    onnx: bytes, lesion_type: str, manifest: Path, methods: Sequence[str], overlays: Path | None, seed: int
) -> list[dict]:
    """Register the network in a throw-away repository and evaluate it as it will be served."""
    with tempfile.TemporaryDirectory() as repository:
        register_onnx_model(
            repository,
            MODEL_NAME,
            onnx,
            command="evaluation",
            data_manifest=str(manifest),
            seed=seed,
            metrics={},
            git_commit="evaluation",
        )
        with UnetModel(setting="embedded", repository=repository) as model:
            estimator = LabelEstimator(model)
            lesions = [lesion for lesion in read_lesions(manifest) if lesion.prompt is not None]
            rows = evaluate(lesions, methods, estimator, overlays)
    for row in rows:
        row["lesion_type"] = lesion_type
    return rows


def run_leave_one_type_out(
    out: Path,
    settings: ExperimentSettings,
    progress: Callable[[str], None] = log.info,
    models: Path | None = None,
    prepare_only: bool = False,
) -> list[dict]:
    """All folds. With ``models`` (a folder of ``<held-out type>.onnx`` from ``train_folds``) the
    networks are taken from there instead of being trained here; evaluation is the same.
    ``prepare_only`` stops after writing the phantoms and the VOI sets (``<out>/cache``), the input of
    ``train_folds`` on another machine."""
    out.mkdir(parents=True, exist_ok=True)
    progress("generating phantoms")
    train = phantom_manifests(
        out / "data" / "train", LESION_TYPES, settings.train_cases, settings.seed, settings.case_size_xyz
    )
    test = phantom_manifests(
        out / "data" / "test",
        LESION_TYPES,
        settings.test_cases,
        settings.seed + TEST_SEED_OFFSET,
        settings.case_size_xyz,
    )
    if models is not None:
        rows = []
        for held_out in LESION_TYPES:
            progress(f"fold {held_out}: evaluating {models / (held_out + '.onnx')}")
            onnx = (models / f"{held_out}.onnx").read_bytes()
            rows += evaluate_onnx(
                onnx, held_out, test[held_out], (*BASELINES, "unet"), out / "overlays", settings.seed
            )
        record = (
            json.loads((models / "training.json").read_text())
            if (models / "training.json").is_file()
            else None
        )
        write_results(out, rows, settings, training_record=record)
        return rows
    progress("cutting training VOIs")
    vois = type_vois(train, settings.variants, settings.seed, out / "cache")
    if prepare_only:
        return []
    rows: list[dict] = []
    for held_out in LESION_TYPES:
        training_types = [t for t in LESION_TYPES if t != held_out]
        samples = concatenate([vois[t] for t in training_types])
        progress(f"fold {held_out}: training on {', '.join(training_types)} ({len(samples)} VOIs)")

        def report(step: int, loss: float, held_out: str = held_out) -> None:
            if (step + 1) % 100 == 0:
                progress(f"fold {held_out}: step {step + 1}/{settings.training.steps}, loss {loss:.3f}")

        network, history = train_segmenter(samples, settings.training, report)
        progress(
            f"fold {held_out}: trained in {history.seconds:.0f} s, final loss {sum(history.losses[-50:]) / min(50, len(history.losses)):.3f}"
        )
        rows += evaluate_onnx(
            export_onnx(network),
            held_out,
            test[held_out],
            (*BASELINES, "unet"),
            out / "overlays",
            settings.seed,
        )
    write_results(out, rows, settings)
    return rows


def write_results(
    out: Path, rows: list[dict], settings: ExperimentSettings, training_record: dict | None = None
) -> None:
    """dice.csv (every lesion × method), dice_table.md and summary.json; ``training_record`` replaces the
    local training settings when the networks were trained elsewhere."""
    with (out / "dice.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    table = summarise(rows)
    methods = [*BASELINES, "unet"]
    lines = ["| unseen type | n | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for lesion_type in LESION_TYPES:
        cells = [
            f"{table[(lesion_type, m)][0]:.3f} ± {table[(lesion_type, m)][1]:.3f}"
            if (lesion_type, m) in table
            else "–"
            for m in methods
        ]
        n = table.get((lesion_type, "unet"), (0, 0, 0))[2]
        lines.append(f"| {lesion_type} | {n} | " + " | ".join(cells) + " |")
    (out / "dice_table.md").write_text("\n".join(lines) + "\n")
    summary = {f"{t}/{m}": {"mean": v[0], "sd": v[1], "n": v[2]} for (t, m), v in table.items()}
    recorded = _settings_dict(settings)
    if training_record is not None:
        recorded["training"] = training_record
    (out / "summary.json").write_text(json.dumps({"settings": recorded, "dice": summary}, indent=2) + "\n")


def _settings_dict(settings: ExperimentSettings) -> dict:
    data = asdict(settings)
    data["training"] = asdict(settings.training)
    return data
