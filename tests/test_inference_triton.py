"""The inference backends against a real ``tritonserver`` process (CPU twin, python backend).

Every model gives the same outputs embedded and through Triton (gRPC backend, plain HTTP client);
bad requests fail clearly; a killed Triton gives InferenceUnavailableError within the deadline and
the same backend works again once Triton is back. Needs ``bash scripts/install-triton.sh``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from services.core.errors import InputError
from services.inference import InferenceUnavailableError
from services.inference.embedded import EmbeddedBackend
from services.inference.export import register_onnx_model
from services.inference.factory import default_repository
from services.inference.repository import ModelRepository
from services.inference.toy_model import toy_onnx
from services.inference.triton import TritonBackend
from services.inference.triton_server import TritonServer, free_port

TOLERANCE = 1e-5
CARD = {"command": "test", "data_manifest": "none", "seed": 0, "metrics": {}, "git_commit": "abcdef0"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> ModelRepository:
    root = tmp_path_factory.mktemp("repository")
    register_onnx_model(root, "toy", toy_onnx(16), max_batch_size=8, max_queue_delay_us=2000, **CARD)
    register_onnx_model(root, "toy_any", toy_onnx(None), max_batch_size=4, **CARD)  # any volume size
    return ModelRepository(root)


@pytest.fixture(scope="module")
def triton(repo: ModelRepository):
    """A real tritonserver on free 127.0.0.1 ports, stopped after the module."""
    with TritonServer(repo) as server:
        yield server


def _inputs(model_signature, batch: int, seed: int, size: int = 16) -> dict[str, np.ndarray]:
    """Uniform [0, 1) inputs: inside every shipped model's domain (the anomaly flows take [0, 1] images)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in model_signature.inputs:
        dims = [size if d == -1 else d for d in spec.dims]
        shape = [batch, *dims] if model_signature.batches else dims
        inputs[spec.name] = rng.random(shape).astype(spec.dtype)
    return inputs


