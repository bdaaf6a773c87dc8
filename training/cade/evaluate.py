"""Held-out evaluation of a trained detector, through the serving pipeline.

The ONNX file runs in :class:`services.cade.pipeline.Detector` on onnxruntime (what the embedded
backend runs), over phantom cases from the task's test seeds — never used in training — and the
candidates are scored by :func:`services.evaluation.cade_report.evaluate_cade` (LUNA16 FROC, CPM with
bootstrap CI, operating thresholds). The numbers go into the model card.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from services.cade.pipeline import Detector
from services.core.io import read_image
from services.evaluation.cade_report import CadeReport, Predictions, evaluate_cade, read_truth, write_report
from training.cade.samples import manifest_cases, phantom_split
from training.cade.tasks import CadeTask, Split


def onnx_detector(task: CadeTask, onnx: Path, threads: int, model_version: str = "candidate") -> Detector:
    """The task's detector bound to ``onnx`` on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def infer(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: batch})[0]

    return Detector(task.detector_spec(), infer, model_version)


def evaluate_split(task: CadeTask, detector: Detector, manifest: Path, out_dir: Path) -> CadeReport:
    """FROC of ``detector`` over every case of ``manifest``; writes froc.json and froc.png to ``out_dir``."""
    case_ids, candidates = [], []
    for case in manifest_cases(manifest):
        result = detector.detect(read_image(case.image))
        case_ids.append(case.case_id)
        candidates += result.froc_candidates(case.case_id)
    predictions = Predictions(
        task.name, task.model_name, detector.model_version, tuple(case_ids), tuple(candidates)
    )
    report = evaluate_cade(read_truth(manifest), predictions)
    write_report(report, out_dir)
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
