"""The ``wlcad`` command as a user runs it: JSON geometry equal to SimpleITK's, clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.conftest import run_cli


def test_help_lists_the_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("info", "inspect", "data"):
        assert command in result.stdout


def test_info_reports_versions_and_providers() -> None:
    result = run_cli("info", "--json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["versions"]["pydicom"]
    assert "CPUExecutionProvider" in facts["inference_providers"]
    assert isinstance(facts["models"], list)


def _sitk_reference(path: Path) -> sitk.Image:
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


@pytest.mark.parametrize(
    "name",
    ["ct-dicom-series", "brain-mr-dicom-series", "brain-t1-nifti", "chest-ct-nifti", "ct-3slice-dicom"],
)
def test_inspect_prints_the_numbers_simpleitk_reports(sample, name: str) -> None:
    path = sample(name)
    result = run_cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    reference = _sitk_reference(path)
    assert described["shape"] == list(reference.GetSize())
    np.testing.assert_allclose(described["spacing"], reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(described["origin"], reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(described["direction"], reference.GetDirection(), atol=1e-5)
    assert described["dtype"]


def test_inspect_nrrd_from_the_dcmqi_samples(sample) -> None:
    path = sample("ct-3slice-dicom").parent / "liver_seg.nrrd"
    described = json.loads(run_cli("inspect", str(path)).stdout)
    reference = sitk.ReadImage(str(path))
    assert described["shape"] == list(reference.GetSize())
    np.testing.assert_allclose(described["origin"], reference.GetOrigin(), atol=1e-6)


def test_radiograph_without_spacing_warns_on_stderr(sample) -> None:
    result = run_cli("inspect", str(sample("chest-xray")))
    assert result.returncode == 0
    assert json.loads(result.stdout)["shape"] == [1841, 1955, 1]
    assert "warning" in result.stderr and "PixelSpacing" in result.stderr


@pytest.mark.parametrize("kind", ["truncated", "not-dicom", "empty", "missing", "mixed-series"])
def test_broken_inputs_exit_nonzero_with_one_clear_line_and_no_traceback(
    sample, tmp_path: Path, kind: str
) -> None:
    if kind == "truncated":
        source = sample("ct-3slice-dicom") / "01.dcm"
        target = tmp_path / "cut.dcm"
        target.write_bytes(source.read_bytes()[:2000])
    elif kind == "not-dicom":
        target = tmp_path / "report.dcm"
        target.write_text("impression: 12 mm nodule in the right upper lobe\n" * 10)
    elif kind == "empty":
        target = tmp_path / "empty.nii.gz"
        target.write_bytes(b"")
    elif kind == "missing":
        target = tmp_path / "absent"
    else:
        target = tmp_path / "mixed"
        target.mkdir()
        for source in (
            sample("ct-3slice-dicom") / "01.dcm",
            sample("brain-mr-dicom-series") / "brain_001.dcm",
        ):
            target.joinpath(source.name).write_bytes(source.read_bytes())
    result = run_cli("inspect", str(target))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("wlcad: error: image:")
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""
