"""How many of a detector's false positives fall on the phantoms' unlabelled hard negatives.

The head-MRA phantoms (``training/data/head_mra.py``) carry tight vessel loops that look like aneurysms
on a maximum-intensity projection and are **not** labelled; their centres are in the split's
``cases.json`` (``hard_negatives: [{"kind": "loop", "center_mm": [x, y, z]}]``, world LPS mm). A loop is
a ring of 2–4 mm radius around that centre, so a candidate within :data:`LOOP_REACH_MM` of it is on the
loop. The question a reader asks — are the false positives the look-alikes, or noise? — is answered per
operating point: of the FPs at or above its cut-off, how many lie on a hard negative, and how many of
the hard negatives drew at least one FP.

One command, on ``wlcad detect --manifest`` output (``<case_id>.json`` per case)::

    python -m training.cade.hard_negatives --manifest DATA/test/manifest.csv --pred PRED \\
        --thresholds 0.9 0.7 0.5 [--out hard_negatives.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from services.core.errors import InputError
from services.evaluation.cade_report import Predictions, read_predictions, read_truth, task_rule
from services.evaluation.matching import match_candidates

#: A loop's ring radius is at most 4 mm (head_mra._loop) and its vessel ~1 mm thick: 6 mm holds it.
LOOP_REACH_MM = 6.0


@dataclass(frozen=True)
class HardNegativeCount:
    """False positives at one cut-off: all of them, those on a hard negative, and the hard negatives hit."""

    threshold: float
    false_positives: int
    fp_per_case: float
    on_hard_negatives: int
    hard_negatives_hit: int
    hard_negatives: int

    @property
    def share_on_hard_negatives(self) -> float:
        return self.on_hard_negatives / self.false_positives if self.false_positives else 0.0


def read_hard_negatives(cases_json: Path) -> dict[str, np.ndarray]:
    """Per case id, the hard negatives' centres (n, 3) in world mm from a phantom split's cases.json."""
    try:
        cases = json.loads(Path(cases_json).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {cases_json}: {exc}", field="cases_json") from exc
    if not isinstance(cases, dict):
        raise InputError("must map case ids to case records", field="cases_json")
    centres = {}
    for case_id, record in cases.items():
        points = [entry["center_mm"] for entry in record.get("hard_negatives", [])]
        centres[case_id] = np.asarray(points, dtype=float).reshape(-1, 3)
    return centres


def count_on_hard_negatives(
    manifest: Path, predictions: Predictions, hard_negatives: dict[str, np.ndarray], thresholds: list[float]
) -> list[HardNegativeCount]:
    """One :class:`HardNegativeCount` per cut-off; the hit rule is the predictions' task's."""
    truth = read_truth(manifest)
    lesions = [t.lesion for t in truth.lesions]
    candidates = list(predictions.candidates)
    is_fp = match_candidates(lesions, candidates, task_rule(predictions.task)).candidate_is_fp
    total = sum(len(hard_negatives.get(case, ())) for case in truth.case_ids)
    counts = []
    for threshold in thresholds:
        fps = [c for c, fp in zip(candidates, is_fp, strict=True) if fp and c.score >= threshold]
        on, hit = 0, set()
        for fp in fps:
            centres = hard_negatives.get(fp.case_id, np.zeros((0, 3)))
            if len(centres):
                distance = np.linalg.norm(centres - np.asarray(fp.center_mm), axis=1)
                if distance.min() <= LOOP_REACH_MM:
                    on += 1
                    hit.add((fp.case_id, int(distance.argmin())))
        counts.append(
            HardNegativeCount(
                threshold=float(threshold),
                false_positives=len(fps),
                fp_per_case=len(fps) / max(len(truth.case_ids), 1),
                on_hard_negatives=on,
                hard_negatives_hit=len(hit),
                hard_negatives=total,
            )
        )
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--manifest", type=Path, required=True, help="the split's manifest (cases.json beside it)"
    )
    parser.add_argument("--pred", type=Path, required=True, help="wlcad detect --manifest output folder")
    parser.add_argument(
        "--thresholds", type=float, nargs="+", required=True, help="cut-offs (e.g. the card's)"
    )
    parser.add_argument("--out", type=Path, help="also write the counts as JSON")
    args = parser.parse_args(argv)
    try:
        counts = count_on_hard_negatives(
            args.manifest,
            read_predictions(args.pred),
            read_hard_negatives(args.manifest.parent / "cases.json"),
            args.thresholds,
        )
    except InputError as exc:
        print(f"hard_negatives: error: {exc.field}: {exc.message}", file=sys.stderr)
        return 2
    rows = [asdict(c) | {"share_on_hard_negatives": round(c.share_on_hard_negatives, 4)} for c in counts]
    for row in rows:
        print(
            f"cut-off {row['threshold']:.4g}: {row['false_positives']} FPs ({row['fp_per_case']:.2f}/case), "
            f"{row['on_hard_negatives']} on hard negatives ({row['share_on_hard_negatives']:.0%}); "
            f"{row['hard_negatives_hit']} of {row['hard_negatives']} hard negatives drew one"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
