"""Train a task's false-positive-reduction classifier (``cade_<task>_fpr``): the second stage.

One command::

    python -m training.cade.fpr --task chest-ct-nodule --out RUN --unet model_repository/cade_chest-ct-nodule/1/model.onnx

1. **VOIs.** Each training case goes through the serving code: the working frame, the shipped U-Net's
   probability map (onnxruntime) and :func:`services.cade.reranking.merged_proposals`. A proposal is
   a positive when it lies within a lesion's radius (the LUNA16 hit rule the evaluation uses), a
   negative when it lies farther than radius + ``IGNORE_MARGIN_MM`` from every lesion; one more
   positive is centred on each lesion, so nodules the proposals miss still teach the classifier.
   Cases the U-Net was trained on are skipped (``--train-skip``): on them its map is better than it
   will be on a new case, and the classifier would learn to trust it too much. Hybrid training cases
   (lesions inserted into the real chest CT, another seed than the hybrid test) show it real vessels.
2. **Classifier.** MONAI ``Classifier`` (batch norm: instance norm would scale away the absolute
   intensity and probability a cube shows) on (working image, U-Net probability) cubes, BCE, AdamW with a
   cosine schedule, a quarter of each batch positive; augmentation by shifts of ±2 voxels, flips and
   in-plane transposes (the cube is cut 4 voxels larger and cropped at random).
   ``--feedback-manifest M`` adds reader feedback (a manifest grown by ``wlcad feedback ingest``): a
   positive cube at each of its lesions and a negative one at each ``hard_negative`` row (a candidate
   a reader rejected), nothing else from those cases (only what a reader said is a label); a
   ``--hard-negative-share`` of each batch's negatives is drawn from the rejected candidates.
3. **Export and card.** ONNX (``image`` (n, 2, s, s, s) → ``logits`` (n, 1)) to
   ``<repository>/cade_<task>_fpr/<version>/``; the two-stage detector (served code, onnxruntime)
   is then evaluated: operating points on the validation seed, FROC on the test and hybrid-test seeds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import Classifier
from tqdm import tqdm

from services.cade.pipeline import Detector
from services.cade.reranking import RerankSpec, merged_proposals, voi_batch
from services.core.errors import InputError
from services.core.io import read_image
from services.inference.export import register_onnx_model
from training.cade.evaluate import (
    evaluate_split,
    onnx_detector,
    operating_points,
    report_metrics,
    two_stage_detector,
)
from training.cade.samples import CaseRows, manifest_cases, phantom_split
from training.cade.tasks import CadeTask, Split, get_task
from training.onnx_export import export_onnx

#: Proposals between a lesion's radius and radius + this are neither positive nor negative.
IGNORE_MARGIN_MM = 3.0
#: A lesion's hit radius is never below this (a 3 mm nodule's centre is hard to hit within 1.5 mm).
MIN_HIT_RADIUS_MM = 2.0
#: Extra voxels on each side of a stored VOI, for random shifts.
SHIFT_VOXELS = 2
CHANNELS = (16, 32, 64, 128)
SUFFIX = "_fpr"


@dataclass
class FprSettings:
    """Everything a run depends on (recorded in fpr.json)."""

    out: Path
    unet: Path
    task: str = "chest-ct-nodule"
    train_skip: int = 30
    train_cases: int = 60
    hybrid_train_cases: int = 20
    validation_cases: int = 20
    test_cases: int = 40
    hybrid_test_cases: int = 10
    negatives_per_case: int = 200
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0
    threads: int = 1
    repository: Path | None = None
    #: A manifest of reader feedback (``wlcad feedback ingest``): its lesions and hard negatives.
    feedback_manifest: Path | None = None
    #: The share of each batch's negatives drawn from the feedback's hard negatives (when it has any).
    hard_negative_share: float = 0.25
    command: str = ""

    def check(self) -> None:
        if not Path(self.unet).is_file():
            raise InputError(f"{self.unet} is not a file", field="unet")
        for name in ("train_cases", "steps", "batch_size", "negatives_per_case", "threads"):
            if getattr(self, name) < 1:
                raise InputError("must be ≥ 1", field=name)
        if self.feedback_manifest is not None and not Path(self.feedback_manifest).is_file():
            raise InputError(f"{self.feedback_manifest} is not a file", field="feedback_manifest")
        if not 0.0 <= self.hard_negative_share < 1.0:
            raise InputError("must be in [0, 1)", field="hard_negative_share")


@dataclass(frozen=True)
class VoiSet:
    """Training cubes: ``vois`` float16 (n, 2, s + 4, s + 4, s + 4), ``labels`` 1 = lesion, the
    matched lesion's diameter (0 for a negative) and ``hard``: a negative a reader rejected."""

    vois: np.ndarray
    labels: np.ndarray
    diameters_mm: np.ndarray
    hard: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.hard is None:
            object.__setattr__(self, "hard", np.zeros(len(self.labels), dtype=bool))

    @staticmethod
    def concat(parts: list[VoiSet]) -> VoiSet:
        return VoiSet(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("vois", "labels", "diameters_mm", "hard")
            )
        )

    def save(self, path: Path, key: str) -> None:
        staged = path.with_suffix(".tmp.npz")
        np.savez(
            staged,
            key=key,
            vois=self.vois,
            labels=self.labels,
            diameters_mm=self.diameters_mm,
            hard=self.hard,
        )
        staged.replace(path)

    @staticmethod
    def load(path: Path, key: str) -> VoiSet | None:
        """The cached set when ``path`` holds one made with ``key``."""
        if not path.is_file():
            return None
        with np.load(path) as stored:
            if str(stored["key"]) != key:
                return None
            hard = stored["hard"] if "hard" in stored.files else None
            return VoiSet(stored["vois"], stored["labels"], stored["diameters_mm"], hard)


