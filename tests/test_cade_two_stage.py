"""The two-stage CT detector: lung blob proposals, candidate VOIs, the classifier stage and how the
model repository binds it (services/cade/proposals.py, reranking.py, model.py)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from services.cade.model import CLASSIFIER_SUFFIX, CadeModel
from services.cade.pipeline import Detector
from services.cade.proposals import ProposalSpec, blob_proposals, lung_mask
from services.cade.reranking import Reranker, RerankSpec, merged_proposals, voi_batch
from services.cade.tasks import CHEST_CT_NODULE, CXR_MASS, TaskNotAvailableError
from services.core.errors import InputError
from services.core.grid import Grid
from services.inference.export import register_onnx_model
from services.inference.factory import default_repository
from training.cade.fpr import classifier_network
from training.onnx_export import export_onnx

SPEC = ProposalSpec(max_count=50)


def chest(spheres_zyx_r: list[tuple[tuple[int, int, int], float, float]], shape=(48, 64, 96)) -> np.ndarray:
    """A working-frame chest: air around a body (0.55), two lungs (0.1) that reach both z ends of the
    volume, and spheres ``(centre, radius voxels, intensity)``."""
    z, y, x = np.indices(shape)
    image = np.zeros(shape, np.float32)
    image[:, 6:-6, 6:-6] = 0.55
    image[:, 14:-14, 14:44] = 0.1
    image[:, 14:-14, 52:-14] = 0.1
    for centre, radius, value in spheres_zyx_r:
        inside = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius**2
        image[inside] = value
    return image


def test_the_lungs_are_the_enclosed_air_not_the_air_around_the_patient():
    image = chest([])
    lungs = lung_mask(image, dataclasses.replace(SPEC, lung_margin_voxels=0))
    assert lungs[24, 32, 30] and lungs[24, 32, 70]  # both lungs
    assert not lungs[24, 2, 2] and not lungs[24, 32, 48]  # outside air, mediastinum
    np.testing.assert_array_equal(lungs, image == np.float32(0.1))


def test_blobs_in_the_lungs_are_proposed_at_their_centre_and_size_and_blobs_elsewhere_are_not():
    nodule, body_blob = ((24, 30, 28), 3.5, 0.5), ((24, 10, 48), 3.5, 0.95)
    image = chest([nodule, body_blob])
    proposals = blob_proposals(image, SPEC)
    best = proposals[0]
    assert np.abs(np.subtract(best.index_zyx, nodule[0])).max() <= 1
    assert 0.6 * 2 * nodule[1] <= best.diameter_voxels() <= 1.6 * 2 * nodule[1]
    assert all(np.abs(np.subtract(p.index_zyx, body_blob[0])).max() > 3 for p in proposals)
    assert [p.response for p in proposals] == sorted((p.response for p in proposals), reverse=True)


def test_an_image_without_lungs_gives_no_proposals_and_a_2d_one_is_refused():
    assert blob_proposals(np.full((20, 30, 30), 0.5, np.float32), SPEC) == []
    with pytest.raises(InputError) as err:
        blob_proposals(np.zeros((30, 30), np.float32), SPEC)
    assert err.value.field == "image"


def test_voi_cubes_are_centred_and_zero_outside_the_image():
    a = np.arange(10 * 12 * 14, dtype=np.float32).reshape(10, 12, 14)
    cubes = voi_batch((a, -a), np.array([[5, 6, 7], [0, 0, 0]]), 4)
    assert cubes.shape == (2, 2, 4, 4, 4)
    np.testing.assert_array_equal(cubes[0, 0], a[3:7, 4:8, 5:9])
    np.testing.assert_array_equal(cubes[0, 1], -a[3:7, 4:8, 5:9])
    assert np.all(cubes[1, 0, :2] == 0) and cubes[1, 0, 2, 2, 2] == a[0, 0, 0]


def working_volume(array: np.ndarray):
    return Grid(array.shape, (1.5, 1.5, 1.5), (0.0, 0.0, 0.0), np.eye(3)).with_array(array)


def centre_brightness(batch: np.ndarray) -> np.ndarray:
    """A classifier that calls a cube a nodule by its centre's intensity (brighter than the body's
    0.55), for the ordering tests."""
    s = batch.shape[-1] // 2
    return (20.0 * (batch[:, 0, s, s, s] - 0.7))[:, None]


def test_the_classifier_decides_the_order_and_suppression_keeps_the_stronger():
    image = chest([((24, 30, 28), 3.5, 0.9), ((24, 30, 70), 2.5, 0.75), ((24, 33, 31), 1.5, 0.8)])
    working = working_volume(image)
    probability = working.with_array(np.zeros_like(image))  # the U-Net sees nothing
    rerank = RerankSpec(proposals=SPEC, voi_voxels=16, max_batch=7)
    reranker = Reranker(rerank, centre_brightness, "test/1")
    found = reranker.candidates(
        working, probability, working.grid, floor=0.5, nms_radius_mm=10.0, max_count=10
    )
    assert len(found) >= 2
    first = np.asarray(working.grid.world_to_index(found[0].center_mm))[::-1]
    assert np.abs(first - (24, 30, 28)).max() <= 1
    assert [c.confidence for c in found] == sorted((c.confidence for c in found), reverse=True)
    mm = np.array([c.center_mm for c in found])
    assert min(np.linalg.norm(a - b) for i, a in enumerate(mm) for b in mm[i + 1 :]) >= 10.0
    assert all(c.confidence >= 0.5 for c in found)


def test_the_u_net_candidates_are_proposed_before_blobs_and_blobs_on_them_are_merged():
    image = chest([((24, 30, 28), 3.5, 0.5)])
    working = working_volume(image)
    z, y, x = np.indices(image.shape)
    prob = np.exp(-((z - 24) ** 2 + (y - 30) ** 2 + (x - 28) ** 2) / 8.0).astype(np.float32) * 0.8
    proposals = merged_proposals(working, working.with_array(prob), RerankSpec(proposals=SPEC))
    assert proposals[0].first_stage == pytest.approx(0.8, abs=0.01)
    assert np.abs(np.subtract(proposals[0].center_zyx, (24, 30, 28))).max() < 0.5
    assert all(p.first_stage == 0.0 for p in proposals[1:])
    assert all(np.linalg.norm(np.subtract(p.center_zyx, (24, 30, 28))) * 1.5 >= 4.0 for p in proposals[1:])


def test_a_task_without_a_second_stage_takes_no_classifier():
    reranker = Reranker(RerankSpec(), centre_brightness, "x/1")
    with pytest.raises(InputError) as err:
        Detector(CXR_MASS.spec, centre_brightness, "cade_cxr-mass/1", reranker)
    assert err.value.field == "model"
    with pytest.raises(InputError):
        RerankSpec(voi_voxels=15)


# ----------------------------------------------------------------------------- the repository
SHIPPED = default_repository()
CLASSIFIER = CHEST_CT_NODULE.model_name + CLASSIFIER_SUFFIX
POINTS = {"1": 0.71, "2": 0.52, "4": 0.33, "8": 0.12}


@pytest.fixture(scope="module")
def two_stage_repository(tmp_path_factory) -> Path:
    """The shipped chest CT U-Net beside a classifier registered the way training/cade/fpr.py does (an
    untrained network of the trained one's shape: these tests are about binding, not accuracy)."""
    repo = tmp_path_factory.mktemp("two-stage") / "repo"
    shutil.copytree(SHIPPED / CHEST_CT_NODULE.model_name, repo / CHEST_CT_NODULE.model_name)
    unet_version = max(int(p.name) for p in (repo / CHEST_CT_NODULE.model_name).iterdir() if p.name.isdigit())
    voi = CHEST_CT_NODULE.spec.rerank.voi_voxels
    torch.manual_seed(0)
    register_onnx_model(
        repo,
        CLASSIFIER,
        export_onnx(classifier_network(voi).eval(), (voi,) * 3, channels=2),
        command="test",
        data_manifest="none",
        seed=0,
        metrics={},
        git_commit="abcdef0",
        max_batch_size=16,
        extra={
            "operating_points": POINTS,
            "first_stage_model": f"{CHEST_CT_NODULE.model_name}/{unet_version}",
        },
    )
    return repo


def test_the_two_stage_detector_runs_both_stages_and_uses_the_classifiers_operating_points(
    two_stage_repository: Path,
):
    with CadeModel(CHEST_CT_NODULE, "embedded", two_stage_repository) as model:
        assert model.classifier is not None
        assert model.version == f"{model.unet_version}+{model.classifier.version}"
        assert model.default_threshold() == pytest.approx(POINTS["4"])
        assert model.detector().two_stage


def test_a_classifier_trained_behind_another_u_net_is_refused(two_stage_repository: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    shutil.copytree(two_stage_repository, repo)
    card_path = repo / CLASSIFIER / "model_card.json"
    card = json.loads(card_path.read_text())
    for entry in card["versions"].values():
        entry["extra"]["first_stage_model"] = f"{CHEST_CT_NODULE.model_name}/99"
    card_path.write_text(json.dumps(card))
    with pytest.raises(TaskNotAvailableError) as err:
        CadeModel(CHEST_CT_NODULE, "embedded", repo)
    assert "/99" in err.value.message and "retrain" in err.value.message


def test_without_its_classifier_the_task_runs_the_u_net_alone(two_stage_repository: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    shutil.copytree(two_stage_repository / CHEST_CT_NODULE.model_name, repo / CHEST_CT_NODULE.model_name)
    with CadeModel(CHEST_CT_NODULE, "embedded", repo) as model:
        assert model.classifier is None and "+" not in model.version
        assert not model.detector().two_stage


@pytest.mark.skipif(not (SHIPPED / CLASSIFIER).is_dir(), reason="no chest CT classifier is shipped")
def test_a_shipped_classifier_is_bound_to_the_shipped_u_net():
    with CadeModel(CHEST_CT_NODULE, "embedded", SHIPPED) as model:
        card = json.loads((SHIPPED / CLASSIFIER / "model_card.json").read_text())
        entry = card["versions"][str(model.classifier.number)]
        assert entry["extra"]["first_stage_model"] == model.unet_version
        assert model.default_threshold() == pytest.approx(entry["extra"]["operating_points"]["4"])


# ----------------------------------------------------------------------------- reader feedback
def _manifest_with_feedback_columns(rows: list[dict], path: Path) -> Path:
    """A manifest as ``wlcad feedback ingest`` grows it: the core columns, then its own."""
    import csv

    from services.core.manifest import COLUMNS

    with path.open("w", newline="") as out:
        writer = csv.DictWriter(
            out, fieldnames=[*COLUMNS, "label_source", "hard_negative"], lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_reader_feedback_becomes_positive_and_hard_negative_cubes(tmp_path):
    """training/cade/fpr.py --feedback-manifest: a manifest grown by ``wlcad feedback ingest`` gives a
    positive cube at its lesion and a hard negative at the candidate the reader rejected, through the
    served first stage; the cache is keyed by the manifest's bytes."""
    from services.core.io import write_image
    from training.cade.evaluate import onnx_detector
    from training.cade.fpr import SHIFT_VOXELS, VoiSet, feedback_vois
    from training.cade.samples import manifest_cases
    from training.cade.tasks import get_task

    task = get_task(CHEST_CT_NODULE.name)
    image = Grid((48, 64, 96), (1.5, 1.5, 1.5)).with_array(
        (chest([((24, 30, 30), 4.0, 0.6)]) * 1400.0 - 1000.0).astype(np.int16), modality="CT"
    )
    write_image(image, tmp_path / "case.nii.gz")
    lesion_mm = [float(v) for v in image.index_to_world([30, 30, 24])]
    rejected_mm = [float(v) for v in image.index_to_world([70, 40, 20])]
    common = {
        "case_id": "c1",
        "image": "case.nii.gz",
        "abnormal": "true",
        "hard_negative": "",
        "label_source": "",
    }
    manifest = _manifest_with_feedback_columns(
        [
            {**common, "lesion_id": 1, "center_x_mm": lesion_mm[0], "center_y_mm": lesion_mm[1],
             "center_z_mm": lesion_mm[2], "diameter_mm": 12.0, "lesion_type": "solid"},
            {**common, "center_x_mm": rejected_mm[0], "center_y_mm": rejected_mm[1], "center_z_mm": rejected_mm[2],
             "diameter_mm": 6.0, "lesion_type": "normal", "hard_negative": "true", "label_source": "reader-fp"},
        ],
        tmp_path / "grown.csv",
    )  # fmt: skip
    (case,) = manifest_cases(manifest)
    unet = SHIPPED / CHEST_CT_NODULE.model_name / "1" / "model.onnx"
    spec = CHEST_CT_NODULE.spec.rerank
    voiset = feedback_vois(onnx_detector(task, unet, 1), spec, case)
    size = spec.voi_voxels + 2 * SHIFT_VOXELS
    assert voiset.vois.shape == (2, 2, size, size, size)
    assert voiset.labels.tolist() == [1, 0] and voiset.hard.tolist() == [False, True]
    assert voiset.diameters_mm.tolist() == [12.0, 0.0]
    centre = voiset.vois[0, 0, size // 2, size // 2, size // 2]
    assert float(centre) == pytest.approx(0.6, abs=0.05)  # the nodule's working intensity at its centre
    voiset.save(tmp_path / "cache.npz", "key-a")
    again = VoiSet.load(tmp_path / "cache.npz", "key-a")
    assert again is not None and again.hard.tolist() == [False, True]
    assert VoiSet.load(tmp_path / "cache.npz", "key-b") is None  # another manifest: extracted again
