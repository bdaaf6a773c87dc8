"""Compare every anomaly method on the SAME test cases in one run, and ship what beats the baseline.

Methods: the PCA baseline (fitted on the training normals), the normal Glow (``--glow``), the
two-flow posterior (``--mixture`` and ``--normal`` flows) and f-AnoGAN (``--gan``). Each is scored
through its exported ONNX graph with :func:`services.anomaly.scoring.scores_from_outputs`, the
serving code, after checking the export against torch; ``--shipped glow,two-flow`` scores the newest
shipped graphs of those families on the same cases too (as references: never re-shipped). Reported per method: test ROC-AUC with a bootstrap 95 % CI
(1,000 case resamples), per finding type (that type's cases against all test normals),
sensitivity at 95 % specificity and the validation AUC. ``--ship`` registers each learned model
whose test AUC beats the baseline's, its card holding the commands, seeds, metrics and the
validation normals' scores (calibration).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from scipy.stats import spearmanr
from tqdm import tqdm

from services.anomaly.calibration import Calibration
from services.anomaly.preprocess import dequantise_centre
from services.anomaly.scoring import INPUT_NAME, LOG_PX, scores_from_outputs
from services.anomaly.tasks import AnomalyTask, anomaly_task
from services.evaluation.bootstrap import bootstrap_auc
from services.evaluation.roc import roc_auc, roc_curve
from services.inference.export import register_onnx_model
from training.anomaly import fanogan
from training.anomaly.baseline import PcaBaseline
from training.anomaly.data import Split, load_split
from training.anomaly.export import export_glow, export_two_flow
from training.anomaly.tasks import plan_for
from training.anomaly.train import load_flow

_REPO_ROOT = Path(__file__).resolve().parents[2]


def onnx_scores(onnx_bytes: bytes, model: str, split: Split, task: AnomalyTask, batch: int = 8) -> np.ndarray:
    """Scores of a split's cases through the exported graph (onnxruntime, one thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    out = []
    for start in tqdm(range(0, len(split.levels), batch), desc=f"{model} seed {split.seed}", leave=False):
        x = dequantise_centre(split.levels[start : start + batch], task.levels).reshape(-1, 1, *task.spatial)
        outputs = dict(zip(names, session.run(None, {INPUT_NAME: x}), strict=True))
        out.append(scores_from_outputs(model, outputs, task))
    return np.concatenate(out)


def export_matches_torch(onnx_bytes: bytes, flow_modules: list, split: Split, task: AnomalyTask) -> float:
    """Largest |ONNX − torch| log p(x) (nats) over 4 validation images, each flow (torch's
    ``Glow.log_prob``, the training path, against the exported map-summing graph)."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    x = dequantise_centre(split.levels[:4], task.levels).reshape(-1, 1, *task.spatial)
    names = [o.name for o in session.get_outputs() if o.name.startswith(LOG_PX)]
    got = session.run(names, {INPUT_NAME: x})
    worst = 0.0
    with torch.no_grad():
        for module, array in zip(flow_modules, got, strict=True):
            ref = module.log_prob(torch.from_numpy(x) - 0.5).numpy()
            worst = max(worst, float(np.max(np.abs(ref - array[:, 0]))))
    return worst


def lineage(run: Path) -> list[dict]:
    """The training metadata of ``run`` and of every run it was initialised from, oldest first."""
    meta = json.loads((Path(run) / "train.json").read_text())
    parent = lineage(Path(meta["init"]).parent) if meta.get("init") else []
    return [*parent, meta]


def unique_runs(*chains: list[dict]) -> list[dict]:
    """Runs of several lineages, each once (two flows of a posterior share their ancestor)."""
    seen, out = set(), []
    for meta in (m for chain in chains for m in chain):
        if meta["command"] not in seen:
            seen.add(meta["command"])
            out.append(meta)
    return out


def complexity(split: Split, levels: int = 256) -> np.ndarray:
    """Mean absolute neighbour difference of each model input (all axes): how much texture and noise
    an image has — what a likelihood model's NLL tends to follow (Nalisnick et al. 2019)."""
    x = split.levels.astype(np.float32) / levels
    return sum(np.abs(np.diff(x, axis=a)).mean(axis=(1, 2, 3)) for a in (1, 2, 3) if x.shape[a] > 1)


