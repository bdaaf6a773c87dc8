"""Archive-scale batch (issue 15, item 4): ``--shard K/N`` processes over one manifest, run side by side
as real ``wlcad`` processes, merged by ``wlcad batch merge`` into outputs byte-identical to a single
unsharded run; a shard SIGKILLed after its first case and rerun completes, and the merge still equals
the single run.

The kill is made deterministic without any timing: the killed shard's second case has a named pipe
(FIFO) for its image, so the shard writes its first case and then blocks in ``open()`` until it is
killed; the real image is put back before the rerun. The case → shard assignment is recomputed here
from its definition (docs/deploy.md), not taken from the code under test.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from services.cli.main import main as wlcad
from services.core.io import write_image
from services.core.manifest import REQUIRED_COLUMNS
from services.core.volume import Volume
from services.inference.export import register_onnx_model
from tests.conftest import REPO_ROOT
from tests.test_detect_cli import CARD, CT_GRID, CT_SPHERES, blob_scorer_onnx, synthetic_ct

N = 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def shard_of(case_id: str, count: int = N) -> int:
    """The documented assignment: ``int(sha256(case_id)[:8], 16) % N``."""
    return int(hashlib.sha256(case_id.encode()).hexdigest()[:8], 16) % count


def case_ids(per_shard: int) -> list[str]:
    """Case ids in a fixed order, at least ``per_shard`` in each of the N shards."""
    ids, counts = [], [0] * N
    number = 0
    while min(counts) < per_shard:
        case = f"case{number:02d}"
        number += 1
        if counts[shard_of(case)] < per_shard:
            ids.append(case)
            counts[shard_of(case)] += 1
    return ids


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", *args],
        cwd=REPO_ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out + err


def files(folder: Path, skip=lambda p: False) -> dict[str, bytes]:
    """Relative path → bytes of every file under ``folder`` (except ``skip``)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not skip(p)
    }


def is_shard_bookkeeping(path: Path) -> bool:
    return path.name.startswith("summary.shard-") or (
        path.name.startswith(".shard-") and path.name.endswith(".lock")
    )


# ---------------------------------------------------------------------------------------- estimate
def _volume(seed: int) -> Volume:
    """20 × 40 × 40 voxels of 1 × 1 × 2 mm with a bright blob at (0, 0, 20) mm."""
    array = np.random.default_rng(seed).normal(0, 1, (20, 40, 40)).astype(np.float32)
    array[8:12, 16:24, 16:24] += 10
    return Volume(array, (1.0, 1.0, 2.0), (-20.0, -20.0, 0.0))


def _estimate_manifest(folder: Path, cases: list[str]) -> Path:
    path = folder / "weak.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(REQUIRED_COLUMNS))
        writer.writeheader()
        for n, case in enumerate(cases):
            image = write_image(_volume(n), folder / f"img-{case}.mha")
            for lesion_id, diameter in ((1, 8.0), (2, 5.0 + n)):
                writer.writerow(
                    {
                        "case_id": case,
                        "image": str(image),
                        "mask": "",
                        "lesion_id": str(lesion_id),
                        "center_x_mm": "0",
                        "center_y_mm": str(lesion_id - 1),
                        "center_z_mm": "20",
                        "diameter_mm": str(diameter),
                        "lesion_type": "blob",
                        "abnormal": "true",
                    }
                )
        # a bad row is recorded in the summary (it has no per-case output): the merge must keep it
        writer.writerow({"case_id": "bad", "image": "nowhere.nii.gz", "lesion_id": "1", "diameter_mm": "-1"})
    return path


def _estimate(manifest: Path, out: Path, *shard: str) -> list[str]:
    return ["estimate", "--manifest", str(manifest), "--method", "sphere", "--out", str(out), *shard]


def _wait_for(path: Path, process: subprocess.Popen, deadline_s: float = 240) -> None:
    """Until ``path`` exists (the shard wrote its first case) or the process ended (a failure)."""
    end = time.monotonic() + deadline_s
    while not path.exists() and process.poll() is None and time.monotonic() < end:
        time.sleep(0.02)


