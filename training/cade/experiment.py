"""The report's sphere-vs-painted experiment: how many more cases do sphere labels need?

For each training-set size *n* the detector is trained twice — on spheres drawn from each lesion's
centre + max diameter and on the exact painted masks — with the same seed, the same cases (the first
*n* of the task's train seed: a case is a pure function of (task, seed, index, size), so the sizes are
nested) and the same budget (steps, batch, learning rate), then both are run through the served
detector (:func:`training.cade.evaluate.onnx_detector`) on one held-out test set from the task's test
seed. Each arm's CPM (with a case-bootstrap 95 % CI) is reported overall and per shape family group —
simple (sphere/ellipsoid), where a sphere label is nearly the painted mask, and irregular
(lobulated/spiculated/irregular), where it is not — and for each painted size, the number of sphere
cases whose CPM reaches the painted CPM (interpolated on log cases between the measured sizes, "not
reached" when no size does), and painted − sphere CPM at each size with a paired bootstrap CI (the
same test cases and resample draws for every arm). Nomura et al. 2019 found 1.6–7.6× more cases for equal performance.

Layout of ``out`` (every file written atomically; an arm whose ``result.json`` exists is not rerun, and
one whose training finished is only re-evaluated)::

    experiment.json                    the settings the arms were run with (a resume must match them)
    data/train-n<n>/train/             the first n train-seed cases (shared by both label kinds)
    data/test/                         the held-out test cases (shared by every arm)
    arms/<target>-n<n>/                train_cade's folder (model.onnx, training.json, model_repository),
                                       predictions.json, evaluation/froc.{json,png}, result.json,
                                       bootstrap.json (CPM per resample: paired painted − sphere CIs)
    sphere_vs_painted.{json,md,png}    every number, the table, CPM vs training cases

CPU time: one optimiser step (batch 4 of 64³ patches, UNet 16-32-64-128, 2 threads) measured 2.3–3.3 s
on two cores that another training run was sharing (so roughly 1.5 s on two free cores): the default
budget (600 steps) is ~15–30 min per arm, and 10,20,40,80 is 8 arms ≈ 2–4 h, plus evaluation (a few
seconds per test case and arm) and the phantoms (~1.4 s per default-size case). ``--steps`` and
``--batch-size`` set the budget; ``--device cuda`` trains on an accelerator (evaluation always runs the
served ONNX on the CPU). Each arm's wall and CPU seconds are in its result.

Torch is imported only when an arm trains, so this module (and ``wlcad experiment``) loads without it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.core.atomic import atomic_output, write_bytes_atomically
from services.core.errors import InputError
from services.core.io import read_image
from services.evaluation.bootstrap import DEFAULT_RESAMPLES
from services.evaluation.cade_groups import cpm_samples, manifest_group_cpms, paired_difference
from services.evaluation.cade_report import Predictions, evaluate_cade, read_truth, write_report
from training.cade.evaluate import onnx_detector, report_metrics
from training.cade.samples import TARGETS, manifest_cases, phantom_split
from training.cade.settings import CHANNELS, CadeTrainingSettings
from training.cade.tasks import CadeTask, get_task
from training.data.dataset import MAX_CASES
from training.data.shapes import FAMILIES, IRREGULAR_FAMILIES

#: Shape-family groups of the breakdown, and the manifest column that names each lesion's family.
SHAPE_GROUPS: dict[str, tuple[str, ...]] = {
    "sphere/ellipsoid": tuple(f for f in FAMILIES if f not in IRREGULAR_FAMILIES),
    "lobulated/spiculated/irregular": IRREGULAR_FAMILIES,
}
FAMILY_COLUMN = "shape_family"
ALL_LESIONS = "all"
#: Nomura et al. 2019: sphere labels needed this many times more cases for equal performance.
REFERENCE_RATIO = (1.6, 7.6)
RESULT = "sphere_vs_painted"
#: Per arm: the CPM of every bootstrap resample per group (the same draws for every arm: paired).
BOOTSTRAP = "bootstrap.json"


@dataclass
class ExperimentSettings:
    """Everything the experiment's numbers depend on (``experiment.json``), plus how it runs."""

    task: str = "chest-ct-nodule"
    cases: tuple[int, ...] = (10, 20, 40, 80)
    test_cases: int = 30
    size_xyz: tuple[int, int, int] | None = None
    steps: int = 600
    batch_size: int = 4
    learning_rate: float = 2e-3
    seed: int = 0
    channels: tuple[int, ...] = CHANNELS
    patch: tuple[int, ...] | None = None
    norm: str = "instance"
    n_resamples: int = DEFAULT_RESAMPLES
    threads: int = 2
    device: str = "cpu"
    command: str = ""

    #: Fields a resumed run may change: they change how fast it runs, not what it computes.
    RUN_ONLY = ("cases", "threads", "device", "command")

    def check(self) -> None:
        check_cases(self.cases)
        if not 1 <= self.test_cases <= MAX_CASES:
            raise InputError(f"must be between 1 and {MAX_CASES}, got {self.test_cases}", field="test_cases")
        for name in ("steps", "batch_size", "threads", "n_resamples"):
            if getattr(self, name) < 1:
                raise InputError(f"must be ≥ 1, got {getattr(self, name)}", field=name)
        if not self.learning_rate > 0:
            raise InputError(f"must be > 0, got {self.learning_rate}", field="learning_rate")
        get_task(self.task)

    def recorded(self) -> dict[str, Any]:
        """The settings that fix the results, as ``experiment.json`` holds them."""
        values = asdict(self)
        return {k: _plain(v) for k, v in values.items() if k not in self.RUN_ONLY}


