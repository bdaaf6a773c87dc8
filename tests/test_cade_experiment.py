"""``wlcad experiment sphere-vs-painted`` on a tiny budget, as a user runs it (a separate process).

A tiny run cannot show which label kind is better (the real run does, see docs); it proves the command
trains every arm on nested training sets from one seed, evaluates them all on the same held-out cases,
writes the JSON, table and plot, resumes without retraining, and refuses bad options before writing.
The analysis (cases spheres need to match painted) and the per-shape-group CPM are checked on numbers
whose answer is known.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from services.core.errors import InputError
from services.evaluation.bootstrap import percentile_interval
from services.evaluation.cade_groups import group_cpms, group_of, paired_difference
from services.evaluation.cade_report import Truth, TruthLesion
from services.evaluation.matching import Candidate, Lesion
from tests.conftest import run_cli
from training.cade.experiment import SHAPE_GROUPS, cases_to_match, parse_cases

TINY = ["--size", "64", "64", "48"]
BUDGET = ["--steps", "2", "--batch-size", "2", "--test-cases", "2", "--resamples", "50"]


def experiment(out: Path, *extra: str, cases: str = "3,2"):
    return run_cli(
        "experiment", "sphere-vs-painted", "--out", str(out), "--cases", cases, *TINY, *BUDGET, *extra,
        timeout=900,
    )  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("monai")
    out = tmp_path_factory.mktemp("experiment")
    done = experiment(out)
    assert done.returncode == 0, done.stderr
    assert "4 arm(s) trained this run" in done.stdout
    assert done.stderr.count(": trained,") == 4  # one progress line per arm
    return out


def test_tiny_run_writes_every_number_a_table_and_a_plot(finished: Path) -> None:
    summary = json.loads((finished / "sphere_vs_painted.json").read_text())
    arms = {(a["target"], a["cases"]): a for a in summary["arms"]}
    assert sorted(arms) == [("painted", 2), ("painted", 3), ("sphere", 2), ("sphere", 3)]
    assert summary["cases"] == [2, 3]  # sorted, whatever order the user gave
    # Same cases for both label kinds, and the size-2 set is the first two cases of the size-3 set.
    for n in (2, 3):
        assert arms["sphere", n]["train_case_ids"] == arms["painted", n]["train_case_ids"]
        assert len(arms["sphere", n]["train_case_ids"]) == n
    assert arms["sphere", 3]["train_case_ids"][:2] == arms["sphere", 2]["train_case_ids"]
    lesions = summary["test_lesions"]
    assert lesions["all"] == sum(lesions[g] for g in SHAPE_GROUPS) > 0
    for arm in summary["arms"]:
        for name, group in arm["groups"].items():
            assert group["n_lesions"] == lesions[name]
            if group["cpm"] is not None:
                ci = group["cpm_ci"]
                assert 0.0 <= ci["low"] <= group["cpm"] <= ci["high"] <= 1.0
        training = json.loads(
            (finished / "arms" / f"{arm['target']}-n{arm['cases']}" / "training.json").read_text()
        )
        assert training["settings"]["target"] == arm["target"] and training["settings"]["steps"] == 2
        assert training["settings"]["seed"] == 0
        predictions = json.loads(
            (finished / "arms" / f"{arm['target']}-n{arm['cases']}" / "predictions.json").read_text()
        )
        assert len(predictions) == summary["test_cases"] == 2  # every arm ran on the same test cases
    matches = summary["cases_to_match"]
    assert {(m["group"], m["painted_cases"]) for m in matches} == {
        (g, n) for g in ("all", *SHAPE_GROUPS) for n in (2, 3)
    }
    differences = {(d["group"], d["cases"]): d for d in summary["paired_differences"]}
    assert set(differences) == {(g, n) for g in ("all", *SHAPE_GROUPS) for n in (2, 3)}
    for (group, n), row in differences.items():
        painted, sphere = (arms[kind, n]["groups"][group]["cpm"] for kind in ("painted", "sphere"))
        if painted is not None:
            assert row["difference"] == pytest.approx(painted - sphere)
    for arm in summary["arms"]:
        samples = json.loads(
            (finished / "arms" / f"{arm['target']}-n{arm['cases']}" / "bootstrap.json").read_text()
        )
        assert samples["n_resamples"] == 50 and len(samples["cpm_samples"]["all"]) == 50
    assert "Painted − sphere CPM (paired bootstrap" in (finished / "sphere_vs_painted.md").read_text()
    assert summary["reference"]["ratio_low"] == 1.6 and summary["reference"]["ratio_high"] == 7.6
    table = (finished / "sphere_vs_painted.md").read_text()
    assert table.count("| sphere |") == 2 and table.count("| painted |") == 2
    assert "1.6–7.6×" in table
    png = (finished / "sphere_vs_painted.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_a_second_run_retrains_nothing_and_a_lost_result_is_only_re_evaluated(finished: Path) -> None:
    models = sorted((finished / "arms").glob("*/model.onnx"))
    before = {p: p.stat().st_mtime_ns for p in models}
    again = experiment(finished)
    assert again.returncode == 0, again.stderr
    assert "0 arm(s) trained this run" in again.stdout
    assert again.stderr.count(": done earlier,") == 4
    lost = finished / "arms" / "painted-n3" / "result.json"
    lost.unlink()
    third = experiment(finished)
    assert third.returncode == 0, third.stderr
    assert "painted labels × 3 cases: re-evaluated" in third.stderr and "0 arm(s) trained" in third.stdout
    assert json.loads(lost.read_text())["reused_training"] is True
    assert {p: p.stat().st_mtime_ns for p in models} == before  # no model was rewritten


def test_resuming_with_another_budget_is_refused_naming_the_option(finished: Path) -> None:
    other = run_cli(
        "experiment", "sphere-vs-painted", "--out", str(finished), "--cases", "2", *TINY,
        "--steps", "5", "--batch-size", "2", "--test-cases", "2", "--resamples", "50",
    )  # fmt: skip
    assert other.returncode == 2
    assert "steps" in other.stderr and "another --out" in other.stderr


@pytest.mark.parametrize("cases", ["10,abc", "0,5", "5,5", "", "-3"])
def test_bad_cases_exit_2_naming_the_option_and_write_nothing(tmp_path: Path, cases: str) -> None:
    out = tmp_path / "never"
    done = run_cli("experiment", "sphere-vs-painted", "--out", str(out), f"--cases={cases}")
    assert done.returncode == 2, done.stderr
    assert "cases" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_parse_cases_sorts_and_rejects() -> None:
    assert parse_cases("80, 10,40,20") == (10, 20, 40, 80)
    with pytest.raises(InputError) as error:
        parse_cases("10,10")
    assert error.value.field == "cases"


def test_cases_to_match_interpolates_on_log_cases() -> None:
    sizes = (10, 20, 40)
    crossing = cases_to_match("all", sizes, [0.3, 0.5, 0.7], 10, 0.6)
    assert crossing.sphere_cases == pytest.approx(math.sqrt(20 * 40))  # half-way on log cases
    assert crossing.ratio == pytest.approx(math.sqrt(800) / 10)
    exact = cases_to_match("all", sizes, [0.3, 0.5, 0.7], 20, 0.5)
    assert exact.sphere_cases == pytest.approx(20.0)
    first = cases_to_match("all", sizes, [0.8, 0.85, 0.9], 40, 0.75)
    assert first.sphere_cases == 10.0 and "smallest" in first.status
    never = cases_to_match("all", sizes, [0.3, 0.5, 0.7], 40, 0.9)
    assert never.sphere_cases is None and never.ratio is None and never.status == "not reached"
    # A curve that dips: the first size reaching the target counts.
    dip = cases_to_match("all", (10, 20, 40, 80), [0.5, 0.7, 0.6, 0.9], 80, 0.65)
    assert dip.sphere_cases == pytest.approx(math.exp(math.log(10) + 0.75 * math.log(2)))
    zero = cases_to_match("all", sizes, [0.0, 0.0, 0.1], 10, 0.0)
    assert zero.sphere_cases is None and "nothing to match" in zero.status
    absent = cases_to_match("x", sizes, [None, None, None], 10, None)
    assert absent.sphere_cases is None and "no lesions" in absent.status


def test_group_cpm_ignores_hits_on_other_groups_lesions() -> None:
    lesion_a = Lesion("c1", (0.0, 0.0, 0.0), 10.0)
    lesion_b = Lesion("c1", (50.0, 0.0, 0.0), 10.0)
    truth = Truth(("c1", "c2"), (TruthLesion(lesion_a, "solid"), TruthLesion(lesion_b, "solid")))
    labels = group_of(["sphere", "spiculated"], SHAPE_GROUPS, "shape_family")
    assert labels == ("sphere/ellipsoid", "lobulated/spiculated/irregular")
    # Found: lesion b only (with the strongest candidate); one FP in c2 between them.
    candidates = [
        Candidate("c1", (50.0, 1.0, 0.0), 0.9),
        Candidate("c2", (0.0, 0.0, 0.0), 0.8),
    ]
    simple, irregular = group_cpms(truth, labels, candidates, list(SHAPE_GROUPS), n_resamples=20)
    assert (simple.n_lesions, simple.n_found, simple.cpm) == (1, 0, 0.0)
    # The hit on lesion b is not an FP for the simple group, and b is found before any FP.
    assert (irregular.n_found, irregular.cpm) == (1, 1.0)
    # The per-resample CPMs are the draws behind the group's CI (so two arms' samples pair up).
    assert percentile_interval(simple.samples) == simple.ci
    assert len(irregular.samples) == 20
    difference = paired_difference(irregular.samples, simple.samples)
    assert difference is not None and difference.low > 0  # b found in every resample that draws c1
    empty = group_cpms(truth, ["sphere/ellipsoid"] * 2, candidates, list(SHAPE_GROUPS), n_resamples=20)[1]
    assert empty.n_lesions == 0 and empty.cpm is None and empty.ci is None
    with pytest.raises(InputError) as error:
        group_of(["sphere", "blob"], SHAPE_GROUPS, "shape_family")
    assert error.value.field == "shape_family" and "blob" in str(error.value)
