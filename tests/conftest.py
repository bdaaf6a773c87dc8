"""Shared fixtures. Real sample data must be present (``make test`` fetches it): a missing sample is a
failure with the command that fixes it, never a silent skip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.core.errors import InputError
from services.core.sample_data import sample_path

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def sample():
    """``sample("ct-dicom-series")`` → path of that real sample file or folder."""

    def resolve(name: str) -> Path:
        try:
            return sample_path(name)
        except InputError as exc:
            pytest.fail(str(exc))

    return resolve


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``wlcad`` as a user would (a separate process), capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )
