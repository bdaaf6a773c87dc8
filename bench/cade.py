"""CADe detection speed, measured side by side in one run (issue 11: goal ≤ 30 s, bar ≤ 60 s per chest
CT on 2 cores; goal ≤ 0.5 s per radiograph).

1. Whole chest CT end to end from a file: a 512×512×300 synthetic chest CT (``training.data``: lungs,
   vessels and nodules, so candidate extraction sees realistic maps; thin slices, so ~300 mm long)
   is written to a temporary NIfTI, then read + moved to the working frame (1.5 mm, CT window) +
   tiled through the shipped ``cade_chest-ct-nodule`` (embedded onnxruntime, what ``wlcad detect``
   runs) + candidates. The time the network itself takes is reported apart, so the tiling / blending /
   candidate overhead shows.
2. MONAI's ``sliding_window_inference`` in torch over the same working-frame volume, same tile,
   overlap, Gaussian blending and batch — with the same weights when given the training run's torch
   checkpoint (``--checkpoint OUT/network.pt``), else through ``onnx2torch`` when installed, else with
   each window batch run by onnxruntime (same network, so the ratio is MONAI's tiling and blending
   against wlcad's numpy tiling). Printed as times and the ratio.
3. Per-radiograph time of ``cade_cxr-mass`` (when the repository has it) on synthetic radiographs read
   from files.
4. Whole head TOF-MRA time of ``cade_head-mra-aneurysm`` (when the repository has it): a
   ``--mra-size`` synthetic slab (default 512×512×160 at the phantom's 0.4–0.8 mm, a clinical TOF
   matrix) read from a file, end to end, split as in 1 (issue 12).

The process is pinned to ``--cores`` CPUs (``sched_setaffinity``), so onnxruntime and torch both see
two cores on a bigger machine too. No asserts on speed: the numbers are printed for the issue note.

Usage: .venv/bin/python bench/cade.py [--model-repository DIR] [--size 512 512 300] [--checkpoint PT]
       [--radiographs 10] [--skip-sliding-window]
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.cade.model import CadeModel
from services.cade.pipeline import Detector
from services.cade.preprocess import to_working
from services.cade.tasks import task_named
from services.cade.tiling import sliding_window
from services.core.errors import InputError
from services.core.io import read_image, write_image
from services.core.volume import Volume
from services.inference.factory import default_repository
from services.inference.repository import ModelRepository
from training.data.dataset import generate_case

CT_TASK, CXR_TASK, MRA_TASK = "chest-ct-nodule", "cxr-mass", "head-mra-aneurysm"


@dataclass
class DetectionTiming:
    """One image's detection, split where the time goes (seconds)."""

    read_s: float
    detect_s: float
    network_s: float
    candidates: int
    working_shape_zyx: tuple[int, ...]

    @property
    def total_s(self) -> float:
        return self.read_s + self.detect_s


def pin_cores(cores: int) -> str:
    """Restrict this process (and the threads it starts later) to the first ``cores`` allowed CPUs."""
    if not hasattr(os, "sched_setaffinity"):
        return f"not pinned (no sched_setaffinity here), {os.cpu_count()} cores"
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, allowed[:cores])
    return f"pinned to {len(os.sched_getaffinity(0))} of {len(allowed)} cores"


def model_or_exit(task: str, repository: Path) -> CadeModel:
    """The task's model from ``repository``, or a clear message and exit status 2."""
    try:
        return CadeModel(task_named(task), setting="embedded", repository=repository)
    except InputError as exc:
        print(f"bench/cade.py: {exc} (field {exc.field}); pass --model-repository DIR", file=sys.stderr)
        raise SystemExit(2) from None


