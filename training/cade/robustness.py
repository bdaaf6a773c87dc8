"""Generalise, don't tune: a trained detector on held-out cases it was never trained for.

Each degradation rewrites the test split's images and keeps their truth (lesion centres and sizes in
world mm do not move), then the ONNX runs through the served pipeline and the FROC is compared with
the undegraded split:

* ``thick-5mm`` (3D): every CT reconstructed as 5 mm slices — the slab average over 5 mm along z,
  sampled every 5 mm (partial volume erases small nodules, as on a real thick-slice series);
* ``low-dose``: Gaussian noise added on top of the scanner's own (``EXTRA_NOISE_SD``: CT HU; a
  radiograph in its own value units), a noise level no training case had.

    python -m training.cade.robustness --task chest-ct-nodule --onnx RUN/model.onnx --data RUN/data \\
        --test-cases 40 --out RUN/robustness [--classifier REPO/cade_chest-ct-nodule_fpr/1/model.onnx]
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from services.core.io import read_image, write_image
from services.core.volume import Volume
from training.cade.evaluate import evaluate_split, onnx_detector, report_metrics, two_stage_detector
from training.cade.samples import phantom_split
from training.cade.tasks import CadeTask, get_task

THICK_SLICE_MM = 5.0
#: Added noise sd: CT in HU (training noise is 15–35 HU at 1.25 mm slices); radiographs in their
#: 12-bit value units (training noise is 15–40).
EXTRA_NOISE_SD = {3: 40.0, 2: 60.0}
DEGRADATIONS = {3: ("thick-5mm", "low-dose"), 2: ("low-dose",)}


def thick_slices(image: Volume, thickness_mm: float = THICK_SLICE_MM) -> Volume:
    """``image`` as a ``thickness_mm`` reconstruction: slab mean along z, then sampled every slab."""
    spacing_z = image.spacing[2]
    if spacing_z >= thickness_mm:
        return image
    slab = max(1, round(thickness_mm / spacing_z))
    averaged = ndimage.uniform_filter1d(np.asarray(image.array, dtype=np.float32), slab, axis=0)
    target = image.grid.respaced([image.spacing[0], image.spacing[1], thickness_mm])
    return image.with_array(averaged).resample(
        reference=target, interpolation="linear", output_dtype=np.float32
    )


def extra_noise(image: Volume, sd: float, rng: np.random.Generator) -> Volume:
    array = np.asarray(image.array, dtype=np.float32)
    return image.with_array(array + rng.normal(0.0, sd, array.shape).astype(np.float32))


def degrade(image: Volume, kind: str, dims: int, rng: np.random.Generator) -> Volume:
    if kind == "thick-5mm":
        return thick_slices(image)
    if kind == "low-dose":
        return extra_noise(image, EXTRA_NOISE_SD[dims], rng)
    raise ValueError(f"unknown degradation {kind!r}")


def degraded_split(task: CadeTask, manifest: Path, kind: str, out_dir: Path, seed: int = 0) -> Path:
    """A copy of ``manifest`` whose images are degraded by ``kind`` (truth rows unchanged)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    written: dict[str, str] = {}
    for row in rows:
        source = (manifest.parent / row["image"]).resolve()
        if str(source) not in written:
            target = out_dir / f"{row['case_id']}.nii.gz"
            if not target.is_file():
                write_image(degrade(read_image(source), kind, task.dims, rng), target)
            written[str(source)] = str(target)
        row["image"] = written[str(source)]
        if row.get("mask"):
            row["mask"] = str((manifest.parent / row["mask"]).resolve())
    out = out_dir / "manifest.csv"
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


@dataclass(frozen=True)
class RobustnessRow:
    condition: str
    metrics: dict[str, float]


def evaluate_robustness(
    task: CadeTask,
    onnx: Path,
    data: Path,
    test_cases: int,
    out: Path,
    threads: int = 2,
    classifier: Path | None = None,
) -> list[RobustnessRow]:
    """The undegraded test split and each degradation of it, through the served detector (two stages
    when ``classifier`` is given)."""
    if classifier is not None:
        detector = two_stage_detector(task, onnx, classifier, threads)
    else:
        detector = onnx_detector(task, onnx, threads)
    manifest = phantom_split(task, "test", test_cases, data)
    rows = [
        RobustnessRow(
            "as trained", report_metrics(evaluate_split(task, detector, manifest, out / "clean"), "test")
        )
    ]
    for kind in DEGRADATIONS[task.dims]:
        degraded = degraded_split(task, manifest, kind, out / kind / "data")
        report = evaluate_split(task, detector, degraded, out / kind)
        rows.append(RobustnessRow(kind, report_metrics(report, "test")))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="chest-ct-nodule")
    parser.add_argument("--onnx", type=Path, required=True, help="the trained detector (model.onnx)")
    parser.add_argument(
        "--classifier", type=Path, default=None, help="the second stage (cade_<task>_fpr model.onnx)"
    )
    parser.add_argument("--data", type=Path, required=True, help="the run's phantom folder (RUN/data)")
    parser.add_argument("--test-cases", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    task = get_task(args.task)
    rows = evaluate_robustness(
        task, args.onnx, args.data, args.test_cases, args.out, args.threads, args.classifier
    )
    record = [{"condition": r.condition, **r.metrics} for r in rows]
    (args.out / "robustness.json").write_text(json.dumps(record, indent=2) + "\n")
    print("| condition | CPM [95 % CI] | sens @1 FP | sens @4 FP |")
    print("|---|---|---|---|")
    for r in rows:
        m = r.metrics
        print(
            f"| {r.condition} | {m['test_cpm']:.3f} [{m['test_cpm_ci_low']:.3f}, {m['test_cpm_ci_high']:.3f}]"
            f" | {m.get('test_sensitivity_at_1fp', float('nan')):.3f}"
            f" | {m.get('test_sensitivity_at_4fp', float('nan')):.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
