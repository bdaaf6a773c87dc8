"""``wlcad detect``: the real CLI on a real ONNX heatmap model served from a Triton-layout repository.

No trained CADe model ships yet, so each test registers a tiny real ONNX "detector" built here with
``onnx.helper``: one fixed mean-filter convolution and an affine step, ``logit = a · (mean − b)``,
which scores bright blobs on the task's normalised intensities. Synthetic images carry blobs at known
mm positions and of known brightness (so of known confidence); every bad input must exit 2 with one
line naming the field and leave no file behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.cade.model import CadeModel, parse_operating_points
from services.cade.tasks import TASKS, TaskNotAvailableError, task_named
from services.cli.main import main as wlcad
from services.core.errors import InputError
from services.core.grid import Grid
from services.core.io import write_image
from services.core.volume import Volume
from services.inference.export import register_onnx_model
from tests.conftest import run_cli

CARD = {"command": "test", "data_manifest": "synthetic", "seed": 0, "git_commit": "0" * 40}
SLOPE, OFFSET = 10.0, 0.45  # logit = SLOPE · (local mean of the normalised image − OFFSET)
CANDIDATE_KEYS = {"center_mm", "center_voxel", "diameter_mm", "confidence"}


def blob_scorer_onnx(dims: int, size: int | None) -> bytes:
    """``image[N,1,*s]`` → ``logits[N,1,*s]``: a 3-wide mean filter (zero padded) and an affine step."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    spatial = [size] * dims if size else ["d", "h", "w"][-dims:]
    weight = np.full((1, 1, *([3] * dims)), SLOPE / 3**dims, dtype=np.float32)
    bias = np.array([-SLOPE * OFFSET], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["logits"], pads=[1] * (2 * dims))],
        f"blob_scorer_{dims}d",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, *spatial])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, *spatial])],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="wlcad-test")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def add_operating_points(repository: Path, model: str, points: dict[str, float]) -> None:
    """What ``wlcad evaluate cade`` records: FP/case → threshold in the served version's card entry."""
    path = repository / model / "model_card.json"
    card = json.loads(path.read_text())
    card["versions"]["1"]["operating_points"] = points
    path.write_text(json.dumps(card))


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    """cade_chest-ct-nodule: a fixed 32³ model (its config sets the tile); cade_cxr-mass: any size."""
    root = tmp_path_factory.mktemp("models")
    register_onnx_model(
        root, "cade_chest-ct-nodule", blob_scorer_onnx(3, 32), metrics={}, max_batch_size=4, **CARD
    )
    register_onnx_model(
        root, "cade_cxr-mass", blob_scorer_onnx(2, None), metrics={}, max_batch_size=2, **CARD
    )
    add_operating_points(root, "cade_chest-ct-nodule", {"1": 0.99, "4": 0.7})
    return root


# ------------------------------------------------------------------------------------------ images
CT_GRID = Grid((40, 96, 110), (0.8, 0.75, 2.0), (-60.0, -20.0, 40.0), np.eye(3))
#: (continuous voxel index x, y, z; diameter mm; HU): a solid nodule and a fainter one.
CT_SPHERES = [((30.3, 40.6, 12.4), 14.0, 30.0), ((80.2, 60.3, 26.7), 12.0, -300.0)]


def synthetic_ct(spheres=CT_SPHERES, grid: Grid = CT_GRID, dtype=np.int16) -> Volume:
    rng = np.random.default_rng(0)
    hu = rng.normal(-800.0, 20.0, grid.shape)
    world = grid.world_grid()
    for index, diameter, value in spheres:
        inside = np.linalg.norm(world - grid.index_to_world(index), axis=-1) <= diameter / 2
        hu[inside] = value + rng.normal(0.0, 20.0, int(inside.sum()))
    return grid.with_array(hu.astype(dtype), modality="CT")


RADIOGRAPH_SPACING = 0.2  # mm
#: (row, col, radius px, added brightness): a dense mass and a fainter one.
MASSES = [(380.4, 150.6, 45.0, 120.0), (200.2, 350.7, 35.0, 60.0)]


def synthetic_radiograph() -> Volume:
    rng = np.random.default_rng(1)
    rows, cols = np.mgrid[0:600, 0:500]
    pixels = rng.normal(100.0, 4.0, rows.shape)
    for row, col, radius, brightness in MASSES:
        pixels[(rows - row) ** 2 + (cols - col) ** 2 <= radius**2] += brightness
    spacing = (RADIOGRAPH_SPACING, RADIOGRAPH_SPACING, 1.0)
    return Volume(pixels[None].astype(np.float32), spacing, (-50.0, -60.0, 0.0))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    return {
        "ct": write_image(synthetic_ct(), folder / "ct.mha"),
        "cxr": write_image(synthetic_radiograph(), folder / "cxr.mha"),
    }


