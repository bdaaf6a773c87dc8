"""Train a CADe detector on phantom cases: one command from seeds to a model-repository folder.

``train_cade(task, settings)`` writes the task's phantom splits (seeds from
:mod:`training.cade.tasks`), brings the training cases to the working frame
(:mod:`training.cade.samples`), samples patches with MONAI's ``RandCropByPosNegLabeld`` (half the
patches centred on a lesion voxel, half anywhere else, so the rare lesion voxels are seen often and
the hard background too), fits a small U-Net with Dice + BCE on the sphere target, exports ONNX and
registers it as ``<repository>/cade_<task>/<version>/`` with config.pbtxt and a card. With
``test_cases`` it also runs the served detector (:class:`services.cade.pipeline.Detector` on
onnxruntime) over held-out test seeds and writes the FROC into the card.

    python -m training.cade.train --task chest-ct-nodule --out runs/cade --steps 600
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceLoss
from monai.transforms import Compose, RandCropByPosNegLabeld, RandFlipd
from scipy import ndimage

from services.core.errors import InputError
from services.inference.export import register_onnx_model
from training.cade.network import build_network, export_onnx
from training.cade.samples import WorkingCase, phantom_split, working_cases
from training.cade.settings import CadeTrainingSettings, add_arguments, settings_from_args
from training.cade.tasks import CadeTask, get_task

#: A loss is recorded per step; the card reports the mean of the last this-many.
FINAL_LOSS_WINDOW = 50


@dataclass
class CadeTrainingResult:
    """What a run produced: the registered ONNX, its card's metrics, the loss per step."""

    task: str
    onnx: Path
    model_version: str
    training_json: Path
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


#: Background patch centres drawn per case, split evenly between anywhere, inside the body and on bright
#: structure (vessels, chest wall, heart): the last two are where false positives come from, and a patch
#: centred in the air around a body teaches nothing after the first steps.
BACKGROUND_POOL = 30_000
#: Working-frame intensity above which a voxel is "in the body" / "bright structure" ([0, 1] scale).
BODY_LEVEL, BRIGHT_LEVEL = 0.05, 0.5
#: Lesion patch centres drawn per lesion: every lesion gets the same number, so a 3 mm nodule is
#: centred as often as a 30 mm one (drawing from all lesion voxels would favour the big one 1000:1,
#: and a pilot run found no nodule under 10 mm).
FOREGROUND_PER_LESION = 256


def patch_transforms(task: CadeTask, seed: int, patch: tuple[int, ...] | None = None) -> Compose:
    """Pad to a tile (with the air value 0, as serving pads), crop one tile around a lesion voxel or a
    background voxel with equal odds — from indices computed once per case (``fg``/``bg`` keys), since
    MONAI otherwise scans the whole volume for them on every draw — and flip along every axis (no side
    or end of a chest is special)."""
    keys = ["image", "label"]
    spatial_axes = list(range(task.dims))
    transforms = Compose(
        [
            RandCropByPosNegLabeld(
                keys,
                label_key="label",
                spatial_size=patch or task.tile,
                pos=1.0,
                neg=1.0,
                num_samples=1,
                fg_indices_key="fg",
                bg_indices_key="bg",
            ),
            *[RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in spatial_axes],
        ]
    )
    transforms.set_random_state(seed=seed)
    return transforms


def padded_to_tile(array: np.ndarray, tile: tuple[int, ...]) -> np.ndarray:
    """``array`` (1, *spatial) padded at the far end with 0 (air, as serving pads) to at least a tile."""
    pad = [(0, 0)] + [(0, max(0, t - n)) for n, t in zip(array.shape[1:], tile, strict=True)]
    return np.pad(array, pad) if any(after for _, after in pad) else array


@dataclass(frozen=True)
class IndexedCase:
    """A working case padded to a tile, with its lesion voxels and a pool of background voxels (flat)."""

    image: torch.Tensor
    label: torch.Tensor
    fg: np.ndarray
    bg: np.ndarray