def test_estimate_shards_run_side_by_side_a_killed_one_reruns_and_the_merge_equals_one_run(tmp_path, capsys):
    cases = case_ids(per_shard=2)
    manifest = _estimate_manifest(tmp_path, cases)
    single = tmp_path / "single"
    assert wlcad(_estimate(manifest, single)) == 0
    reference = (single / "summary.csv").read_bytes()
    assert reference.count(b",ok,") == 2 * len(cases) and b",error," in reference

    # The killed shard's second case reads a FIFO: the shard writes its first case, then blocks.
    victim = shard_of(cases[0])
    first, blocked = [c for c in cases if shard_of(c) == victim][:2]
    image = tmp_path / f"img-{blocked}.mha"
    image.rename(tmp_path / "held.mha")
    os.mkfifo(image)

    out = tmp_path / "sharded"
    processes = {k: spawn(*_estimate(manifest, out, "--shard", f"{k}/{N}")) for k in range(N)}
    try:
        _wait_for(out / first / "lesion-2.json", processes[victim])
        assert processes[victim].poll() is None, finish(processes[victim])[1]
        processes[victim].send_signal(signal.SIGKILL)
        assert finish(processes[victim])[0] == -signal.SIGKILL
        for k in set(range(N)) - {victim}:
            status, output = finish(processes[k])
            assert status == 0, output
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    assert (out / first / "lesion-2.json").is_file() and not (out / blocked).exists()

    # Each finished shard wrote exactly its own cases (the documented assignment) and its summary.
    for k in set(range(N)) - {victim}:
        document = json.loads((out / f"summary.shard-{k}-of-{N}.json").read_text())
        assert document["cases"] == sorted(c for c in [*cases, "bad"] if shard_of(c) == k)
    case_folders = {p.name for p in out.iterdir() if p.is_dir()}
    assert case_folders == {c for c in cases if shard_of(c) != victim} | {first}

    capsys.readouterr()
    assert wlcad(["batch", "merge", str(out)]) == 2  # the killed shard left no summary
    error = capsys.readouterr().err
    assert f"summary.shard-{victim}-of-{N}.json (rerun --shard {victim}/{N})" in error, error
    assert not (out / "summary.csv").exists()

    others = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent.name != first}
    image.unlink()
    (tmp_path / "held.mha").rename(image)
    status, output = finish(spawn(*_estimate(manifest, out, "--shard", f"{victim}/{N}")))
    assert status == 0, output
    assert {p: p.stat().st_mtime_ns for p in others} == others  # the rerun touched no other shard's file
    rows = json.loads((out / f"summary.shard-{victim}-of-{N}.json").read_text())["rows"]
    assert [r["status"] for r in rows if r["case_id"] == first] == ["skipped", "skipped"]  # resumed

    changed = tmp_path / "changed.csv"
    changed.write_text(manifest.read_text() + "extra,x.nii.gz,,1,0,0,20,8,blob,true\n")
    assert wlcad(["batch", "merge", str(out), "--manifest", str(changed)]) == 2
    assert "manifest: changed.csv differs from the manifest" in capsys.readouterr().err

    assert wlcad(["batch", "merge", str(out)]) == 0
    assert (out / "summary.csv").read_bytes() == reference
    assert files(out, is_shard_bookkeeping) == files(single)  # every mask and report, byte for byte


# ------------------------------------------------------------------------------------------ detect
@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    register_onnx_model(
        root, "cade_chest-ct-nodule", blob_scorer_onnx(3, 32), metrics={}, max_batch_size=4, **CARD
    )
    return root


