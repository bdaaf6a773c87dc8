"""Gateway benchmark: what the gateway hop costs, and how fast a big volume streams through it.

    .venv/bin/python bench/gateway.py [--calls 2000] [--json out/bench-gateway.json]

1. Overhead: p50/p99 of the same small call (``Describe``, and ``Estimate`` on a 32³ volume) made
   directly to the label-estimation service and through the gateway, sequentially, alternating
   between the two call by call (goal: ≤ 1 ms p50 added).
2. Streaming: a 512×512×300 int16 volume (150 MiB) uploaded in 4 MiB chunks through the gateway to
   the service (``EstimateUpload``): MB/s end to end (goal ≥ 400 MB/s) and the service's and the
   gateway's peak RSS (VmHWM) against the volume's size (goal ≤ 3×), next to the same upload made
   directly to the service.
3. DICOMweb: the same volume as a 300-file CT series in a local Orthanc (``orthanc`` +
   ``orthanc-dicomweb``, stored through its REST API): a plain WADO-RS fetch of the series, and
   ``Estimate`` by StudyInstanceUID/SeriesInstanceUID through the gateway (the service fetches and
   reads the series), both as MB/s of voxels. Skipped, with a note, when Orthanc is not installed.

The service and the gateway are separate ``wlcad serve`` processes on free 127.0.0.1 ports, started
fresh so peak RSS belongs to this run. Numbers hold for this machine and this run only; the load
average printed first says how quiet the machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from services.api.client import LabelEstimationClient  # noqa: E402
from services.api.convert import volume_to_proto  # noqa: E402
from services.api.pb import image_pb2  # noqa: E402
from services.api.pb import label_estimation_pb2 as pb  # noqa: E402
from services.core.volume import Volume  # noqa: E402
from services.servers import orthanc  # noqa: E402


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


def paired_latencies(direct, via, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Milliseconds of ``n`` calls each, alternating direct and gateway call by call (the order
    swapped every pair), so a burst of other work on the shared cores lands on both sides alike
    instead of on whichever block of calls it happened to overlap."""
    for _ in range(min(200, n)):
        direct()
        via()
    times = np.empty((2, n))
    for i in range(n):
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            call = direct if side == 0 else via
            started = time.perf_counter()
            call()
            times[side, i] = time.perf_counter() - started
    return times[0] * 1000, times[1] * 1000


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


def fetch_series(base_url: str, study: str, series: str) -> tuple[float, int]:
    """Seconds and bytes of one WADO-RS fetch of a whole series (multipart/related DICOM)."""
    url = f"{base_url}/studies/{study}/series/{series}"
    request = urllib.request.Request(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        size = len(response.read())
    return time.perf_counter() - started, size


def dicomweb_rows(
    server: orthanc.LocalOrthanc, client: LabelEstimationClient, volume: Volume, repeats: int, work: Path
) -> dict:
    """Store ``volume`` in Orthanc as a DICOM series, then time fetching it two ways."""
    import pydicom

    from training.data.dicom_export import write_dicom_series

    paths = write_dicom_series(volume, work / "series", uid_seed="bench-gateway")
    server.upload(paths)
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    study, series = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
    size = volume.array.nbytes
    fetches = [fetch_series(server.dicomweb_url, study, series) for _ in range(repeats)]
    centre = volume.index_to_world([256, 256, 150])
    request = pb.EstimateRequest(
        image=image_pb2.ImageSource(
            dicomweb=image_pb2.DicomWebReference(
                base_url=server.dicomweb_url, study_instance_uid=study, series_instance_uid=series
            )
        ),
        lesions=[pb.LesionPrompt(lesion_id=1, center_mm=[float(v) for v in centre], diameter_mm=20)],
        method="sphere",
    )
    estimates = []
    for _ in range(repeats):
        started = time.perf_counter()
        response = client.estimate_request(request, timeout=300)
        estimates.append(time.perf_counter() - started)
        assert response.lesions[0].measurements.voxels > 0
    return {
        "wado_rs_seconds": [s for s, _ in fetches],
        "wado_rs_body_bytes": fetches[0][1],
        "wado_rs_mb_per_s": size / min(s for s, _ in fetches) / 1e6,
        "estimate_by_reference_seconds": estimates,
        "estimate_by_reference_mb_per_s": size / min(estimates) / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls per latency measurement")
    parser.add_argument("--repeats", type=int, default=3, help="uploads of the big volume per path")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

    work = Path(tempfile.mkdtemp(prefix="wlcad-bench-gateway-"))
    pacs = orthanc.LocalOrthanc(work / "orthanc").start() if orthanc.available() else None
    service_address = f"127.0.0.1:{free_port()}"
    service = start(
        ["serve", "label-estimation", "--listen", service_address, "--metrics-listen", ""]
        + (["--dicomweb", pacs.dicomweb_url] if pacs else [])
    )
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
        print(f"\noverhead, {args.calls} sequential calls each, direct and gateway alternating (ms)")
        for name, make_call in (
            ("Describe", lambda c: lambda: c.describe(timeout=10)),
            ("Estimate 32³", lambda c: lambda: c.estimate_request(small_request, timeout=10)),
        ):
            d, g = paired_latencies(make_call(direct), make_call(via), args.calls)
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
        if pacs is None:
            print("\nDICOMweb from Orthanc: not measured (install it: scripts/install-system-deps.sh)")
        else:
            print(f"\nthe same volume as a {volume.array.shape[0]}-file DICOM series in Orthanc (DICOMweb)")
            rows = dicomweb_rows(pacs, via, volume, args.repeats, work)
            results["dicomweb_orthanc"] = rows
            print(
                f"  WADO-RS fetch of the series        best {min(rows['wado_rs_seconds']):.3f} s → "
                f"{rows['wado_rs_mb_per_s']:7.0f} MB/s of voxels ({rows['wado_rs_body_bytes'] / 2**20:.0f} MiB body)"
            )
            print(
                f"  Estimate by reference via gateway  best {min(rows['estimate_by_reference_seconds']):.3f} s → "
                f"{rows['estimate_by_reference_mb_per_s']:7.0f} MB/s of voxels (service fetches + reads the series)"
            )
        direct.close()
        via.close()
    finally:
        for process in (gateway, service):
            process.terminate()
            process.wait(15)
        if pacs is not None:
            pacs.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