def indexed_case(case: WorkingCase, tile: tuple[int, ...], rng: np.random.Generator) -> IndexedCase:
    image = padded_to_tile(case.image, tile)
    label = padded_to_tile(case.label, tile)
    flat_image, flat_label = image[0].ravel(), label[0].ravel()
    background = flat_label == 0
    pools = [
        np.flatnonzero(background),
        np.flatnonzero(background & (flat_image > BODY_LEVEL)),
        np.flatnonzero(background & (flat_image > BRIGHT_LEVEL)),
    ]
    share = BACKGROUND_POOL // (len(pools) + bool(case.hard_negative.size))
    picks = [rng.choice(pool, min(share, pool.size), replace=False) for pool in pools if pool.size]
    if case.hard_negative.size:  # reader-rejected candidates: a quarter of the background centres
        rejected = _padded_flat_indices(case.hard_negative, case.label.shape[1:], label.shape[1:])
        picks.append(rng.choice(rejected, share, replace=True))
    bg = np.concatenate(picks)
    return IndexedCase(torch.as_tensor(image), torch.as_tensor(label), lesion_balanced(label[0], rng), bg)


def _padded_flat_indices(flat: np.ndarray, shape: tuple[int, ...], padded: tuple[int, ...]) -> np.ndarray:
    """Flat indices into ``shape`` as flat indices into the far-end padded ``padded``."""
    return np.ravel_multi_index(np.unravel_index(flat, shape), padded)