def timed_detector(model: CadeModel) -> tuple[Detector, list[float]]:
    """The model's detector with its network calls timed (the list collects seconds per batch)."""
    calls: list[float] = []
    infer = model.infer

    def run(batch: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = infer(batch)
        calls.append(time.perf_counter() - start)
        return out

    two_stage = model.detector()  # the second stage as served, when the repository has the classifier
    return Detector(two_stage.spec, run, model.unet_version, two_stage.reranker), calls


def detect_file(detector: Detector, calls: list[float], path: Path) -> DetectionTiming:
    """Read ``path`` and detect: the whole user-visible path of ``wlcad detect`` minus JSON writing."""
    calls.clear()
    start = time.perf_counter()
    image = read_image(path)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    result = detector.detect(image)
    detect_s = time.perf_counter() - start
    working = detector.spec.frame.grid_for(image.grid).shape
    return DetectionTiming(read_s, detect_s, sum(calls), len(result.candidates), tuple(working))


BENCH_SEED = 4242
#: A chest CT of 512×512×300 is a thin-slice scan (~0.7 × 0.7 × 1 mm, ~300 mm long); the phantom draws
#: its slice thickness at random (0.625–5 mm), and 300 slices of 5 mm would be a 1.5 m "chest".
THIN_SLICE_MM = 1.25


def synthetic_file(task: str, size_xyz: tuple[int, int, int], folder: Path, index: int = 0) -> Path:
    """A phantom of ``task`` written to a NIfTI file (detection is timed from the file)."""
    path = folder / f"{task}-{index}.nii.gz"
    write_image(generate_case(task, seed=BENCH_SEED, index=index, size_xyz=size_xyz).image, path)
    return path


def thin_slice_index(limit: int = 50) -> int:
    """The first bench-seed chest CT phantom with thin slices. The spacing is drawn before anything that
    depends on the grid size, so a tiny phantom of the same index has the same slice thickness."""
    for index in range(limit):
        spacing = generate_case(CT_TASK, seed=BENCH_SEED, index=index, size_xyz=(32, 32, 16)).image.spacing
        if spacing[2] <= THIN_SLICE_MM:
            return index
    return 0


# ------------------------------------------------------------------------------- MONAI comparison


def torch_predictor(model: CadeModel, repository: Path, checkpoint: Path | None) -> tuple[Callable, str]:
    """A torch callable for MONAI: the checkpoint's network, the ONNX via onnx2torch, or onnxruntime."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
    if checkpoint is not None:
        from training.cade.network import build_network

        network = build_network(3)
        try:
            network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
            reason = str(exc).strip().splitlines()[0]
            print(f"bench/cade.py: {checkpoint} is not a cade network checkpoint: {reason}", file=sys.stderr)
            raise SystemExit(2) from None
        network.eval()
        return network, f"torch network from {checkpoint.name}, {same_weights(model, network)}"
    onnx = ModelRepository(repository).onnx_path(model.name)
    try:
        from onnx2torch import convert
    except ImportError:
        import onnxruntime as ort

        session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run(batch: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: batch.numpy()})[0])

        return run, "onnxruntime per window batch (no torch checkpoint given, onnx2torch not installed)"
    return convert(str(onnx)).eval(), "torch network converted by onnx2torch"


def same_weights(model: CadeModel, network: Callable) -> str:
    """How far the torch network is from the served ONNX on one random tile (≈ 0: the same weights)."""
    import torch

    tile = np.random.default_rng(0).random((1, 1, *model.spec.tiling.tile), dtype=np.float32)
    with torch.no_grad():
        ours = network(torch.from_numpy(tile)).numpy()
    served = model.infer(tile)
    return f"max |logit difference| from the ONNX on one tile {float(np.max(np.abs(ours - served))):.2g}"


def monai_seconds(working: Volume, model: CadeModel, predictor: Callable) -> float:
    import torch
    from monai.inferers import sliding_window_inference

    tiling = model.spec.tiling
    volume = torch.as_tensor(np.ascontiguousarray(working.array, dtype=np.float32))[None, None]
    start = time.perf_counter()
    with torch.no_grad():
        sliding_window_inference(
            volume, tiling.tile, sw_batch_size=tiling.max_batch, predictor=predictor,
            overlap=tiling.overlap, mode="gaussian", padding_mode="constant", cval=tiling.pad_value,
        )  # fmt: skip
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-repository", type=Path, default=None, help="default: the shipped one")
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 300), metavar=("X", "Y", "Z"))
    parser.add_argument("--image", type=Path, help="time this CT file instead of a synthetic one")
    parser.add_argument("--cores", type=int, default=2, help="CPUs to pin the process to (default 2)")
    parser.add_argument(
        "--checkpoint", type=Path, help="the training run's network.pt (same weights in torch)"
    )
    parser.add_argument("--radiographs", type=int, default=10, help="radiographs to time (0: skip)")
    parser.add_argument("--cxr-size", type=int, nargs=2, default=(512, 512), metavar=("X", "Y"))
    parser.add_argument("--skip-sliding-window", action="store_true")
    parser.add_argument("--mra-size", type=int, nargs=3, default=(512, 512, 160), metavar=("X", "Y", "Z"))
    parser.add_argument("--skip-mra", action="store_true", help="leave out the head MRA timing")
    args = parser.parse_args(argv)
    repository = args.model_repository or default_repository()
    pinned = pin_cores(args.cores)
    with model_or_exit(CT_TASK, repository) as ct_model:
        import onnxruntime

        print(f"# {platform.processor() or platform.machine()}, {pinned}, load {os.getloadavg()[0]:.2f}, "
              f"onnxruntime {onnxruntime.__version__}, model {ct_model.version} from {repository}")  # fmt: skip
        # The torch side first: a bad checkpoint fails before the long CT run, not after it.
        predictor = (
            None if args.skip_sliding_window else torch_predictor(ct_model, repository, args.checkpoint)
        )
        with tempfile.TemporaryDirectory(prefix="wlcad-bench-cade-") as folder:
            bench_chest_ct(ct_model, args, Path(folder), predictor)
            if args.radiographs > 0:
                bench_radiographs(repository, args.radiographs, tuple(args.cxr_size), Path(folder))
            if not args.skip_mra:
                bench_head_mra(repository, tuple(args.mra_size), Path(folder))
    return 0


def bench_chest_ct(
    ct_model: CadeModel, args: argparse.Namespace, folder: Path, predictor: tuple[Callable, str] | None
) -> None:
    if args.image is not None:
        path = args.image
        print(f"chest CT from {path} ({path.stat().st_size / 2**20:.0f} MiB)")
    else:
        size = tuple(args.size)
        path = synthetic_file(CT_TASK, size, folder, thin_slice_index())
        mib = path.stat().st_size / 2**20
        spacing = "×".join(f"{v:.2f}" for v in read_image(path).spacing)
        print(
            f"chest CT {size[0]}×{size[1]}×{size[2]} ({spacing} mm) written to a temporary NIfTI ({mib:.0f} MiB)"
        )
    detector, calls = timed_detector(ct_model)
    timing = detect_file(detector, calls, path)
    print(
        f"wlcad detect (end to end from the file): {timing.total_s:.1f} s (goal ≤ 30 s, bar ≤ 60 s) = "
        f"read {timing.read_s:.1f} s + preprocess/tiles/candidates {timing.detect_s:.1f} s "
        f"(network {timing.network_s:.1f} s in {len(calls)} batches); working grid "
        f"{'×'.join(map(str, timing.working_shape_zyx))} (z×y×x), {timing.candidates} candidates"
    )
    if predictor is None:
        return
    start = time.perf_counter()
    working = to_working(read_image(path), ct_model.spec.frame, ct_model.spec.intensity)
    preprocess_s = time.perf_counter() - start
    network, how = predictor
    start = time.perf_counter()
    sliding_window(working.array, ct_model.infer, ct_model.spec.tiling)
    wlcad_tiling_s = time.perf_counter() - start
    monai_s = monai_seconds(working, ct_model, network)
    print(f"wlcad tiling alone (numpy, onnxruntime) over the working volume: {wlcad_tiling_s:.1f} s")
    print(f"MONAI sliding_window_inference (torch, {how}) over the same working volume: {monai_s:.1f} s")
    print(
        f"ratio MONAI / wlcad tiling: {monai_s / wlcad_tiling_s:.2f}×; MONAI + read + preprocess "
        f"({timing.read_s + preprocess_s:.1f} s) / wlcad end to end: "
        f"{(monai_s + timing.read_s + preprocess_s) / timing.total_s:.2f}× (MONAI gives a map, no candidates)"
    )


def has_model(repository: Path, task: str, what: str) -> bool:
    """Whether ``cade_<task>`` is in the repository; says which timing is skipped when it is not."""
    if task_named(task).model_name in ModelRepository(repository).model_names():
        return True
    print(f"cade_{task} is not in {repository}: {what} skipped")
    return False


def bench_radiographs(repository: Path, count: int, size_xy: tuple[int, int], folder: Path) -> None:
    if not has_model(repository, CXR_TASK, "per-radiograph time"):
        return
    with CadeModel(task_named(CXR_TASK), setting="embedded", repository=repository) as model:
        detector, calls = timed_detector(model)
        paths = [synthetic_file(CXR_TASK, (*size_xy, 1), folder, i) for i in range(count + 1)]
        detect_file(detector, calls, paths[0])  # warm-up: first session run, first allocations
        timings = [detect_file(detector, calls, p).total_s for p in paths[1:]]
    p50, p90 = np.percentile(timings, [50, 90])
    print(
        f"wlcad detect per radiograph ({count} × {size_xy[0]}×{size_xy[1]}, {model.version}, from files): "
        f"p50 {p50:.3f} s, p90 {p90:.3f} s (goal ≤ 0.5 s)"
    )


def bench_head_mra(repository: Path, size_xyz: tuple[int, int, int], folder: Path) -> None:
    if not has_model(repository, MRA_TASK, "head MRA time"):
        return
    path = synthetic_file(MRA_TASK, size_xyz, folder)
    spacing = "×".join(f"{v:.2f}" for v in read_image(path).spacing)
    with CadeModel(task_named(MRA_TASK), setting="embedded", repository=repository) as model:
        detector, calls = timed_detector(model)
        timing = detect_file(detector, calls, path)
    print(
        f"wlcad detect per head MRA ({'×'.join(map(str, size_xyz))}, {spacing} mm, {model.version}, from a "
        f"file): {timing.total_s:.1f} s = read {timing.read_s:.1f} s + preprocess/tiles/candidates "
        f"{timing.detect_s:.1f} s (network {timing.network_s:.1f} s in {len(calls)} batches); working grid "
        f"{'×'.join(map(str, timing.working_shape_zyx))}, {timing.candidates} candidates"
    )


if __name__ == "__main__":
    sys.exit(main())