def _http_infer(url: str, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    client = httpclient.InferenceServerClient(url)
    try:
        tensors = []
        for name, array in inputs.items():
            tensor = httpclient.InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = client.infer(model, tensors)
        return {
            output["name"]: result.as_numpy(output["name"]) for output in result.get_response()["outputs"]
        }
    finally:
        client.close()


def _assert_same_outputs(repository: ModelRepository, server: TritonServer, size: int = 16) -> None:
    """Every model: embedded == Triton gRPC (plain and shared memory) == Triton HTTP, within 1e-5."""

    async def compare() -> None:
        async with (
            EmbeddedBackend(repository) as embedded,
            TritonBackend(server.grpc_url, shared_memory=False) as grpc_plain,
            TritonBackend(server.grpc_url, shared_memory=True, shared_memory_min_bytes=0) as grpc_shm,
        ):
            for name in repository.model_names():
                signature = await embedded.signature(name)
                for batch, seed in ((1, 0), (min(3, max(signature.max_batch_size, 1)), 1)):
                    inputs = _inputs(signature, batch, seed, size)
                    expected = await embedded.infer(name, inputs)
                    via_http = await asyncio.to_thread(_http_infer, server.http_url, name, inputs)
                    for label, got in (
                        ("grpc", await grpc_plain.infer(name, inputs)),
                        ("grpc+shm", await grpc_shm.infer(name, inputs)),
                        ("http", via_http),
                    ):
                        assert set(got) == set(expected), (name, label)
                        for output, value in expected.items():
                            assert got[output].shape == value.shape, (name, label, output)
                            # equal infinities are equal (a flow's log p(x) of pure noise can be -inf)
                            np.testing.assert_allclose(
                                got[output], value, rtol=0, atol=TOLERANCE, err_msg=f"{name} {label} {output}"
                            )

    asyncio.run(compare())


def test_toy_models_same_outputs_embedded_and_triton(repo: ModelRepository, triton: TritonServer) -> None:
    _assert_same_outputs(repo, triton)


def test_large_volume_through_shared_memory(repo: ModelRepository, triton: TritonServer) -> None:
    volume = np.random.default_rng(5).standard_normal((1, 1, 64, 64, 64)).astype(np.float32)  # 1 MiB

    async def run() -> tuple[dict, dict, int]:
        async with EmbeddedBackend(repo) as embedded, TritonBackend(triton.grpc_url) as remote:
            assert remote.shared_memory  # 127.0.0.1 → same host → system shared memory by default
            got = await remote.infer("toy_any", {"image": volume})
            status = await remote._client.get_system_shared_memory_status()
            return await embedded.infer("toy_any", {"image": volume}), got, len(status.regions)

    expected, got, regions = asyncio.run(run())
    assert regions >= 1
    assert np.abs(got["probability"] - expected["probability"]).max() <= TOLERANCE


def test_every_shipped_model_same_outputs_embedded_and_triton() -> None:
    """Each model in model_repository/ (none until training ships one) through a real Triton."""
    shipped = ModelRepository(default_repository())
    if not shipped.model_names():
        return
    with TritonServer(shipped) as server:
        _assert_same_outputs(shipped, server, size=32)


def test_concurrent_requests_are_correct(repo: ModelRepository, triton: TritonServer) -> None:
    volumes = [
        np.random.default_rng(i).standard_normal((1, 1, 16, 16, 16)).astype(np.float32) for i in range(16)
    ]

    async def run() -> tuple[list, list]:
        async with EmbeddedBackend(repo) as embedded, TritonBackend(triton.grpc_url) as remote:
            expected = await asyncio.gather(*(embedded.infer("toy", {"image": v}) for v in volumes))
            got = await asyncio.gather(*(remote.infer("toy", {"image": v}) for v in volumes))
            return expected, got

    expected, got = asyncio.run(run())
    for e, g in zip(expected, got, strict=True):
        assert np.abs(e["probability"] - g["probability"]).max() <= TOLERANCE


def test_triton_rejects_bad_requests_naming_the_field(triton: TritonServer, caplog) -> None:
    good = np.zeros((1, 1, 16, 16, 16), np.float32)
    caplog.set_level(logging.INFO, logger="services.inference.triton")  # where a retry is logged

    async def run() -> None:
        # A generous deadline: the config fetch is real work on the server; a bad request must fail
        # at once on its merits, which the absence of retries shows (not a stopwatch).
        async with TritonBackend(triton.grpc_url, deadline_s=60) as remote:
            for model, inputs, field, message in (
                ("nope", {"image": good}, "model", "unknown model 'nope'"),
                ("toy", {"image": good.astype(np.float64)}, "inputs.image", "dtype float64"),
                ("toy", {"image": good[:, :, :8]}, "inputs.image", "does not match"),
                (
                    "toy",
                    {"image": np.zeros((9, 1, 16, 16, 16), np.float32)},
                    "inputs.image",
                    "max_batch_size",
                ),
            ):
                with pytest.raises(InputError, match=message) as caught:
                    await remote.infer(model, inputs)
                assert caught.value.field == field
                retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
                assert not retries, retries  # not retried as if the server were down
            # The server itself rejects a wrong shape too (client-side check bypassed).
            remote._signatures["toy"] = await remote.signature("toy_any")
            with pytest.raises(InputError, match="triton rejected") as caught:
                await remote.infer("toy", {"image": np.zeros((1, 1, 8, 8, 8), np.float32)})
            assert caught.value.field == "inputs"

    asyncio.run(run())


def test_killed_triton_gives_unavailable_within_deadline_then_recovers(
    repo: ModelRepository, tmp_path: Path
) -> None:
    ports = {"grpc_port": free_port(), "http_port": free_port(), "metrics_port": free_port()}
    small = np.ones((1, 1, 16, 16, 16), np.float32)
    large = np.ones((1, 1, 64, 64, 64), np.float32)  # goes through shared memory
    deadline_s = 5.0  # only for calls to the dead server, where no work can race it
    working_s = 60.0  # calls a live server must answer: real work, so a generous deadline
    elapsed_s: list[float] = []

    async def run() -> None:
        async with TritonBackend(f"127.0.0.1:{ports['grpc_port']}", deadline_s=deadline_s) as remote:
            first = TritonServer(repo, workdir=tmp_path / "first", **ports).start()
            try:
                before = await remote.infer("toy", {"image": small}, timeout_s=working_s)
                await remote.infer("toy_any", {"image": large}, timeout_s=working_s)
                assert await remote.ready(working_s, ["toy", "toy_any"])
                assert not await remote.ready(working_s, ["nope"])  # a model the server does not hold
            finally:
                first.kill()  # crash: SIGKILL to the server and its python-backend stubs
            assert not await remote.ready(working_s)  # the probe answers at once: the port is closed
            for inputs, model in (({"image": small}, "toy"), ({"image": large}, "toy_any")):
                started = time.monotonic()
                with pytest.raises(InferenceUnavailableError) as caught:
                    await remote.infer(model, inputs)
                elapsed = time.monotonic() - started
                # Refused while retrying: the code says the server is down (UNAVAILABLE), never that the
                # deadline passed, and the answer comes before the deadline (retries stop a margin before
                # it, and after max_retry_s at most). The refusal of a dead port takes milliseconds, so
                # the 5 s deadline races no work.
                assert caught.value.code == "UNAVAILABLE", caught.value
                assert elapsed < deadline_s, elapsed
                elapsed_s.append(elapsed)
            second = TritonServer(repo, workdir=tmp_path / "second", **ports).start()
            try:
                after = await remote.infer("toy", {"image": small}, timeout_s=working_s)
                assert np.array_equal(after["probability"], before["probability"])
                await remote.infer("toy_any", {"image": large}, timeout_s=working_s)  # shm re-registered
                assert await remote.ready(working_s, ["toy"])
            finally:
                second.cleanup()
            first.cleanup()

    asyncio.run(run())
    print(f"\ndead triton answered UNAVAILABLE in {', '.join(f'{e:.2f}' for e in elapsed_s)} s")


def test_wlcad_triton_command_serves_and_stops(repo: ModelRepository) -> None:
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    command = [sys.executable, "-m", "services.cli.main", "triton", "--repository", str(repo.root)]
    command += [
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--metrics-port",
        str(metrics_port),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = process.stdout.readline()
        assert ready.startswith("triton ready"), ready + process.stderr.read()
        volume = np.zeros((1, 1, 16, 16, 16), np.float32)
        assert _http_infer(f"127.0.0.1:{http_port}", "toy", {"image": volume})["score"].shape == (1, 1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0  # liveness: Triton drains for up to 5 s, then unloads
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def test_wlcad_triton_bad_repository_is_one_line_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "triton", "--repository", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("wlcad: error: --repository") and "Traceback" not in result.stderr