def test_detect_shards_merge_into_the_single_runs_outputs_and_froc(repository, tmp_path, capsys):
    lesioned = write_image(synthetic_ct(), tmp_path / "ct.mha")
    clean = write_image(synthetic_ct(spheres=[]), tmp_path / "clean.mha")
    rows = [
        "case_id,image,mask,lesion_id,center_x_mm,center_y_mm,center_z_mm,diameter_mm,lesion_type,abnormal"
    ]
    for n, case in enumerate(case_ids(per_shard=1)):
        if n % 2:
            rows.append(f"{case},{clean},,,,,,,,false")
            continue
        for lesion_id, (index, diameter, _) in enumerate(CT_SPHERES, start=1):
            x, y, z = CT_GRID.index_to_world(index)
            rows.append(f"{case},{lesioned},,{lesion_id},{x},{y},{z},{diameter},solid,true")
    manifest = tmp_path / "truth.csv"
    manifest.write_text("\n".join(rows) + "\n")
    common = ["--task", "chest-ct-nodule", "--model-repository", str(repository), "--threshold", "0.3"]
    common += ["--manifest", str(manifest)]

    single = tmp_path / "single"
    assert wlcad(["detect", *common, "--out", str(single)]) == 0
    evaluated = tmp_path / "evaluated"
    assert (
        wlcad(
            ["evaluate", "cade", "--manifest", str(manifest), "--pred", str(single), "--out", str(evaluated)]
        )
        == 0
    )

    out = tmp_path / "sharded"
    (out / "summary").mkdir(parents=True)
    # What a SIGKILLed writer leaves (services.core.atomic's names): each shard removes its own only.
    stale = [out / f".{case}.json.0123456789ab" for case in case_ids(per_shard=1)]
    stale.append(out / "summary" / f".summary.shard-1-of-{N}.json.0123456789ab")
    kept = [out / ".other.json.0123456789ab", out / f".{case_ids(1)[0]}.json.notes"]
    for path in stale + kept:
        path.write_text("{")
    processes = [spawn("detect", *common, "--out", str(out), "--shard", f"{k}/{N}") for k in range(N)]
    for process in processes:
        status, output = finish(process)
        assert status == 0, output
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    capsys.readouterr()
    assert wlcad(["batch", "merge", str(out)]) == 0
    assert "CPM 1.000" in capsys.readouterr().out

    assert files(out, lambda p: p.parent.name == "summary" or p.name.startswith(".")) == files(single)
    assert (out / "summary" / "froc.json").read_bytes() == (evaluated / "froc.json").read_bytes()
    merged = json.loads((out / "summary" / "summary.json").read_text())
    assert (merged["n_cases"], merged["n_failed"], merged["threshold"]) == (
        len(case_ids(per_shard=1)),
        0,
        0.3,
    )
    assert merged["cases"] == {
        p.stem: {"status": "ok", "n_candidates": len(json.loads(p.read_text())["candidates"])}
        for p in sorted(single.glob("*.json"))
    }
    assert list(merged["cases"]) == sorted(merged["cases"])


# --------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("spec", ["3/3", "-1/3", "1/0", "one/3", "1"])
def test_a_bad_shard_exits_2_naming_it_before_any_work(spec, tmp_path, capsys):
    manifest = _estimate_manifest(tmp_path, ["a"])
    assert wlcad(_estimate(manifest, tmp_path / "out", f"--shard={spec}")) == 2
    assert capsys.readouterr().err.startswith("wlcad: error: shard:")
    assert not (tmp_path / "out").exists()


def test_a_negative_shard_as_its_own_argument_is_named_too(tmp_path, capsys):
    manifest = _estimate_manifest(tmp_path, ["a"])
    # argparse would call "-1/3" a missing value (SystemExit, no field named)
    assert wlcad(_estimate(manifest, tmp_path / "out", "--shard", "-1/3")) == 2
    assert capsys.readouterr().err.startswith("wlcad: error: shard:")


def test_a_shard_of_another_count_is_refused_in_a_folder_of_a_sharded_run(tmp_path, capsys):
    manifest = _estimate_manifest(tmp_path, ["a", "b"])
    out = tmp_path / "out"
    assert wlcad(_estimate(manifest, out, "--shard", "0/2")) == 0
    capsys.readouterr()
    assert wlcad(_estimate(manifest, out, "--shard", "0/3")) == 2
    error = capsys.readouterr().err
    assert error.startswith("wlcad: error: shard:") and "a run in 2 shards" in error, error
    assert wlcad(["batch", "merge", str(out)]) == 2
    assert "summary.shard-1-of-2.json (rerun --shard 1/2)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if not p.is_dir()) == [
        ".shard-0-of-2.lock",
        "summary.shard-0-of-2.json",
    ]
    assert wlcad(_estimate(manifest, out, "--shard", "1/2")) == 0
    (report,) = [p for p in out.glob("*/lesion-1.json") if p.parent.name == "b"]
    report.unlink()  # a per-case output lost after its shard finished
    capsys.readouterr()
    assert wlcad(["batch", "merge", str(out)]) == 2
    assert f"case 'b' lesion 1 has no report; rerun --shard {shard_of('b', 2)}/2" in capsys.readouterr().err
    assert not (out / "summary.csv").exists()
