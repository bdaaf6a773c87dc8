"""The reader-feedback loop: verdicts → sphere-label rows and hard-negative rows in a grown manifest."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from services.core.errors import InputError
from services.core.manifest import read_lesions, read_manifest
from services.core.volume import Volume
from services.evaluation.cade_report import read_truth
from services.feedback.candidates import circus_candidates, detect_candidates
from services.feedback.ingest import FEEDBACK_COLUMNS, feedback_key, ingest_feedback, phantom_verdicts
from services.feedback.verdicts import parse_choices, parse_verdicts
from tests.conftest import run_cli

HEADER = "case_id,image,mask,lesion_id,center_x_mm,center_y_mm,center_z_mm,diameter_mm,lesion_type,abnormal,shape_family\n"
MANIFEST = (
    HEADER
    + "case_a,a.nii.gz,a_mask.nii.gz,1,0.000,0.000,0.000,10.000,solid,true,sphere\n"
    + "case_b,b.nii.gz,,,,,,,normal,false,\n"
)
#: case_a's candidates, strongest first: a hit on lesion 1, a new lesion, a false positive, an FP inside
#: lesion 1 (contradicts the manifest), one the reader skipped.
CANDIDATES = {
    "task": "chest-ct-nodule",
    "model": "cade_chest-ct-nodule",
    "model_version": "1",
    "candidates": [
        {"center_mm": [1.0, 1.0, 0.0], "center_voxel": [0, 0, 0], "diameter_mm": 9.0, "confidence": 0.9},
        {"center_mm": [30.0, 0.0, 0.0], "center_voxel": [0, 0, 0], "diameter_mm": 6.0, "confidence": 0.7},
        {"center_mm": [-30.0, 5.0, 5.0], "center_voxel": [0, 0, 0], "diameter_mm": 5.0, "confidence": 0.5},
        {"center_mm": [2.0, 0.0, 0.0], "center_voxel": [0, 0, 0], "diameter_mm": 4.0, "confidence": 0.4},
        {"center_mm": [0.0, 40.0, 0.0], "center_voxel": [0, 0, 0], "diameter_mm": 4.0, "confidence": 0.3},
    ],
}
VERDICTS = {"1": "TP", "2": "TP", "3": "FP", "4": "fp", "5": "skip"}


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    for name in ("a.nii.gz", "a_mask.nii.gz", "b.nii.gz"):
        (tmp_path / name).write_bytes(b"")  # existence only: the sampler's reader checks files exist
    path = tmp_path / "manifest.csv"
    path.write_text(MANIFEST)
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_verdicts_grow_the_manifest_with_a_lesion_and_a_hard_negative(manifest):
    result = ingest_feedback(parse_verdicts(VERDICTS), detect_candidates(CANDIDATES), manifest, "case_a")
    assert (
        result.added_lesions,
        result.added_hard_negatives,
        result.confirmed,
        result.conflicts,
        result.skipped,
    ) == (
        1,
        1,
        1,
        1,
        1,
    )
    rows = _rows(manifest)
    assert list(rows[0])[-len(FEEDBACK_COLUMNS) :] == list(FEEDBACK_COLUMNS)
    assert rows[0]["shape_family"] == "sphere"  # columns already there are kept
    assert [r["label_source"] for r in rows] == ["", "", "reader-tp", "reader-fp"]
    tp, fp = rows[2], rows[3]
    assert (
        tp | {} == tp
        and tp["case_id"] == "case_a"
        and tp["image"] == "a.nii.gz"
        and tp["mask"] == "a_mask.nii.gz"
    )
    assert (tp["lesion_id"], tp["center_x_mm"], tp["diameter_mm"], tp["lesion_type"], tp["abnormal"]) == (
        "2",
        "30.000",
        "6.000",
        "solid",
        "true",
    )
    assert tp["hard_negative"] == "" and tp["candidate_confidence"] == "0.7000"
    assert tp["feedback_key"] == feedback_key("case_a", (30.0, 0.0, 0.0))
    assert (
        fp["lesion_id"],
        fp["center_x_mm"],
        fp["center_z_mm"],
        fp["diameter_mm"],
        fp["hard_negative"],
    ) == (
        "",
        "-30.000",
        "5.000",
        "5.000",
        "true",
    )
    # every existing reader of manifests: the new lesion counts, the hard negative is no lesion
    truth = read_truth(manifest)
    assert sorted(lesion.lesion.center_mm[0] for lesion in truth.lesions) == [0.0, 30.0]
    assert [(lesion.case_id, lesion.prompt.lesion_id) for lesion in read_lesions(manifest)] == [
        ("case_a", 1),
        ("case_a", 2),
    ]
    from training.cade.samples import manifest_cases

    cases = {case.case_id: case for case in manifest_cases(manifest)}
    assert [p.center_mm for p in cases["case_a"].prompts] == [(0.0, 0.0, 0.0), (30.0, 0.0, 0.0)]
    assert cases["case_a"].mask == manifest.parent / "a_mask.nii.gz"  # the case keeps its mask
    assert cases["case_b"].prompts == ()


def test_ingest_is_idempotent_and_a_changed_verdict_replaces_the_row(manifest):
    verdicts, candidates = parse_verdicts(VERDICTS), detect_candidates(CANDIDATES)
    ingest_feedback(verdicts, candidates, manifest, "case_a")
    first = manifest.read_bytes()
    again = ingest_feedback(verdicts, candidates, manifest, "case_a")
    assert manifest.read_bytes() == first
    assert (again.unchanged, again.added_lesions, again.added_hard_negatives) == (2, 0, 0)
    changed = ingest_feedback(parse_verdicts(VERDICTS | {"2": "FP"}), candidates, manifest, "case_a")
    assert (changed.replaced, changed.added_hard_negatives, changed.unchanged) == (1, 1, 1)
    rows = [r for r in _rows(manifest) if r["label_source"]]
    assert sorted((r["label_source"], r["center_x_mm"]) for r in rows) == [
        ("reader-fp", "-30.000"),
        ("reader-fp", "30.000"),
    ]
    assert all(
        r["abnormal"] == "true" for r in _rows(manifest) if r["case_id"] == "case_a"
    )  # lesion 1 remains


def test_a_true_positive_on_a_lesion_free_case_makes_it_abnormal(manifest, tmp_path):
    grown = tmp_path / "grown.csv"
    one = {"candidates": [{"center_mm": [5.0, 5.0, 5.0], "diameter_mm": 8.0, "confidence": 0.8}]}
    result = ingest_feedback(
        parse_verdicts({"1": "TP"}), detect_candidates(one), manifest, "case_b", out=grown
    )
    assert result.added_lesions == 1 and manifest.read_text() == MANIFEST  # --out leaves the input alone
    rows = [r for r in _rows(grown) if r["case_id"] == "case_b"]
    assert [r["abnormal"] for r in rows] == ["true", "true"]
    assert rows[1]["lesion_id"] == "1" and rows[1]["lesion_type"] == "unspecified"
    assert read_manifest(grown, check_files=True)[-1]["abnormal"] is True


def test_circus_feedback_entries_choice_indices_and_results_json(tmp_path):
    # the case image: an oblique-free but offset, anisotropic grid, so voxel → mm is not the identity
    volume = Volume(np.zeros((10, 20, 30), np.int16), (0.7, 0.7, 2.5), origin=(-100.0, -50.0, 20.0))
    from services.core.io.nifti import write_nifti

    write_nifti(volume, tmp_path / "c.nii.gz")
    manifest = tmp_path / "m.csv"
    manifest.write_text(HEADER + "case_c,c.nii.gz,,,,,,,normal,false,\n")
    results = {
        "results": {
            "lesionCandidates": [
                {"rank": 1, "confidence": 0.95, "volumeId": 0, "location": [10, 5, 3], "volumeSize": 113.1},
                {"rank": 2, "confidence": 0.6, "volumeId": 0, "location": [20, 15, 7], "volumeSize": 65.4},
            ]
        },
        "metadata": {"diameters_mm": [6.0, 5.0]},
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    feedback = [
        {
            "feedbackId": "f1",
            "isConsensual": False,
            "userEmail": "r1@example.org",
            "data": {"lesionCandidates": [{"id": 0, "value": 1}, {"id": 1, "value": 1}]},
        },
        {
            "feedbackId": "f2",
            "isConsensual": True,
            "userEmail": "chief@example.org",
            "data": {"lesionCandidates": [{"id": 0, "value": 0}, {"id": 1, "value": 1}]},
        },
    ]
    (tmp_path / "feedback.json").write_text(json.dumps(feedback))
    done = run_cli(
        "feedback", "ingest", str(tmp_path / "feedback.json"), "--candidates", str(tmp_path / "results.json"),
        "--manifest", str(manifest), "--case", "case_c", "--lesion-type", "solid",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "example.org" not in done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert (summary["added_lesions"], summary["added_hard_negatives"]) == (1, 1)  # the consensual entry
    tp, fp = (r for r in _rows(manifest) if r["label_source"])
    expected_tp = volume.index_to_world([10, 5, 3])
    assert [float(tp[f"center_{a}_mm"]) for a in "xyz"] == pytest.approx(expected_tp, abs=1e-3)
    assert (tp["diameter_mm"], tp["lesion_type"], tp["label_source"]) == ("6.000", "solid", "reader-tp")
    assert [float(fp[f"center_{a}_mm"]) for a in "xyz"] == pytest.approx(
        volume.index_to_world([20, 15, 7]), abs=1e-3
    )
    assert fp["hard_negative"] == "true"
    # without the plug-in's diameters, the size comes from volumeSize (equivalent sphere)
    del results["metadata"]
    (found,) = circus_candidates(
        {"results": {"lesionCandidates": results["results"]["lesionCandidates"][:1]}}, volume
    )
    assert found.diameter_mm == pytest.approx(6.0, abs=0.01) and found.id == 0 and found.rank == 1


def test_feedback_forms():
    bare = parse_verdicts([{"id": 3, "value": "TP"}, {"id": 0, "value": 1}])
    assert (bare.by, bare.verdicts) == ("id", {3: "TP", 0: "FP"})
    data = parse_verdicts({"lesionCandidates": [{"id": 0, "value": 2}]}, choices=parse_choices("TP,FP,skip"))
    assert data.verdicts == {0: "skip"}
    entry = parse_verdicts(
        {"isConsensual": False, "data": {"nodules": [{"id": 1, "value": 0}]}}, feedback_key="nodules"
    )
    assert entry.verdicts == {1: "TP"}
    assert parse_verdicts({"2": "fp", " 1": "TP"}).verdicts == {2: "FP", 1: "TP"}


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"1": "maybe"}, "feedback[1]"),
        ({"0": "TP"}, "feedback"),
        ({"first": "TP"}, "feedback"),
        ({}, "feedback"),
        ([{"id": 0, "value": 5}], "feedback[0].value"),
        ([{"id": -1, "value": 0}], "feedback[0]"),
        ([{"id": 0, "value": 0}, {"id": 0, "value": 1}], "feedback[1]"),
        ([{"isConsensual": False, "data": {"lesionCandidates": []}}] * 2, "feedback"),
        ({"isConsensual": True, "data": {"other": []}}, "feedback_key"),
        ("TP", "feedback"),
    ],
)
def test_bad_feedback_is_refused_naming_the_field(document, field):
    with pytest.raises(InputError) as caught:
        parse_verdicts(document)
    assert caught.value.field == field


def test_refusals_name_the_field_and_leave_the_manifest_alone(manifest, tmp_path):
    candidates = detect_candidates(CANDIDATES)
    cases = [
        (lambda: ingest_feedback(parse_verdicts({"9": "TP"}), candidates, manifest, "case_a"), "feedback"),
        (lambda: ingest_feedback(parse_verdicts({"1": "TP"}), candidates, manifest, "case_z"), "case"),
        (
            lambda: ingest_feedback(
                parse_verdicts({"2": "TP"}), candidates, manifest, "case_a", out=tmp_path / "x" / "m.csv"
            ),
            "out",
        ),
        (
            lambda: detect_candidates(
                {"candidates": [{"center_mm": [0, 0], "diameter_mm": 1, "confidence": 1}]}
            ),
            "candidates[0].center_mm",
        ),
        (lambda: detect_candidates({"results": []}), "candidates"),
    ]
    (tmp_path / "x").mkdir()
    for call, field in cases:
        with pytest.raises(InputError) as caught:
            call()
        assert caught.value.field == field
    assert manifest.read_text() == MANIFEST
    manifest.write_text(MANIFEST.replace("shape_family", "label_source").replace(",sphere\n", ",model\n"))
    with pytest.raises(InputError) as caught:
        ingest_feedback(parse_verdicts({"1": "TP"}), candidates, manifest, "case_a")
    assert caught.value.field == "label_source"


def test_cli_simulate_then_ingest_on_a_phantom_truth(manifest, tmp_path):
    """The phantom reader: TP within a true lesion's radius, else FP; ingesting its verdicts adds only
    hard negatives to a manifest that already holds every lesion."""
    candidates = tmp_path / "case_a.json"
    candidates.write_text(json.dumps(CANDIDATES))
    verdicts = tmp_path / "verdicts.json"
    done = run_cli(
        "feedback",
        "simulate",
        "--candidates",
        str(candidates),
        "--manifest",
        str(manifest),
        "--out",
        str(verdicts),
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(verdicts.read_text()) == {"1": "TP", "2": "FP", "3": "FP", "4": "TP", "5": "FP"}
    assert phantom_verdicts(detect_candidates(CANDIDATES), manifest, "case_a") == json.loads(
        verdicts.read_text()
    )
    done = run_cli(
        "feedback", "ingest", str(verdicts), "--candidates", str(candidates), "--manifest", str(manifest)
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (
        summary["case_id"],
        summary["confirmed"],
        summary["added_hard_negatives"],
        summary["added_lesions"],
    ) == ("case_a", 2, 3, 0)
    bad = run_cli(
        "feedback",
        "ingest",
        str(verdicts),
        "--candidates",
        str(candidates),
        "--manifest",
        str(manifest),
        "--choices",
        "TP",
    )
    assert bad.returncode == 2 and bad.stderr.startswith("wlcad: error: choices")


def test_phantom_loop_with_the_shipped_detector(tmp_path):
    """Phantoms → ``wlcad detect`` (the shipped chest CT detector) → the phantom reader → ingest into a
    manifest missing one detected lesion: that lesion comes back as a reader sphere label, every false
    positive becomes a hard negative outside every true lesion, and the rest are confirmed."""
    from training.data.dataset import write_dataset

    write_dataset("chest-ct-nodule", 2, 901, tmp_path / "ph", size_xyz=(96, 96, 48))
    truth = tmp_path / "ph" / "manifest.csv"
    det = tmp_path / "det"
    done = run_cli(
        "detect", "--task", "chest-ct-nodule", "--manifest", str(truth), "--out", str(det), timeout=600
    )
    assert done.returncode == 0, done.stderr
    cases = sorted({row["case_id"] for row in read_manifest(truth, check_files=False)})
    verdicts = {}
    for case in cases:
        out = tmp_path / f"{case}.verdicts.json"
        done = run_cli(
            "feedback",
            "simulate",
            "--candidates",
            str(det / f"{case}.json"),
            "--manifest",
            str(truth),
            "--out",
            str(out),
        )
        assert done.returncode == 0, done.stderr
        verdicts[case] = json.loads(out.read_text())
    assert any(v == "TP" for per_case in verdicts.values() for v in per_case.values())
    # hide one lesion the detector found: the reader's TP must bring it back
    hit_case = next(case for case in cases if "TP" in verdicts[case].values())
    hit = detect_candidates(json.loads((det / f"{hit_case}.json").read_text()))[
        int(next(rank for rank, v in verdicts[hit_case].items() if v == "TP")) - 1
    ]
    truth_rows = _rows(truth)
    lesions = [r for r in truth_rows if r["case_id"] == hit_case and r["lesion_id"]]
    hidden = min(
        lesions,
        key=lambda r: np.linalg.norm(np.subtract([float(r[f"center_{a}_mm"]) for a in "xyz"], hit.center_mm)),
    )
    grown = tmp_path / "ph" / "grown.csv"
    with grown.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(truth_rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(r for r in truth_rows if r is not hidden)
    totals = {"added_lesions": 0, "added_hard_negatives": 0, "confirmed": 0}
    for case in cases:
        out = tmp_path / f"{case}.verdicts.json"
        done = run_cli(
            "feedback",
            "ingest",
            str(out),
            "--candidates",
            str(det / f"{case}.json"),
            "--manifest",
            str(grown),
        )
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        for key in totals:
            totals[key] += summary[key]
    false_positives = sum(v == "FP" for per_case in verdicts.values() for v in per_case.values())
    true_positives = sum(v == "TP" for per_case in verdicts.values() for v in per_case.values())
    assert totals == {
        "added_lesions": 1,
        "added_hard_negatives": false_positives,
        "confirmed": true_positives - 1,
    }
    rows = read_manifest(grown, check_files=True)
    (back,) = [r for r in _rows(grown) if r["label_source"] == "reader-tp"]
    assert back["case_id"] == hit_case
    distance = np.linalg.norm(
        np.subtract(
            [float(back[f"center_{a}_mm"]) for a in "xyz"], [float(hidden[f"center_{a}_mm"]) for a in "xyz"]
        )
    )
    assert distance <= float(hidden["diameter_mm"]) / 2
    true = [
        (
            np.asarray([r["center_x_mm"], r["center_y_mm"], r["center_z_mm"]]),
            r["diameter_mm"] / 2,
            r["case_id"],
        )
        for r in read_manifest(truth, check_files=False)
        if r["lesion_id"]
    ]
    negatives = [r for r in rows if (r.get("hard_negative") or "") == "true"]
    assert len(negatives) == false_positives
    for row in negatives:
        centre = np.asarray([row["center_x_mm"], row["center_y_mm"], row["center_z_mm"]])
        assert all(np.linalg.norm(centre - c) > radius for c, radius, case in true if case == row["case_id"])