def detect(repository: Path, *args: str) -> int:
    return wlcad(["detect", "--model-repository", str(repository), *args])


def read_candidates(path: Path) -> dict:
    payload = json.loads(path.read_text())
    assert set(payload) == {"task", "model", "model_version", "candidates"}
    confidences = [c["confidence"] for c in payload["candidates"]]
    assert confidences == sorted(confidences, reverse=True)
    for cand in payload["candidates"]:
        assert set(cand) == CANDIDATE_KEYS
        assert len(cand["center_mm"]) == 3 and all(isinstance(v, float) for v in cand["center_mm"])
        assert len(cand["center_voxel"]) == 3 and all(isinstance(v, int) for v in cand["center_voxel"])
        assert isinstance(cand["diameter_mm"], float) and 0.0 <= cand["confidence"] <= 1.0
    return payload


def red_pixels(png: Path) -> int:
    """Pixels in the overlay's candidate-ring colour (services.core.overlay.ESTIMATE)."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int(np.count_nonzero((rgb[..., 0] == 255) & (rgb[..., 1] == 64) & (rgb[..., 2] == 64)))


# ------------------------------------------------------------------------------------------ chest CT
def test_ct_nodules_at_their_mm_positions_through_the_real_cli(repository, images, tmp_path):
    out, overlay = tmp_path / "candidates.json", tmp_path / "overlay.png"
    result = run_cli(
        "detect", "--task", "chest-ct-nodule", "--image", str(images["ct"]), "--out", str(out),
        "--threshold", "0.3", "--overlay", str(overlay), "--inference", "embedded",
        "--model-repository", str(repository),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    payload = read_candidates(out)
    assert payload["task"] == "chest-ct-nodule"
    assert payload["model"] == "cade_chest-ct-nodule"
    assert payload["model_version"] == "cade_chest-ct-nodule/1"
    assert len(payload["candidates"]) == 2
    for cand, (index, diameter, _) in zip(payload["candidates"], CT_SPHERES, strict=True):
        truth_mm = CT_GRID.index_to_world(index)
        assert np.linalg.norm(np.asarray(cand["center_mm"]) - truth_mm) < 1.0  # 1.5 mm working voxels
        assert cand["center_voxel"] == [int(v) for v in np.rint(index)]
        assert cand["diameter_mm"] == pytest.approx(diameter, rel=0.25)
    solid, faint = (c["confidence"] for c in payload["candidates"])
    assert solid > 0.9 and 0.4 < faint < 0.8  # 30 HU vs −300 HU through the blob scorer
    assert Image.open(overlay).format == "PNG" and red_pixels(overlay) > 50


def test_threshold_and_card_operating_points_set_the_cut_off(repository, images, tmp_path):
    out = tmp_path / "c.json"
    args = ["--task", "chest-ct-nodule", "--image", str(images["ct"]), "--out", str(out)]

    def count(*cutoff: str) -> int:
        assert detect(repository, *args, *cutoff) == 0
        return len(read_candidates(out)["candidates"])

    assert count("--threshold", "0.85") == 1  # only the solid nodule
    assert count("--threshold", "0.3") == 2
    assert count("--fp-rate", "1") == 0  # card: 1 FP/case → 0.99, above both
    assert count("--fp-rate", "4") == 1  # card: 4 FP/case → 0.7
    assert count() == 1  # default: the card's point at the task's default rate (4 FP/case), not 0.5
    assert count("--threshold", "0.999") == 0  # a valid, empty list


def test_lesion_free_ct_gives_a_valid_empty_list_and_an_overlay(repository, tmp_path):
    image = write_image(synthetic_ct(spheres=[]), tmp_path / "clean.mha")
    out, overlay = tmp_path / "c.json", tmp_path / "o.png"
    args = ["--task", "chest-ct-nodule", "--image", str(image), "--out", str(out), "--overlay", str(overlay)]
    assert detect(repository, *args) == 0
    assert read_candidates(out)["candidates"] == []
    assert overlay.is_file() and red_pixels(overlay) == 0


# ------------------------------------------------------------------------------------------ radiograph
def test_radiograph_masses_in_the_normalised_frame(repository, images, tmp_path):
    out, overlay = tmp_path / "cxr.json", tmp_path / "cxr.png"
    args = ["--task", "cxr-mass", "--image", str(images["cxr"]), "--out", str(out), "--overlay", str(overlay)]
    assert detect(repository, *args, "--threshold", "0.3") == 0
    payload = read_candidates(out)
    assert payload["model"] == "cade_cxr-mass" and payload["model_version"] == "cade_cxr-mass/1"
    assert len(payload["candidates"]) == 2
    origin = np.array([-50.0, -60.0])
    for cand, (row, col, radius, _) in zip(payload["candidates"], MASSES, strict=True):
        assert abs(cand["center_voxel"][0] - col) <= 1 and abs(cand["center_voxel"][1] - row) <= 1
        assert cand["center_voxel"][2] == 0
        expected_mm = origin + RADIOGRAPH_SPACING * np.array([col, row])
        assert np.abs(np.asarray(cand["center_mm"][:2]) - expected_mm).max() < 2 * RADIOGRAPH_SPACING
        assert cand["diameter_mm"] == pytest.approx(2 * radius * RADIOGRAPH_SPACING, rel=0.2)
    assert red_pixels(overlay) > 50
    between = sum(c["confidence"] for c in payload["candidates"]) / 2
    assert detect(repository, *args, "--threshold", str(between)) == 0
    assert len(read_candidates(out)["candidates"]) == 1


def test_radiograph_without_operating_points_refuses_an_fp_rate(repository, images, tmp_path, capsys):
    out = tmp_path / "c.json"
    args = ["--task", "cxr-mass", "--image", str(images["cxr"]), "--out", str(out), "--fp-rate", "1"]
    assert detect(repository, *args) == 2
    assert "fp_rate:" in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------------------------------ bad input
def _bad_images(folder: Path) -> dict[str, Path]:
    nan = synthetic_ct(dtype=np.float32)
    array = np.array(nan.array)
    array[10, 20, 30] = np.nan
    thin = Grid((4, 96, 110), (0.8, 0.75, 2.0), (-60.0, -20.0, 40.0), np.eye(3))  # 8 mm deep
    return {
        "nan": write_image(nan.with_array(array), folder / "nan.mha"),
        "thin": write_image(synthetic_ct(spheres=[], grid=thin), folder / "thin.mha"),
    }


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("radiograph to the CT detector", "image"),
        ("CT to the radiograph detector", "image"),
        ("non-finite voxels", "image"),
        ("too small to tile", "image"),
        ("unknown task", "task"),
        ("missing model", "model"),
        ("threshold and fp-rate", "threshold"),
        ("threshold out of range", "threshold"),
        ("fp-rate not on the card", "fp_rate"),
        ("missing image file", "image"),
        ("out not json", "out"),
    ],
)
def test_bad_input_exits_2_naming_the_field_and_writes_nothing(
    case, field, repository, images, tmp_path, capsys
):
    bad = _bad_images(tmp_path) if case in ("non-finite voxels", "too small to tile") else {}
    out, overlay = tmp_path / "out" / "c.json", tmp_path / "out" / "o.png"
    task, image, extra, repo = "chest-ct-nodule", images["ct"], [], repository
    if case == "radiograph to the CT detector":
        image = images["cxr"]
    elif case == "CT to the radiograph detector":
        task = "cxr-mass"
    elif case == "non-finite voxels":
        image = bad["nan"]
    elif case == "too small to tile":
        image = bad["thin"]
    elif case == "unknown task":
        task = "liver-lesion"
    elif case == "missing model":
        repo = tmp_path / "empty-repository"
        repo.mkdir()
    elif case == "threshold and fp-rate":
        extra = ["--threshold", "0.5", "--fp-rate", "1"]
    elif case == "threshold out of range":
        extra = ["--threshold", "1.5"]
    elif case == "fp-rate not on the card":
        extra = ["--fp-rate", "2"]
    elif case == "missing image file":
        image = tmp_path / "absent.mha"
    elif case == "out not json":
        out = tmp_path / "out" / "c.txt"
    capsys.readouterr()
    args = ["--task", task, "--image", str(image), "--out", str(out), "--overlay", str(overlay), *extra]
    assert detect(repo, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"wlcad: error: {field}:"), err
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


def test_bad_input_through_the_real_cli_is_one_line(repository, images, tmp_path):
    out = tmp_path / "c.json"
    result = run_cli(
        "detect", "--task", "chest-ct-nodule", "--image", str(images["cxr"]), "--out", str(out),
        "--model-repository", str(repository),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "wlcad: error: image: is a single slice (a 2D image) but chest-ct-nodule is a 3D detector"
    ]
    assert not out.exists()


# ------------------------------------------------------------------------------------------ API
def test_task_registry_and_model_binding(repository):
    assert set(TASKS) == {"chest-ct-nodule", "cxr-mass", "head-mra-aneurysm"}
    ct, cxr, mra = task_named("chest-ct-nodule"), task_named("cxr-mass"), task_named("head-mra-aneurysm")
    assert (ct.dims, ct.model_name, ct.match_rule) == (3, "cade_chest-ct-nodule", "luna16")
    assert (cxr.dims, cxr.model_name, cxr.match_rule) == (2, "cade_cxr-mass", "luna16")
    assert (mra.dims, mra.model_name, mra.match_rule) == (3, "cade_head-mra-aneurysm", "adam")
    with pytest.raises(InputError) as unknown:
        task_named("nope")
    assert unknown.value.field == "task"
    with CadeModel(ct, repository=repository) as model:
        assert model.spec.tiling.tile == (32, 32, 32)  # the fixed-size model's own tile
        assert model.spec.tiling.max_batch == 4
        assert model.operating_points == {1.0: 0.99, 4.0: 0.7}
        assert model.threshold_for(1.0) == 0.99 and model.default_threshold() == 0.7
    with CadeModel(cxr, repository=repository) as model:
        assert model.spec.tiling.tile == cxr.spec.tiling.tile  # any-size model: the task's tile
        assert model.spec.tiling.max_batch == 2 and model.default_threshold() == cxr.default_threshold


def test_a_model_of_the_wrong_dimensionality_is_not_the_task(tmp_path):
    register_onnx_model(tmp_path, "cade_cxr-mass", blob_scorer_onnx(3, None), metrics={}, **CARD)
    with pytest.raises(TaskNotAvailableError, match="2D task") as error:
        CadeModel(task_named("cxr-mass"), repository=tmp_path)
    assert error.value.field == "model"


def test_operating_points_read_both_card_forms():
    assert parse_operating_points({"2": 0.4, "1": 0.6}, "x") == {1.0: 0.6, 2.0: 0.4}
    listed = [{"max_fp_per_case": 1.0, "threshold": 0.6, "sensitivity": 0.7}]
    assert parse_operating_points(listed, "x") == {1.0: 0.6}
    for bad in ("0.5", {"one": 0.5}, {"0": 0.5}, [{"max_fp_per_case": 1.0}]):
        with pytest.raises(InputError) as error:
            parse_operating_points(bad, "card.operating_points")
        assert error.value.field == "card.operating_points"


# ------------------------------------------------------------------------------------------ batch
MANIFEST_HEADER = (
    "case_id,image,mask,lesion_id,center_x_mm,center_y_mm,center_z_mm,diameter_mm,lesion_type,abnormal"
)


def _manifest(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([MANIFEST_HEADER, *rows]) + "\n")
    return path


def test_batch_is_resumable_records_bad_cases_and_prints_the_froc(repository, images, tmp_path, capsys):
    clean = write_image(synthetic_ct(spheres=[]), tmp_path / "clean.mha")
    lesions = [
        "ct1,{image},,{n},{x},{y},{z},{d},solid,true".format(
            image=images["ct"], n=n, x=mm[0], y=mm[1], z=mm[2], d=diameter
        )
        for n, (index, diameter, _) in enumerate(CT_SPHERES, start=1)
        for mm in [CT_GRID.index_to_world(index)]
    ]
    good = [*lesions, f"ct2,{clean},,,,,,,,false"]
    out = tmp_path / "detections"
    with_bad = _manifest(tmp_path / "with-bad.csv", [*good, f"cxr,{images['cxr']},,,,,,,,false"])
    capsys.readouterr()
    assert (
        detect(
            repository,
            "--task",
            "chest-ct-nodule",
            "--manifest",
            str(with_bad),
            "--out",
            str(out),
            "--threshold",
            "0.3",
        )
        == 2
    )
    printed = capsys.readouterr().out
    assert (
        "2 detected, 0 already done, 1 failed" in printed
        and "failed cxr: image: is a single slice" in printed
    )
    assert sorted(p.name for p in out.iterdir()) == ["ct1.json", "ct2.json"]  # no partial or temporary file
    assert len(read_candidates(out / "ct1.json")["candidates"]) == 2
    assert read_candidates(out / "ct2.json")["candidates"] == []
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    manifest = _manifest(tmp_path / "good.csv", good)
    assert (
        detect(
            repository,
            "--task",
            "chest-ct-nodule",
            "--manifest",
            str(manifest),
            "--out",
            str(out),
            "--threshold",
            "0.3",
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "0 detected, 2 already done, 0 failed" in printed
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # resumed, not redone
    assert "2 cases" in printed and "2 lesions" in printed and "CPM 1.000" in printed
