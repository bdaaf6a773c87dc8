"""training/cade/hard_negatives.py: false positives on the phantoms' unlabelled vessel loops, counted per
cut-off with the task's own hit rule (ADAM for aneurysms), through its command."""

from __future__ import annotations

import json
from pathlib import Path

from services.core.manifest import write_manifest
from training.cade.hard_negatives import main

LOOP_MM = (20.0, 0.0, 0.0)


def _split(folder: Path) -> Path:
    folder.mkdir()
    rows = [
        {"case_id": "A", "image": "A.nii.gz", "lesion_id": 1, "center_x_mm": 0.0, "center_y_mm": 0.0,
         "center_z_mm": 0.0, "diameter_mm": 6.0, "lesion_type": "saccular-bend", "abnormal": "true"},
        {"case_id": "B", "image": "B.nii.gz", "lesion_type": "normal", "abnormal": "false"},
    ]  # fmt: skip
    cases = {
        "A": {"hard_negatives": [{"kind": "loop", "center_mm": list(LOOP_MM)}]},
        "B": {"hard_negatives": [{"kind": "loop", "center_mm": [-30.0, 5.0, 5.0]}]},
    }
    (folder / "cases.json").write_text(json.dumps(cases))
    return write_manifest(rows, folder / "manifest.csv")


def _predictions(folder: Path) -> Path:
    folder.mkdir()
    candidates = {
        # on the aneurysm's surface: a hit by ADAM (≤ r), which the aneurysm task uses
        "A": [([3.0, 0.0, 0.0], 0.9), ([23.0, 1.0, 0.0], 0.8), ([60.0, 60.0, 0.0], 0.4)],
        "B": [([-30.0, 9.0, 5.0], 0.6), ([-30.0, 5.0, 12.0], 0.7)],  # 4 mm (on the loop) and 7 mm (off)
    }
    for case, found in candidates.items():
        doc = {
            "task": "head-mra-aneurysm", "model": "cade_head-mra-aneurysm", "model_version": "1",
            "case_id": case,
            "candidates": [{"center_mm": c, "diameter_mm": 4.0, "confidence": s} for c, s in found],
        }  # fmt: skip
        (folder / f"{case}.json").write_text(json.dumps(doc))
    return folder


def test_false_positives_on_loops_per_cut_off(tmp_path, capsys):
    manifest, pred = _split(tmp_path / "test"), _predictions(tmp_path / "pred")
    out = tmp_path / "counts.json"
    args = ["--manifest", str(manifest), "--pred", str(pred), "--thresholds", "0.75", "0.5", "0.1"]
    assert main([*args, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    by_cut = {row["threshold"]: row for row in rows}
    # ≥ 0.75: one FP (A's, 3.2 mm from its loop), on a loop; the TP on the surface is not an FP
    assert (by_cut[0.75]["false_positives"], by_cut[0.75]["on_hard_negatives"]) == (1, 1)
    # ≥ 0.5: B's two FPs join; the 4 mm one is on B's loop, the 7 mm one is not
    assert (by_cut[0.5]["false_positives"], by_cut[0.5]["on_hard_negatives"]) == (3, 2)
    assert by_cut[0.5]["hard_negatives_hit"] == 2 and by_cut[0.5]["hard_negatives"] == 2
    assert by_cut[0.1]["false_positives"] == 4 and by_cut[0.1]["fp_per_case"] == 2.0
    assert "2 of 2 hard negatives" in capsys.readouterr().out


def test_a_split_without_cases_json_is_refused_naming_it(tmp_path, capsys):
    manifest, pred = _split(tmp_path / "test"), _predictions(tmp_path / "pred")
    (manifest.parent / "cases.json").unlink()
    assert main(["--manifest", str(manifest), "--pred", str(pred), "--thresholds", "0.5"]) == 2
    assert capsys.readouterr().err.startswith("hard_negatives: error: cases_json:")
