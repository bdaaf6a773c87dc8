"""Label estimation: exact geometry, baselines on phantoms, dose labels, SEG/CIRCUS outputs, CLI, batch."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy.spatial.transform import Rotation

from services.core.errors import InputError
from services.core.io import read_image, write_image
from services.core.lesion_mask import world_coordinates
from services.core.lesion_prompt import LesionPrompt
from services.core.manifest import read_lesions
from services.core.volume import Volume
from services.evaluation import dice
from services.label_estimation.circus_label import circus_voxel_label, unpack_circus_voxels
from services.label_estimation.dose import Isodose, dose_labels, read_rtdose
from services.label_estimation.pipeline import LabelEstimator
from services.label_estimation.shapes import (
    ellipsoid_mask,
    prompt_from_circus_ellipsoid,
    prompt_from_recist,
    sphere_mask,
)
from tests.conftest import run_cli
from training.data.dataset import write_dataset


def _oblique_image() -> Volume:
    direction = Rotation.from_euler("xyz", [12, -25, 40], degrees=True).as_matrix()
    rng = np.random.default_rng(1)
    return Volume(
        rng.normal(0, 1, (30, 60, 50)).astype(np.float32), (0.8, 0.6, 2.5), (10.0, -20.0, 5.0), direction
    )


def test_sphere_is_a_sphere_in_mm_on_an_oblique_anisotropic_grid() -> None:
    image = _oblique_image()
    center = image.index_to_world([24.3, 31.7, 14.2])
    mask = sphere_mask(image, LesionPrompt(tuple(center), 14.0))
    full = mask.full()
    k, j, i = np.nonzero(full)
    distances = np.linalg.norm(image.index_to_world(np.stack([i, j, k], 1).astype(float)) - center, axis=1)
    assert distances.max() <= 7.0 + 1e-9
    # Every voxel of the image within the radius is in the mask (no clipping by the box).
    everything = world_coordinates(image, (0, 0, 0), image.shape_xyz)
    inside = np.linalg.norm(everything - center, axis=-1) <= 7.0
    np.testing.assert_array_equal(full, inside)
    # Volume ≈ 4/3 π r³ despite 2.5 mm slices.
    assert full.sum() * image.voxel_volume_mm3 == pytest.approx(4 / 3 * np.pi * 7.0**3, rel=0.08)


def test_ellipsoid_recist_and_circus_prompts() -> None:
    image = Volume(np.zeros((40, 80, 80), np.int16), (0.5, 0.5, 1.0))
    recist = prompt_from_recist((10.0, 20.0, 20.0), (30.0, 20.0, 20.0), 8.0)
    assert recist.axes_mm == (20.0, 8.0, 8.0)
    assert recist.center_mm == (20.0, 20.0, 20.0)
    mask = ellipsoid_mask(image, recist.center_mm, recist.axes_mm, np.asarray(recist.axes_direction))
    k, j, i = np.nonzero(mask.full())
    world = image.index_to_world(np.stack([i, j, k], 1).astype(float))
    assert np.ptp(world[:, 0]) == pytest.approx(20.0, abs=1.0)  # long axis along x
    assert np.ptp(world[:, 1]) == pytest.approx(8.0, abs=1.0)
    circus = prompt_from_circus_ellipsoid((5.0, 6.0, 7.0), (25.0, 16.0, 13.0))
    assert circus.center_mm == (15.0, 11.0, 10.0)
    assert circus.axes_mm == (20.0, 10.0, 6.0)
    with pytest.raises(InputError, match="max must exceed min"):
        prompt_from_circus_ellipsoid((5, 6, 7), (5, 16, 13))
    with pytest.raises(InputError) as caught:
        prompt_from_recist((0, 0, 0), (10, 0, 0), 12.0)
    assert caught.value.field == "short_axis_mm"


@pytest.mark.parametrize(
    ("center_mm", "diameter_mm", "field"),
    [
        ((500.0, 0.0, 0.0), 10.0, "center_mm"),  # outside the image: the pipeline's check
        ((20.0, 20.0, 20.0), 0.0, "diameter_mm"),
        ((20.0, 20.0, 20.0), -4.0, "diameter_mm"),
        ((20.0, 20.0, 20.0), 900.0, "diameter_mm"),  # larger than the image: the pipeline's check
        ((20.0, float("nan"), 20.0), 10.0, "center_mm"),
        ((20.0, 20.0, 20.0), float("inf"), "diameter_mm"),
        ((20.0, 20.0), 10.0, "center_mm"),
    ],
)
def test_bad_prompts_name_the_field(center_mm, diameter_mm, field: str) -> None:
    """Malformed values are refused when the prompt is made, values that do not fit the image by the
    pipeline; either way the error names the field."""
    image = Volume(np.zeros((40, 80, 80), np.int16), (0.5, 0.5, 1.0))
    with pytest.raises(InputError) as caught:
        LabelEstimator().estimate(image, [LesionPrompt(center_mm, diameter_mm)], "sphere")
    assert caught.value.field == field


def test_unet_refuses_single_slice_images() -> None:
    """A radiograph is a one-slice volume; the 3D segmenter would score ~0.03 Dice on it (measured)."""
    xray = Volume(np.zeros((1, 200, 200), np.uint16), (0.2, 0.2, 1.0))
    with pytest.raises(InputError, match="one slice") as caught:
        LabelEstimator(SimpleNamespace(infer=lambda batch: batch, version="", max_batch=1)).estimate(
            xray, [LesionPrompt((20.0, 20.0, 0.0), 10.0)], "unet"
        )
    assert caught.value.field == "method"


def test_unet_without_a_backend_is_a_clear_error() -> None:
    image = Volume(np.zeros((40, 80, 80), np.int16), (0.5, 0.5, 1.0))
    with pytest.raises(InputError, match="inference backend"):
        LabelEstimator().estimate(image, [LesionPrompt((20.0, 20.0, 20.0), 10.0)], "unet")


# --------------------------------------------------------------------------- on phantoms
@pytest.fixture(scope="module")
def liver(tmp_path_factory) -> Path:
    """Small liver MR phantoms: dark lesions, thick slices, irregular shapes."""
    out = tmp_path_factory.mktemp("liver")
    write_dataset("liver-mr-lesion", 3, 4242, out, size_xyz=(160, 160, 48))
    return out / "manifest.csv"


@pytest.fixture(scope="module")
def brain(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("brain")
    write_dataset("brain-mr-metastasis", 3, 4243, out, size_xyz=(160, 160, 96))
    return out / "manifest.csv"


def _mean_dice(manifest: Path, method: str) -> float:
    estimator = LabelEstimator()
    scores = []
    for lesion in read_lesions(manifest):
        image, truth = read_image(lesion.image), read_image(lesion.truth)
        estimate = estimator.estimate(image, [lesion.prompt], method)[0]
        scores.append(dice(estimate.mask.full(), truth.array == lesion.prompt.lesion_id))
    return float(np.mean(scores))


@pytest.mark.parametrize("fixture", ["liver", "brain"])
def test_classic_baselines_beat_the_sphere_on_phantoms_of_both_polarities(fixture: str, request) -> None:
    """Threshold and random walker read the polarity from the image: dark liver and bright brain lesions.

    Measured (seeds 4242/4243): liver sphere 0.56, threshold 0.70, random walker 0.79; brain sphere
    0.66, threshold 0.69 (oedema and necrotic cores confuse one global threshold), random walker 0.72.
    """
    manifest = request.getfixturevalue(fixture)
    sphere = _mean_dice(manifest, "sphere")
    assert 0.3 < sphere < 0.8
    assert _mean_dice(manifest, "threshold") > sphere
    assert _mean_dice(manifest, "random-walker") > sphere + 0.05


def test_estimates_carry_measurements_and_qc(liver: Path) -> None:
    lesion = read_lesions(liver)[0]
    image = read_image(lesion.image)
    estimate = LabelEstimator().estimate(image, [lesion.prompt], "threshold")[0]
    report = estimate.report()
    assert report["measurements"]["voxels"] > 0
    assert report["measurements"]["volume_mm3"] == pytest.approx(
        report["measurements"]["voxels"] * image.voxel_volume_mm3, rel=1e-3
    )
    assert 0.5 < report["qc"]["diameter_ratio"] < 2.0
    assert report["qc"]["center_offset_mm"] < lesion.prompt.diameter_mm
    json.dumps(report)  # serialisable as it is


def test_dose_labels_recover_every_treated_target(brain: Path) -> None:
    """Each treated target gets its own label; Dice ≥ 0.8 where the dose grid can resolve it.

    A target narrower than four dose voxels (6 mm on the 1.5 mm grid) cannot reach 0.8 through any
    resampling (measured: a 4.3 mm, 7-voxel target scores 0.58); it must still be found.
    """
    rows = list(csv.DictReader(brain.open()))
    resolved = 0
    for case_id in sorted({r["case_id"] for r in rows}):
        case_rows = [r for r in rows if r["case_id"] == case_id]
        image = read_image(brain.parent / case_rows[0]["image"])
        truth = read_image(brain.parent / case_rows[0]["mask"])
        dose = read_rtdose(brain.parent / case_rows[0]["rtdose"])
        labels, targets = dose_labels(image, dose, Isodose.parse("50%"))
        treated = [r for r in case_rows if r["treated"] == "true"]
        assert len(targets) == len(treated)
        found = set()
        for row in treated:
            lesion = truth.array == int(row["lesion_id"])
            overlapping = np.bincount(labels[lesion], minlength=labels.max() + 1)[1:]
            assert overlapping.sum() > 0, f"treated target {row['lesion_id']} of {case_id} was not found"
            label = int(np.argmax(overlapping)) + 1
            found.add(label)
            if float(row["diameter_mm"]) >= 4 * max(dose.spacing):
                assert dice(labels == label, lesion) >= 0.8
                resolved += 1
        assert len(found) == len(treated)  # one label per target, none shared
        untreated = [r for r in case_rows if r["treated"] == "false"]
        for row in untreated:
            assert not np.any(labels[truth.array == int(row["lesion_id"])]), (
                "an untreated lesion got a dose label"
            )
    assert resolved >= 3


@pytest.mark.parametrize("text", ["0%", "100%", "-5Gy", "fifty", "12"])
def test_bad_isodose_names_the_field(text: str) -> None:
    with pytest.raises(InputError) as caught:
        Isodose.parse(text)
    assert caught.value.field == "isodose"


# --------------------------------------------------------------------------- outputs
def test_circus_voxel_label_round_trip() -> None:
    image = _oblique_image()
    mask = sphere_mask(image, LesionPrompt(tuple(image.index_to_world([25, 30, 15])), 9.0))
    label, packed = circus_voxel_label(mask)
    assert label["data"]["voxels"] == hashlib.sha1(packed).hexdigest()
    tight = mask.tight()
    assert label["data"]["origin"] == list(tight.start_xyz)
    np.testing.assert_array_equal(unpack_circus_voxels(packed, label["data"]["size"]), tight.mask_zyx)


def test_cli_on_real_ct_series_writes_mask_seg_circus_and_report(sample, tmp_path: Path) -> None:
    series = sample("ct-3slice-dicom")
    image = read_image(series)
    center = image.index_to_world([300, 250, 1])
    out = tmp_path / "mask.nii.gz"
    result = run_cli(
        "estimate", "--image", str(series), f"--center-mm={center[0]:.2f},{center[1]:.2f},{center[2]:.2f}",
        "--diameter-mm", "20", "--method", "threshold", "--out", str(out), "--seg", str(tmp_path / "seg.dcm"),
        "--circus", str(tmp_path / "circus"), "--report", str(tmp_path / "lesion.json"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    mask = read_image(out)
    assert mask.same_grid(image, tolerance_mm=1e-4)
    assert mask.array.max() == 1
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert seg.SegmentSequence[0].SegmentLabel == "lesion 1"
    referenced = {ref.SeriesInstanceUID for ref in seg.ReferencedSeriesSequence}
    assert referenced == {image.metadata["series_instance_uid"]}
    assert len(list((tmp_path / "circus").glob("lesion-*.json"))) == 1
    report = json.loads((tmp_path / "lesion.json").read_text())
    assert report["method"] == "threshold" and report["measurements"]["voxels"] == int(mask.array.sum())


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dicom3tools is installed by scripts/install-system-deps.sh"
)
def test_seg_passes_dciodvfy(sample, tmp_path: Path) -> None:
    series = sample("ct-3slice-dicom")
    image = read_image(series)
    center = image.index_to_world([256, 256, 1])
    seg_path = tmp_path / "seg.dcm"
    result = run_cli(
        "estimate", "--image", str(series), "--center-mm", f"{center[0]},{center[1]},{center[2]}",
        "--diameter-mm", "15", "--method", "sphere", "--out", str(tmp_path / "m.nrrd"), "--seg", str(seg_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    check = subprocess.run(["dciodvfy", str(seg_path)], capture_output=True, text=True)
    errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], "\n".join(errors)


def test_seg_of_an_anonymised_series_without_uids_is_refused(sample, tmp_path: Path) -> None:
    """The TotalSegmentator series has blank Study/Series UIDs: a SEG could not reference it."""
    series = sample("ct-dicom-series")
    center = read_image(series).index_to_world([256, 256, 9])
    seg = tmp_path / "seg.dcm"
    result = run_cli(
        "estimate", "--image", str(series), "--center-mm", f"{center[0]},{center[1]},{center[2]}",
        "--diameter-mm", "15", "--method", "sphere", "--out", str(tmp_path / "m.nii.gz"), "--seg", str(seg),
    )  # fmt: skip
    assert result.returncode == 2
    assert "StudyInstanceUID" in result.stderr and not seg.exists()
    assert not (tmp_path / "m.nii.gz").exists()  # refused before anything is written


def test_negative_coordinates_in_both_forms(tmp_path: Path) -> None:
    image = Volume(np.zeros((20, 40, 40), np.int16), (1.0, 1.0, 2.0), (-120.0, -30.0, 0.0))
    path = write_image(image, tmp_path / "img.nii.gz")
    for i, form in enumerate((["--center-mm=-100.2,-2.1,28.6"], ["--center-mm", "-100.2,-2.1,28.6"])):
        out = tmp_path / f"m{i}.nii.gz"
        result = run_cli(
            "estimate",
            "--image",
            str(path),
            *form,
            "--diameter-mm",
            "6",
            "--method",
            "sphere",
            "--out",
            str(out),
        )
        assert result.returncode == 0, result.stderr
        mask = read_image(out)
        k, j, i_ = np.nonzero(mask.array)
        centre = image.index_to_world(np.stack([i_, j, k], 1).astype(float).mean(0))
        np.testing.assert_allclose(centre, [-100.2, -2.1, 28.6], atol=0.6)


@pytest.mark.parametrize(
    ("arguments", "needle"),
    [
        (["--center-mm", "0,0,400", "--diameter-mm", "6"], "center_mm"),
        (["--center-mm", "0,0,10", "--diameter-mm", "0"], "--diameter-mm"),
        (["--center-mm", "0,0,10", "--diameter-mm", "5000"], "diameter_mm"),
        (["--center-mm", "0,nan,10", "--diameter-mm", "6"], "--center-mm"),
        (["--center-voxel", "1,2", "--diameter-mm", "6"], "--center-voxel"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path: Path, arguments: list[str], needle: str) -> None:
    image = Volume(np.zeros((20, 40, 40), np.int16), (1.0, 1.0, 2.0), (-20.0, -20.0, 0.0))
    path = write_image(image, tmp_path / "img.nii.gz")
    out = tmp_path / "out.nii.gz"
    result = run_cli("estimate", "--image", str(path), *arguments, "--method", "sphere", "--out", str(out))
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
    unreadable = tmp_path / "broken.nii.gz"
    unreadable.write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    result = run_cli(
        "estimate",
        "--image",
        str(unreadable),
        "--center-mm",
        "0,0,0",
        "--diameter-mm",
        "5",
        "--out",
        str(out),
    )
    assert result.returncode == 2 and result.stderr.startswith("wlcad: error: image:")


def test_batch_is_resumable_and_records_bad_rows(liver: Path, tmp_path: Path) -> None:
    rows = list(csv.DictReader(liver.open()))
    bad = dict(rows[0], lesion_id="99", center_x_mm="9999")  # centre far outside the image
    manifest = tmp_path / "weak.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        for row in [*rows, bad]:
            writer.writerow(
                {
                    **row,
                    "image": str((liver.parent / row["image"]).resolve()),
                    "mask": str((liver.parent / row["mask"]).resolve()),
                }
            )
    out = tmp_path / "out"
    first = run_cli("estimate", "--manifest", str(manifest), "--method", "threshold", "--out", str(out))
    assert first.returncode == 0, first.stderr
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert len(summary) == len(rows) + 1
    assert [r["status"] for r in summary].count("ok") == len(rows)
    failed = [r for r in summary if r["status"] == "error"]
    assert len(failed) == 1 and "center_mm" in failed[0]["error"]
    scores = [float(r["dice"]) for r in summary if r["status"] == "ok"]
    assert all(0 <= d <= 1 for d in scores) and np.mean(scores) > 0.5
    again = run_cli("estimate", "--manifest", str(manifest), "--method", "threshold", "--out", str(out))
    assert again.returncode == 0
    statuses = [r["status"] for r in csv.DictReader((out / "summary.csv").open())]
    assert statuses.count("skipped") == len(rows)
    assert not list(out.rglob(".*"))  # no temporary files left behind


def test_dose_cli_writes_one_label_per_treated_target(brain: Path, tmp_path: Path) -> None:
    row = next(r for r in csv.DictReader(brain.open()) if r["treated"] == "true")
    result = run_cli(
        "estimate", "--dose", str(brain.parent / row["rtdose"]), "--image", str(brain.parent / row["image"]),
        "--isodose", "50%", "--out", str(tmp_path / "dose"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    targets = json.loads((tmp_path / "dose" / "dose-targets.json").read_text())["targets"]
    labels = read_image(tmp_path / "dose" / "dose-labels.nii.gz")
    assert labels.array.max() == len(targets) >= 1
    not_dose = tmp_path / "ct.dcm"
    shutil.copy(sorted(p for p in (brain.parent / "images").iterdir())[0], tmp_path / "img.nii.gz")
    pydicom.dcmread(
        Path(__file__).parent.parent
        / ".cache"
        / "samples"
        / "dcmqi"
        / "segmentations"
        / "ct-3slice"
        / "01.dcm"
    ).save_as(not_dose)
    bad = run_cli(
        "estimate",
        "--dose",
        str(not_dose),
        "--image",
        str(tmp_path / "img.nii.gz"),
        "--out",
        str(tmp_path / "d2"),
    )
    assert bad.returncode == 2 and "not RTDOSE" in bad.stderr
