"""Two detectors on the same cases: each CPM with its case-bootstrap 95 % CI and the paired CI of the
difference (the same resampled cases for both), so "B is better than A" is a measured claim.

One command, on two ``wlcad detect --manifest`` output folders of one manifest::

    python -m training.cade.compare --manifest TEST/manifest.csv --pred A_DIR --pred B_DIR [--out compare.json]

The hit rule is the task's (LUNA16 for nodules, ADAM for aneurysms); both folders must hold the
same task's predictions for the manifest's cases.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from services.core.errors import InputError
from services.evaluation.bootstrap import DEFAULT_RESAMPLES
from services.evaluation.cade_groups import cpm_samples, paired_difference
from services.evaluation.cade_report import evaluate_cade, read_predictions, read_truth, task_rule


@dataclass(frozen=True)
class DetectorCpm:
    pred: str
    model_version: str
    cpm: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Comparison:
    task: str
    n_cases: int
    n_lesions: int
    a: DetectorCpm
    b: DetectorCpm
    #: CPM of b minus a, and its paired 95 % CI.
    difference: float
    difference_ci_low: float
    difference_ci_high: float


def compare(
    manifest: Path, pred_a: Path, pred_b: Path, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> Comparison:
    truth = read_truth(manifest)
    runs = [read_predictions(p) for p in (pred_a, pred_b)]
    if runs[0].task != runs[1].task:
        raise InputError(f"{runs[0].task} and {runs[1].task} are different tasks", field="pred")
    lesions = [t.lesion for t in truth.lesions]
    rule = task_rule(runs[0].task)
    samples, summaries = [], []
    for path, run in zip((pred_a, pred_b), runs, strict=True):
        report = evaluate_cade(truth, run, n_resamples=n_resamples, seed=seed)
        ci = report.cpm_ci
        summaries.append(DetectorCpm(str(path), run.model_version, report.cpm, ci.low, ci.high))
        samples.append(
            cpm_samples(
                lesions, run.candidates, truth.case_ids, rule=rule, n_resamples=n_resamples, seed=seed
            )
        )
    interval = paired_difference(samples[1], samples[0])
    if interval is None:
        raise InputError("no resample defines both CPMs", field="manifest")
    return Comparison(
        task=runs[0].task,
        n_cases=len(truth.case_ids),
        n_lesions=len(lesions),
        a=summaries[0],
        b=summaries[1],
        difference=summaries[1].cpm - summaries[0].cpm,
        difference_ci_low=float(interval.low),
        difference_ci_high=float(interval.high),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--pred", type=Path, action="append", required=True, help="give twice: A then B")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES)
    parser.add_argument("--out", type=Path, help="also write the comparison as JSON")
    args = parser.parse_args(argv)
    try:
        if len(args.pred) != 2:
            raise InputError(f"give exactly two, got {len(args.pred)}", field="pred")
        result = compare(args.manifest, args.pred[0], args.pred[1], args.resamples)
    except InputError as exc:
        print(f"compare: error: {exc.field}: {exc.message}", file=sys.stderr)
        return 2
    for label, run in (("A", result.a), ("B", result.b)):
        print(f"{label} {run.model_version}: CPM {run.cpm:.3f} [{run.ci_low:.3f}, {run.ci_high:.3f}]")
    print(
        f"B − A: {result.difference:+.3f} [{result.difference_ci_low:+.3f}, {result.difference_ci_high:+.3f}] "
        f"paired, {result.n_cases} cases, {result.n_lesions} lesions ({result.task})"
    )
    if args.out:
        args.out.write_text(json.dumps(asdict(result), indent=1) + "\n")
    return 0 if np.isfinite(result.difference) else 2


if __name__ == "__main__":
    sys.exit(main())
