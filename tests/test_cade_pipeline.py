"""The CADe pipeline core (services/cade): candidates from probability maps, tiled inference, and a
whole detector from a Volume back to the Volume's own mm and voxel coordinates."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from services.cade.candidates import DetectionCandidate, find_candidates
from services.cade.pipeline import Detector, DetectorSpec
from services.cade.preprocess import Intensity, WorkingFrame
from services.cade.tiling import TilingSpec, sliding_window
from services.core.errors import InputError
from services.core.grid import Grid
from services.core.volume import Volume
from services.core.work_budget import RequestCancelledError, WorkBudget, scope
from services.evaluation.matching import Candidate, Lesion, tabulate

DIRECTION = Rotation.from_euler("xyz", [12, -20, 33], degrees=True).as_matrix()
SPACING = (0.7, 0.9, 2.5)  # x, y, z mm: anisotropic, thick slices


def oblique_grid(shape_zyx=(30, 70, 80), spacing=SPACING) -> Grid:
    return Grid(shape_zyx, spacing, (-40.0, 25.0, 110.0), DIRECTION)


def blob_map(grid: Grid, blobs) -> np.ndarray:
    """Soft spheres: ``peak * sigmoid((r − dist) / 0.4 mm)`` for ``(center_mm, diameter_mm, peak)``;
    the region above half a peak is the sphere itself."""
    world = grid.world_grid()
    prob = np.zeros(grid.shape, dtype=np.float32)
    for center, diameter, peak in blobs:
        dist = np.linalg.norm(world - np.asarray(center), axis=-1)
        prob = np.maximum(prob, peak / (1.0 + np.exp(-(diameter / 2 - dist) / 0.4)))
    return prob


def inside_point(grid: Grid, index_xyz) -> np.ndarray:
    """A world point at a continuous (sub-voxel) index, so exact centres are not voxel centres."""
    return grid.index_to_world(np.asarray(index_xyz, dtype=float))


# ----------------------------------------------------------------------------------- candidates
def test_centres_and_diameters_on_an_anisotropic_oblique_grid():
    grid = oblique_grid()
    truth = [
        (inside_point(grid, (20.3, 30.6, 8.2)), 12.0, 0.9),
        (inside_point(grid, (55.7, 45.1, 15.4)), 16.0, 0.7),
        (inside_point(grid, (40.2, 15.5, 22.7)), 10.0, 0.5),
    ]
    found = find_candidates(blob_map(grid, truth), grid, floor=0.2, nms_radius_mm=8.0)
    assert len(found) == 3
    assert [c.confidence for c in found] == sorted((c.confidence for c in found), reverse=True)
    for cand, (center, diameter, peak) in zip(found, truth, strict=True):
        error_index = np.abs(grid.world_to_index(cand.center_mm) - grid.world_to_index(center))
        assert np.all(error_index < 0.5), error_index  # sub-voxel, per axis
        assert cand.diameter_mm == pytest.approx(diameter, rel=0.12)
        assert cand.confidence == pytest.approx(peak, abs=0.01)
        assert cand.center_voxel == tuple(int(v) for v in np.rint(grid.world_to_index(cand.center_mm)))


def test_suppression_in_mm_keeps_the_stronger():
    grid = oblique_grid(spacing=(1.0, 1.0, 1.0), shape_zyx=(40, 40, 40))
    strong = inside_point(grid, (15.0, 20.0, 20.0))
    weak = strong + DIRECTION @ np.array([7.0, 0.0, 0.0])  # 7 mm away along x
    prob = blob_map(grid, [(strong, 4.0, 0.6), (weak, 4.0, 0.9)])
    (only,) = find_candidates(prob, grid, floor=0.2, nms_radius_mm=10.0)
    assert only.confidence == pytest.approx(0.9, abs=0.01)
    assert np.linalg.norm(np.asarray(only.center_mm) - weak) < 0.5
    both = find_candidates(prob, grid, floor=0.2, nms_radius_mm=5.0)
    assert [round(c.confidence, 1) for c in both] == [0.9, 0.6]


def test_cap_keeps_the_strongest_in_order():
    grid = oblique_grid(spacing=(1.0, 1.0, 1.0), shape_zyx=(30, 30, 120))
    peaks = [0.3, 0.8, 0.5, 0.95, 0.6]
    blobs = [(inside_point(grid, (10 + 22 * n, 15, 15)), 5.0, p) for n, p in enumerate(peaks)]
    found = find_candidates(blob_map(grid, blobs), grid, floor=0.1, nms_radius_mm=6.0, max_count=3)
    assert [round(c.confidence, 2) for c in found] == [0.95, 0.8, 0.6]


def test_single_slice_maps_give_circles_and_empty_maps_nothing():
    grid = Grid((1, 200, 160), (0.5, 0.5, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    center = inside_point(grid, (60.4, 120.7, 0.0))
    (cand,) = find_candidates(blob_map(grid, [(center, 20.0, 0.8)]), grid, nms_radius_mm=10.0)
    assert np.linalg.norm(np.asarray(cand.center_mm) - center) < 0.25
    assert cand.diameter_mm == pytest.approx(20.0, rel=0.05)  # equivalent circle, not sphere
    assert find_candidates(np.zeros(grid.shape, np.float32), grid) == []


def test_candidates_feed_froc_matching():
    cand = DetectionCandidate((1.0, 2.0, 3.0), (0, 0, 0), 6.0, 0.75)
    assert cand.to_candidate("case-1") == Candidate("case-1", (1.0, 2.0, 3.0), 0.75)
    table = tabulate([Lesion("case-1", (1.0, 2.5, 3.0), 6.0)], [cand.to_candidate("case-1")])
    assert table.candidate_score.tolist() == [0.75]


def test_bad_probability_maps_name_the_field():
    grid = oblique_grid(shape_zyx=(4, 5, 6))
    with pytest.raises(InputError) as shape:
        find_candidates(np.zeros((4, 5, 7)), grid)
    assert shape.value.field == "probability"
    nan = np.zeros(grid.shape)
    nan[1, 1, 1] = np.nan
    with pytest.raises(InputError) as finite:
        find_candidates(nan, grid)
    assert finite.value.field == "probability"


# ----------------------------------------------------------------------------------- tiling
@pytest.fixture(scope="module")
def toy_net():
    """The toy ONNX conv net (two 3×3×3 convs, zero padding: receptive radius 2) with any input size."""
    import onnxruntime as ort

    from services.inference.toy_model import toy_onnx

    session = ort.InferenceSession(toy_onnx(None), providers=["CPUExecutionProvider"])
    batches: list[int] = []

    def infer(batch: np.ndarray) -> np.ndarray:
        batches.append(batch.shape[0])
        return session.run(["probability"], {"image": batch})[0]

    infer.batches = batches
    return infer


def test_tiling_equals_the_whole_image_away_from_borders(toy_net):
    rng = np.random.default_rng(3)
    image = rng.standard_normal((37, 45, 41)).astype(np.float32)
    spec = TilingSpec(tile=(16, 16, 16), overlap=0.5, max_batch=5)
    toy_net.batches.clear()
    tiled = sliding_window(image, toy_net, spec)
    whole = toy_net(image[None, None])[0, 0]
    interior = (slice(2, -2),) * 3  # the net's own zero padding differs at the image border only
    assert tiled.shape == image.shape
    np.testing.assert_allclose(tiled[interior], whole[interior], atol=2e-3)
    assert max(toy_net.batches[:-1]) <= 5 and len(toy_net.batches) > 2


def test_tiling_through_the_inference_backend_matches_onnxruntime(toy_net, tmp_path):
    """The serving path: a fixed-size (16³) model in a Triton-layout repository, run by the embedded
    backend in batches of its max_batch_size, gives the tiles onnxruntime gives."""
    from services.inference.backend import BlockingBackend
    from services.inference.embedded import EmbeddedBackend
    from services.inference.export import register_onnx_model
    from services.inference.repository import ModelRepository
    from services.inference.toy_model import toy_onnx

    card = {"command": "test", "data_manifest": "none", "seed": 0, "git_commit": "0" * 40}
    register_onnx_model(tmp_path, "cade_toy", toy_onnx(16), metrics={}, max_batch_size=4, **card)
    image = np.random.default_rng(6).standard_normal((30, 40, 35)).astype(np.float32)
    spec = TilingSpec(tile=(16, 16, 16), overlap=0.5, max_batch=4)
    with BlockingBackend(lambda: EmbeddedBackend(ModelRepository(tmp_path))) as backend:
        served = sliding_window(
            image, lambda b: backend.infer("cade_toy", {"image": b}, ["probability"])["probability"], spec
        )
    np.testing.assert_allclose(served, sliding_window(image, toy_net, spec), atol=1e-5)


def test_tiling_in_2d_equals_the_whole_image():
    def box_filter(batch: np.ndarray) -> np.ndarray:  # a translation-equivariant "2D net"
        assert batch.ndim == 4 and batch.dtype == np.float32
        return np.stack([ndimage.uniform_filter(b, size=(1, 3, 3), mode="constant") for b in batch])

    image = np.random.default_rng(4).standard_normal((1, 70, 90)).astype(np.float32)
    tiled = sliding_window(image, box_filter, TilingSpec(tile=(32, 32), overlap=0.5))
    whole = box_filter(image[None])[0]
    np.testing.assert_allclose(tiled[:, 1:-1, 1:-1], whole[:, 1:-1, 1:-1], atol=1e-3)


def test_tiling_stops_between_batches_when_the_caller_left():
    calls = []
    budget = WorkBudget(is_active=lambda: len(calls) < 2)

    def infer(batch):
        calls.append(batch.shape[0])
        return batch

    with scope(budget), pytest.raises(RequestCancelledError):
        sliding_window(np.zeros((64, 64, 64), np.float32), infer, TilingSpec(tile=(16, 16, 16), max_batch=2))
    assert len(calls) == 2  # the third batch never ran


@pytest.mark.parametrize(
    ("shape", "tile", "words"),
    [
        ((1, 64, 64), (16, 16, 16), "single slice"),  # a radiograph to a 3D detector
        ((20, 64, 64), (16, 16), "slices but the detector is 2D"),  # a CT to a 2D detector
        ((20, 6, 64), (16, 16, 16), "smaller than the least"),
    ],
)
def test_tiling_refuses_what_it_cannot_run(shape, tile, words):
    with pytest.raises(InputError, match=words) as error:
        sliding_window(
            np.zeros(shape, np.float32), lambda b: b, TilingSpec(tile=tile, min_shape=(8,) * len(tile))
        )
    assert error.value.field == "image"


def test_a_net_answering_the_wrong_shape_is_an_inference_error_not_an_empty_answer():
    from services.inference.errors import InferenceError

    with pytest.raises(InferenceError):
        sliding_window(
            np.zeros((20, 20, 20), np.float32), lambda b: b[:, :, :-1], TilingSpec(tile=(16, 16, 16))
        )


# ----------------------------------------------------------------------------------- detector
def bright_blob_net(batch: np.ndarray) -> np.ndarray:
    """A hand-made detector: high logits where the (normalised) intensity is bright."""
    smooth = np.stack([ndimage.gaussian_filter(b, sigma=(0, 1, 1, 1)) for b in batch])
    return (25.0 * (smooth - 0.45)).astype(np.float32)


CT_SPEC = DetectorSpec(
    task="test-nodule",
    frame=WorkingFrame(dims=3, spacing_mm=1.5),
    intensity=Intensity("window", -1000.0, 400.0),
    tiling=TilingSpec(tile=(32, 32, 32), min_shape=(16, 16, 16), overlap=0.25, max_batch=4),
    floor=0.5,
    nms_radius_mm=8.0,
)


def noisy_ct(seed: int, spheres) -> Volume:
    grid = Grid((40, 96, 110), (0.8, 0.75, 2.0), (-60.0, -20.0, 40.0), DIRECTION)
    rng = np.random.default_rng(seed)
    hu = rng.normal(-800.0, 40.0, grid.shape)
    world = grid.world_grid()
    for center, diameter in spheres:
        hu[np.linalg.norm(world - center, axis=-1) <= diameter / 2] = 30.0 + rng.normal(0, 40.0)
    return grid.with_array(hu.astype(np.int16), modality="CT")


def test_detector_finds_bright_spheres_at_their_mm_positions_on_the_original_grid():
    grid = noisy_ct(0, []).grid
    spheres = [(inside_point(grid, (30.3, 40.6, 12.4)), 14.0), (inside_point(grid, (80.2, 60.3, 26.7)), 9.0)]
    image = noisy_ct(1, spheres)
    result = Detector(CT_SPEC, bright_blob_net, "test/1").detect(image)
    assert result.task == "test-nodule" and result.model_version == "test/1"
    assert len(result.candidates) == 2
    for center, diameter in spheres:
        near = min(result.candidates, key=lambda c: np.linalg.norm(np.asarray(c.center_mm) - center))
        assert np.linalg.norm(np.asarray(near.center_mm) - center) < 0.75  # half a working voxel
        assert near.center_voxel == tuple(int(v) for v in np.rint(image.world_to_index(center)))
        assert near.diameter_mm == pytest.approx(diameter, rel=0.2)
    payload = result.as_dict()
    assert payload["model"] == "cade_test-nodule" and len(payload["candidates"]) == 2
    assert [c.score for c in result.froc_candidates("c")] == [c.confidence for c in result.candidates]


def test_lesion_free_and_flat_images_give_a_valid_empty_list():
    detector = Detector(CT_SPEC, bright_blob_net, "test/1")
    assert detector.detect(noisy_ct(2, [])).candidates == ()
    flat = noisy_ct(2, []).with_array(np.full((40, 96, 110), -1000, np.int16))
    assert detector.detect(flat).candidates == ()


def test_radiograph_detector_works_in_a_normalised_frame_whatever_the_pixel_spacing():
    spec = DetectorSpec(
        task="test-mass",
        frame=WorkingFrame(dims=2, long_side=128),
        intensity=Intensity("percentile", 1.0, 99.0),
        tiling=TilingSpec(tile=(64, 64), min_shape=(32, 32), overlap=0.25),
        floor=0.5,
        nms_radius_pixels=6.0,
    )
    rng = np.random.default_rng(5)
    rows, cols = np.mgrid[0:400, 0:320]
    pixels = rng.normal(100.0, 10.0, (400, 320))
    pixels[(rows - 250.3) ** 2 + (cols - 90.6) ** 2 <= 30**2] += 120.0
    answers = []
    for spacing in (1.0, 0.143):  # unknown (1 mm placeholder) and a real detector pitch
        image = Volume(pixels[None].astype(np.float32), (spacing, spacing, 1.0))
        (cand,) = (
            Detector(spec, lambda b: bright_blob_net(b[:, :, None])[:, :, 0], "x/1").detect(image).candidates
        )
        answers.append(cand)
        assert np.abs(np.asarray(cand.center_voxel[:2]) - (90.6, 250.3)).max() <= 1
        assert cand.diameter_mm == pytest.approx(60.0 * spacing, rel=0.1)
    assert answers[0].center_voxel == answers[1].center_voxel


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.zeros((1, 200, 200), np.float32), "single slice"),  # a radiograph to the CT detector
        (np.where(np.arange(20 * 60 * 60).reshape(20, 60, 60) == 7, np.nan, 0.0), "non-finite"),
        (np.zeros((4, 200, 200), np.float32), "smaller than the least"),  # 4 × 2 mm = 8 mm deep
    ],
)
def test_detector_refuses_bad_images_naming_the_field(array, words):
    image = Volume(array, (0.8, 0.8, 2.0))
    with pytest.raises(InputError, match=words) as error:
        Detector(CT_SPEC, bright_blob_net, "test/1").detect(image)
    assert error.value.field == "image"


def test_a_ct_to_the_radiograph_detector_is_refused():
    spec = DetectorSpec(
        task="test-mass",
        frame=WorkingFrame(dims=2, long_side=128),
        intensity=Intensity("percentile", 1.0, 99.0),
        tiling=TilingSpec(tile=(64, 64)),
        nms_radius_pixels=6.0,
        nms_radius_mm=None,
    )
    with pytest.raises(InputError, match="2D detector") as error:
        Detector(spec, bright_blob_net, "x/1").detect(Volume(np.zeros((20, 64, 64)), (1.0, 1.0, 1.0)))
    assert error.value.field == "image"


def test_tiles_of_air_are_not_run_and_read_as_no_lesion() -> None:
    """skip_below: tiles with (almost) nothing above the level are never sent to the network; a tile
    holding any body is, and its logits are the network's own."""
    from services.cade.tiling import SKIPPED_LOGIT, TilingSpec, sliding_window

    image = np.zeros((64, 64, 64), np.float32)
    image[:20, :20, :20] = 0.5  # the "body" fills one corner
    seen: list[int] = []

    def infer(batch: np.ndarray) -> np.ndarray:
        seen.append(len(batch))
        return np.full(batch.shape, 3.0, np.float32)

    spec = TilingSpec(tile=(32, 32, 32), overlap=0.0, max_batch=8, skip_below=0.05)
    logits = sliding_window(image, infer, spec)
    assert sum(seen) == 1  # of 8 tiles, only the one holding the body ran
    assert logits[5, 5, 5] == pytest.approx(3.0)
    assert logits[50, 50, 50] == pytest.approx(SKIPPED_LOGIT)
    seen.clear()
    everything = sliding_window(image, infer, TilingSpec(tile=(32, 32, 32), overlap=0.0, max_batch=8))
    assert sum(seen) == 8 and np.allclose(everything, 3.0)


def test_a_head_first_volume_reaches_the_network_as_the_feet_first_one_does():
    """The networks learnt chests stored with their axes along L, P, S: the same voxels stored
    head-first (or mirrored in x and y, as RAS NIfTI is) must give the same working array."""
    from services.cade.preprocess import to_working

    rng = np.random.default_rng(5)
    feet_first = Volume(
        rng.normal(-500, 300, (20, 30, 40)).astype(np.float32), (0.8, 0.8, 2.0), (-16.0, -12.0, 5.0)
    )
    flips = np.diag([-1.0, -1.0, -1.0])
    far_corner = np.asarray(feet_first.grid.index_to_world(np.array(feet_first.shape_xyz, float) - 1))
    mirrored = Volume(feet_first.array[::-1, ::-1, ::-1].copy(), feet_first.spacing, tuple(far_corner), flips)
    frame, intensity = WorkingFrame(dims=3, spacing_mm=1.5), Intensity("window", -1000.0, 400.0)
    expected, seen = to_working(feet_first, frame, intensity), to_working(mirrored, frame, intensity)
    assert np.allclose(seen.direction, np.eye(3))
    assert seen.grid.same_grid(expected.grid)
    np.testing.assert_allclose(seen.array, expected.array, atol=1e-5)
