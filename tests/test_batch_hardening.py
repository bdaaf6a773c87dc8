"""Batch and CLI hardening (issue 10, item 7), through the real ``wlcad estimate`` process where a user
would meet the problem: outputs confined to ``--out``, a resume key that notices changed inputs,
leftovers of a killed run removed, unwritable outputs and impossible requests refused before any work
(exit 2, nothing written)."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from services.api.pb import label_estimation_pb2 as pb
from services.core.errors import InputError
from services.core.io import write_image
from services.core.lesion_prompt import LesionPrompt, validated_prompt
from services.core.manifest import REQUIRED_COLUMNS, read_lesions
from services.core.volume import Volume
from services.label_estimation.batch import run_batch
from services.label_estimation.pipeline import LabelEstimator
from services.label_estimation.wire import prompts_from_proto
from tests.conftest import REPO_ROOT, run_cli

CENTRE = "0,0,20"


def _image(folder: Path) -> Path:
    """20 × 40 × 40 voxels of 1 × 1 × 2 mm around the origin, with a bright 8 mm blob at (0, 0, 20) mm."""
    array = np.random.default_rng(3).normal(0, 1, (20, 40, 40)).astype(np.float32)
    array[8:12, 16:24, 16:24] += 10
    return write_image(Volume(array, (1.0, 1.0, 2.0), (-20.0, -20.0, 0.0)), folder / "img.nii.gz")


def _manifest(path: Path, image: Path, rows: list[dict]) -> Path:
    """A manifest of ``rows`` (``case_id``, optionally ``lesion_id``/``diameter_mm``) on ``image``."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(REQUIRED_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    "image": str(image),
                    "mask": "",
                    "lesion_id": "1",
                    "center_x_mm": "0",
                    "center_y_mm": "0",
                    "center_z_mm": "20",
                    "diameter_mm": "8",
                    "lesion_type": "blob",
                    "abnormal": "true",
                    **row,
                }
            )
    return path


def _batch(manifest: Path, out: Path, method: str = "sphere") -> subprocess.CompletedProcess:
    return run_cli("estimate", "--manifest", str(manifest), "--method", method, "--out", str(out))


def _statuses(out: Path) -> list[str]:
    return [row["status"] for row in csv.DictReader((out / "summary.csv").open())]


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- outputs stay in --out
@pytest.mark.parametrize("case_id", ["../../x", "ABSOLUTE", "a/b", "..", "a\\b", "a\x00b", "."])
def test_unsafe_case_ids_are_refused_naming_the_row_and_nothing_is_written(
    tmp_path: Path, case_id: str
) -> None:
    if case_id == "ABSOLUTE":
        case_id = str(tmp_path / "elsewhere")
    image = _image(tmp_path)
    manifest = _manifest(tmp_path / "weak.csv", image, [{"case_id": "case1"}, {"case_id": case_id}])
    before = _files(tmp_path)
    result = _batch(manifest, tmp_path / "a" / "b" / "out")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("wlcad: error: case_id: line 3:"), result.stderr
    assert "Traceback" not in result.stderr
    assert _files(tmp_path) == before  # not even the first, valid row's outputs
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------- resume key
def test_a_rerun_recomputes_when_the_method_or_the_prompt_changed(tmp_path: Path) -> None:
    image = _image(tmp_path)
    manifest = _manifest(tmp_path / "weak.csv", image, [{"case_id": "case1"}])
    out = tmp_path / "out"
    report = out / "case1" / "lesion-1.json"
    assert _batch(manifest, out).returncode == 0
    assert _statuses(out) == ["ok"]
    assert _batch(manifest, out).returncode == 0
    assert _statuses(out) == ["skipped"]  # same inputs: resumed

    assert _batch(manifest, out, "threshold").returncode == 0
    assert _statuses(out) == ["ok"]
    assert json.loads(report.read_text())["method"] == "threshold"

    _manifest(manifest, image, [{"case_id": "case1", "diameter_mm": "12"}])
    assert _batch(manifest, out, "threshold").returncode == 0
    assert _statuses(out) == ["ok"]
    written = json.loads(report.read_text())
    assert written["prompt"]["diameter_mm"] == 12.0
    assert written["resume_key"]["prompt"]["diameter_mm"] == 12.0
    assert _batch(manifest, out, "threshold").returncode == 0
    assert _statuses(out) == ["skipped"]


