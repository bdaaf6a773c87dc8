"""``wlcad evaluate anomaly``: ROC-AUC (= scikit-learn's), its bootstrap CI, per abnormality type
(that type against all normals), sensitivity at 95 % specificity, the same answer from the score
folder and from the worklist CSV, and refusals (missing scores, mixed models) naming the field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from services.cli.main import main as wlcad
from services.core.manifest import write_manifest
from services.evaluation.anomaly_report import evaluate_anomaly, read_scores, read_truth

VERSION = "anomaly_cxr-anomaly_two-flow/1"
TYPES = ("mass", "effusion")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A manifest of 60 normals, 20 masses and 20 effusions (one case has both), and score JSONs in
    the layout ``wlcad score --manifest`` writes: effusions easy, masses overlapping the normals."""
    folder = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(4)
    rows, scores, truth = [], {}, {}
    for i in range(100):
        case = f"c{i:03d}"
        kind = "normal" if i < 60 else TYPES[(i - 60) // 20]
        base = {"case_id": case, "image": f"{case}.nii.gz", "abnormal": str(kind != "normal").lower()}
        if kind == "normal":
            rows.append({**base, "lesion_type": "normal"})
        else:
            rows.append({**base, "lesion_id": 1, "center_x_mm": 1, "center_y_mm": 1, "center_z_mm": 0,
                         "diameter_mm": 10, "lesion_type": kind})  # fmt: skip
        if i == 99:  # a second finding in one case: counted in both types
            rows.append({**rows[-1], "lesion_id": 2, "lesion_type": "mass"})
        shift = {"normal": 0.0, "mass": 0.8, "effusion": 3.0}[kind]
        scores[case] = float(rng.normal(shift, 1.0))
        truth[case] = kind
    write_manifest(rows, folder / "manifest.csv")
    out = folder / "scores"
    out.mkdir()
    for case, value in scores.items():
        document = {"task": "cxr-anomaly", "model": "two-flow", "model_version": VERSION, "score": value}
        (out / f"{case}.json").write_text(json.dumps(document))
    (out / "summary").mkdir()  # shard summaries live here: not scores
    return folder / "manifest.csv", out, {"scores": scores, "truth": truth}


def test_auc_per_type_and_sensitivity_match_scikit_learn(run):
    manifest, folder, known = run
    report = evaluate_anomaly(read_truth(manifest), read_scores(folder), n_resamples=300)
    cases = sorted(known["scores"])
    s = np.array([known["scores"][c] for c in cases])
    abnormal = np.array([known["truth"][c] != "normal" for c in cases])
    assert report.overall.auc == pytest.approx(roc_auc_score(abnormal, s), abs=1e-12)
    assert report.overall.auc_ci.low < report.overall.auc < report.overall.auc_ci.high
    assert (report.overall.n_abnormal, report.overall.n_normal) == (40, 60)
    fpr, tpr, thresholds = roc_curve(abnormal, s, drop_intermediate=False)
    best = np.argmax(np.where(fpr <= 0.05, tpr, -1))
    point = report.overall.operating_point
    assert point.sensitivity == pytest.approx(tpr[best]) and point.threshold == pytest.approx(
        thresholds[best]
    )
    assert (
        point.specificity >= 0.95
        and point.sensitivity_ci.low <= point.sensitivity <= point.sensitivity_ci.high
    )
    called = s >= point.threshold
    assert called[~abnormal].mean() <= 0.05 and called[abnormal].mean() == pytest.approx(point.sensitivity)

    by_type = {t.name: t for t in report.by_type}
    assert set(by_type) == set(TYPES)
    for kind in TYPES:
        # that type's cases (c099 is an effusion with a mass too: in both) against all normals
        chosen = [
            c for c in cases if known["truth"][c] in ("normal", kind) or (c == "c099" and kind == "mass")
        ]
        expected = roc_auc_score(
            [known["truth"][c] != "normal" for c in chosen], [known["scores"][c] for c in chosen]
        )
        assert by_type[kind].auc == pytest.approx(expected, abs=1e-12) and by_type[kind].n_normal == 60
    assert by_type["mass"].n_abnormal == 21 and by_type["effusion"].n_abnormal == 20
    assert by_type["effusion"].auc > by_type["mass"].auc  # the easy type separates better


def test_cli_writes_json_and_roc_and_reads_the_worklist_the_same(run, tmp_path, capsys):
    manifest, folder, _ = run
    out = tmp_path / "eval"
    assert (
        wlcad(
            ["evaluate", "anomaly", "--manifest", str(manifest), "--scores", str(folder), "--out", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "sens @ 95% spec" in printed and "effusion" in printed
    document = json.loads((out / "anomaly.json").read_text())
    assert document["model_version"] == VERSION and document["n_cases"] == 100
    assert document["auc_ci"]["n_resamples"] == 1000 and {t["name"] for t in document["by_type"]} == set(
        TYPES
    )
    assert document["roc"]["fpr"][0] == 0.0 and document["roc"]["tpr"][-1] == 1.0
    with Image.open(out / "roc.png") as png:
        assert png.format == "PNG"
    # the same scores as a worklist CSV (as wlcad score writes it; a failed row is not a score)
    scores = read_scores(folder).by_case
    worklist = tmp_path / "worklist.csv"
    with worklist.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, ["rank", "case_id", "status", "score", "model_version", "error"])
        writer.writeheader()
        for rank, (case, value) in enumerate(sorted(scores.items(), key=lambda kv: -kv[1]), start=1):
            writer.writerow(
                {
                    "rank": rank,
                    "case_id": case,
                    "status": "scored",
                    "score": repr(value),
                    "model_version": VERSION,
                }
            )
        writer.writerow(
            {"case_id": "c-extra", "status": "failed", "model_version": VERSION, "error": "image: constant"}
        )
    again = tmp_path / "again"
    assert (
        wlcad(
            [
                "evaluate",
                "anomaly",
                "--manifest",
                str(manifest),
                "--scores",
                str(worklist),
                "--out",
                str(again),
            ]
        )
        == 0
    )
    assert json.loads((again / "anomaly.json").read_text()) == document


def test_refusals_name_the_field(run, tmp_path, capsys):
    manifest, folder, _ = run
    partial = tmp_path / "partial"
    partial.mkdir()
    for path in sorted(folder.glob("*.json"))[3:]:
        (partial / path.name).write_bytes(path.read_bytes())
    argv = [
        "evaluate",
        "anomaly",
        "--manifest",
        str(manifest),
        "--scores",
        str(partial),
        "--out",
        str(tmp_path / "e"),
    ]
    assert wlcad(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("wlcad: error: scores: 3 manifest case(s) have no score") and "c000" in err
    assert not (tmp_path / "e").exists()
    assert wlcad([*argv, "--allow-missing"]) == 0
    document = json.loads((tmp_path / "e" / "anomaly.json").read_text())
    assert document["cases_without_scores"] == ["c000", "c001", "c002"] and document["n_cases"] == 97

    other = json.loads((partial / "c050.json").read_text())
    (partial / "c050.json").write_text(json.dumps({**other, "model_version": "anomaly_cxr-anomaly_glow/1"}))
    assert wlcad([*argv, "--allow-missing"]) == 2
    assert "several models mixed" in capsys.readouterr().err
    (partial / "c050.json").write_text(json.dumps({**other, "score": float("nan")}).replace("NaN", '"NaN"'))
    assert wlcad([*argv, "--allow-missing"]) == 2
    assert "c050.json: 'score' must be a finite number" in capsys.readouterr().err
    assert wlcad([*argv[:-2], "--out", str(partial)]) == 2
    assert capsys.readouterr().err.startswith("wlcad: error: --out:")
