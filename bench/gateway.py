"""Gateway benchmark: what the gateway hop costs, and how fast a big volume streams through it.

    .venv/bin/python bench/gateway.py [--calls 2000] [--json out/bench-gateway.json]

1. Overhead: p50/p99 of the same small call (``Describe``, and ``Estimate`` on a 32³ volume) made
   directly to the label-estimation service and through the gateway, sequentially (goal: ≤ 1 ms p50
   added).
2. Streaming: a 512×512×300 int16 volume (150 MiB) uploaded in 4 MiB chunks through the gateway to
   the service (``EstimateUpload``): MB/s end to end (goal ≥ 400 MB/s) and the service's and the
   gateway's peak RSS (VmHWM) against the volume's size (goal ≤ 3×), next to the same upload made
   directly to the service.

The service and the gateway are separate ``wlcad serve`` processes on free 127.0.0.1 ports, started
fresh so peak RSS belongs to this run. Numbers hold for this machine and this run only; the load
average printed first says how quiet the machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from services.api.client import LabelEstimationClient  # noqa: E402
from services.api.convert import volume_to_proto  # noqa: E402
from services.api.pb import image_pb2  # noqa: E402
from services.api.pb import label_estimation_pb2 as pb  # noqa: E402
from services.core.volume import Volume  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", *argv],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def wait_ready(client: LabelEstimationClient, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            client.describe(timeout=1)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def latencies(call, n: int) -> np.ndarray:
    for _ in range(min(200, n)):
        call()
    times = np.empty(n)
    for i in range(n):
        started = time.perf_counter()
        call()
        times[i] = time.perf_counter() - started
    return times * 1000


def stream_once(client: LabelEstimationClient, volume: Volume) -> float:
    header = volume_to_proto(volume, with_data=False)
    centre = volume.index_to_world([256, 256, 150])
    request = pb.EstimateRequest(
        image=image_pb2.ImageSource(volume=header),
        lesions=[pb.LesionPrompt(lesion_id=1, center_mm=[float(v) for v in centre], diameter_mm=20)],
        method="sphere",
    )
    data = memoryview(volume.array).cast("B")
    started = time.perf_counter()
    response = client.upload(request, data, timeout=300)
    seconds = time.perf_counter() - started
    assert response.lesions[0].measurements.voxels > 0
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls per latency measurement")
    parser.add_argument("--repeats", type=int, default=3, help="uploads of the big volume per path")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

    service_address = f"127.0.0.1:{free_port()}"
    service = start(["serve", "label-estimation", "--listen", service_address, "--metrics-listen", ""])
    gateway_address = f"127.0.0.1:{free_port()}"
    gateway = start(
        ["serve", "gateway", "--grpc-listen", gateway_address, "--http-listen", f"127.0.0.1:{free_port()}",
         "--route", f"label-estimation={service_address}"]
    )  # fmt: skip
    results: dict = {}
    try:
        direct, via = LabelEstimationClient(service_address), LabelEstimationClient(gateway_address)
        wait_ready(direct)
        wait_ready(via)
        small = Volume(np.random.default_rng(0).normal(0, 20, (32, 32, 32)).astype(np.int16), (1, 1, 1))
        small_request = pb.EstimateRequest(
            image=image_pb2.ImageSource(volume=volume_to_proto(small)),
            lesions=[pb.LesionPrompt(lesion_id=1, center_mm=[16, 16, 16], diameter_mm=6)],
            method="sphere",
        )
        print(f"\noverhead, {args.calls} sequential calls each (ms)")
        for name, make_call in (
            ("Describe", lambda c: lambda: c.describe(timeout=10)),
            ("Estimate 32³", lambda c: lambda: c.estimate_request(small_request, timeout=10)),
        ):
            d = latencies(make_call(direct), args.calls)
            g = latencies(make_call(via), args.calls)
            added = float(np.median(g) - np.median(d))
            results[name] = {
                "direct_p50_ms": float(np.median(d)),
                "direct_p99_ms": float(np.percentile(d, 99)),
                "gateway_p50_ms": float(np.median(g)),
                "gateway_p99_ms": float(np.percentile(g, 99)),
                "added_p50_ms": added,
            }
            print(
                f"  {name:14s} direct p50 {np.median(d):6.3f} p99 {np.percentile(d, 99):6.3f} | "
                f"gateway p50 {np.median(g):6.3f} p99 {np.percentile(g, 99):6.3f} | added p50 {added:6.3f}"
            )

        volume = Volume(
            np.random.default_rng(1).integers(-1000, 1000, (300, 512, 512), dtype=np.int16), (0.7, 0.7, 1.0)
        )
        size = volume.array.nbytes
        print(f"\nstreaming a 512×512×300 int16 volume ({size / 2**20:.0f} MiB) in 4 MiB chunks")
        for name, client in (("direct", direct), ("gateway", via)):
            seconds = [stream_once(client, volume) for _ in range(args.repeats)]
            best = min(seconds)
            results[f"stream_{name}"] = {"seconds": seconds, "mb_per_s": size / best / 1e6}
            print(
                f"  {name:8s} best {best:.3f} s → {size / best / 1e6:7.0f} MB/s (runs: {', '.join(f'{s:.3f}' for s in seconds)})"
            )
        service_peak, gateway_peak = peak_rss(service.pid), peak_rss(gateway.pid)
        results["peak_rss"] = {
            "volume_bytes": size,
            "service_bytes": service_peak,
            "gateway_bytes": gateway_peak,
            "service_over_volume": service_peak / size,
            "gateway_over_volume": gateway_peak / size,
        }
        print(
            f"  peak RSS: service {service_peak / 2**20:.0f} MiB ({service_peak / size:.2f}× the volume), "
            f"gateway {gateway_peak / 2**20:.0f} MiB ({gateway_peak / size:.2f}×)"
        )
        print("  (DICOMweb from Orthanc: not measured here; see docs/serving.md)")
        direct.close()
        via.close()
    finally:
        for process in (gateway, service):
            process.terminate()
            process.wait(15)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