def test_the_model_version_is_part_of_the_resume_key_and_keyless_reports_are_redone(tmp_path: Path) -> None:
    image = _image(tmp_path)
    lesions = read_lesions(_manifest(tmp_path / "weak.csv", image, [{"case_id": "case1"}]))
    out = tmp_path / "out"

    def statuses(version: str) -> list[str]:
        summary = run_batch(lesions, out, "sphere", LabelEstimator(), model_version=version)
        return [row["status"] for row in csv.DictReader(summary.open())]

    assert statuses("label_unet3d/1") == ["ok"]
    assert statuses("label_unet3d/1") == ["skipped"]
    assert statuses("label_unet3d/2") == ["ok"]
    report = out / "case1" / "lesion-1.json"
    old = json.loads(report.read_text())
    del old["resume_key"]  # a report written before the key existed cannot say what it was made from
    report.write_text(json.dumps(old))
    assert statuses("label_unet3d/2") == ["ok"]


# --------------------------------------------------------------------------- leftovers of a killed run
_KILLED_WRITER = """
import os, signal, sys
from contextlib import ExitStack
from pathlib import Path
from services.core.atomic import atomic_output
out = Path(sys.argv[1])
with ExitStack() as stack:
    stack.enter_context(atomic_output(out / "case1" / "lesion-1.nii.gz", suffix=".nii.gz"))
    stack.enter_context(atomic_output(out / "case1" / "lesion-1.json"))
    stack.enter_context(atomic_output(out / "gone" / "lesion-7.json"))
    stack.enter_context(atomic_output(out / "summary.csv"))
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_temporaries_left_by_a_sigkilled_run_are_removed_when_a_batch_starts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(out)], cwd=REPO_ROOT, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    stale = {p for p in out.rglob(".*") if p.is_file()}
    assert len(stale) == 4  # the writers' own names, left for good by the kill
    keep = [out / "case1" / ".lesion-1.nii.gz.notes", out / ".summary.csv.bak", out / "case1" / "mine.txt"]
    for path in keep:
        path.write_text("the user's, not wlcad's")
    image = _image(tmp_path)
    result = _batch(_manifest(tmp_path / "weak.csv", image, [{"case_id": "case1"}]), out)
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)
    assert (out / "case1" / "lesion-1.json").is_file()


def test_a_second_batch_into_the_same_out_is_refused_while_one_runs(tmp_path: Path) -> None:
    """Two batches into one folder would overwrite each other and delete each other's temporaries."""
    image = _image(tmp_path)
    manifest = _manifest(tmp_path / "weak.csv", image, [{"case_id": "case1"}])
    out = tmp_path / "out"
    out.mkdir()
    handle = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running batch holds
        result = _batch(manifest, out)
    finally:
        os.close(handle)
    assert result.returncode == 2
    assert result.stderr.startswith("wlcad: error: out: another batch"), result.stderr
    assert not (out / "case1").exists()
    assert _batch(manifest, out).returncode == 0  # the lock went with its holder


# --------------------------------------------------------------------------- unwritable outputs
def test_an_unwritable_batch_out_exits_2_before_any_work(tmp_path: Path) -> None:
    image = _image(tmp_path)
    manifest = _manifest(tmp_path / "weak.csv", image, [{"case_id": "case1"}])
    (tmp_path / "a-file").write_text("")
    result = _batch(manifest, tmp_path / "a-file" / "out")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("wlcad: error: out:") and "a-file is not a folder" in result.stderr

    def refuse_to_compute(*_args):
        raise AssertionError("computed before checking the output")

    with pytest.raises(InputError) as caught:
        run_batch(
            read_lesions(manifest),
            tmp_path / "a-file" / "out",
            "sphere",
            SimpleNamespace(estimate=refuse_to_compute),
        )
    assert caught.value.field == "out"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only-mode folder")
def test_a_read_only_batch_out_exits_2(tmp_path: Path) -> None:
    image = _image(tmp_path)
    out = tmp_path / "out"
    out.mkdir(mode=0o555)
    result = _batch(_manifest(tmp_path / "weak.csv", image, [{"case_id": "case1"}]), out)
    assert result.returncode == 2 and result.stderr.startswith("wlcad: error: out:"), result.stderr


