"""The detection (CADe) part of ``wlcad demo``: hybrid phantoms and real samples through the gateway's
``wlcad.v1.Detection`` service, each at the model card's default operating point.

The same honesty rules as the rest of the demo:

* Phantom hybrids (synthetic lesions in a real background) are scored against their exact truth with
  the task's hit rule (LUNA16; ADAM for aneurysms), and their FROC is printed with the number of cases
  (a handful of cases gives a wide interval: the model card holds the real test-set figures). Head
  MRA has no real sample to insert aneurysms into, so its cases are plain phantoms of the test seed.
* The real chest radiograph shows round lung masses; four were reader-marked (approximate, not ground
  truth): the demo says which of them a candidate falls on and how many candidates fall elsewhere
  (fainter masses are unmarked, so "elsewhere" is not "false").
* The real CT series has no known lesion (and is an abdomen, not a chest): its candidates are listed
  as what they are, candidates on an image with no known nodule.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from services.api.detection_client import DetectionClient, result_from_proto
from services.cade.pipeline import DetectionResult
from services.cade.tasks import task_named
from services.core.io import read_image

#: Phantom cases per detection task: a CT takes seconds, a radiograph a fraction of one.
DETECTION_CASES = {"chest-ct-nodule": 3, "cxr-mass": 10, "head-mra-aneurysm": 2}
#: Tasks whose demo phantoms are hybrids (lesions inserted into the task's real sample).
HYBRID_TASKS = frozenset({"chest-ct-nodule", "cxr-mass"})
#: Real samples each detector runs on: (task, sample name in the demo's real-sample plan).
REAL_DETECTIONS = (("chest-ct-nodule", "ct-dicom-series"), ("cxr-mass", "chest-xray"))


@dataclass(frozen=True)
class TaskRun:
    """One task's phantom predictions and truth (FROC inputs) and what the demo printed about it."""

    task: str
    model_version: str
    threshold: float
    n_cases: int
    n_lesions: int
    found_at_cutoff: int
    false_positives_at_cutoff: int
    cpm: float | None


def _phantom_cases(out: Path, task: str, cases: int, seed: int) -> tuple[Path, dict[str, list[dict]]]:
    from training.data.dataset import write_dataset

    folder = out / "phantoms-detection" / task
    marker = folder / "cases.txt"
    if not (marker.is_file() and marker.read_text() == f"{cases} {seed}\n"):
        write_dataset(task, cases, seed, folder, hybrid_mode=task in HYBRID_TASKS)
        marker.write_text(f"{cases} {seed}\n")
    by_case: dict[str, list[dict]] = defaultdict(list)
    with open(folder / "manifest.csv", newline="") as stream:
        for row in csv.DictReader(stream):
            by_case[row["case_id"]].append(row)
    return folder, by_case


def _render(image, result: DetectionResult, task: str, threshold: float, path: Path) -> None:
    from services.cli.detect_cmd import render_detections

    render_detections(image, result, task_named(task), threshold, path)


def _phantom_task(client: DetectionClient, task: str, out: Path, seed: int) -> TaskRun:
    from services.evaluation.cade_report import Predictions, evaluate_cade, read_truth

    folder, by_case = _phantom_cases(out, task, DETECTION_CASES[task], seed)
    case_ids, candidates = [], []
    threshold, version = float("nan"), ""
    for case_id, rows in by_case.items():
        image = read_image(folder / rows[0]["image"])
        # The FROC needs every peak the detector has, so the phantoms are asked at the floor (0)...
        response = client.detect_volume(task, image, threshold=0.0)
        result = result_from_proto(response)
        version = response.model_version
        case_ids.append(case_id)
        candidates += result.froc_candidates(case_id)
        # ...and the overlay shows what a reader would see at the default operating point.
        default = client.detect_volume(task, image)
        threshold = default.threshold
        _render(image, result_from_proto(default), task, threshold, out / case_id / "detection.png")
    truth = read_truth(folder / "manifest.csv")
    report = evaluate_cade(
        truth, Predictions(task, f"cade_{task}", version, tuple(case_ids), tuple(candidates))
    )
    at_cutoff = evaluate_cade(
        truth,
        Predictions(
            task,
            f"cade_{task}",
            version,
            tuple(case_ids),
            tuple(c for c in candidates if c.score >= threshold),
        ),
    )
    return TaskRun(
        task,
        version,
        threshold,
        report.n_cases,
        report.n_lesions,
        at_cutoff.estimate.n_found,
        at_cutoff.estimate.n_false_positives,
        report.cpm if np.isfinite(report.cpm) else None,
    )


