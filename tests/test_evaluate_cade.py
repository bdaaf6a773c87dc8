"""``wlcad evaluate cade`` and services.evaluation.cade_report: hand-worked FROC numbers, breakdowns,
operating points, input validation, and the command end to end in a real process."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from services.core.errors import InputError
from services.core.manifest import write_manifest
from services.evaluation import Candidate, Lesion, bootstrap_froc, froc
from services.evaluation.cade_report import (
    evaluate_cade,
    read_predictions,
    read_truth,
    report_json,
)
from tests.conftest import run_cli

FAR = (1000.0, 1000.0, 1000.0)  # hits no lesion: a false positive

# Four cases. A: L1 (4 mm, solid) and L2 (8 mm, ground-glass); B: L3 (12 mm, solid); C: L4 (25 mm,
# part-solid) and no prediction file; D: lesion-free.
LESIONS = {
    "L1": ("A", (0.0, 0.0, 0.0), 4.0, "solid"),
    "L2": ("A", (50.0, 0.0, 0.0), 8.0, "ground-glass"),
    "L3": ("B", (0.0, 0.0, 0.0), 12.0, "solid"),
    "L4": ("C", (0.0, 0.0, 0.0), 25.0, "part-solid"),
}
# The ranking, descending: TP L1 0.95; 4 FPs (→ 1 FP/case); TP L3 0.70; 4 FPs (→ 2 FP/case); TP L2 0.45;
# 8 FPs down to 0.05 (→ 4 FP/case); one more FP 0.04 (→ 4.25 FP/case). L4 is never found.
FP_SCORES = [0.90, 0.85, 0.80, 0.75, 0.65, 0.60, 0.55, 0.50, *np.round(np.linspace(0.40, 0.05, 8), 4), 0.04]
FP_CASES = ["A", "B", "D"]


def _candidates() -> dict[str, list[dict]]:
    per_case: dict[str, list[dict]] = {"A": [], "B": [], "D": []}

    def add(case: str, centre: tuple[float, float, float], score: float) -> None:
        per_case[case].append(
            {"center_mm": list(centre), "center_voxel": [1, 2, 3], "diameter_mm": 5.0, "confidence": score}
        )

    add("A", (0.5, 0.0, 0.0), 0.95)  # L1 (radius 2)
    add("B", (1.0, 1.0, 0.0), 0.70)  # L3
    add("A", (51.0, 0.0, 0.0), 0.45)  # L2
    for index, score in enumerate(FP_SCORES):
        add(FP_CASES[index % 3], FAR, float(score))
    return per_case


def _detection(case: str, candidates: list[dict], **override) -> dict:
    doc = {"task": "chest-ct-nodule", "model": "cade_chest-ct-nodule", "model_version": "1", "case_id": case}
    doc["candidates"] = candidates
    doc.update(override)
    return doc


def _manifest(folder: Path, lesions: dict = LESIONS, free: tuple[str, ...] = ("D",)) -> Path:
    rows = []
    for number, (case, centre, diameter, kind) in enumerate(lesions.values(), start=1):
        x, y, z = centre
        rows.append(
            {"case_id": case, "image": f"{case}.nii.gz", "lesion_id": number, "center_x_mm": x,
             "center_y_mm": y, "center_z_mm": z, "diameter_mm": diameter, "lesion_type": kind,
             "abnormal": "true"}
        )  # fmt: skip
    for case in free:
        rows.append(
            {"case_id": case, "image": f"{case}.nii.gz", "lesion_type": "normal", "abnormal": "false"}
        )
    return write_manifest(rows, folder / "manifest.csv")


def _pred_folder(folder: Path, per_case: dict[str, list[dict]] | None = None) -> Path:
    pred = folder / "pred"
    pred.mkdir()
    for case, candidates in (per_case or _candidates()).items():
        (pred / f"{case}.json").write_text(json.dumps(_detection(case, candidates)))
    return pred


@pytest.fixture
def worked(tmp_path):
    return read_truth(_manifest(tmp_path)), read_predictions(_pred_folder(tmp_path))


def _rates(group) -> list[float]:
    return [r.sensitivity for r in group.at_rates]


def test_hand_worked_froc_cpm_and_operating_points(worked):
    truth, predictions = worked
    report = evaluate_cade(truth, predictions, n_resamples=200)
    assert (report.n_cases, report.n_lesions, report.n_candidates) == (4, 4, 20)
    assert report.cases_without_predictions == ("C",)
    assert report.estimate.n_found == 3 and report.estimate.n_false_positives == 17
    # LUNA16 read-out: 1/8, 1/4, 1/2 → 0.25; 1 → top of the rise at 1 FP/case, 0.5; 2, 4, 8 → 0.75.
    assert [r.sensitivity for r in report.sensitivities] == pytest.approx(
        [0.25, 0.25, 0.25, 0.5, 0.75, 0.75, 0.75]
    )
    assert report.cpm == pytest.approx(3.5 / 7)
    points = [[p.max_fp_per_case, p.threshold, p.fp_per_case, p.sensitivity] for p in report.operating_points]
    assert np.allclose(points, [[1.0, 0.70, 1.0, 0.5], [2.0, 0.45, 2.0, 0.75], [4.0, 0.05, 4.0, 0.75]])
    assert [(p.n_true_positives, p.n_false_positives) for p in report.operating_points] == [
        (2, 4),
        (3, 8),
        (3, 16),
    ]
    for rate in report.sensitivities:
        assert rate.ci.n_resamples > 0 and rate.ci.low <= rate.sensitivity <= rate.ci.high
    assert report.cpm_ci.low <= report.cpm <= report.cpm_ci.high


def test_breakdowns_by_size_and_kind_keep_the_whole_fp_axis(worked):
    report = evaluate_cade(*worked, n_resamples=200)
    by_size = {g.name: g for g in report.by_size}
    assert list(by_size) == ["< 6 mm", "6–10 mm", "10–20 mm", "≥ 20 mm", "≥ 6 mm"]
    assert [by_size[n].n_lesions for n in by_size] == [1, 1, 1, 1, 3]
    assert _rates(by_size["< 6 mm"]) == pytest.approx([1.0, 1.0, 1.0])
    # L2 scores 0.45, below 8 FPs: missed at 1 FP/case, found at 2 — only if L1's and L3's hits are
    # ignored in this group (counted as FPs they would push L2 past 2 FP/case).
    assert _rates(by_size["6–10 mm"]) == pytest.approx([0.0, 1.0, 1.0])
    assert _rates(by_size["10–20 mm"]) == pytest.approx([1.0, 1.0, 1.0])
    assert _rates(by_size["≥ 20 mm"]) == pytest.approx([0.0, 0.0, 0.0]) and by_size["≥ 20 mm"].n_found == 0
    assert _rates(by_size["≥ 6 mm"]) == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    by_kind = {g.name: g for g in report.by_kind}
    assert sorted(by_kind) == ["ground-glass", "part-solid", "solid"]
    assert by_kind["solid"].n_lesions == 2 and _rates(by_kind["solid"]) == pytest.approx([1.0, 1.0, 1.0])
    assert _rates(by_kind["ground-glass"]) == pytest.approx([0.0, 1.0, 1.0])
    assert _rates(by_kind["part-solid"]) == pytest.approx([0.0, 0.0, 0.0])


def test_size_bin_edges_and_empty_bins(tmp_path):
    lesions = {"a": ("A", (0.0, 0.0, 0.0), 6.0, ""), "b": ("A", (50.0, 0.0, 0.0), 20.0, "solid")}
    truth = read_truth(_manifest(tmp_path, lesions, free=()))
    pred = _pred_folder(tmp_path, {"A": [{"center_mm": [0, 0, 0], "confidence": 0.5}]})
    report = evaluate_cade(truth, read_predictions(pred), n_resamples=50)
    counts = {g.name: g.n_lesions for g in report.by_size}
    assert counts == {"< 6 mm": 0, "6–10 mm": 1, "10–20 mm": 0, "≥ 20 mm": 1, "≥ 6 mm": 2}
    assert next(g for g in report.by_size if g.name == "< 6 mm").at_rates == ()
    assert [g.name for g in report.by_kind] == ["solid", "unspecified"]


def test_a_case_without_predictions_counts_as_no_candidates(tmp_path):
    truth = read_truth(_manifest(tmp_path))
    per_case = _candidates()
    with_c = dict(per_case, C=[{"center_mm": [0, 0, 0], "confidence": 0.99}])
    without_d = {k: v for k, v in per_case.items() if k != "D"}
    (tmp_path / "c").mkdir()
    (tmp_path / "d").mkdir()
    full = evaluate_cade(truth, read_predictions(_pred_folder(tmp_path / "c", with_c)), n_resamples=20)
    assert full.cases_without_predictions == () and full.estimate.n_found == 4
    # D's FPs vanish, but D stays in the denominator: FP/case still divides by 4 cases.
    no_d = evaluate_cade(truth, read_predictions(_pred_folder(tmp_path / "d", without_d)), n_resamples=20)
    assert no_d.cases_without_predictions == ("C", "D")
    assert no_d.n_cases == 4
    assert no_d.estimate.fp_per_case[-1] == pytest.approx(sum(1 for i in range(17) if i % 3 != 2) / 4)


def test_agrees_with_services_evaluation_froc_and_bootstrap(worked):
    truth, predictions = worked
    lesions = [t.lesion for t in truth.lesions]
    for rule in ("luna16", "adam"):
        report = evaluate_cade(truth, predictions, rule=rule, n_resamples=300, seed=7)
        direct = froc(lesions, predictions.candidates, truth.case_ids, rule=rule)
        boot = bootstrap_froc(
            lesions, predictions.candidates, truth.case_ids, rule=rule, n_resamples=300, seed=7
        )
        assert report.cpm == direct.cpm
        assert [r.sensitivity for r in report.sensitivities] == [
            p.sensitivity for p in direct.operating_points
        ]
        assert report.cpm_ci == boot.cpm
        assert [r.ci for r in report.sensitivities] == list(boot.sensitivity)
        assert [p.threshold for p in report.operating_points] == [
            p.threshold for p in direct.operating_points if p.fp_per_case in (1.0, 2.0, 4.0)
        ]


def test_adam_rule_counts_the_sphere_surface(tmp_path):
    lesions = {"a": ("A", (0.0, 0.0, 0.0), 10.0, "saccular-bifurcation")}
    truth = read_truth(_manifest(tmp_path, lesions, free=()))
    pred = read_predictions(_pred_folder(tmp_path, {"A": [{"center_mm": [5.0, 0, 0], "confidence": 0.8}]}))
    assert evaluate_cade(truth, pred, rule="luna16", n_resamples=10).estimate.n_found == 0
    assert evaluate_cade(truth, pred, rule="adam", n_resamples=10).estimate.n_found == 1
    # No rule given: the predictions' task decides (chest-ct-nodule → LUNA16, head-mra-aneurysm → ADAM).
    assert evaluate_cade(truth, pred, n_resamples=10).rule.value == "luna16"
    aneurysm = dataclasses.replace(pred, task="head-mra-aneurysm")
    report = evaluate_cade(truth, aneurysm, n_resamples=10)
    assert report.rule.value == "adam" and report.estimate.n_found == 1
    assert (
        evaluate_cade(truth, dataclasses.replace(pred, task="foreign"), n_resamples=10).rule.value == "luna16"
    )


def test_a_list_file_reads_like_a_folder(tmp_path, worked):
    truth, from_folder = worked
    listed = [_detection(case, cands) for case, cands in _candidates().items()]
    path = tmp_path / "all.json"
    path.write_text(json.dumps(listed))
    from_list = read_predictions(path)
    assert from_list.case_ids == from_folder.case_ids
    assert sorted(from_list.candidates, key=repr) == sorted(from_folder.candidates, key=repr)
    assert from_list.candidates[0] == Candidate("A", (0.5, 0.0, 0.0), 0.95)
    assert (from_list.task, from_list.model, from_list.model_version) == (
        "chest-ct-nodule",
        "cade_chest-ct-nodule",
        "1",
    )
    assert truth.lesions[0].lesion == Lesion("A", (0.0, 0.0, 0.0), 4.0)


def _bad_candidate(**change) -> dict:
    candidate = {"center_mm": [0, 0, 0], "center_voxel": [0, 0, 0], "diameter_mm": 4.0, "confidence": 0.5}
    candidate.update(change)
    return candidate


@pytest.mark.parametrize(
    ("document", "field", "words"),
    [
        (_detection("A", [_bad_candidate(confidence="high")]), "candidates[0].confidence", "A.json"),
        (_detection("A", [_bad_candidate(confidence=float("nan"))]), "candidates[0].confidence", "finite"),
        (
            _detection("A", [_bad_candidate(), _bad_candidate(center_mm=[1, 2])]),
            "candidates[1].center_mm",
            "3",
        ),
        (_detection("A", [_bad_candidate(center_voxel=[1, "x", 3])]), "candidates[0].center_voxel", "A.json"),
        (_detection("A", [_bad_candidate(diameter_mm=-1)]), "candidates[0].diameter_mm", "> 0"),
        (_detection("A", [_bad_candidate(confidence=True)]), "candidates[0].confidence", "finite number"),
        (_detection("A", ["not an object"]), "candidates[0]", "object"),
        (_detection("A", {"a": 1}), "candidates", "list"),
        ({k: v for k, v in _detection("A", []).items() if k != "model"}, "model", "A.json"),
        (_detection("A", [], model_version=""), "model_version", "non-empty"),
        (_detection("B", []), "case_id", "file name"),
    ],
)
def test_bad_prediction_files_are_refused_naming_file_and_field(tmp_path, document, field, words):
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "A.json").write_text(json.dumps(document))
    with pytest.raises(InputError) as caught:
        read_predictions(pred)
    assert caught.value.field == field
    assert words in str(caught.value)


def test_bad_prediction_sets_are_refused(tmp_path):
    truth = read_truth(_manifest(tmp_path))
    (tmp_path / "x.json").write_text("{not json")
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "twice.json").write_text(json.dumps([_detection("A", []), _detection("A", [])]))
    (tmp_path / "mixed.json").write_text(
        json.dumps([_detection("A", []), _detection("B", [], model="other")])
    )
    (tmp_path / "stranger.json").write_text(json.dumps([_detection("A", []), _detection("Z9", [])]))
    (tmp_path / "nothing").mkdir()
    cases = [
        ("x.json", "--pred", "not valid JSON"),
        ("empty.json", "--pred", "no detection"),
        ("twice.json", "case_id", "twice"),
        ("mixed.json", "model", "differs"),
        ("nothing", "--pred", "no <case_id>.json"),
        ("missing.json", "--pred", "does not exist"),
    ]
    for name, field, words in cases:
        with pytest.raises(InputError) as caught:
            read_predictions(tmp_path / name)
        assert (caught.value.field, words in str(caught.value)) == (field, True), name
    with pytest.raises(InputError) as caught:
        evaluate_cade(truth, read_predictions(tmp_path / "stranger.json"))
    assert caught.value.field == "case_id" and "'Z9'" in str(caught.value)


def test_a_manifest_without_lesions_is_refused(tmp_path):
    truth = read_truth(_manifest(tmp_path, {}, free=("A", "B")))
    pred = read_predictions(_pred_folder(tmp_path, {"A": []}))
    with pytest.raises(InputError) as caught:
        evaluate_cade(truth, pred)
    assert caught.value.field == "manifest"


def test_report_json_holds_every_number_as_plain_json(worked):
    report = evaluate_cade(*worked, n_resamples=100)
    data = json.loads(json.dumps(report_json(report), allow_nan=False))
    assert data["curve"]["thresholds"][0] is None  # the curve starts at threshold inf
    assert (
        len(data["curve"]["fp_per_case"])
        == len(data["curve"]["sensitivity"])
        == len(data["curve"]["thresholds"])
    )
    assert data["n_cases_without_predictions"] == 1 and data["cases_without_predictions"] == ["C"]
    assert data["bootstrap"] == {"n_resamples": 100, "seed": 0, "level": 0.95}
    assert [g["name"] for g in data["by_size"]][:4] == ["< 6 mm", "6–10 mm", "10–20 mm", "≥ 20 mm"]


def test_unreachable_operating_point_has_no_threshold(tmp_path):
    # One case; its two top candidates are tied FPs, so the first cut below inf already costs 2 FP/case:
    # no threshold keeps ≤ 1 FP/case (inf, nothing kept), while ≤ 2 and ≤ 4 reach the hit at 0.5.
    lesions = {"a": ("A", (0.0, 0.0, 0.0), 10.0, "solid")}
    truth = read_truth(_manifest(tmp_path, lesions, free=()))
    cands = [{"center_mm": list(FAR), "confidence": 0.9}] * 2 + [{"center_mm": [1, 0, 0], "confidence": 0.5}]
    report = evaluate_cade(truth, read_predictions(_pred_folder(tmp_path, {"A": cands})), n_resamples=10)
    points = [(p.threshold, p.fp_per_case, p.sensitivity) for p in report.operating_points]
    assert points == [(math.inf, 0.0, 0.0), (0.5, 2.0, 1.0), (0.5, 2.0, 1.0)]
    assert [p["threshold"] for p in report_json(report)["operating_points"]] == [None, 0.5, 0.5]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_cli_writes_json_and_png_and_prints_the_table(tmp_path):
    manifest, pred = _manifest(tmp_path), _pred_folder(tmp_path)
    out = tmp_path / "out"
    result = run_cli(
        "evaluate",
        "cade",
        "--manifest",
        str(manifest),
        "--pred",
        str(pred),
        "--out",
        str(out),
        "--resamples",
        "200",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "froc.json").read_text())
    assert data["cpm"] == pytest.approx(0.5) and data["rule"] == "luna16"
    assert [p["threshold"] for p in data["operating_points"]] == pytest.approx([0.70, 0.45, 0.05])
    assert data["n_cases_without_predictions"] == 1
    width, height = _png_size(out / "froc.png")
    assert width > 300 and height > 300
    assert "CPM 0.500" in result.stdout and "1 without predictions" in result.stdout
    assert "froc.json" in result.stdout


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    manifest, pred = _manifest(tmp_path), _pred_folder(tmp_path)
    (pred / "A.json").write_text(json.dumps(_detection("A", [_bad_candidate(center_mm=[0, 0])])))
    out = tmp_path / "out"
    result = run_cli("evaluate", "cade", "--manifest", str(manifest), "--pred", str(pred), "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "candidates[0].center_mm" in result.stderr and "A.json" in result.stderr
    assert not out.exists()
    bad_rule = run_cli("evaluate", "cade", "--manifest", str(manifest), "--pred", str(pred), "--rule", "nope")
    assert bad_rule.returncode == 2 and "--rule" in bad_rule.stderr
    same = run_cli("evaluate", "cade", "--manifest", str(manifest), "--pred", str(pred), "--out", str(pred))
    assert same.returncode == 2 and "--out" in same.stderr


def test_radiograph_lesions_without_z_and_bad_manifest_rows(tmp_path):
    row = {"case_id": "X", "image": "x.png", "lesion_id": 1, "center_x_mm": 10.0, "center_y_mm": 20.0,
           "diameter_mm": 30.0, "lesion_type": "mass", "abnormal": "true"}  # fmt: skip
    truth = read_truth(write_manifest([row], tmp_path / "cxr.csv"))
    assert truth.lesions[0].lesion.center_mm == (10.0, 20.0, 0.0)
    pred = read_predictions(
        _pred_folder(tmp_path, {"X": [{"center_mm": [12.0, 21.0, 0.0], "confidence": 0.6}]})
    )
    assert evaluate_cade(truth, pred, n_resamples=10).estimate.n_found == 1
    for column, value in (("center_y_mm", None), ("diameter_mm", 0.0)):
        bad = write_manifest([dict(row, **{column: value})], tmp_path / f"bad_{column}.csv")
        with pytest.raises(InputError) as caught:
            read_truth(bad)
        assert caught.value.field == column and "'X'" in str(caught.value)