@pytest.mark.parametrize("option", ["--out", "--report", "--seg", "--circus"])
def test_unwritable_single_lesion_outputs_exit_2_and_write_nothing(tmp_path: Path, option: str) -> None:
    image = _image(tmp_path)
    (tmp_path / "a-file").write_text("")
    outputs = {"--out": tmp_path / "m.nii.gz", option: tmp_path / "a-file" / "x"}
    if option == "--out":
        outputs[option] = tmp_path / "a-file" / "m.nii.gz"
    arguments = [text for pair in outputs.items() for text in (pair[0], str(pair[1]))]
    result = run_cli(
        "estimate", "--image", str(image), "--center-mm", CENTRE, "--diameter-mm", "8", "--method", "sphere",
        *arguments,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"wlcad: error: {option[2:]}:"), result.stderr
    assert not (tmp_path / "m.nii.gz").exists()


# --------------------------------------------------------------------------- requests that cannot work
def test_seg_on_an_input_without_dicom_uids_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    image = _image(tmp_path)
    mask, seg = tmp_path / "m.nii.gz", tmp_path / "seg.dcm"
    result = run_cli(
        "estimate", "--image", str(image), "--center-mm", CENTRE, "--diameter-mm", "8", "--method", "sphere",
        "--out", str(mask), "--seg", str(seg),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("wlcad: error: seg: a DICOM SEG needs a DICOM image input"), result.stderr
    assert not mask.exists() and not seg.exists()


@pytest.mark.parametrize("diameter", ["1e-300", "0.05"])
def test_non_physical_diameters_exit_2_naming_the_field(tmp_path: Path, diameter: str) -> None:
    image = _image(tmp_path)
    out = tmp_path / "m.nii.gz"
    result = run_cli(
        "estimate", "--image", str(image), "--center-mm", CENTRE, "--diameter-mm", diameter, "--method",
        "sphere", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("wlcad: error: diameter_mm:") and "0.1" in result.stderr
    assert "overflow" not in result.stderr and not out.exists()


def test_a_non_physical_manifest_diameter_is_that_rows_error(tmp_path: Path) -> None:
    image = _image(tmp_path)
    manifest = _manifest(
        tmp_path / "weak.csv",
        image,
        [{"case_id": "case1"}, {"case_id": "case1", "lesion_id": "2", "diameter_mm": "1e-300"}],
    )
    out = tmp_path / "out"
    assert _batch(manifest, out).returncode == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "error"]
    assert "diameter_mm" in rows[1]["error"]
    assert not (out / "case1" / "lesion-2.nii.gz").exists()


def test_prompt_limits_hold_for_every_entry_point() -> None:
    """Checked in LesionPrompt, so the gRPC request inherits the CLI's and the manifest's limit."""
    assert LesionPrompt((0.0, 0.0, 0.0), 0.1).diameter_mm == 0.1
    for diameter in (0.0999, 1e-300, float("nan")):
        with pytest.raises(InputError) as caught:
            LesionPrompt((0.0, 0.0, 0.0), diameter)
        assert caught.value.field == "diameter_mm"
    with pytest.raises(InputError) as caught:
        LesionPrompt((0.0, 0.0, 0.0), 5.0, axes_mm=(0.01, 5.0, 5.0))
    assert caught.value.field == "axes_mm"
    with pytest.raises(InputError) as caught:
        prompts_from_proto([pb.LesionPrompt(lesion_id=1, center_mm=[0, 0, 0], diameter_mm=0.05)])
    assert caught.value.field == "lesions[0].diameter_mm"
    image = Volume(np.zeros((20, 40, 40), np.int16), (1.0, 1.0, 2.0), (-20.0, -20.0, 0.0))
    with pytest.raises(InputError) as caught:  # 1e6 mm axes on a 40 mm image: refused, not clipped
        validated_prompt(image, LesionPrompt((0.0, 0.0, 20.0), 8.0, axes_mm=(1e6, 8.0, 8.0)))
    assert caught.value.field == "axes_mm"


def test_a_mask_name_that_cannot_be_written_is_refused_before_the_seg(sample, tmp_path: Path) -> None:
    """The SEG is written first (its last checks need the source files), so the mask's name is checked
    up front: a wrong suffix must not leave a SEG behind."""
    series = sample("ct-3slice-dicom")
    seg = tmp_path / "seg.dcm"
    result = run_cli(
        "estimate", "--image", str(series), "--center-voxel", "256,256,1", "--diameter-mm", "15", "--method",
        "sphere", "--out", str(tmp_path / "mask.txt"), "--seg", str(seg),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("wlcad: error: out: cannot write mask.txt"), result.stderr
    assert not seg.exists()