def _marked_hits(result: DetectionResult, marks: list[dict]) -> tuple[dict[int, int], int]:
    """Each reader mark (pixel column, row, diameter) a candidate centre falls inside → the best such
    candidate's rank (1 = strongest); and how many candidates fall on no mark."""
    ranks: dict[int, int] = {}
    elsewhere = 0
    for rank, cand in enumerate(result.candidates, start=1):
        column, row = cand.center_voxel[0], cand.center_voxel[1]
        inside = [
            m["lesion_id"]
            for m in marks
            if np.hypot(column - m["column"], row - m["row"]) <= m["diameter_px"] / 2.0
        ]
        for lesion_id in inside:
            ranks.setdefault(lesion_id, rank)
        elsewhere += not inside
    return dict(sorted(ranks.items())), elsewhere


def _real_detection(client: DetectionClient, task: str, sample, out: Path) -> dict:
    from services.cli.demo_cmd import READER_MARKS

    if sample.path.is_dir():
        response = client.detect_file(task, sample.path)
    else:
        response = client.detect_volume(task, sample.image)
    result = result_from_proto(response)
    _render(sample.image, result, task, response.threshold, out / sample.name / f"detection-{task}.png")
    record = {"task": task, "threshold": round(response.threshold, 4), "candidates": len(result.candidates)}
    if sample.name == "chest-xray":
        marks = json.loads(READER_MARKS.read_text())["lesions"]
        ranks, elsewhere = _marked_hits(result, marks)
        record |= {
            "reader_marked": len(marks),
            "reader_marked_rank": ranks,
            "candidates_elsewhere": elsewhere,
        }
        shown = ", ".join(f"mark {m} at rank {r}" for m, r in ranks.items()) or "none"
        print(
            f"  real {sample.name} ({task}): {len(ranks)}/{len(marks)} reader-marked masses have a candidate "
            f"({shown}) among {len(result.candidates)}; {elsewhere} candidate(s) on no mark (fainter "
            f"masses are unmarked) → {out / sample.name}/detection-{task}.png"
        )
    else:
        print(
            f"  real {sample.name} ({task}): no known nodule (an abdominal CT); {len(result.candidates)} "
            f"candidate(s) at the cut-off, each a false positive or unknown → "
            f"{out / sample.name}/detection-{task}.png"
        )
    return record


def run_detection(address: str, token: str | None, out: Path, seed: int, real_samples: list) -> dict:
    """The detection section of the demo; returns its summary (also printed)."""
    summary: dict = {}
    with DetectionClient(address, token=token) as client:
        try:
            description = client.describe()
        except grpc.RpcError as exc:
            print(f"\ndetection: the Detection service did not answer ({exc.code().name}); skipped")
            return {"skipped": exc.code().name}
        print("\ndetection (CADe) through the gateway's Detection service, at each model's default cut-off:")
        available = {t.name for t in description.tasks if t.available}
        for entry in description.tasks:
            if not entry.available:
                print(f"  {entry.name}: skipped ({entry.reason})")
                summary[entry.name] = {"skipped": entry.reason}
        for task in (t for t in DETECTION_CASES if t in available):
            run = _phantom_task(client, task, out, seed)
            cpm = "—" if run.cpm is None else f"{run.cpm:.3f}"
            kind = "hybrid phantoms" if task in HYBRID_TASKS else "phantoms"
            print(
                f"  {task} ({run.model_version}, cut-off {run.threshold:.3f}): {kind}, {run.n_cases} "
                f"cases, {run.n_lesions} lesions: {run.found_at_cutoff} found, "
                f"{run.false_positives_at_cutoff / max(run.n_cases, 1):.1f} FP/case; CPM {cpm} "
                f"(n={run.n_cases}; the model card has the test-set CPM with its CI)"
            )
            summary[task] = {"phantoms": run.__dict__}
        for task, name in REAL_DETECTIONS:
            sample = next((s for s in real_samples if s.name == name), None)
            if task in available and sample is not None:
                summary.setdefault(task, {})[name] = _real_detection(client, task, sample, out)
    return summary
