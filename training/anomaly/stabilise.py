"""Re-register a shipped flow with its coupling log-scales computed stably: ``log(sigmoid(x))`` →
``−softplus(−x)`` in the ONNX graph, weights untouched.

Why: the first cxr-anomaly exports computed each affine coupling's log-determinant as
``Log(Sigmoid(raw))``. Far from the training data (a 64² image of pure noise) ``raw`` falls below
about −88, ``Sigmoid`` underflows to 0 in float32 and ``Log`` gives −inf: log p(x) = −inf, a
non-finite score the service can only refuse. ``−Softplus(−x)`` is the same function without the
underflow (onnxruntime's Softplus is stable at ±200; :class:`training.anomaly.glow.AffineCoupling`
now exports ``logsigmoid`` for the same reason). The flows' weights (``flow.pt``) are not kept in
the repository, so the shipped graph itself is rewritten; nothing else in it changes.

The new version is measured, not assumed: every validation and test image is scored through both
graphs (the largest |Δ log p(x)| goes on the card), the test metrics and the calibration come from
the new graph's own scores, and inputs that gave −inf before (pure noise, a checkerboard, the
extremes) must now give finite values.

One command per model::

    python -m training.anomaly.stabilise --task cxr-anomaly --model glow [--repository model_repository]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from services.anomaly.calibration import Calibration
from services.anomaly.preprocess import dequantise_centre
from services.anomaly.scoring import INPUT_NAME, LOG_PX
from services.anomaly.tasks import anomaly_task
from services.evaluation.roc import roc_auc
from services.inference.card import ModelCard
from services.inference.export import register_onnx_model
from services.inference.repository import ONNX_FILE
from training.anomaly.data import Split, load_split
from training.anomaly.evaluate import metrics_for, onnx_scores
from training.anomaly.tasks import plan_for

_REPO_ROOT = Path(__file__).resolve().parents[2]


def stable_log_sigmoid(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` with every ``Log`` of a ``Sigmoid`` output replaced by ``Neg(Softplus(Neg(x)))`` of
    the Sigmoid's input (the Sigmoid stays for its other consumers); returns (model, rewrites)."""
    graph = model.graph
    sigmoid_input = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "Sigmoid"}
    nodes, rewrites = [], 0
    for node in graph.node:
        if node.op_type == "Log" and node.input[0] in sigmoid_input:
            x, out, tag = sigmoid_input[node.input[0]], node.output[0], f"stable_logsigmoid_{rewrites}"
            nodes += [
                helper.make_node("Neg", [x], [f"{tag}_neg"], name=f"{tag}_neg"),
                helper.make_node("Softplus", [f"{tag}_neg"], [f"{tag}_softplus"], name=f"{tag}_softplus"),
                helper.make_node("Neg", [f"{tag}_softplus"], [out], name=f"{tag}_out"),
            ]
            rewrites += 1
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model, rewrites


def hostile_inputs(spatial: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Images far from any radiograph, in the model's [0, 1] domain: noise, a checkerboard, 0, 1."""
    rng = np.random.default_rng(seed)
    checker = (np.indices(spatial).sum(0) % 2).astype(np.float32)
    images = [rng.random(spatial), rng.random(spatial) ** 4, checker, np.zeros(spatial), np.ones(spatial)]
    return np.stack(images).astype(np.float32)[:, None]


def _log_px(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    names = [o.name for o in session.get_outputs() if o.name.startswith(LOG_PX)]
    return np.concatenate(session.run(names, {INPUT_NAME: x}), axis=1)


def largest_difference(old: bytes, new: bytes, splits: list[Split], levels: int, spatial) -> float:
    """max |log p_old − log p_new| (nats) over every image of ``splits``, each flow's output."""
    a, b = (ort.InferenceSession(m, providers=["CPUExecutionProvider"]) for m in (old, new))
    worst = 0.0
    for split in splits:
        for start in range(0, len(split.levels), 16):
            x = dequantise_centre(split.levels[start : start + 16], levels).reshape(-1, 1, *spatial)
            worst = max(worst, float(np.max(np.abs(_log_px(a, x) - _log_px(b, x)))))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", required=True, choices=["cxr-anomaly", "head-ct-anomaly"])
    parser.add_argument("--model", required=True, choices=["glow", "two-flow"])
    parser.add_argument("--repository", type=Path, default=_REPO_ROOT / "model_repository")
    args = parser.parse_args(argv)
    command = "python -m training.anomaly.stabilise " + shlex.join(sys.argv[1:] if argv is None else argv)
    task, plan = anomaly_task(args.task), plan_for(args.task)
    name = task.model_name(args.model)
    model_dir = args.repository / name
    card = ModelCard.read(model_dir)
    version, entry = max(card.versions.items(), key=lambda kv: int(kv[0]))
    old = (model_dir / version / ONNX_FILE).read_bytes()
    stable, rewrites = stable_log_sigmoid(onnx.load_from_string(old))
    if rewrites == 0:
        print(f"{name}/{version} has no Log(Sigmoid): nothing to do")
        return 0
    new = stable.SerializeToString()

    session_old, session_new = (
        ort.InferenceSession(m, providers=["CPUExecutionProvider"]) for m in (old, new)
    )
    hostile = hostile_inputs(task.spatial)
    before, after = _log_px(session_old, hostile), _log_px(session_new, hostile)
    if not np.isfinite(after).all():
        raise SystemExit(f"still non-finite after the rewrite: {after.tolist()}")
    validation = load_split(args.task, plan.seeds.validation, plan.cases["validation"])
    test = load_split(args.task, plan.seeds.test, plan.cases["test"])
    worst = largest_difference(old, new, [validation, test], task.levels, task.spatial)
    scores = {
        "validation": onnx_scores(new, args.model, validation, task),
        "test": onnx_scores(new, args.model, test, task),
    }
    normal_val = scores["validation"][~validation.abnormal]
    calibration = Calibration.from_scores(
        normal_val, plan.seeds.validation, f"{len(normal_val)} normal validation phantoms"
    )
    metrics = {k: v for k, v in entry.metrics.items() if not k.startswith("test_")}  # baseline, training time
    metrics |= {f"test_{k}": float(v) for k, v in metrics_for(scores["test"], test).items()}
    metrics["validation_auc"] = round(roc_auc(scores["validation"], validation.abnormal), 4)
    metrics["max_abs_log_px_change_nats"] = worst
    notes = (
        f"version {version}'s graph with its {rewrites} Log(Sigmoid(x)) rewritten as -Softplus(-x) (same weights): "
        f"log p(x) differs by at most {worst:.3g} nats over the {len(validation.levels) + len(test.levels)} "
        f"validation and test images; on noise / checkerboard / 0 / 1 it was {np.round(before[:, 0], 1).tolist()} "
        f"and is now {np.round(after[:, 0], 1).tolist()} nats. Metrics and calibration re-measured on this graph."
    )
    path = register_onnx_model(
        args.repository,
        name,
        new,
        command=command,
        data_manifest=entry.data_manifest,
        seed=entry.seed,
        metrics=metrics,
        max_batch_size=8,
        notes=notes,
        extra={**entry.extra, "calibration": calibration.to_json(), "rewritten_from_version": int(version)},
    )
    print(
        f"registered {path}\n{notes}\ntest AUC {metrics['test_auc']} [{metrics['test_auc_ci_low']}, {metrics['test_auc_ci_high']}]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
