"""Held-out evaluation of a trained detector, through the serving pipeline.

The ONNX file runs in :class:`services.cade.pipeline.Detector` on onnxruntime (what the embedded
backend runs), over phantom cases from the task's test seeds — never used in training — and the
candidates are scored by :func:`services.evaluation.cade_report.evaluate_cade` (LUNA16 FROC, CPM with
bootstrap CI, operating thresholds). The numbers go into the model card.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from services.cade.pipeline import Detector
from services.cade.reranking import Reranker
from services.core.atomic import write_bytes_atomically
from services.core.errors import InputError
from services.core.io import read_image
from services.evaluation.cade_report import CadeReport, Predictions, evaluate_cade, read_truth, write_report
from training.cade.samples import manifest_cases, phantom_split
from training.cade.tasks import CadeTask, Split


def _onnx_infer(onnx: Path, threads: int):
    """``onnx`` on onnxruntime's CPU provider as an infer function (what the embedded backend runs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def infer(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: batch})[0]

    return infer


def onnx_detector(task: CadeTask, onnx: Path, threads: int, model_version: str = "candidate") -> Detector:
    """The task's detector bound to ``onnx`` on the CPU (its U-Net alone)."""
    return Detector(task.detector_spec(), _onnx_infer(onnx, threads), model_version)


def two_stage_detector(task: CadeTask, unet: Path, classifier: Path, threads: int) -> Detector:
    """The served two-stage detector: ``unet`` then the second-stage ``classifier``, on the CPU."""
    spec = task.detector_spec()
    if spec.rerank is None:
        raise InputError(f"{task.name} has no second stage", field="classifier")
    reranker = Reranker(spec.rerank, _onnx_infer(classifier, threads), "fpr")
    return Detector(spec, _onnx_infer(unet, threads), task.model_name, reranker)


def evaluate_split(task: CadeTask, detector: Detector, manifest: Path, out_dir: Path) -> CadeReport:
    """FROC of ``detector`` over every case of ``manifest``; writes froc.json and froc.png to ``out_dir``,
    and every case's candidates as ``predictions.json`` (a list of ``wlcad detect`` documents, which
    ``read_predictions`` and ``training.cade.compare`` read), so two detectors can be compared paired."""
    case_ids, candidates, documents = [], [], []
    for case in manifest_cases(manifest):
        result = detector.detect(read_image(case.image))
        case_ids.append(case.case_id)
        candidates += result.froc_candidates(case.case_id)
        documents.append({**result.as_dict(task.model_name), "case_id": case.case_id})
    predictions = Predictions(
        task.name, task.model_name, detector.model_version, tuple(case_ids), tuple(candidates)
    )
    report = evaluate_cade(read_truth(manifest), predictions)  # the task's own hit rule
    write_report(report, out_dir)
    write_bytes_atomically(Path(out_dir) / "predictions.json", (json.dumps(documents) + "\n").encode())
    return report


def report_metrics(report: CadeReport, prefix: str) -> dict[str, float]:
    """Card entries: CPM with its CI, sensitivity at 1/2/4 FP per case, their confidence thresholds."""
    ci = report.cpm_ci
    metrics = {
        f"{prefix}_cases": float(report.n_cases),
        f"{prefix}_lesions": float(report.n_lesions),
        f"{prefix}_cpm": round(report.cpm, 4),
        f"{prefix}_cpm_ci_low": round(ci.low, 4),
        f"{prefix}_cpm_ci_high": round(ci.high, 4),
    }
    for rate in report.sensitivities:
        if rate.fp_per_case in (1.0, 2.0, 4.0):
            metrics[f"{prefix}_sensitivity_at_{rate.fp_per_case:g}fp"] = round(rate.sensitivity, 4)
    for point in report.operating_points:
        if math.isfinite(point.threshold):
            metrics[f"{prefix}_threshold_at_{point.max_fp_per_case:g}fp"] = round(point.threshold, 4)
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def operating_points(report: CadeReport) -> dict[str, float]:
    """FP per case → the confidence cut-off that keeps the FP rate at or below it (the card's form)."""
    return {
        f"{p.max_fp_per_case:g}": round(p.threshold, 4)
        for p in report.operating_points
        if math.isfinite(p.threshold)
    }


def validation_operating_points(task: CadeTask, onnx: Path, settings, out_dir: Path) -> dict[str, float]:
    """Operating points measured on the validation split: the cut-offs are chosen on cases that are
    neither trained on nor tested on, so the test set's sensitivity at them is not tuned to it."""
    detector = onnx_detector(task, onnx, settings.threads)
    manifest = phantom_split(
        task, "validation", settings.validation_cases, Path(settings.out) / "data", settings.size_xyz
    )
    return operating_points(evaluate_split(task, detector, manifest, out_dir / "validation"))


def held_out_metrics(task: CadeTask, onnx: Path, settings, out_dir: Path) -> dict[str, float]:
    """Test (and hybrid-test) FROC metrics of ``onnx``, cases from seeds training never saw."""
    detector = onnx_detector(task, onnx, settings.threads)
    metrics: dict[str, float] = {}
    splits: list[tuple[Split, int]] = [
        ("test", settings.test_cases),
        ("hybrid-test", settings.hybrid_test_cases),
    ]
    for split, count in splits:
        if count:
            manifest = phantom_split(task, split, count, Path(settings.out) / "data", settings.size_xyz)
            report = evaluate_split(task, detector, manifest, out_dir / split)
            metrics |= report_metrics(report, split.replace("-", "_"))
    return metrics


def calibrate_run(run: Path, validation_cases: int, threads: int = 2) -> dict[str, float]:
    """Measure a finished run's operating points on ``validation_cases`` of the validation seed and
    write them into its registered card entry (what ``--validation-cases`` does during training)."""
    import dataclasses
    import json
    from types import SimpleNamespace

    from services.inference.card import ModelCard
    from training.cade.tasks import get_task

    record = json.loads((run / "training.json").read_text())
    task = get_task(record["task"])
    model = Path(record["model"])
    size = record["settings"].get("size_xyz")
    settings = SimpleNamespace(
        out=run, validation_cases=validation_cases, threads=threads, size_xyz=tuple(size) if size else None
    )
    points = validation_operating_points(task, model, settings, run / "evaluation")
    card = ModelCard.read(model.parent.parent)
    version = model.parent.name
    entry = card.versions[version]
    command = (
        f"{entry.command}; python -m training.cade.evaluate --run {run} --validation-cases {validation_cases}"
    )
    versions = dict(card.versions)
    data = f"{entry.data_manifest}; operating points: validation seed {task.seeds.validation} × {validation_cases} cases"
    versions[version] = dataclasses.replace(
        entry, command=command, data_manifest=data, extra={**entry.extra, "operating_points": points}
    )
    dataclasses.replace(card, versions=versions).write(model.parent.parent)
    return points


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="operating points of a finished CADe run (validation seed)")
    parser.add_argument("--run", type=Path, required=True, help="the training run's --out folder")
    parser.add_argument("--validation-cases", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print(calibrate_run(args.run, args.validation_cases, args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