def metrics_for(scores: np.ndarray, split: Split) -> dict[str, float]:
    truth = split.abnormal
    normal = ~truth
    rho = spearmanr(scores[normal], complexity(split)[normal]).statistic
    ci = bootstrap_auc(scores, truth)
    curve = roc_curve(scores, truth)
    sens95 = float(curve.tpr[curve.fpr <= 0.05].max())
    out = {
        "auc": round(roc_auc(scores, truth), 4),
        "auc_ci_low": round(ci.low, 4),
        "auc_ci_high": round(ci.high, 4),
        "sensitivity_at_95_specificity": round(sens95, 4),
        "spearman_with_complexity_among_normals": round(float(rho), 4),
    }
    for kind in sorted(set(split.finding[truth].tolist())):
        chosen = normal | (split.finding == kind)
        out[f"auc_{kind}"] = round(roc_auc(scores[chosen], truth[chosen]), 4)
        kind_ci = bootstrap_auc(scores[chosen], truth[chosen])
        out[f"auc_{kind}_ci_low"], out[f"auc_{kind}_ci_high"] = round(kind_ci.low, 4), round(kind_ci.high, 4)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, choices=["cxr-anomaly", "head-ct-anomaly"])
    parser.add_argument("--glow", type=Path, help="run folder of the normal Glow")
    parser.add_argument("--mixture", type=Path, help="run folder of the two-flow model's mixture flow")
    parser.add_argument("--normal", type=Path, help="run folder of the two-flow model's normal flow")
    parser.add_argument(
        "--gan", type=Path, help="run folder of the f-AnoGAN (python -m training.anomaly.fanogan)"
    )
    parser.add_argument(
        "--shipped",
        default="",
        help="families whose newest shipped graph is scored alongside (e.g. glow,two-flow)",
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ship", action="store_true", help="register models that beat the baseline")
    parser.add_argument("--repository", type=Path, default=_REPO_ROOT / "model_repository")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python -m training.anomaly.evaluate " + shlex.join(sys.argv[1:] if argv is None else argv)
    task = anomaly_task(args.task)
    plan = plan_for(args.task)
    train = load_split(args.task, plan.seeds.train, plan.cases["train"])
    validation = load_split(args.task, plan.seeds.validation, plan.cases["validation"])
    test = load_split(args.task, plan.seeds.test, plan.cases["test"])
    results: dict[str, dict] = {}
    scores: dict[str, dict[str, np.ndarray]] = {}

    started = time.perf_counter()
    pca = PcaBaseline().fit(train.normals(), task.levels)
    scores["baseline"] = {"validation": pca.score(validation.levels), "test": pca.score(test.levels)}
    seconds = {"baseline": time.perf_counter() - started}

    models: dict[str, tuple[bytes, list, list[dict]]] = {}
    if args.glow:
        flow, _ = load_flow(args.glow / "flow.pt")
        models["glow"] = (export_glow(flow, task.spatial), [flow], lineage(args.glow))
    if args.mixture and args.normal:
        mixture, _ = load_flow(args.mixture / "flow.pt")
        normal, _ = load_flow(args.normal / "flow.pt")
        runs = unique_runs(lineage(args.mixture), lineage(args.normal))
        models["two-flow"] = (export_two_flow(mixture, normal, task.spatial), [mixture, normal], runs)
    export_error: dict[str, float] = {}
    if args.gan:
        gan, gan_meta = fanogan.load(args.gan / fanogan.CHECKPOINT)
        models["gan"] = (fanogan.export_fanogan(gan, task.spatial), [], [gan_meta])
        sample = dequantise_centre(validation.levels[:4], task.levels).reshape(-1, 1, *task.spatial)
        export_error["gan"] = fanogan.export_matches_torch(models["gan"][0], gan, sample)
    references = shipped_graphs(args.repository, task, [m for m in args.shipped.split(",") if m])
    for name, (onnx_bytes, flows, _) in {**models, **references}.items():
        if flows:
            export_error[name] = export_matches_torch(onnx_bytes, flows, validation, task)
        started = time.perf_counter()
        family = name.split("@", 1)[0]
        scores[name] = {
            "validation": onnx_scores(onnx_bytes, family, validation, task),
            "test": onnx_scores(onnx_bytes, family, test, task),
        }
        seconds[name] = time.perf_counter() - started

    for name, by_split in scores.items():
        results[name] = {
            **{f"test_{k}": v for k, v in metrics_for(by_split["test"], test).items()},
            "validation_auc": round(roc_auc(by_split["validation"], validation.abnormal), 4),
            "scoring_seconds_validation_and_test": round(seconds[name], 1),
        }
        if name in export_error:
            what = "score" if name == "gan" else "log_px"
            results[name][f"onnx_vs_torch_max_abs_{what}"] = export_error[name]
    summary = {
        "task": args.task,
        "command": command,
        "seeds": {"train": plan.seeds.train, "validation": plan.seeds.validation, "test": plan.seeds.test},
        "cases": {
            "train": len(train.abnormal),
            "train_normals": int((~train.abnormal).sum()),
            "validation": len(validation.abnormal),
            "validation_normals": int((~validation.abnormal).sum()),
            "test": len(test.abnormal),
            "test_normals": int((~test.abnormal).sum()),
            "test_types": {
                k: int(v) for k, v in zip(*np.unique(test.finding, return_counts=True), strict=True)
            },
        },
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "scores.npz", **{f"{m}_{s}": v for m, d in scores.items() for s, v in d.items()})
    (args.out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))

    if args.ship:
        base_auc = results["baseline"]["test_auc"]
        for name, (onnx_bytes, _, metas) in models.items():
            if results[name]["test_auc"] <= base_auc:
                print(f"not shipping {name}: test AUC {results[name]['test_auc']} ≤ baseline {base_auc}")
                continue
            ship(args, task, plan, name, onnx_bytes, metas, scores[name], validation, results, command)
    return summary