def lesion_balanced(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of lesion voxels, ``FOREGROUND_PER_LESION`` from each connected lesion."""
    components, count = ndimage.label(label > 0)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    flat = components.ravel()
    order = np.argsort(flat, kind="stable")
    starts = np.searchsorted(flat[order], np.arange(1, count + 2))
    picks = [order[rng.integers(starts[n], starts[n + 1], size=FOREGROUND_PER_LESION)] for n in range(count)]
    return np.concatenate(picks)


class PatchSampler:
    """Seeded batches of (image, label) patches drawn from cases chosen uniformly."""

    def __init__(
        self, task: CadeTask, cases: Sequence[WorkingCase], seed: int, patch: tuple[int, ...] | None = None
    ) -> None:
        if not cases:
            raise InputError("no training cases", field="cases")
        patch = patch or task.tile
        self.rng = np.random.default_rng(seed)
        self.cases = [indexed_case(case, patch, self.rng) for case in cases]
        self.transforms = patch_transforms(task, seed, patch)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for row in self.rng.integers(len(self.cases), size=size):
            case = self.cases[int(row)]
            patch = self.transforms({"image": case.image, "label": case.label, "fg": case.fg, "bg": case.bg})[
                0
            ]
            images.append(torch.as_tensor(patch["image"]).float())
            labels.append((torch.as_tensor(patch["label"]) > 0).float())
        return torch.stack(images), torch.stack(labels)


#: ``--lesion-weight-voxels N``: each lesion weighs in the BCE as if it had at least N voxels. A
#: 5 mm nodule's 20 voxels are outweighed 200:1 by a 30 mm mass in the same loss, and the shipped
#: detector gives nodules under 6 mm p < 0.01. Measured with N = 500 (1600 steps, 50 cases): test CPM
#: 0.281 [0.185, 0.375] vs 0.308 without — no gain, so it is off by default (docs/cade.md). Capped so
#: a one-voxel speck cannot dominate a batch.
MAX_LESION_WEIGHT = 50.0


def lesion_weights(labels: torch.Tensor, weight_voxels: int) -> torch.Tensor:
    """Per-voxel BCE weights: 1 on background; on each connected lesion ``weight_voxels / n``
    (n its voxel count in the patch), clipped to [1, ``MAX_LESION_WEIGHT``]."""
    weights = np.ones(labels.shape, dtype=np.float32)
    for index, patch in enumerate(labels.detach().cpu().numpy() > 0):
        components, count = ndimage.label(patch)
        if count:
            sizes = np.bincount(components.ravel())[1:].astype(np.float32)
            per_lesion = np.clip(weight_voxels / sizes, 1.0, MAX_LESION_WEIGHT)
            weights[index] = np.concatenate([[1.0], per_lesion])[components]
    return torch.as_tensor(weights, device=labels.device)


class LesionDiceBCELoss(torch.nn.Module):
    """BCE over every voxel (each lesion weighted to ``weight_voxels`` when > 0, see
    :func:`lesion_weights`), plus a soft Dice per patch, averaged over the patches that hold a lesion.

    A Dice over the whole batch is dominated by its largest lesion, so small nodules would not pull
    their weight; a Dice per patch that also counts lesion-free patches asks those to predict a total
    below one voxel (a run with it stalled at loss 1.0). Lesion-free patches teach through the BCE."""

    def __init__(self, weight_voxels: int = 0) -> None:
        super().__init__()
        self.weight_voxels = weight_voxels
        self.dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=1.0, smooth_dr=1.0)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weights = lesion_weights(labels, self.weight_voxels) if self.weight_voxels > 0 else None
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, weight=weights)
        with_lesion = labels.flatten(1).amax(dim=1) > 0
        if bool(with_lesion.any()):
            loss = loss + self.dice(logits[with_lesion], labels[with_lesion]).mean()
        return loss


def fit(
    task: CadeTask,
    cases: Sequence[WorkingCase],
    settings: CadeTrainingSettings,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[torch.nn.Module, list[float], float]:
    """The training loop: AdamW, one-cycle schedule (constant for a smoke run), :class:`LesionDiceBCELoss`."""
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    network = build_network(task.dims, settings.channels, settings.norm).to(device)
    optimiser = torch.optim.AdamW(network.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    schedule = (
        torch.optim.lr_scheduler.OneCycleLR(
            optimiser, max_lr=settings.learning_rate, total_steps=settings.steps, pct_start=0.1
        )
        if settings.steps >= 20
        else None
    )
    loss_function = LesionDiceBCELoss(settings.lesion_weight_voxels)
    sampler = PatchSampler(task, cases, settings.seed, settings.patch)
    losses: list[float] = []
    start = time.perf_counter()
    network.train()
    for step in range(settings.steps):
        images, labels = (t.to(device) for t in sampler.batch(settings.batch_size))
        optimiser.zero_grad(set_to_none=True)
        loss = loss_function(network(images), labels)
        loss.backward()
        optimiser.step()
        if schedule is not None:
            schedule.step()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step, losses[-1])
    return network.eval(), losses, time.perf_counter() - start


def data_description(task: CadeTask, settings: CadeTrainingSettings) -> str:
    """The card's data line: every split's seed and size, so the test set's seeds are on record."""
    size = "default size" if settings.size_xyz is None else "size {}×{}×{}".format(*settings.size_xyz)
    seeds = task.seeds
    train = (
        f"train manifest {Path(settings.train_manifest).name}"
        if settings.train_manifest is not None
        else f"train seed {seeds.train} × {settings.cases} cases"
    )
    return (
        f"{task.name} phantoms ({size}), {settings.target} targets: {train}; held out: validation seed {seeds.validation} × {settings.validation_cases} cases (operating "
        f"points), test seed {seeds.test}"
        f" × {settings.test_cases} cases, hybrid-test seed {seeds.hybrid_test}"
        f" × {settings.hybrid_test_cases} cases (real {task.name} sample background)"
    )


def frame_metrics(task: CadeTask) -> dict[str, float]:
    """The working frame and intensity scale the model was trained in: serving must use the same."""
    metrics: dict[str, float] = {"frame_dims": float(task.dims)}
    if task.frame.spacing_mm is not None:
        metrics["frame_spacing_mm"] = float(task.frame.spacing_mm)
    if task.frame.long_side is not None:
        metrics["frame_long_side"] = float(task.frame.long_side)
    metrics["intensity_low"] = float(task.intensity.low)
    metrics["intensity_high"] = float(task.intensity.high)
    for axis, size in zip("zyx"[-task.dims :], task.tile, strict=True):
        metrics[f"tile_{axis}"] = float(size)
    return metrics


def describe(task: CadeTask, settings: CadeTrainingSettings) -> str:
    layout = ",".join("zyx"[-task.dims :])
    frame = (
        f"{task.frame.spacing_mm} mm isotropic" if task.dims == 3 else f"long side {task.frame.long_side} px"
    )
    return (
        f"CADe heatmap detector for {task.name}: MONAI UNet (channels {list(settings.channels)}, {settings.norm} "
        f"norm, patches {list(settings.patch or task.tile)}) trained on "
        f"{settings.target} labels from lesion centre + max diameter; working frame {frame}, intensity "
        f"{task.intensity.kind} [{task.intensity.low}, {task.intensity.high}] → [0, 1]; input 'image' "
        f"(n,1,{layout}) = (n,1,{','.join(map(str, task.tile))}), output 'logits' of the same shape."
    )


def _progress_bar(settings: CadeTrainingSettings):
    from tqdm import tqdm

    # A terminal gets a live bar; a log file (a long run under nohup) a line every 30 s.
    interactive = sys.stderr.isatty()
    return tqdm(
        total=settings.steps,
        unit="step",
        file=sys.stderr,
        disable=not settings.progress,
        mininterval=0.1 if interactive else 30.0,
    )


def train_cade(task: CadeTask | str, settings: CadeTrainingSettings) -> CadeTrainingResult:
    """Phantoms → working frame → patches → U-Net → ONNX → ``cade_<task>/<version>/`` with its card."""
    task = get_task(task) if isinstance(task, str) else task
    settings.check()
    stride = 2 ** (len(settings.channels) - 1)
    if any(size % stride for size in task.tile):
        raise InputError(
            f"{len(settings.channels)} levels need tiles divisible by {stride}; {task.name}'s tile is {task.tile}",
            field="channels",
        )
    if settings.patch is not None and (
        len(settings.patch) != task.dims or any(size % stride for size in settings.patch)
    ):
        raise InputError(
            f"needs {task.dims} sizes divisible by {stride}, got {list(settings.patch)}", field="patch"
        )
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    train_manifest = (
        Path(settings.train_manifest)
        if settings.train_manifest is not None
        else phantom_split(task, "train", settings.cases, out / "data", settings.size_xyz)
    )
    cases = working_cases(task, train_manifest, settings.target)
    with _progress_bar(settings) as bar:

        def on_step(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        network, losses, seconds = fit(task, cases, settings, on_step)
    onnx = export_onnx(network, task.tile)
    (out / "model.onnx").write_bytes(onnx)
    # The weights as torch saw them, for benches that compare against torch inference (never served).
    torch.save(network.state_dict(), out / "network.pt")
    window = losses[-FINAL_LOSS_WINDOW:]
    metrics = {
        "training_final_loss": round(float(np.mean(window)), 4),
        "training_first_loss": round(losses[0], 4),
        "training_seconds": round(seconds, 1),
        "training_steps": float(settings.steps),
        "training_cases": float(len(cases)),
        **frame_metrics(task),
    }
    if settings.test_cases or settings.hybrid_test_cases:
        from training.cade.evaluate import held_out_metrics

        metrics |= held_out_metrics(task, out / "model.onnx", settings, out / "evaluation")
    points: dict[str, float] = {}
    if settings.validation_cases:
        from training.cade.evaluate import validation_operating_points

        points = validation_operating_points(task, out / "model.onnx", settings, out / "evaluation")
    repository = settings.repository or out / "model_repository"
    path = register_onnx_model(
        repository,
        task.model_name,
        onnx,
        command=settings.command or f"python -m training.cade.train --task {task.name}",
        data_manifest=data_description(task, settings),
        seed=settings.seed,
        metrics=metrics,
        description=describe(task, settings),
        max_batch_size=task.tiling().max_batch,
        preferred_batch_sizes=(task.tiling().max_batch,),
        extra={"operating_points": points} if points else None,
    )
    record = out / "training.json"
    record.write_text(
        json.dumps(
            {
                "task": task.name,
                "settings": _jsonable(asdict(settings)),
                "seeds": asdict(task.seeds),
                "train_manifest": str(train_manifest),
                "model": str(path),
                "metrics": metrics,
                "losses": [round(v, 5) for v in losses],
            },
            indent=2,
        )
        + "\n"
    )
    return CadeTrainingResult(
        task.name, path, f"{task.model_name}/{path.parent.name}", record, losses, seconds, metrics
    )


def _jsonable(values: dict) -> dict:
    return {
        k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
        for k, v in values.items()
    }


def run(args: argparse.Namespace, command: str) -> int:
    """The handler of ``wlcad train cade`` (options from :func:`training.cade.settings.add_arguments`);
    ``command`` is the command line the card records."""
    result = train_cade(args.task, settings_from_args(args, command))
    print(f"trained {result.task} in {result.seconds:.0f} s → {result.onnx} ({result.model_version})")
    print(json.dumps(result.metrics, indent=1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    return run(args, "python -m training.cade.train " + " ".join(shlex.quote(a) for a in argv))


if __name__ == "__main__":
    sys.exit(main())
