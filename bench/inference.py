"""Inference benchmark: embedded vs Triton, Triton dynamic batching on vs off, onnxruntime vs torch.

Everything is measured in one run on this machine, side by side, on the same ONNX net (the toy 3D
conv net of services/inference/toy_model.py until a trained model ships; ``--model`` benchmarks a
model of the repository instead)::

    .venv/bin/python bench/inference.py                   # ~1 min on 2 cores
    .venv/bin/python bench/inference.py --duration 5 --json out/bench-inference.json

Latency is per request as the caller sees it (client-side, includes gRPC for Triton); throughput is
completed requests per second with ``concurrency`` requests kept in flight. Goals (issue 4): Triton
dynamic batching ≥ 1.5× throughput at concurrency 16; onnxruntime ≥ 1.5× faster than torch eager.
Triton here is the CPU twin (python backend), so absolute Triton numbers include its IPC overhead;
the NGC GPU server in production runs the native onnxruntime backend.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.inference.backend import InferenceBackend
from services.inference.embedded import EmbeddedBackend
from services.inference.export import register_onnx_model
from services.inference.repository import ModelRepository
from services.inference.toy_model import toy_onnx, toy_weights
from services.inference.triton import TritonBackend
from services.inference.triton_server import TritonServer

CONCURRENCY = (1, 4, 16)


@dataclass
class Result:
    """One measured configuration."""

    name: str
    concurrency: int
    requests: int
    p50_ms: float
    p99_ms: float
    throughput_rps: float


def _inputs(signature, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        spec.name: rng.standard_normal(
            ([1] if signature.batches else []) + [d if d != -1 else 32 for d in spec.dims]
        ).astype(spec.dtype)
        for spec in signature.inputs
    }


async def _window(
    backend: InferenceBackend, model: str, payloads: list, duration_s: float
) -> tuple[list, float]:
    """Keep ``len(payloads)`` requests in flight for ``duration_s``: (latencies in s, elapsed s)."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + duration_s

    async def worker(payload: dict[str, np.ndarray]) -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await backend.infer(model, payload)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker(p) for p in payloads))
    return latencies, time.perf_counter() - started


async def _compare(
    backends: dict[str, InferenceBackend], model: str, duration_s: float, rounds: int
) -> list[Result]:
    """Every backend at every concurrency, in alternating short windows so that load from anything
    else on the machine hits all of them alike; totals over the rounds."""
    signature = await next(iter(backends.values())).signature(model)
    results = []
    for concurrency in CONCURRENCY:
        payloads = [_inputs(signature, seed) for seed in range(concurrency)]
        totals = {name: ([], 0.0) for name in backends}
        before = {name: await _executions(b, model) for name, b in backends.items()}
        for _ in range(rounds):
            for name, backend in backends.items():
                await backend.infer(model, payloads[0])  # warm-up (session, channel, spinning threads)
                latencies, elapsed = await _window(backend, model, payloads, duration_s / rounds)
                totals[name] = (totals[name][0] + latencies, totals[name][1] + elapsed)
        for name, backend in backends.items():
            after = await _executions(backend, model)
            latencies, elapsed = totals[name]
            ms = np.asarray(latencies) * 1e3
            result = Result(
                name,
                concurrency,
                len(latencies),
                float(np.percentile(ms, 50)),
                float(np.percentile(ms, 99)),
                len(latencies) / elapsed,
            )
            _print_row(result, after[0] - before[name][0], after[1] - before[name][1])
            results.append(result)
    return results


async def _executions(backend: InferenceBackend, model: str) -> tuple[int, int]:
    """(requests, model executions) so far: their ratio is the mean batch the batcher formed."""
    if isinstance(backend, EmbeddedBackend):
        stats = backend.stats(model)
        return stats["requests"], stats["runs"]
    if isinstance(backend, TritonBackend):
        stats = (await backend._client.get_inference_statistics(model)).model_stats[0]
        return stats.inference_count, stats.execution_count
    return 0, 0


def _print_row(r: Result, requests: int, executions: int) -> None:
    batch = f"mean batch {requests / executions:4.1f}" if executions else ""
    print(
        f"  {r.name:<20} c={r.concurrency:<3} p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  "
        f"{r.throughput_rps:7.1f} req/s  {batch}",
        flush=True,
    )


def _torch_vs_onnxruntime(onnx_path: Path, size: int, channels: int, seed: int, repeats: int) -> dict | None:
    """Same net, same weights, batch 1 and 8: onnxruntime vs torch eager (CPU, all cores, no grad)."""
    try:
        import torch
    except ImportError:
        print("  torch not installed: skipped (pip install torch==2.13.0, the project's train extra)")
        return None
    import onnxruntime as ort

    weights = {k: torch.from_numpy(v) for k, v in toy_weights(channels, seed).items()}

    def net(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.relu(torch.nn.functional.conv3d(x, weights["w1"], weights["b1"], padding=1))
        x = torch.relu(torch.nn.functional.conv3d(x, weights["w2"], weights["b2"], padding=1))
        p = torch.sigmoid(torch.nn.functional.conv3d(x, weights["w3"], weights["b3"]))
        return p, p.amax(dim=(2, 3, 4))

    torch.set_num_threads(os.cpu_count() or 1)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    report = {"torch": torch.__version__, "onnxruntime": ort.__version__, "threads": torch.get_num_threads()}
    for batch in (1, 8):
        x = np.random.default_rng(batch).standard_normal((batch, 1, size, size, size)).astype(np.float32)
        with torch.inference_mode():
            expected = net(torch.from_numpy(x))[0].numpy()
        got = session.run(["probability"], {"image": x})[0]
        assert np.abs(got - expected).max() <= 1e-4, "torch and onnxruntime disagree: not the same net"

        def run_torch(x=x) -> None:
            with torch.inference_mode():
                net(torch.from_numpy(x))

        def run_ort(x=x) -> None:
            session.run(None, {"image": x})

        samples: dict[str, list[float]] = {"torch": [], "ort": []}
        for index in range(repeats + 3):  # interleaved, so machine noise hits both alike
            for key, run in (("torch", run_torch), ("ort", run_ort)):
                started = time.perf_counter()
                run()
                if index >= 3:  # first three: warm-up
                    samples[key].append(time.perf_counter() - started)
        torch_ms, ort_ms = (float(np.median(samples[k])) * 1e3 for k in ("torch", "ort"))
        report[f"batch{batch}"] = {
            "torch_ms": torch_ms,
            "onnxruntime_ms": ort_ms,
            "speedup": torch_ms / ort_ms,
        }
        print(
            f"  batch {batch}: torch eager {torch_ms:7.2f} ms  onnxruntime {ort_ms:7.2f} ms  "
            f"speed-up {torch_ms / ort_ms:4.2f}×",
            flush=True,
        )
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per configuration")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating windows the duration is split into"
    )
    parser.add_argument("--size", type=int, default=16, help="toy net volume edge (voxels)")
    parser.add_argument("--channels", type=int, default=4, help="toy net feature channels")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--queue-delay-us", type=int, default=1000, help="dynamic_batching max queue delay")
    parser.add_argument("--model", help="benchmark this model of --repository instead of the toy net")
    parser.add_argument("--repository", type=Path, default=None)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--skip-triton", action="store_true", help="embedded and torch only (a machine without tritonserver)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="wlcad-bench-") as tmp:
        if args.model:
            repository = ModelRepository(args.repository or Path("model_repository"))
            model = args.model
            repository.signature(model)
        else:
            model = "bench_toy"
            register_onnx_model(
                tmp,
                model,
                toy_onnx(args.size, args.channels, seed=0),
                command="bench/inference.py",
                data_manifest="none (random weights)",
                seed=0,
                metrics={},
                git_commit="0000000",
                max_batch_size=args.max_batch_size,
                max_queue_delay_us=args.queue_delay_us,
            )
            repository = ModelRepository(tmp)
        print(
            f"model {model}: {repository.signature(model).inputs[0]}; {os.cpu_count()} CPU cores; "
            f"{args.duration:g} s per configuration; load average before start "
            f"{os.getloadavg()[0]:.2f} (anything else running skews every number below)",
            flush=True,
        )
        print("latency/throughput (embedded = onnxruntime in-process; triton = tritonserver CPU twin, gRPC):")
        with contextlib.ExitStack() as servers:
            urls = {}
            if not args.skip_triton:
                for label, batching in (("triton batching on", True), ("triton batching off", False)):
                    workdir = Path(tmp) / label.replace(" ", "_")
                    server = TritonServer(repository, dynamic_batching=batching, workdir=workdir)
                    urls[label] = servers.enter_context(server).grpc_url

            async def run_all() -> list[Result]:
                async with contextlib.AsyncExitStack() as stack:
                    backends = {"embedded": await stack.enter_async_context(EmbeddedBackend(repository))}
                    for label, url in urls.items():
                        backends[label] = await stack.enter_async_context(TritonBackend(url))
                    return await _compare(backends, model, args.duration, args.rounds)

            results = asyncio.run(run_all())
        print("onnxruntime vs torch eager (same net, same weights, in-process):")
        versus = None
        if not args.model:
            versus = _torch_vs_onnxruntime(
                repository.onnx_path(model),
                args.size,
                args.channels,
                seed=0,
                repeats=max(10, int(args.duration * 20)),
            )
        else:
            print("  only for the toy net (a repository model has no torch twin here)")

    by = {(r.name, r.concurrency): r for r in results}
    summary = {}
    print("summary:")
    if not args.skip_triton:
        on, off = by[("triton batching on", 16)], by[("triton batching off", 16)]
        summary["triton_dynamic_batching_speedup_c16"] = on.throughput_rps / off.throughput_rps
        print(
            f"  triton dynamic batching at concurrency 16: {summary['triton_dynamic_batching_speedup_c16']:.2f}× "
            f"throughput (goal ≥ 1.5×)"
        )
        for c in CONCURRENCY:
            e, t = by[("embedded", c)], by[("triton batching on", c)]
            print(
                f"  concurrency {c:>2}: embedded {e.throughput_rps:7.1f} req/s vs triton {t.throughput_rps:7.1f} req/s"
            )
    if versus:
        summary["onnxruntime_vs_torch_speedup_batch1"] = versus["batch1"]["speedup"]
        summary["onnxruntime_vs_torch_speedup_batch8"] = versus["batch8"]["speedup"]
        print(
            f"  onnxruntime vs torch eager: {versus['batch1']['speedup']:.2f}× (batch 1), "
            f"{versus['batch8']['speedup']:.2f}× (batch 8) (goal ≥ 1.5×)"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"results": [asdict(r) for r in results], "torch_vs_onnxruntime": versus, "summary": summary},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
