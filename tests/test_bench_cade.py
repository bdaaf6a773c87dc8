"""bench/cade.py runs end to end (small: a tiny real ONNX detector, a small phantom CT, two
radiographs) and refuses a repository without the CT model with a clear message and status 2.

Speed is never asserted here: the bench prints its numbers for the issue note.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.inference.export import register_onnx_model
from tests.conftest import REPO_ROOT
from tests.test_detect_cli import CARD, blob_scorer_onnx

SMALL = ["--size", "80", "80", "48", "--cxr-size", "192", "160", "--mra-size", "96", "96", "48"]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "bench/cade.py", *args], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT
    )


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    register_onnx_model(
        root, "cade_chest-ct-nodule", blob_scorer_onnx(3, 32), metrics={}, max_batch_size=4, **CARD
    )
    register_onnx_model(
        root, "cade_cxr-mass", blob_scorer_onnx(2, None), metrics={}, max_batch_size=2, **CARD
    )
    register_onnx_model(
        root, "cade_head-mra-aneurysm", blob_scorer_onnx(3, 64), metrics={}, max_batch_size=4, **CARD
    )
    return root


def test_bench_times_ct_detection_next_to_monai_and_radiographs(repository: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("monai")
    done = bench("--model-repository", str(repository), *SMALL, "--radiographs", "2")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "chest CT 80×80×48 (" in out
    assert "wlcad detect (end to end from the file)" in out and "cade_chest-ct-nodule/1" in out
    assert "MONAI sliding_window_inference (torch, onnxruntime per window batch" in out
    assert "wlcad tiling alone (numpy, onnxruntime)" in out
    assert re.search(r"ratio MONAI / wlcad tiling: \d+\.\d\d×", out), out
    assert "per radiograph (2 × 192×160, cade_cxr-mass/1" in out
    assert re.search(
        r"per head MRA \(96×96×48, [0-9.×]+ mm, cade_head-mra-aneurysm/1, from a file\): \d", out
    ), out


def test_bench_runs_the_training_checkpoint_with_the_served_weights(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("monai")
    from training.cade.train import main as train

    run = tmp_path / "run"
    assert (
        train(
            [
                "--out",
                str(run),
                "--cases",
                "1",
                "--size",
                "64",
                "64",
                "48",
                "--steps",
                "1",
                "--batch-size",
                "1",
            ]
        )
        == 0
    )
    args = [
        "--model-repository",
        str(run / "model_repository"),
        "--size",
        "64",
        "64",
        "48",
        "--radiographs",
        "0",
    ]
    done = bench(*args, "--checkpoint", str(run / "network.pt"))
    assert done.returncode == 0, done.stderr
    found = re.search(
        r"torch network from network.pt, max \|logit difference\| from the ONNX on one tile (\S+)\)",
        done.stdout,
    )
    assert found, done.stdout
    assert float(found.group(1)) < 1e-3  # the checkpoint is the network the ONNX was exported from
    assert "per radiograph" not in done.stdout
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    bad = bench(*args, "--checkpoint", str(broken))
    assert bad.returncode == 2 and "is not a cade network checkpoint" in bad.stderr
    assert "wlcad detect" not in bad.stdout  # refused before the CT run


def test_bench_without_the_ct_model_exits_2_naming_it(tmp_path: Path) -> None:
    done = bench("--model-repository", str(tmp_path), *SMALL)
    assert done.returncode == 2
    assert "cade_chest-ct-nodule" in done.stderr and "--model-repository" in done.stderr
    assert "Traceback" not in done.stderr


def test_bench_skips_radiographs_without_their_model(tmp_path: Path) -> None:
    register_onnx_model(
        tmp_path, "cade_chest-ct-nodule", blob_scorer_onnx(3, 32), metrics={}, max_batch_size=4, **CARD
    )
    done = bench("--model-repository", str(tmp_path), *SMALL, "--skip-sliding-window", "--radiographs", "2")
    assert done.returncode == 0, done.stderr
    assert "cade_cxr-mass is not in" in done.stdout and "MONAI" not in done.stdout
