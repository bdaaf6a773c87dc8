"""The demo's overlays and its honesty about real samples: readable PNGs (size, window, contours on the
mask's boundary, lesion ids drawn) and no lesion claimed where none is known. No timing assertions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from services.cli import demo_cmd
from services.core.overlay import (
    BRAIN,
    ESTIMATE,
    LUNG,
    PERCENTILE,
    REFERENCE,
    SOFT_TISSUE,
    Finding,
    Outline,
    apply_window,
    display_flips,
    render_overlay,
    window_for,
)
from services.core.volume import Volume

NO_LESION_SAMPLES = {"ct-dicom-series", "brain-mr-dicom-series", "brain-t1-nifti"}


@pytest.fixture(scope="module")
def plan(sample) -> dict[str, demo_cmd.RealCase]:
    for name in ("ct-dicom-series", "brain-mr-dicom-series", "chest-xray", "brain-t1-nifti"):
        sample(name)  # a missing sample fails with the command that fetches it
    return {case.name: case for case in demo_cmd.real_sample_plan()}


def _lesion_volume(direction=None) -> tuple[Volume, np.ndarray, tuple[float, float, float]]:
    """A small uniform slice with an irregular lesion (a disc joined to a square), anisotropic pixels."""
    array = np.zeros((1, 48, 40), dtype=np.int16)
    volume = Volume(array, (0.8, 1.2, 5.0), direction=np.eye(3) if direction is None else direction)
    rows, cols = np.mgrid[:48, :40]
    mask = ((rows - 20) ** 2 + (cols - 18) ** 2 <= 36) | (
        (rows >= 22) & (rows < 30) & (cols >= 20) & (cols < 27)
    )
    centre = tuple(float(v) for v in volume.index_to_world([19.0, 22.0, 0.0]))
    return volume, mask[None], centre


def _coloured(picture: np.ndarray, colour) -> np.ndarray:
    return np.all(picture == np.asarray(colour, dtype=np.uint8), axis=-1)


def test_overlay_is_at_least_512_px_and_keeps_the_physical_aspect(tmp_path: Path) -> None:
    volume, mask, centre = _lesion_volume()
    rendered = render_overlay(
        volume,
        [Finding(1, centre, 12.0, [Outline(mask, ESTIMATE, "estimate")])],
        tmp_path / "o.png",
        title="t",
    )
    assert max(rendered.size) >= 512
    assert Image.open(rendered.path).size == rendered.size
    full = next(p for p in rendered.panels if p.kind == "full")
    x0, y0, x1, y1 = full.box
    assert max(x1 - x0, y1 - y0) >= 512
    # 40 × 0.8 mm wide, 48 × 1.2 mm tall: the panel has the same shape in millimetres.
    assert (x1 - x0) / (y1 - y0) == pytest.approx((40 * 0.8) / (48 * 1.2), abs=0.01)


def test_windows_fit_the_modality() -> None:
    grey = apply_window(np.array([-600.0, -1350.0, 150.0, -2000.0]), LUNG)
    assert abs(int(grey[0]) - 127.5) <= 1  # the lung window's level is mid-grey
    assert grey[1] == 0 and grey[2] == 255 and grey[3] == 0
    assert abs(int(apply_window(np.array([40.0]), SOFT_TISSUE)[0]) - 127.5) <= 1
    assert window_for("CT", "CHEST") is LUNG
    assert window_for("CT", "HEAD") is BRAIN
    assert window_for("CT", "ABDOMEN") is SOFT_TISSUE
    assert window_for("MR", "ABDOMEN") is PERCENTILE
    assert window_for("CR", "CHEST") is PERCENTILE


@pytest.mark.parametrize("flipped", [False, True])
def test_outline_pixels_lie_on_the_mask_boundary(tmp_path: Path, flipped: bool) -> None:
    """Every contour pixel, in the full slice and in the zoom, shows a boundary voxel of the mask:
    a contour, not a fill, and not drawn beside the mask; a reference lies on the ring just outside.
    Flipped storage (a RAS NIfTI) included."""
    direction = np.diag([-1.0, -1.0, 1.0]) if flipped else None
    volume, mask, centre = _lesion_volume(direction)
    assert display_flips(volume) == (flipped, flipped)
    outlines = [Outline(mask, ESTIMATE, "estimate"), Outline(mask, REFERENCE, "reference", outside=True)]
    rendered = render_overlay(volume, [Finding(1, centre, 12.0, outlines)], tmp_path / "o.png", title="t")
    picture = np.asarray(Image.open(rendered.path).convert("RGB"))
    boundary = mask[0] & ~ndimage.binary_erosion(mask[0], structure=np.ones((3, 3)))
    ring = ndimage.binary_dilation(mask[0], structure=np.ones((3, 3))) & ~mask[0]
    shown = set()
    for panel in rendered.panels:
        x0, y0, x1, y1 = panel.box
        ys, xs = np.nonzero(_coloured(picture[y0:y1, x0:x1], ESTIMATE))
        assert len(xs) > 50, panel.kind
        for x, y in zip(xs + x0, ys + y0, strict=True):
            row, col = panel.source_index(int(x), int(y))
            assert boundary[row, col], (panel.kind, row, col)
            shown.add((row, col))
        # The same region as a reference: drawn on the pixels just outside it, never over the estimate.
        ys, xs = np.nonzero(_coloured(picture[y0:y1, x0:x1], REFERENCE))
        assert len(xs) > 50, panel.kind
        assert all(ring[panel.source_index(int(x), int(y))] for x, y in zip(xs + x0, ys + y0, strict=True))
    assert shown == set(map(tuple, np.argwhere(boundary)))  # and the whole boundary is drawn


def test_lesion_id_is_drawn_at_its_label_position(tmp_path: Path) -> None:
    volume, mask, centre = _lesion_volume()
    rendered = render_overlay(
        volume,
        [Finding(7, centre, 12.0, [Outline(mask, ESTIMATE, "estimate")])],
        tmp_path / "o.png",
        title="t",
    )
    picture = np.asarray(Image.open(rendered.path).convert("RGB")).astype(int)
    boxes = [box for lesion_id, box in rendered.label_boxes if lesion_id == 7]
    assert len(boxes) == 2  # on the full slice and on the zoom
    for x0, y0, x1, y1 in boxes:
        region = picture[y0:y1, x0:x1]
        yellow = (region[..., 0] > 150) & (region[..., 1] > 130) & (region[..., 2] < 90)
        assert yellow.sum() >= 10  # the digit's strokes, not just its black box


def test_a_real_sample_without_a_known_lesion_is_never_prompted(plan) -> None:
    for name in NO_LESION_SAMPLES:
        case = plan[name]
        assert case.status == demo_cmd.NO_KNOWN_LESION
        assert case.prompts == () and case.reference is None
    # The radiograph is abnormal: never a "no lesion" background, prompted only at reader marks.
    chest = plan["chest-xray"]
    assert chest.status in (demo_cmd.READER_MARKED, demo_cmd.ABNORMAL_NOT_LOCALISED)
    assert chest.reference is None
    if chest.status == demo_cmd.ABNORMAL_NOT_LOCALISED:
        assert chest.prompts == ()


def test_reader_marks_are_recorded_as_approximate_and_inside_the_radiograph(plan) -> None:
    marks = json.loads(demo_cmd.READER_MARKS.read_text())
    assert "approximate" in marks["provenance"] and "reader-marked by the wlcad team" in marks["provenance"]
    chest = plan["chest-xray"]
    assert chest.status == demo_cmd.READER_MARKED
    assert len(chest.prompts) == len(marks["lesions"]) >= 1
    for prompt in chest.prompts:
        assert chest.image.contains_world(prompt.center_mm)


def test_the_liver_lesion_comes_from_the_dicom_overlay(plan) -> None:
    """The centre derived from the overlay lies inside the overlay's outline; annotation graphics
    (the 'Tra' text, a box at the edge) are not taken for lesions."""
    case = plan["liver-mr-overlay"]
    assert case.status == demo_cmd.REFERENCE_OUTLINE
    assert len(case.prompts) == 1 and set(np.unique(case.reference)) == {0, 1}
    prompt = case.prompts[0]
    col, row, k = np.rint(case.image.world_to_index(prompt.center_mm)).astype(int)
    assert k == 0 and case.reference[0, row, col] == 1
    filled = case.reference[0] == 1
    assert 20.0 < prompt.diameter_mm < 35.0  # a ~25 mm lesion at 0.72 mm pixels
    assert filled.sum() > 3 * (filled & ~ndimage.binary_erosion(filled)).sum()


class _FakeClient:
    """Answers like the service: the grid it read, and a mask for each prompt it was given."""

    def __init__(self) -> None:
        self.requests: list[tuple[Path, list, str]] = []

    def estimate_file(self, path, prompts, method, timeout: float = 120.0):
        from services.api.convert import volume_to_proto
        from services.api.pb import label_estimation_pb2 as pb
        from services.core.io import read_image

        self.requests.append((Path(path), list(prompts), method))
        return pb.EstimateResponse(grid=volume_to_proto(read_image(path), with_data=False))


def test_the_demo_checks_transport_but_outlines_nothing_on_a_normal_brain(tmp_path: Path, sample) -> None:
    sample("brain-t1-nifti")
    (case,) = demo_cmd.real_sample_plan(["brain-t1-nifti"])
    client = _FakeClient()
    args = argparse.Namespace(http="http://127.0.0.1:1")
    entry = demo_cmd._real_case(client, args, None, case, ["sphere", "threshold"], tmp_path)
    assert len(client.requests) == 1  # one transport probe, not one lesion request per method
    assert entry["status"] == demo_cmd.NO_KNOWN_LESION and entry["transport_check"]["same_as_local_read"]
    assert "lesions" not in entry and "dice_vs_overlay" not in entry
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {"brain-t1-nifti/overview.png"}  # no mask, no SEG, no report
    picture = np.asarray(Image.open(tmp_path / "brain-t1-nifti" / "overview.png").convert("RGB"))
    assert not _coloured(picture, ESTIMATE).any() and not _coloured(picture, REFERENCE).any()


def test_the_main_job_runs_end_to_end_against_real_servers(plan, tmp_path: Path) -> None:
    """``make run``'s demo against a real service and gateway (the same ``wlcad serve`` processes):
    every phantom task gets a Dice per method and the summary is written. Guards the main job as a
    whole; it once failed only at its end (a local name shadowing the Dice function)."""
    import subprocess
    import sys

    from tests.serving_support import REPO_ROOT, start_stack

    stack = start_stack(tmp_path / "logs")
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "services.cli.main",
                "demo",
                "--out",
                str(tmp_path / "out"),
                "--address",
                stack.grpc_address,
                "--http",
                stack.http_url,
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        stack.stop()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for task in ("chest-ct-nodule", "brain-mr-metastasis", "cxr-mass"):
        scores = {key: value for key, value in summary["dice"].items() if key.startswith(f"{task}/")}
        assert f"{task}/sphere" in scores and all(0.0 < value <= 1.0 for value in scores.values()), summary[
            "dice"
        ]
    assert "brain-mr-metastasis/dose 50%" in summary["dice"]
