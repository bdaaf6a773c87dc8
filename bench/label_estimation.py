"""Label-estimation speed, measured side by side in one run.

1. Per-lesion latency (p50/p99) of the ``unet`` method with the model loaded, on a 512×512×300 CT:
   VOI extraction + inference (embedded onnxruntime) + resampling back + post-processing.
   Goal: ≤ 50 ms on 2 cores.
2. The same network run the brute-force way — MONAI's sliding-window inferer in torch over the whole
   512×512×300 volume — and the ratio (goal ≥ 100×): why wlcad segments around the prompt only.
   The torch network has the shipped architecture with fresh weights: speed does not depend on them.

Usage: .venv/bin/python bench/label_estimation.py [--lesions 40] [--skip-sliding-window]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from services.core.lesion_prompt import LesionPrompt
from services.core.volume import Volume
from services.label_estimation.model import UnetModel
from services.label_estimation.pipeline import LabelEstimator
from services.label_estimation.voi import VOI_SIZE


def synthetic_ct(seed: int = 0) -> Volume:
    """512×512×300 int16 with blobs: the cost of reading and resampling does not depend on content."""
    rng = np.random.default_rng(seed)
    array = rng.normal(-800, 40, (300, 512, 512)).astype(np.int16)
    return Volume(array, (0.7, 0.7, 1.0), (-180.0, -180.0, -150.0))


def lesion_prompts(image: Volume, count: int, seed: int = 1) -> list[LesionPrompt]:
    rng = np.random.default_rng(seed)
    prompts = []
    for lesion_id in range(1, count + 1):
        index = rng.uniform([60, 60, 40], [450, 450, 260])
        prompts.append(LesionPrompt(tuple(image.index_to_world(index)), float(rng.uniform(4, 30)), lesion_id))
    return prompts


def per_lesion_latency(image: Volume, prompts: list[LesionPrompt]) -> np.ndarray:
    with UnetModel(setting="embedded") as model:
        estimator = LabelEstimator(model)
        estimator.estimate(image, prompts[:2], "unet")  # warm-up: session creation, first allocations
        timings = []
        for prompt in prompts:
            start = time.perf_counter()
            estimator.estimate(image, [prompt], "unet")
            timings.append(time.perf_counter() - start)
    return np.asarray(timings)


def sliding_window_seconds(image: Volume) -> float:
    import torch
    from monai.inferers import sliding_window_inference

    from training.label_unet.network import build_network

    network = build_network().eval()
    volume = torch.as_tensor(image.array.astype(np.float32))[None, None]
    start = time.perf_counter()
    with torch.no_grad():
        sliding_window_inference(volume, (VOI_SIZE,) * 3, sw_batch_size=8, predictor=network, overlap=0.25)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lesions", type=int, default=40)
    parser.add_argument("--skip-sliding-window", action="store_true")
    args = parser.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"
    )
    image = synthetic_ct()
    timings = per_lesion_latency(image, lesion_prompts(image, args.lesions)) * 1000
    p50, p99 = np.percentile(timings, [50, 99])
    print(
        f"unet per lesion (embedded, {args.lesions} lesions, 512×512×300): p50 {p50:.1f} ms, p99 {p99:.1f} ms (goal p50 ≤ 50 ms)"
    )
    if not args.skip_sliding_window:
        whole = sliding_window_seconds(image)
        print(f"whole-volume sliding window (MONAI, torch, {VOI_SIZE}³ windows, overlap 0.25): {whole:.1f} s")
        print(f"ratio whole-volume / per-lesion p50: {whole * 1000 / p50:.0f}× (goal ≥ 100×)")


if __name__ == "__main__":
    main()