def check_cases(cases: Sequence[int]) -> tuple[int, ...]:
    """Training-set sizes: at least one, each in 1..MAX_CASES, no repeats; returned ascending."""
    sizes = tuple(cases)
    if not sizes:
        raise InputError("give at least one training-set size, e.g. 10,20,40,80", field="cases")
    bad = [n for n in sizes if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CASES]
    if bad:
        raise InputError(f"sizes must be whole numbers in 1..{MAX_CASES}, got {bad}", field="cases")
    if len(set(sizes)) != len(sizes):
        raise InputError(f"a size is repeated: {list(sizes)}", field="cases")
    return tuple(sorted(sizes))


def parse_cases(text: str) -> tuple[int, ...]:
    """``"10,20,40,80"`` → (10, 20, 40, 80); anything else is an InputError on ``cases``."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise InputError(
            f"needs comma-separated whole numbers like 10,20,40,80, got {text!r}", field="cases"
        ) from None
    return check_cases(sizes)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


# ------------------------------------------------------------------------------------------------ arms


@dataclass(frozen=True)
class Arm:
    """One trained detector: a label kind at a training-set size."""

    target: str
    cases: int

    @property
    def name(self) -> str:
        return f"{self.target}-n{self.cases}"


@dataclass
class ArmResult:
    """An arm's numbers (its ``result.json``): CPM overall and per shape group, with 95 % CIs."""

    target: str
    cases: int
    train_case_ids: list[str]
    cpm: float
    cpm_ci: dict[str, float]
    groups: dict[str, dict[str, Any]]
    metrics: dict[str, float]
    training_seconds: float
    training_cpu_seconds: float
    evaluation_seconds: float
    model: str
    reused_training: bool = False
    resumed: bool = field(default=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("resumed")
        return values


def _write_json(path: Path, document: Any) -> Path:
    return write_bytes_atomically(path, (json.dumps(document, indent=2) + "\n").encode())


def _check_resume(out: Path, settings: ExperimentSettings) -> None:
    """A resumed ``out`` must hold arms run with the same settings: mixing budgets would make the
    sphere and painted curves incomparable without anything saying so."""
    record = out / "experiment.json"
    wanted = settings.recorded()
    if record.is_file():
        found = json.loads(record.read_text())
        for key, value in wanted.items():
            if found.get(key) != value:
                raise InputError(
                    f"{out} holds an experiment run with {key}={found.get(key)!r}, not {value!r}; "
                    "use another --out or the same settings",
                    field=key,
                )
        return
    out.mkdir(parents=True, exist_ok=True)
    _write_json(record, wanted)


def _link_split(link: Path, target: Path) -> None:
    """``link`` → ``target`` (a symlink): train_cade finds the shared phantoms and reuses them."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise InputError(f"{link} exists and is not the shared split", field="out")
    link.symlink_to(target, target_is_directory=True)


def _training_settings(settings: ExperimentSettings, arm: Arm, arm_dir: Path) -> CadeTrainingSettings:
    return CadeTrainingSettings(
        out=arm_dir,
        cases=arm.cases,
        test_cases=0,  # evaluated here, per shape group, on the shared test split
        size_xyz=settings.size_xyz,
        target=arm.target,  # type: ignore[arg-type]
        steps=settings.steps,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        seed=settings.seed,
        channels=settings.channels,
        patch=settings.patch,
        norm=settings.norm,
        threads=settings.threads,
        device=settings.device,
        command=f"{settings.command} (arm {arm.name})" if settings.command else "",
    )


def _finished_training(arm_dir: Path, training: CadeTrainingSettings) -> dict[str, Any] | None:
    """The arm's training.json when a run with these settings already finished (its model exists)."""
    record = arm_dir / "training.json"
    if not (record.is_file() and (arm_dir / "model.onnx").is_file()):
        return None
    found = json.loads(record.read_text())
    recorded = found.get("settings", {})
    keys = (
        "cases",
        "target",
        "steps",
        "batch_size",
        "learning_rate",
        "seed",
        "channels",
        "size_xyz",
        "patch",
        "norm",
    )
    for key in keys:
        if recorded.get(key) != _plain(getattr(training, key)):
            return None
    return found


def _train(task: CadeTask, training: CadeTrainingSettings) -> tuple[dict[str, Any], float, float]:
    """Train one arm; returns its training.json, wall and process CPU seconds (all threads)."""
    from training.cade.train import train_cade  # torch: only when an arm really trains

    wall, cpu = time.perf_counter(), time.process_time()
    result = train_cade(task, training)
    record = json.loads(result.training_json.read_text())
    return record, time.perf_counter() - wall, time.process_time() - cpu


def evaluate_arm(
    task: CadeTask, onnx: Path, test_manifest: Path, arm_dir: Path, settings: ExperimentSettings
) -> tuple[float, dict[str, Any], dict[str, dict[str, Any]], dict[str, float]]:
    """Run the served detector over the test split; writes predictions.json (``wlcad evaluate cade``
    reads it) and evaluation/froc.{json,png}. Returns CPM, its CI, the group CPMs, the card metrics."""
    detector = onnx_detector(task, onnx, settings.threads, model_version=f"{task.model_name}/{arm_dir.name}")
    case_ids, candidates, documents = [], [], []
    for case in manifest_cases(test_manifest):
        result = detector.detect(read_image(case.image))
        case_ids.append(case.case_id)
        candidates += result.froc_candidates(case.case_id)
        documents.append({"case_id": case.case_id, **result.as_dict()})
    _write_json(arm_dir / "predictions.json", documents)
    predictions = Predictions(
        task.name, task.model_name, detector.model_version, tuple(case_ids), tuple(candidates)
    )
    report = evaluate_cade(read_truth(test_manifest), predictions, n_resamples=settings.n_resamples)
    write_report(report, arm_dir / "evaluation")
    groups = manifest_group_cpms(
        test_manifest, candidates, FAMILY_COLUMN, SHAPE_GROUPS, n_resamples=settings.n_resamples
    )
    ci = report.cpm_ci
    overall = {
        "name": ALL_LESIONS,
        "n_lesions": report.n_lesions,
        "n_found": report.estimate.n_found,
        "cpm": float(report.cpm),
        "cpm_ci": {"low": ci.low, "high": ci.high, "level": ci.level},
    }
    by_group = {ALL_LESIONS: overall} | {g.name: g.as_dict() for g in groups}
    truth = read_truth(test_manifest)
    lesions = [t.lesion for t in truth.lesions]
    samples = {
        ALL_LESIONS: cpm_samples(lesions, candidates, truth.case_ids, n_resamples=settings.n_resamples)
    }
    samples |= {g.name: g.samples for g in groups if g.samples is not None}
    _write_json(
        arm_dir / BOOTSTRAP,
        {
            "n_resamples": settings.n_resamples,
            "seed": 0,
            "cpm_samples": {
                k: [v if math.isfinite(v) else None for v in a.tolist()] for k, a in samples.items()
            },
        },
    )
    return float(report.cpm), overall["cpm_ci"], by_group, report_metrics(report, "test")


def run_arm(
    task: CadeTask, arm: Arm, out: Path, test_manifest: Path, settings: ExperimentSettings
) -> ArmResult:
    """One arm, resumably: a finished result is read back, a finished training only re-evaluated."""
    arm_dir = out / "arms" / arm.name
    done = arm_dir / "result.json"
    if done.is_file():
        return ArmResult(**json.loads(done.read_text()), resumed=True)
    shared = phantom_split(task, "train", arm.cases, out / "data" / f"train-n{arm.cases}", settings.size_xyz)
    _link_split(arm_dir / "data" / "train", shared.parent.resolve())
    training = _training_settings(settings, arm, arm_dir)
    record = _finished_training(arm_dir, training)
    reused = record is not None
    if record is None:
        record, wall, cpu = _train(task, training)
    else:
        wall, cpu = float(record["metrics"].get("training_seconds", 0.0)), float("nan")
    start = time.perf_counter()
    cpm, ci, groups, metrics = evaluate_arm(task, arm_dir / "model.onnx", test_manifest, arm_dir, settings)
    result = ArmResult(
        target=arm.target,
        cases=arm.cases,
        train_case_ids=[c.case_id for c in manifest_cases(shared)],
        cpm=cpm,
        cpm_ci=ci,
        groups=groups,
        metrics=record["metrics"] | metrics,
        training_seconds=round(wall, 1),
        training_cpu_seconds=round(cpu, 1) if math.isfinite(cpu) else None,  # type: ignore[arg-type]
        evaluation_seconds=round(time.perf_counter() - start, 1),
        model=str(record["model"]),
        reused_training=reused,
    )
    _write_json(done, result.as_dict())
    return result


# ------------------------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class Match:
    """How many sphere cases reach the painted CPM at one painted size (``sphere_cases`` None: not
    reached, or the group has no lesion in the test set)."""

    group: str
    painted_cases: int
    painted_cpm: float | None
    sphere_cases: float | None
    status: str

    @property
    def ratio(self) -> float | None:
        return None if self.sphere_cases is None else self.sphere_cases / self.painted_cases

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ratio": self.ratio}


def cases_to_match(
    group: str, sizes: Sequence[int], sphere: Sequence[float | None], painted_cases: int, target: float | None
) -> Match:
    """The smallest sphere training size whose CPM ≥ ``target``: the first measured size that reaches
    it, interpolated on log cases from the size before (where the curve crosses the target)."""
    if target is None or any(v is None for v in sphere):
        return Match(group, painted_cases, target, None, "no lesions of this group in the test set")
    if target <= 0:
        return Match(group, painted_cases, target, None, "painted CPM is 0: nothing to match")
    for i, value in enumerate(sphere):
        if value >= target:  # type: ignore[operator]
            if i == 0:
                return Match(
                    group,
                    painted_cases,
                    target,
                    float(sizes[0]),
                    "reached at the smallest size measured (so at most this many)",
                )
            low, high = float(sphere[i - 1]), float(value)  # type: ignore[arg-type]
            fraction = (target - low) / (high - low)
            log_n = math.log(sizes[i - 1]) + fraction * (math.log(sizes[i]) - math.log(sizes[i - 1]))
            return Match(group, painted_cases, target, math.exp(log_n), "interpolated on log cases")
    return Match(group, painted_cases, target, None, "not reached")


def _cpm_of(results: dict[Arm, ArmResult], arm: Arm, group: str) -> float | None:
    return results[arm].groups[group]["cpm"]


def matches(results: dict[Arm, ArmResult], sizes: Sequence[int]) -> list[Match]:
    out = []
    for group in (ALL_LESIONS, *SHAPE_GROUPS):
        sphere = [_cpm_of(results, Arm("sphere", n), group) for n in sizes]
        for n in sizes:
            out.append(cases_to_match(group, sizes, sphere, n, _cpm_of(results, Arm("painted", n), group)))
    return out


def _arm_samples(out: Path, arm: Arm) -> dict[str, np.ndarray]:
    path = out / "arms" / arm.name / BOOTSTRAP
    if not path.is_file():
        return {}
    document = json.loads(path.read_text())
    return {
        k: np.array([np.nan if v is None else v for v in values])
        for k, values in document["cpm_samples"].items()
    }


def paired_differences(
    out: Path, results: dict[Arm, ArmResult], sizes: Sequence[int]
) -> list[dict[str, Any]]:
    """Painted − sphere CPM at each size and group, with a paired bootstrap 95 % CI (both arms were
    evaluated on the same test cases with the same resample draws, so the test set's own variance —
    which case happened to be hard — cancels, and the CI is much narrower than two separate ones)."""
    rows = []
    for n in sizes:
        painted, sphere = Arm("painted", n), Arm("sphere", n)
        a, b = _arm_samples(out, painted), _arm_samples(out, sphere)
        for group in (ALL_LESIONS, *SHAPE_GROUPS):
            p, q = _cpm_of(results, painted, group), _cpm_of(results, sphere, group)
            ci = paired_difference(a[group], b[group]) if group in a and group in b else None
            rows.append({
                "group": group,
                "cases": n,
                "difference": None if p is None or q is None else p - q,
                "ci": None if ci is None else {"low": ci.low, "high": ci.high, "level": ci.level},
            })  # fmt: skip
    return rows


def _cell(group: dict[str, Any]) -> str:
    if group["cpm"] is None:
        return "— (no lesions)"
    ci = group["cpm_ci"]
    return f"{group['cpm']:.3f} [{ci['low']:.3f}–{ci['high']:.3f}]"


def table_markdown(summary: dict[str, Any]) -> str:
    """The experiment as a markdown table: CPM [95 % CI] per arm and group, then the cases to match."""
    groups = (ALL_LESIONS, *SHAPE_GROUPS)
    lines = [
        f"# Sphere vs painted labels: {summary['task']}",
        "",
        f"Test set: {summary['test_cases']} held-out cases (seed {summary['seeds']['test']}), lesions per group: "
        + ", ".join(f"{g} {summary['test_lesions'][g]}" for g in groups)
        + f". Budget per arm: {summary['settings']['steps']} steps × batch {summary['settings']['batch_size']}, "
        f"seed {summary['settings']['seed']}. CPM with case-bootstrap 95 % CI.",
        "",
        "| training cases | labels | " + " | ".join(f"CPM {g}" for g in groups) + " | train s |",
        "|---|---|" + "---|" * len(groups) + "---|",
    ]
    for arm in summary["arms"]:
        cells = " | ".join(_cell(arm["groups"][g]) for g in groups)
        lines.append(f"| {arm['cases']} | {arm['target']} | {cells} | {arm['training_seconds']:.0f} |")
    low, high = REFERENCE_RATIO
    lines += [
        "",
        f"## Cases spheres need to match painted labels (report: {low}–{high}× more cases)",
        "",
        "| group | painted cases | painted CPM | sphere cases needed | ratio | how |",
        "|---|---|---|---|---|---|",
    ]
    for m in summary["cases_to_match"]:
        cpm = "—" if m["painted_cpm"] is None else f"{m['painted_cpm']:.3f}"
        need = "not reached" if m["sphere_cases"] is None else f"{m['sphere_cases']:.1f}"
        ratio = "—" if m["ratio"] is None else f"{m['ratio']:.2f}×"
        lines.append(f"| {m['group']} | {m['painted_cases']} | {cpm} | {need} | {ratio} | {m['status']} |")
    lines += [
        "",
        "## Painted − sphere CPM (paired bootstrap 95 % CI over the same test cases)",
        "",
        "| training cases | " + " | ".join(groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    by_size: dict[int, dict[str, dict[str, Any]]] = {}
    for row in summary["paired_differences"]:
        by_size.setdefault(row["cases"], {})[row["group"]] = row
    for n, row in by_size.items():
        lines.append(f"| {n} | " + " | ".join(_difference_cell(row[g]) for g in groups) + " |")
    lines += ["", f"Time: {summary['seconds']['total']:.0f} s in all on {summary['settings_run']['device']} "
              f"({summary['settings_run']['threads']} threads); command: `{summary['command']}`", ""]  # fmt: skip
    return "\n".join(lines)


def _difference_cell(row: dict[str, Any]) -> str:
    if row["difference"] is None:
        return "—"
    ci = "" if row["ci"] is None else f" [{row['ci']['low']:+.3f}, {row['ci']['high']:+.3f}]"
    return f"{row['difference']:+.3f}{ci}"


def plot_cpm_vs_cases(summary: dict[str, Any], path: Path) -> Path:
    """CPM vs training cases (log axis) with 95 % CI bars, sphere and painted, one panel per group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = (ALL_LESIONS, *SHAPE_GROUPS)
    figure = Figure(figsize=(4.2 * len(groups), 4.0))
    sizes = summary["cases"]
    for k, group in enumerate(groups):
        axes = figure.add_subplot(1, len(groups), k + 1)
        for target, colour, shift in (("sphere", "tab:blue", 0.97), ("painted", "tab:orange", 1.03)):
            rows = [
                a for a in summary["arms"] if a["target"] == target and a["groups"][group]["cpm"] is not None
            ]
            if not rows:
                continue
            x = [a["cases"] * shift for a in rows]
            y = [a["groups"][group]["cpm"] for a in rows]
            below = [v - a["groups"][group]["cpm_ci"]["low"] for v, a in zip(y, rows, strict=True)]
            above = [a["groups"][group]["cpm_ci"]["high"] - v for v, a in zip(y, rows, strict=True)]
            axes.errorbar(
                x, y, yerr=[below, above], color=colour, marker="o", capsize=3, label=f"{target} labels"
            )
        axes.set_xscale("log")
        axes.set_xticks(sizes)
        axes.set_xticklabels([str(n) for n in sizes])
        axes.minorticks_off()
        axes.set_ylim(-0.02, 1.02)
        axes.grid(True, alpha=0.4)
        axes.set_xlabel("training cases")
        axes.set_ylabel("CPM (95 % CI)")
        axes.set_title(f"{group} ({summary['test_lesions'][group]} lesions)", fontsize="medium")
        axes.legend(loc="upper left", fontsize="small")
    figure.suptitle(f"{summary['task']}: sphere vs painted labels, {summary['test_cases']} test cases")
    figure.tight_layout()
    FigureCanvasAgg(figure)
    with atomic_output(path, suffix=".png") as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    return path


# ------------------------------------------------------------------------------------------------- run


@dataclass
class ExperimentResult:
    """Where the experiment's outputs are, and its numbers."""

    json: Path
    table: Path
    plot: Path
    summary: dict[str, Any]
    trained: int


def run_sphere_vs_painted(
    out: Path, settings: ExperimentSettings, progress: Callable[[str], None] = lambda line: None
) -> ExperimentResult:
    """Every arm (resumably), then the JSON, table and plot. ``progress`` gets one line per arm."""
    settings.check()
    settings.cases = check_cases(settings.cases)
    task = get_task(settings.task)
    out = Path(out)
    _check_resume(out, settings)
    test_manifest = phantom_split(task, "test", settings.test_cases, out / "data", settings.size_xyz)
    arms = [Arm(target, n) for n in settings.cases for target in TARGETS]
    results: dict[Arm, ArmResult] = {}
    started = time.perf_counter()
    for index, arm in enumerate(arms, start=1):
        result = results[arm] = run_arm(task, arm, out, test_manifest, settings)
        how = "done earlier" if result.resumed else ("re-evaluated" if result.reused_training else "trained")
        shapes = ", ".join(f"{g} {_cpm_text(result.groups[g])}" for g in SHAPE_GROUPS)
        progress(
            f"arm {index}/{len(arms)} {arm.target} labels × {arm.cases} cases: {how}, "
            f"train {result.training_seconds:.0f} s, evaluate {result.evaluation_seconds:.0f} s; "
            f"CPM {result.cpm:.3f} [{result.cpm_ci['low']:.3f}–{result.cpm_ci['high']:.3f}] ({shapes})"
        )
    truth = read_truth(test_manifest)
    summary = {
        "task": task.name,
        "command": settings.command,
        "settings": settings.recorded(),
        "settings_run": {"threads": settings.threads, "device": settings.device},
        "seeds": asdict(task.seeds),
        "cases": list(settings.cases),
        "test_cases": len(truth.case_ids),
        "test_manifest": str(test_manifest),
        "test_lesions": {g: results[arms[0]].groups[g]["n_lesions"] for g in (ALL_LESIONS, *SHAPE_GROUPS)},
        "shape_groups": {g: list(f) for g, f in SHAPE_GROUPS.items()},
        "arms": [results[a].as_dict() for a in arms],
        "cases_to_match": [m.as_dict() for m in matches(results, settings.cases)],
        "paired_differences": paired_differences(out, results, settings.cases),
        "reference": {"source": "Nomura et al. 2019", "ratio_low": REFERENCE_RATIO[0], "ratio_high": REFERENCE_RATIO[1]},
        "seconds": {
            "this_run": round(time.perf_counter() - started, 1),
            "total": round(sum(r.training_seconds + r.evaluation_seconds for r in results.values()), 1),
        },
    }  # fmt: skip
    json_path = _write_json(out / f"{RESULT}.json", summary)
    table = write_bytes_atomically(out / f"{RESULT}.md", table_markdown(summary).encode())
    plot = plot_cpm_vs_cases(summary, out / f"{RESULT}.png")
    trained = sum(1 for r in results.values() if not r.resumed and not r.reused_training)
    return ExperimentResult(json_path, table, plot, summary, trained)


def _cpm_text(group: dict[str, Any]) -> str:
    return "—" if group["cpm"] is None else f"{group['cpm']:.3f}"