def _nearest_voxel_zyx(grid, center_mm) -> tuple[int, int, int]:
    """The working-grid voxel (z, y, x) nearest a world point, clipped into the grid."""
    index = np.clip(np.rint(grid.world_to_index(center_mm))[::-1], 0, np.asarray(grid.shape) - 1)
    return tuple(int(v) for v in index)


def feedback_vois(detector: Detector, spec: RerankSpec, case: CaseRows) -> VoiSet | None:
    """A reader-feedback case's cubes: positive at each lesion, negative (``hard``) at each rejected
    candidate; None when it has neither."""
    points = [(p, 1) for p in case.prompts] + [(p, 0) for p in case.hard_negatives]
    if not points:
        return None
    working, probability = detector.working_and_probability(read_image(case.image))
    grid = working.grid
    voxels = [_nearest_voxel_zyx(grid, p.center_mm) for p, _ in points]
    size = spec.voi_voxels + 2 * SHIFT_VOXELS
    cubes = voi_batch((np.asarray(working.array), np.asarray(probability.array)), np.array(voxels), size)
    labels = np.array([label for _, label in points], np.uint8)
    diameters = np.array([p.diameter_mm if label else 0.0 for p, label in points], np.float32)
    return VoiSet(cubes.astype(np.float16), labels, diameters, labels == 0)


def case_vois(
    detector: Detector, spec: RerankSpec, case: CaseRows, negatives: int, rng: np.random.Generator
) -> VoiSet:
    """The labelled cubes of one case (see the module docstring)."""
    working, probability = detector.working_and_probability(read_image(case.image))
    proposals = merged_proposals(working, probability, spec)
    grid = working.grid
    centres_mm = np.array([grid.index_to_world(np.asarray(p.center_zyx[::-1])) for p in proposals]).reshape(
        -1, 3
    )
    lesions_mm = np.array([p.center_mm for p in case.prompts], dtype=float).reshape(-1, 3)
    radii = np.maximum(np.array([p.diameter_mm / 2 for p in case.prompts], dtype=float), MIN_HIT_RADIUS_MM)
    voxels, labels, diameters = [], [], []
    if len(lesions_mm):
        distance = np.linalg.norm(centres_mm[:, None, :] - lesions_mm[None], axis=2)
        inside = distance <= radii[None]
        ambiguous = (distance <= radii[None] + IGNORE_MARGIN_MM) & ~inside
    else:
        inside = ambiguous = np.zeros((len(proposals), 0), dtype=bool)
    positive = np.flatnonzero(inside.any(axis=1))
    negative = np.flatnonzero(~inside.any(axis=1) & ~ambiguous.any(axis=1))
    if len(negative) > negatives:
        negative = np.sort(rng.choice(negative, negatives, replace=False))
    for i in positive:
        voxels.append(proposals[i].voxel_zyx(grid.shape))
        labels.append(1)
        diameters.append(2 * radii[int(np.argmax(inside[i]))])
    for prompt in case.prompts:
        voxels.append(_nearest_voxel_zyx(grid, prompt.center_mm))
        labels.append(1)
        diameters.append(prompt.diameter_mm)
    for i in negative:
        voxels.append(proposals[i].voxel_zyx(grid.shape))
        labels.append(0)
        diameters.append(0.0)
    size = spec.voi_voxels + 2 * SHIFT_VOXELS
    cubes = voi_batch((np.asarray(working.array), np.asarray(probability.array)), np.array(voxels), size)
    return VoiSet(cubes.astype(np.float16), np.array(labels, np.uint8), np.array(diameters, np.float32))


def collect(task: CadeTask, settings: FprSettings, detector: Detector) -> VoiSet:
    """The cubes of every training case (cached in ``out/vois.npz``: extraction is most of the time)."""
    voiset = _phantom_vois(task, settings, detector)
    if settings.feedback_manifest is None:
        return voiset
    manifest = Path(settings.feedback_manifest)
    cache = Path(settings.out) / "feedback_vois.npz"
    key = json.dumps([hashlib.sha256(manifest.read_bytes()).hexdigest(), str(settings.unet)])
    feedback = VoiSet.load(cache, key)
    if feedback is None:
        assert detector.spec.rerank is not None
        parts = [feedback_vois(detector, detector.spec.rerank, case) for case in manifest_cases(manifest)]
        parts = [p for p in parts if p is not None]
        if not parts:
            raise InputError("holds no lesion and no hard negative", field="feedback_manifest")
        feedback = VoiSet.concat(parts)
        feedback.save(cache, key)
    return VoiSet.concat([voiset, feedback])


def _phantom_vois(task: CadeTask, settings: FprSettings, detector: Detector) -> VoiSet:
    cache = Path(settings.out) / "vois.npz"
    key = json.dumps(
        [
            settings.train_skip,
            settings.train_cases,
            settings.hybrid_train_cases,
            settings.negatives_per_case,
            str(settings.unet),
        ]
    )
    cached = VoiSet.load(cache, key)
    if cached is not None:
        return cached
    data = Path(settings.out) / "data"
    cases = manifest_cases(phantom_split(task, "train", settings.train_skip + settings.train_cases, data))
    cases = cases[settings.train_skip :]
    if settings.hybrid_train_cases:
        cases += manifest_cases(phantom_split(task, "hybrid-train", settings.hybrid_train_cases, data))
    rng = np.random.default_rng(settings.seed)
    assert detector.spec.rerank is not None
    parts = [
        case_vois(detector, detector.spec.rerank, case, settings.negatives_per_case, rng)
        for case in tqdm(cases, desc="VOIs", unit="case", file=sys.stderr, mininterval=30.0)
    ]
    voiset = VoiSet.concat(parts)
    voiset.save(cache, key)
    return voiset


def classifier_network(voi: int) -> torch.nn.Module:
    return Classifier(
        in_shape=(2, voi, voi, voi),
        classes=1,
        channels=CHANNELS,
        strides=(2, 2, 2, 2),
        num_res_units=1,
        norm="batch",
    )


def augmented(cubes: np.ndarray, voi: int, rng: np.random.Generator) -> np.ndarray:
    """Random crops of ``voi`` from the stored cubes, random flips on each axis and y/x transposes."""
    out = np.empty((len(cubes), cubes.shape[1], voi, voi, voi), dtype=np.float32)
    for i, cube in enumerate(cubes):
        z, y, x = rng.integers(0, 2 * SHIFT_VOXELS + 1, size=3)
        crop = cube[:, z : z + voi, y : y + voi, x : x + voi]
        for axis in (1, 2, 3):
            if rng.random() < 0.5:
                crop = np.flip(crop, axis)
        if rng.random() < 0.5:
            crop = np.swapaxes(crop, 2, 3)
        out[i] = crop
    return out


def fit(voiset: VoiSet, settings: FprSettings, voi: int) -> tuple[torch.nn.Module, list[float], float]:
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed + 1)
    network = classifier_network(voi)
    optimiser = torch.optim.AdamW(network.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, settings.steps)
    positives = np.flatnonzero(voiset.labels == 1)
    negatives = np.flatnonzero((voiset.labels == 0) & ~voiset.hard)
    hard = np.flatnonzero(voiset.hard)
    if not len(positives) or not len(negatives):
        raise InputError(
            f"needs positives and negatives, got {len(positives)} and {len(negatives)}", field="cases"
        )
    n_pos = max(1, settings.batch_size // 4)
    n_hard = round(settings.hard_negative_share * (settings.batch_size - n_pos)) if len(hard) else 0
    loss_fn = torch.nn.BCEWithLogitsLoss()
    losses: list[float] = []
    started = time.perf_counter()
    network.train()
    for _ in tqdm(range(settings.steps), desc="classifier", unit="step", file=sys.stderr, mininterval=30.0):
        pick = np.concatenate(
            [
                rng.choice(positives, n_pos),
                rng.choice(hard, n_hard) if n_hard else np.zeros(0, np.int64),
                rng.choice(negatives, settings.batch_size - n_pos - n_hard),
            ]
        )
        batch = torch.from_numpy(augmented(voiset.vois[pick].astype(np.float32), voi, rng))
        target = torch.from_numpy(voiset.labels[pick].astype(np.float32))[:, None]
        loss = loss_fn(network(batch), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
    return network.eval(), losses, time.perf_counter() - started


def evaluate(
    task: CadeTask, settings: FprSettings, classifier: Path
) -> tuple[dict[str, float], dict[str, float]]:
    """(card metrics on test / hybrid-test, operating points on validation) of the two-stage detector."""
    detector = two_stage_detector(task, Path(settings.unet), classifier, settings.threads)
    data, out = Path(settings.out) / "data", Path(settings.out) / "evaluation"
    points: dict[str, float] = {}
    if settings.validation_cases:
        manifest = phantom_split(task, "validation", settings.validation_cases, data)
        points = operating_points(evaluate_split(task, detector, manifest, out / "validation"))
    metrics: dict[str, float] = {}
    splits: list[tuple[Split, int]] = [
        ("test", settings.test_cases),
        ("hybrid-test", settings.hybrid_test_cases),
    ]
    for split, count in splits:
        if count:
            manifest = phantom_split(task, split, count, data)
            metrics |= report_metrics(
                evaluate_split(task, detector, manifest, out / split), split.replace("-", "_")
            )
    return metrics, points


def train_fpr(settings: FprSettings) -> Path:
    settings.check()
    task = get_task(settings.task)
    spec = task.detector_spec().rerank
    if spec is None:
        raise InputError(f"{task.name} has no second stage", field="task")
    torch.set_num_threads(settings.threads)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    first = onnx_detector(task, Path(settings.unet), settings.threads, model_version=task.model_name)
    started = time.perf_counter()
    voiset = collect(task, settings, first)
    extraction_s = time.perf_counter() - started
    network, losses, seconds = fit(voiset, settings, spec.voi_voxels)
    onnx = export_onnx(network, (spec.voi_voxels,) * 3, channels=2)
    (out / "model.onnx").write_bytes(onnx)
    metrics = {
        "training_vois": float(len(voiset.labels)),
        "training_positive_vois": float(voiset.labels.sum()),
        "training_hard_negative_vois": float(voiset.hard.sum()),
        "training_extraction_seconds": round(extraction_s, 1),
        "training_seconds": round(seconds, 1),
        "training_steps": float(settings.steps),
        "training_first_loss": round(float(np.mean(losses[:50])), 4),
        "training_final_loss": round(float(np.mean(losses[-200:])), 4),
    }
    held_out, points = evaluate(task, settings, out / "model.onnx")
    metrics |= held_out
    seeds = task.seeds
    data = (
        f"{task.name} phantoms (default size): train seed {seeds.train} cases {settings.train_skip}–"
        f"{settings.train_skip + settings.train_cases - 1} (the U-Net trained on the first {settings.train_skip}), "
        f"hybrid-train seed {seeds.hybrid_train} × {settings.hybrid_train_cases} (real chest CT background); "
        f"operating points: validation seed {seeds.validation} × {settings.validation_cases}; held out: test seed "
        f"{seeds.test} × {settings.test_cases}, hybrid-test seed {seeds.hybrid_test} × {settings.hybrid_test_cases}"
    )
    if settings.feedback_manifest is not None:
        manifest = Path(settings.feedback_manifest)
        data += (
            f"; reader feedback {manifest.name} (sha256 {hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]}): "
            f"{int(voiset.hard.sum())} rejected candidates as hard negatives"
        )
    first_stage = _first_stage_version(Path(settings.unet), task)
    path = register_onnx_model(
        settings.repository or out / "model_repository",
        task.model_name + SUFFIX,
        onnx,
        command=settings.command or "python -m training.cade.fpr",
        data_manifest=data,
        seed=settings.seed,
        metrics=metrics,
        description=(
            f"False-positive-reduction classifier of {task.name}: MONAI Classifier (channels {list(CHANNELS)}) on "
            f"{spec.voi_voxels}³ working-frame cubes of (image, U-Net probability) around U-Net candidates and "
            f"lung LoG blobs; input 'image' (n, 2, {spec.voi_voxels}, {spec.voi_voxels}, {spec.voi_voxels}), "
            "output 'logits' (n, 1). Its confidences are the two-stage detector's."
        ),
        max_batch_size=spec.max_batch,
        preferred_batch_sizes=(spec.max_batch,),
        extra={"operating_points": points, "first_stage_model": first_stage},
    )
    (out / "fpr.json").write_text(
        json.dumps(
            {
                "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
                "model": str(path),
                "metrics": metrics,
                "operating_points": points,
                "losses": [round(v, 4) for v in losses],
            },
            indent=1,
        )
        + "\n"
    )
    return path


def _first_stage_version(unet: Path, task: CadeTask) -> str:
    """``cade_<task>/<version>`` when ``unet`` lies in a repository (…/cade_<task>/<version>/model.onnx)."""
    unet = unet.resolve()
    if unet.parent.parent.name == task.model_name and unet.parent.name.isdigit():
        return f"{task.model_name}/{unet.parent.name}"
    raise InputError(f"must be a registered {task.model_name}/<version>/model.onnx, got {unet}", field="unet")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = FprSettings(out=Path("runs/fpr"), unet=Path())
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--unet", type=Path, required=True, help="the first stage: cade_<task>/<version>/model.onnx"
    )
    parser.add_argument(
        "--repository", type=Path, default=None, help="register here (default OUT/model_repository)"
    )
    parser.add_argument(
        "--feedback-manifest",
        type=Path,
        default=None,
        help="reader feedback (wlcad feedback ingest): its lesions as positives, hard negatives as negatives",
    )
    for name in (
        "task", "train_skip", "train_cases", "hybrid_train_cases", "validation_cases", "test_cases",
        "hybrid_test_cases", "negatives_per_case", "steps", "batch_size", "learning_rate", "seed", "threads",
        "hard_negative_share",
    ):  # fmt: skip
        value = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    settings = FprSettings(
        **vars(args), command="python -m training.cade.fpr " + " ".join(shlex.quote(a) for a in argv)
    )
    path = train_fpr(settings)
    print(f"registered {path}")
    print(json.dumps(json.loads((Path(settings.out) / "fpr.json").read_text())["metrics"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
