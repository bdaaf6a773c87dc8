"""``wlcad evaluate cade``: FROC, CPM with 95 % CIs, breakdowns and operating points of a detector;
``wlcad evaluate anomaly``: ROC-AUC with 95 % CIs, per abnormality type, sensitivity at 95 %
specificity of anomaly scores (:mod:`services.evaluation.anomaly_report`)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from services.core.errors import InputError
from services.evaluation.bootstrap import DEFAULT_RESAMPLES
from services.evaluation.cade_report import (
    CadeReport,
    SubgroupSensitivity,
    evaluate_cade,
    read_predictions,
    read_truth,
    write_report,
)
from services.evaluation.matching import MatchRule

#: ``--rule`` names: the short ones of the issue and the enum's own values.
RULES = {"luna": MatchRule.LUNA16, "luna16": MatchRule.LUNA16, "adam": MatchRule.ADAM}


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("evaluate", help="score outputs against a manifest's truth")
    actions = parser.add_subparsers(dest="evaluate_command", metavar="WHAT", required=True)
    cade = actions.add_parser(
        "cade",
        help="FROC/CPM of detection candidates (wlcad detect JSON) against the manifest's lesions",
        description=(
            "Writes <out>/froc.json (every number) and <out>/froc.png. A manifest case without a "
            "prediction file counts as a case with no candidates (reported)."
        ),
    )
    cade.add_argument("--manifest", type=Path, required=True, help="manifest CSV with the lesions (truth)")
    cade.add_argument(
        "--pred", type=Path, required=True, help="folder of <case_id>.json or one JSON file with a list"
    )
    cade.add_argument(
        "--rule",
        choices=sorted(RULES),
        help="hit rule: luna (LUNA16, < r) or adam (≤ r); default: the predictions' task's (adam for aneurysms)",
    )
    cade.add_argument("--out", type=Path, default=Path("cade-evaluation"), help="output folder")
    cade.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples")
    cade.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    cade.set_defaults(handler=run_cade)

    anomaly = actions.add_parser(
        "anomaly",
        help="ROC-AUC (95 % CI), per type, sensitivity at 95 % specificity of wlcad score outputs",
        description=(
            "Writes <out>/anomaly.json (every number) and <out>/roc.png. Truth: a case is abnormal when "
            "its manifest rows say so; its types are their lesion_type values. Each type's AUC is that "
            "type's cases against all normals. A manifest case without a score is an error unless "
            "--allow-missing."
        ),
    )
    anomaly.add_argument(
        "--manifest", type=Path, required=True, help="manifest CSV (truth: abnormal, lesion_type)"
    )
    anomaly.add_argument(
        "--scores",
        type=Path,
        required=True,
        help="wlcad score --manifest's folder (<case_id>.json) or worklist.csv",
    )
    anomaly.add_argument("--out", type=Path, default=Path("anomaly-evaluation"), help="output folder")
    anomaly.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples")
    anomaly.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    anomaly.add_argument(
        "--allow-missing", action="store_true", help="leave out (and list) manifest cases without a score"
    )
    anomaly.set_defaults(handler=run_anomaly)


def _threshold(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "none"


def _groups(title: str, groups: tuple[SubgroupSensitivity, ...]) -> list[str]:
    lines = [f"{title:<18} lesions  sens@1 FP  sens@2 FP  sens@4 FP"]
    for group in groups:
        cells = [f"{r.sensitivity:9.3f}" for r in group.at_rates] or ["        -"] * 3
        lines.append(f"  {group.name:<16} {group.n_lesions:7d}  " + "  ".join(cells))
    return lines


def summary(report: CadeReport) -> str:
    """The short table printed after the files are written."""
    missing = len(report.cases_without_predictions)
    ci = report.cpm_ci
    lines = [
        f"{report.task} · {report.model} {report.model_version} · rule {report.rule.value}",
        f"{report.n_cases} cases ({missing} without predictions, counted as no candidates), "
        f"{report.n_lesions} lesions, {report.n_candidates} candidates",
        f"CPM {report.cpm:.3f} ({ci.level:.0%} CI {ci.low:.3f}–{ci.high:.3f}, {ci.n_resamples} resamples)",
        "FP/case  sensitivity  95% CI",
    ]
    for rate in report.sensitivities:
        lines.append(
            f"{rate.fp_per_case:7.3g}  {rate.sensitivity:11.3f}  {rate.ci.low:.3f}–{rate.ci.high:.3f}"
        )
    lines.append("operating point   threshold  FP/case  sensitivity")
    for point in report.operating_points:
        lines.append(
            f"  ≤ {point.max_fp_per_case:g} FP/case    {_threshold(point.threshold):>9}  "
            f"{point.fp_per_case:7.3f}  {point.sensitivity:11.3f}"
        )
    lines += _groups("by size", report.by_size) + _groups("by kind", report.by_kind)
    return "\n".join(lines)


def run_cade(args: argparse.Namespace) -> int:
    if args.resamples < 1:
        raise InputError(f"must be ≥ 1, got {args.resamples}", field="--resamples")
    if args.pred.is_dir() and args.out.resolve() == args.pred.resolve():
        raise InputError("must differ from --pred (froc.json would be read as a prediction)", field="--out")
    truth = read_truth(args.manifest)
    predictions = read_predictions(args.pred)
    report = evaluate_cade(
        truth,
        predictions,
        rule=RULES[args.rule] if args.rule else None,
        n_resamples=args.resamples,
        seed=args.seed,
    )
    json_path, png_path = write_report(report, args.out)
    print(summary(report))
    print(f"wrote {json_path} and {png_path}")
    return 0


def run_anomaly(args: argparse.Namespace) -> int:
    from services.evaluation import anomaly_report

    if args.resamples < 1:
        raise InputError(f"must be ≥ 1, got {args.resamples}", field="--resamples")
    if args.scores.is_dir() and args.out.resolve() == args.scores.resolve():
        raise InputError("must differ from --scores (anomaly.json would be read as a score)", field="--out")
    truth = anomaly_report.read_truth(args.manifest)
    scores = anomaly_report.read_scores(args.scores)
    report = anomaly_report.evaluate_anomaly(
        truth, scores, allow_missing=args.allow_missing, n_resamples=args.resamples, seed=args.seed
    )
    json_path, png_path = anomaly_report.write_report(report, args.out)
    print(anomaly_report.summary(report))
    print(f"wrote {json_path} and {png_path}")
    return 0
