"""training/cade/compare.py: two detectors' CPMs on the same cases and the paired CI of their difference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.core.manifest import write_manifest
from training.cade.compare import compare, main

CASES = ("a", "b", "c", "d")


def _manifest(folder: Path) -> Path:
    rows = [
        {"case_id": case, "image": f"{case}.nii.gz", "lesion_id": 1, "center_x_mm": 0.0, "center_y_mm": 0.0,
         "center_z_mm": 0.0, "diameter_mm": 8.0, "lesion_type": "solid", "abnormal": "true"}
        for case in CASES
    ]  # fmt: skip
    return write_manifest(rows, folder / "manifest.csv")


def _pred(folder: Path, found: set[str], task: str = "chest-ct-nodule") -> Path:
    folder.mkdir()
    for case in CASES:
        candidates = [{"center_mm": [100.0, 0.0, 0.0], "confidence": 0.9}]  # one FP in every case
        if case in found:
            candidates.append({"center_mm": [1.0, 0.0, 0.0], "confidence": 0.95})
        doc = {"task": task, "model": f"cade_{task}", "model_version": folder.name, "case_id": case,
               "candidates": candidates}  # fmt: skip
        (folder / f"{case}.json").write_text(json.dumps(doc))
    return folder


def test_the_better_detector_wins_by_a_paired_interval(tmp_path):
    manifest = _manifest(tmp_path)
    weak, strong = _pred(tmp_path / "weak", {"a"}), _pred(tmp_path / "strong", set(CASES))
    result = compare(manifest, weak, strong, n_resamples=200)
    assert (result.a.cpm, result.b.cpm) == (pytest.approx(0.25), pytest.approx(1.0))
    assert result.difference == pytest.approx(0.75)
    assert 0.0 < result.difference_ci_low <= result.difference <= result.difference_ci_high <= 1.0
    same = compare(manifest, strong, strong, n_resamples=50)
    assert same.difference == 0.0 and same.difference_ci_low == same.difference_ci_high == 0.0


def test_the_command_writes_json_and_refuses_other_tasks(tmp_path, capsys):
    manifest = _manifest(tmp_path)
    weak, strong = _pred(tmp_path / "weak", {"a"}), _pred(tmp_path / "strong", set(CASES))
    out = tmp_path / "compare.json"
    assert (
        main(["--manifest", str(manifest), "--pred", str(weak), "--pred", str(strong), "--out", str(out)])
        == 0
    )
    assert json.loads(out.read_text())["difference"] == pytest.approx(0.75)
    assert "B − A: +0.750" in capsys.readouterr().out
    other = _pred(tmp_path / "aneurysm", set(CASES), task="head-mra-aneurysm")
    assert main(["--manifest", str(manifest), "--pred", str(weak), "--pred", str(other)]) == 2
    assert capsys.readouterr().err.startswith("compare: error: pred:")
    assert main(["--manifest", str(manifest), "--pred", str(weak)]) == 2
