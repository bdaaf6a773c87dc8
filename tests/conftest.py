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


@pytest.fixture(scope="session")
def ct_series(sample, tmp_path_factory) -> Path:
    """The real CT series with the Study/Series UIDs its anonymisation blanked restored (a copy), as a
    PACS would hold it: SEG/SR and DICOMweb tests need them. Read only."""
    from tests.dicom_checks import with_uids_restored

    return with_uids_restored(sample("ct-dicom-series"), tmp_path_factory.mktemp("ct") / "series")


@pytest.fixture(scope="session")
def phantom_series(tmp_path_factory) -> Path:
    """A phantom DICOM series carrying identifiers that must never reach a SEG, SR or log. Read only."""
    from tests.dicom_checks import phantom_series_with_secrets

    return phantom_series_with_secrets(tmp_path_factory.mktemp("phantom"))


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``wlcad`` as a user would (a separate process), capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )
