"""Real serving processes for the tests: a label-estimation service and a gateway, each its own
``wlcad serve`` process on free 127.0.0.1 ports, with their logs kept for inspection."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.api.convert import volume_to_proto
from services.api.pb import image_pb2
from services.api.pb import label_estimation_pb2 as pb
from services.core.volume import Volume

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Process:
    """One ``wlcad`` child process with its combined output in ``log``."""

    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> Process:
        handle = open(self.log, "ab")  # noqa: SIM115 - lives as long as the process
        env = {**os.environ, **(self.env or {})}
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "-v", *self.argv],
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0


def wait_serving(address: str, timeout_s: float = 60.0, service: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not serving after {timeout_s} s")
            time.sleep(0.2)


@dataclass
class Stack:
    """A service and a gateway routed to it."""

    service: Process
    gateway: Process
    service_address: str
    grpc_address: str
    http_url: str
    metrics_url: str

    def stop(self) -> None:
        self.gateway.stop()
        self.service.stop()


def start_service(
    log_dir: Path, port: int | None = None, extra: list[str] | None = None, env: dict[str, str] | None = None
) -> tuple[Process, str, str]:
    port = port or free_port()
    metrics = free_port()
    address = f"127.0.0.1:{port}"
    process = Process(
        [
            "serve",
            "label-estimation",
            "--listen",
            address,
            "--metrics-listen",
            f"127.0.0.1:{metrics}",
            *(extra or []),
        ],
        log_dir / "service.log",
        env=env,
    ).start()
    return process, address, f"http://127.0.0.1:{metrics}/metrics"


def start_gateway(log_dir: Path, service_address: str, extra: list[str] | None = None, env=None):
    grpc_port, http_port = free_port(), free_port()
    process = Process(
        [
            "serve",
            "gateway",
            "--grpc-listen",
            f"127.0.0.1:{grpc_port}",
            "--http-listen",
            f"127.0.0.1:{http_port}",
            "--route",
            f"label-estimation={service_address}",
            *(extra or []),
        ],
        log_dir / "gateway.log",
        env=env,
    ).start()
    return process, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"


def start_stack(
    log_dir: Path,
    gateway_extra: list[str] | None = None,
    service_extra: list[str] | None = None,
    service_env: dict[str, str] | None = None,
) -> Stack:
    log_dir.mkdir(parents=True, exist_ok=True)
    service, service_address, metrics = start_service(log_dir, extra=service_extra, env=service_env)
    gateway, grpc_address, http_url = start_gateway(log_dir, service_address, gateway_extra)
    try:
        wait_serving(service_address)
        wait_serving(grpc_address, service="wlcad.v1.LabelEstimation")
    except TimeoutError:
        gateway.stop()
        service.stop()
        raise
    return Stack(service, gateway, service_address, grpc_address, http_url, metrics)


def small_volume(shape_zyx=(24, 40, 40), seed: int = 0, dtype=np.int16) -> Volume:
    """A noisy background with a bright ball at its centre (a lesion the methods can find)."""
    rng = np.random.default_rng(seed)
    array = rng.normal(0, 20, shape_zyx).astype(np.float32)
    z, y, x = np.ogrid[: shape_zyx[0], : shape_zyx[1], : shape_zyx[2]]
    centre = [s // 2 for s in shape_zyx]
    ball = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= 5**2
    array[ball] += 300
    return Volume(array.astype(dtype), (1.0, 1.0, 1.0), (-10.0, 5.0, 100.0))


def centre_mm(volume: Volume) -> list[float]:
    z, y, x = volume.array.shape
    return [float(v) for v in volume.index_to_world([x // 2, y // 2, z // 2])]


def estimate_request(volume: Volume, method: str = "sphere", diameter: float = 10.0, lesions: int = 1):
    centre = centre_mm(volume)
    prompts = [
        pb.LesionPrompt(
            lesion_id=i + 1, center_mm=[centre[0] + 2 * i, centre[1], centre[2]], diameter_mm=diameter
        )
        for i in range(lesions)
    ]
    return pb.EstimateRequest(
        image=image_pb2.ImageSource(volume=volume_to_proto(volume)), lesions=prompts, method=method
    )


def until(attempt, what: str, budget_s: float = 60.0):
    """``attempt()`` again until it returns something other than None. Only for something already due
    (a slot being freed, a call being admitted): the budget is generous, so only a hang runs it out."""
    deadline = time.monotonic() + budget_s
    while (result := attempt()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {budget_s:g} s")
        time.sleep(0.05)
    return result


def metric_value(metrics_url: str, name: str, **labels: str) -> float:
    """One sample of a process's Prometheus /metrics by name and labels (0 when absent)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0