def shipped_graphs(
    repository: Path, task: AnomalyTask, families: list[str]
) -> dict[str, tuple[bytes, list, list]]:
    """``family@shipped-vN`` → the newest shipped ONNX of ``anomaly_<task>_<family>`` (a reference)."""
    from services.inference.repository import ModelRepository

    out: dict[str, tuple[bytes, list, list]] = {}
    repo = ModelRepository(repository)
    for family in families:
        name = task.model_name(family)
        versions = repo.versions(name)
        if not versions:
            raise SystemExit(f"--shipped {family}: {name} is not in {repository}")
        graph = repo.model_dir(name) / str(versions[-1]) / "model.onnx"
        out[f"{family}@shipped-v{versions[-1]}"] = (graph.read_bytes(), [], [])
    return out


def ship(args, task, plan, name, onnx_bytes, metas, scores, validation, results, command) -> None:
    normal_val = scores["validation"][~validation.abnormal]
    calibration = Calibration.from_scores(
        normal_val, plan.seeds.validation, f"{len(normal_val)} normal validation phantoms"
    )
    metrics = {k: float(v) for k, v in results[name].items() if isinstance(v, int | float)}
    metrics.update(
        {f"baseline_{k}": float(v) for k, v in results["baseline"].items() if k.startswith("test_auc")}
    )
    metrics["training_seconds"] = float(sum(m.get("seconds", 0.0) for m in metas))
    if name == "gan":
        _ship_gan(args, task, plan, onnx_bytes, metas[0], metrics, calibration, command)
        return
    what = (
        "normal Glow: score = NLL in bits/dim"
        if name == "glow"
        else "two-flow posterior: score = NLL_normal − NLL_mixture in bits/dim (log p(x) − log p(x|normal))"
    )
    flows = "; ".join(
        f"{m['steps']} steps on {m['data']} ({m['train_cases']} cases{', from the run before' if m['init'] else ''})"
        for m in metas
    )
    cfg = load_flow((args.glow if name == "glow" else args.normal) / "flow.pt")[0].config()
    register_onnx_model(
        args.repository,
        task.model_name(name),
        onnx_bytes,
        command=" && ".join([*(m["command"] for m in metas), command]),
        data_manifest=(
            f"{task.name} phantoms: train seed {plan.seeds.train} × {plan.cases['train']} cases, "
            f"validation seed {plan.seeds.validation} × {plan.cases['validation']} (calibration), "
            f"test seed {plan.seeds.test} × {plan.cases['test']}"
        ),
        seed=int(metas[0].get("seed", 0)),
        metrics=metrics,
        description=(
            f"{task.name} anomaly {what}. Glow {cfg}; input 'image' (n,1,{','.join(map(str, task.spatial))}) "
            f"in [0,1] (services.anomaly.preprocess), outputs log p(x) in nats. Trainings: {flows}."
        ),
        max_batch_size=8,
        extra={"calibration": calibration.to_json(), "score_units": "bits/dim", "trainings": metas},
    )
    print(f"shipped {task.model_name(name)}")


def _ship_gan(args, task, plan, onnx_bytes, meta, metrics, calibration, command) -> None:
    register_onnx_model(
        args.repository,
        task.model_name("gan"),
        onnx_bytes,
        command=f"{meta['command']} && {command}",
        data_manifest=(
            f"{task.name} phantoms: train seed {plan.seeds.train} normals ({meta['train_cases']} of "
            f"{plan.cases['train']} cases), validation seed {plan.seeds.validation} × {plan.cases['validation']} "
            f"(calibration), test seed {plan.seeds.test} × {plan.cases['test']}"
        ),
        seed=int(meta.get("seed", 0)),
        metrics=metrics,
        description=(
            f"{task.name} f-AnoGAN baseline (WGAN-GP {meta['steps']} generator steps, then the izi_f encoder "
            f"{meta['encoder_steps']} steps; latent {meta['latent']}, width {meta['width']}): score = mean "
            f"squared residual of x − G(E(x)) + {fanogan.KAPPA} × that of the critic's features, on [−1, 1]. "
            f"Input 'image' (n,1,{','.join(map(str, task.spatial))}) in [0,1] (services.anomaly.preprocess); "
            "outputs 'score' (n) and 'residual_map' (n,1,...)."
        ),
        max_batch_size=8,
        extra={"calibration": calibration.to_json(), "score_units": "squared residual", "trainings": [meta]},
    )
    print(f"shipped {task.model_name('gan')}")


if __name__ == "__main__":
    main()
