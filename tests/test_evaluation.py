"""services.evaluation against independent computations.

* FROC: a line-by-line port of LUNA16's ``evaluateCAD`` matching loop + ``computeFROC`` (scikit-learn
  ``roc_curve``, ``numpy.interp``), MONAI's ``monai.metrics.froc`` where its conventions agree, and
  hand-worked cases where they differ (MONAI skips the lowest threshold, its default rates start at
  1/4, and overlapping spheres overwrite each other in its label map).
* ROC: scikit-learn's ``roc_curve`` / ``roc_auc_score``.
* Bootstrap: the vectorised case-weight evaluation against rebuilding every resample and scoring it
  with the plain functions (and scikit-learn for AUC).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from services.core.errors import InputError
from services.evaluation import (
    LUNA16_FP_RATES,
    Candidate,
    Lesion,
    MatchRule,
    bootstrap_auc,
    bootstrap_froc,
    bootstrap_mean_dice,
    dice,
    froc,
    match_candidates,
    percentile_interval,
    resample_cases,
    roc_auc,
    roc_curve,
)
from services.evaluation.plots import plot_froc, plot_roc

RATES = np.array(LUNA16_FP_RATES)


# ---------------------------------------------------------------- references and synthetic data


def luna16_reference(lesions, candidates, case_ids):
    """LUNA16's evaluateCAD (no excluded nodules, no 100-mark cap) + computeFROC, written plainly."""
    gt, prob, excluded = [], [], []
    for case in case_ids:
        cands = {i: c for i, c in enumerate(candidates) if c.case_id == case}
        remaining = dict(cands)
        for lesion in (x for x in lesions if x.case_id == case):
            radius_squared = pow(lesion.diameter_mm / 2.0, 2.0)
            matches = []
            for key, cand in cands.items():
                dist = sum(pow(a - b, 2.0) for a, b in zip(lesion.center_mm, cand.center_mm, strict=True))
                if dist < radius_squared:
                    matches.append(cand)
                    remaining.pop(key, None)
            gt.append(1.0)
            prob.append(max(c.score for c in matches) if matches else -1e9)
            excluded.append(not matches)
        for cand in remaining.values():
            gt.append(0.0)
            prob.append(cand.score)
            excluded.append(False)
    gt_local = [g for g, e in zip(gt, excluded, strict=True) if not e]
    prob_local = [p for p, e in zip(prob, excluded, strict=True) if not e]
    n_detected, n_lesions, n_cands = sum(gt_local), sum(gt), len(prob_local)
    curves = {}
    for drop in (True, False):
        fpr, tpr, _ = sk_roc_curve(gt_local, prob_local, drop_intermediate=drop)
        curves[drop] = (fpr * (n_cands - n_detected) / len(case_ids), tpr * n_detected / n_lesions)
    return curves


def synthetic_detections(rng, n_cases, *, overlap=True, ties=False):
    """Cases with 0–3 lesions (some overlapping), candidates near lesions (sometimes several), FPs,
    lesion-free and candidate-free cases."""
    case_ids = [f"case{i:03d}" for i in range(n_cases)]
    lesions, candidates = [], []
    for case in case_ids:
        n_les = rng.choice([0, 1, 1, 2, 3])
        centres = rng.uniform(0, 300, (n_les, 3))
        diameters = rng.uniform(4, 30, n_les)
        if overlap and n_les >= 2 and rng.random() < 0.3:
            centres[1] = centres[0] + rng.normal(0, diameters[0] / 4, 3)
        for centre, diameter in zip(centres, diameters, strict=True):
            lesions.append(Lesion(case, centre, diameter))
            for _ in range(rng.choice([0, 1, 1, 2, 3])):
                offset = rng.normal(0, diameter / 5, 3)
                candidates.append(Candidate(case, centre + offset, rng.uniform(0.2, 1.0)))
        if rng.random() < 0.85:
            for _ in range(rng.integers(0, 15)):
                candidates.append(Candidate(case, rng.uniform(0, 300, 3), rng.uniform(0.0, 0.9)))
    if ties:
        candidates = [Candidate(c.case_id, c.center_mm, round(c.score, 1)) for c in candidates]
    return lesions, candidates, case_ids


def interp_at(x, fps, sens):
    return np.interp(x, fps, sens)


# ---------------------------------------------------------------- Dice


def test_dice_matches_its_definition():
    rng = np.random.default_rng(0)
    for density in (0.0, 0.01, 0.3, 0.9):
        a = rng.random((6, 7, 8)) < density
        b = rng.random((6, 7, 8)) < density
        total = int(a.sum()) + int(b.sum())  # the definition, written out independently
        expected = 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total
        assert dice(a, b) == pytest.approx(expected, abs=1e-15)
    assert dice(a, a) == 1.0


def test_dice_hand_worked_and_empty_masks():
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([0, 1, 1, 0], bool)
    assert dice(a, b) == pytest.approx(0.5)  # 2·1 / (2 + 2)
    empty = np.zeros(4, bool)
    assert dice(empty, empty) == 1.0  # nothing to find, nothing found: perfect agreement
    assert dice(a, empty) == 0.0
    assert dice(np.array([0, 2, 3]), np.array([0, 1, 0])) == pytest.approx(2 * 1 / 3)  # nonzero = foreground


def test_dice_refuses_masks_of_different_shapes():
    with pytest.raises(InputError) as caught:
        dice(np.zeros((3, 3), bool), np.zeros((3, 4), bool))
    assert caught.value.field == "b"


# ---------------------------------------------------------------- typed inputs


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Lesion("a", (0, np.nan, 0), 5), "Lesion.center_mm"),
        (lambda: Lesion("a", (0, np.inf, 0), 5), "Lesion.center_mm"),
        (lambda: Lesion("a", (0, 0), 5), "Lesion.center_mm"),
        (lambda: Lesion("a", (0, 0, 0), -1.0), "Lesion.diameter_mm"),
        (lambda: Lesion("a", (0, 0, 0), 0.0), "Lesion.diameter_mm"),
        (lambda: Lesion("a", (0, 0, 0), float("nan")), "Lesion.diameter_mm"),
        (lambda: Lesion("", (0, 0, 0), 5), "Lesion.case_id"),
        (lambda: Candidate("a", (0, 0, 0), float("nan")), "Candidate.score"),
        (lambda: Candidate("a", ("x", 0, 0), 0.5), "Candidate.center_mm"),
        (lambda: Candidate(7, (0, 0, 0), 0.5), "Candidate.case_id"),
    ],
)
def test_bad_lesions_and_candidates_are_refused_with_their_field(make, field):
    with pytest.raises(InputError) as caught:
        make()
    assert caught.value.field == field


def test_inputs_are_normalised_to_float_tuples():
    lesion = Lesion("a", np.array([1, 2, 3]), 4)
    assert lesion.center_mm == (1.0, 2.0, 3.0) and isinstance(lesion.center_mm[0], float)
    assert lesion.diameter_mm == 4.0


def test_froc_input_errors_name_the_field():
    lesion = Lesion("a", (0, 0, 0), 10)
    with pytest.raises(InputError) as caught:
        froc([lesion], [Candidate("zzz", (0, 0, 0), 0.5)], ["a"])
    assert caught.value.field == "candidates[0].case_id"
    with pytest.raises(InputError) as caught:
        froc([lesion], [], ["a", "a"])
    assert caught.value.field == "case_ids"
    with pytest.raises(InputError) as caught:
        froc([], [Candidate("a", (0, 0, 0), 0.5)], ["a"])
    assert caught.value.field == "lesions"
    with pytest.raises(InputError) as caught:
        froc([(0, 0, 0, 10)], [], ["a"])
    assert caught.value.field == "lesions[0]"
    with pytest.raises(InputError) as caught:
        froc([lesion], [], ["a"], fp_rates=(1, 0.5))
    assert caught.value.field == "fp_rates"
    with pytest.raises(InputError) as caught:
        froc([lesion], [], ["a"], rule="iou")
    assert caught.value.field == "rule"


# ---------------------------------------------------------------- hit rules


def test_luna16_and_adam_differ_exactly_on_the_sphere_surface():
    lesion = Lesion("a", (0, 0, 0), 10.0)
    on_surface = Candidate("a", (3, 4, 0), 0.9)  # distance exactly 5 = d/2 (exact in binary)
    just_inside = Candidate("a", (2.99, 4, 0), 0.8)
    just_outside = Candidate("a", (3, 4, 0.2), 0.7)
    luna = match_candidates([lesion], [on_surface, just_inside, just_outside], MatchRule.LUNA16)
    adam = match_candidates([lesion], [on_surface, just_inside, just_outside], "adam")
    assert luna.candidate_is_fp.tolist() == [True, False, True]
    assert adam.candidate_is_fp.tolist() == [False, False, True]
    assert luna.lesion_score.tolist() == [0.8] and adam.lesion_score.tolist() == [0.9]
    # The surface candidate alone: missed under LUNA16 (and one FP), found under ADAM.
    assert froc([lesion], [on_surface], ["a"], rule="luna16").cpm == 0.0
    adam_result = froc([lesion], [on_surface], ["a"], rule=MatchRule.ADAM)
    assert adam_result.cpm == 1.0 and adam_result.rule is MatchRule.ADAM


def test_candidate_inside_two_lesions_is_a_hit_for_both():
    lesions = [Lesion("a", (0, 0, 0), 10), Lesion("a", (4, 0, 0), 10)]
    both = Candidate("a", (2, 0, 0), 0.6)
    match = match_candidates(lesions, [both])
    assert match.lesion_found.tolist() == [True, True]
    assert match.candidate_lesion_hits.tolist() == [2]
    result = froc(lesions, [both], ["a"])
    assert result.n_found == 2 and result.n_false_positives == 0 and result.cpm == 1.0


def test_extra_hits_on_a_found_lesion_are_neither_tp_nor_fp():
    lesion = Lesion("a", (0, 0, 0), 10)
    candidates = [
        Candidate("a", (0, 0, 0), 0.9),
        Candidate("a", (1, 0, 0), 0.8),  # second hit on the same lesion: ignored
        Candidate("a", (0, 2, 0), 0.3),  # third hit: ignored
        Candidate("a", (50, 0, 0), 0.7),  # a real FP
    ]
    result = froc([lesion], candidates, ["a"])
    assert result.thresholds.tolist() == [np.inf, 0.9, 0.7]
    assert result.fp_per_case.tolist() == [0.0, 0.0, 1.0]
    assert result.sensitivity.tolist() == [0.0, 1.0, 1.0]
    assert result.n_false_positives == 1 and result.n_found == 1


# ---------------------------------------------------------------- FROC, hand-worked


def _hand_worked():
    lesions = [
        Lesion("a", (0, 0, 0), 10),  # L1, found at 0.9
        Lesion("a", (50, 0, 0), 10),  # L2, found at 0.4
        Lesion("b", (0, 0, 0), 10),  # L3, found at 0.7
        Lesion("b", (100, 100, 100), 6),  # L4, missed
    ]
    candidates = [
        Candidate("a", (1, 0, 0), 0.9),
        Candidate("a", (200, 0, 0), 0.8),
        Candidate("b", (0, 1, 0), 0.7),
        Candidate("b", (0, 200, 0), 0.6),
        Candidate("a", (0, 0, 200), 0.5),
        Candidate("a", (51, 0, 0), 0.4),
    ]
    return lesions, candidates, ["a", "b"]


def test_froc_hand_worked_vertices_interpolation_and_cpm():
    result = froc(*_hand_worked())
    # Ranking 0.9 TP, 0.8 FP, 0.7 TP, 0.6 FP, 0.5 FP, 0.4 TP over 2 cases and 4 lesions.
    assert result.fp_per_case.tolist() == [0, 0, 0.5, 0.5, 1.0, 1.5, 1.5]
    assert result.sensitivity.tolist() == [0, 0.25, 0.25, 0.5, 0.5, 0.5, 0.75]
    # 1/8, 1/4 on the flat 0.25 segment; 1/2 on the vertical rise (its top); 1 on the 0.5 plateau;
    # 2, 4, 8 beyond the last vertex: held at 0.75.
    expected = [0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 0.75]
    assert [p.sensitivity for p in result.operating_points] == pytest.approx(expected)
    assert result.cpm == pytest.approx(3.75 / 7)
    assert [p.threshold for p in result.operating_points] == [0.9, 0.9, 0.7, 0.6, 0.4, 0.4, 0.4]
    assert (result.n_cases, result.n_lesions, result.n_found, result.n_false_positives) == (2, 4, 3, 3)
    with pytest.raises(ValueError):
        result.fp_per_case[0] = 1.0  # results are read-only


def test_tied_scores_make_a_diagonal_segment():
    lesions = [Lesion("a", (0, 0, 0), 10), Lesion("a", (50, 0, 0), 10)]
    candidates = [
        Candidate("a", (0, 0, 0), 0.9),
        Candidate("a", (50, 0, 0), 0.5),  # TP tied with …
        Candidate("a", (99, 0, 0), 0.5),  # … an FP
    ]
    result = froc(lesions, candidates, ["a"])
    assert result.fp_per_case.tolist() == [0, 0, 1] and result.sensitivity.tolist() == [0, 0.5, 1]
    expected = [0.5625, 0.625, 0.75, 1, 1, 1, 1]  # 0.5 + 0.5·rate up to 1 FP/case
    assert [p.sensitivity for p in result.operating_points] == pytest.approx(expected)
    assert result.cpm == pytest.approx(sum(expected) / 7)


def test_lesion_free_cases_count_in_the_fp_per_case_denominator():
    lesions, candidates, cases = _hand_worked()
    base = froc(lesions, candidates, cases)
    quiet = froc(lesions, candidates, [*cases, "normal"])  # a normal case without any candidate
    np.testing.assert_allclose(quiet.fp_per_case, base.fp_per_case * 2 / 3)
    np.testing.assert_array_equal(quiet.sensitivity, base.sensitivity)
    assert quiet.n_cases == 3 and quiet.cpm > base.cpm  # same FPs spread over more cases
    noisy = froc(lesions, [*candidates, Candidate("normal", (0, 0, 0), 0.95)], [*cases, "normal"])
    assert noisy.fp_per_case[1] == pytest.approx(1 / 3)  # its FP outranks every lesion
    assert noisy.cpm < quiet.cpm


def test_case_without_candidates_and_no_candidates_at_all():
    lesions, candidates, cases = _hand_worked()
    lonely = Lesion("c", (0, 0, 0), 8)
    with_c = froc([*lesions, lonely], candidates, [*cases, "c"])
    assert with_c.n_lesions == 5 and with_c.n_found == 3
    assert with_c.sensitivity.max() == pytest.approx(3 / 5)
    nothing = froc(lesions, [], cases)
    assert nothing.cpm == 0.0 and nothing.fp_per_case.tolist() == [0.0] and nothing.n_found == 0
    assert all(p.threshold == np.inf for p in nothing.operating_points)


# ---------------------------------------------------------------- FROC vs LUNA16's script


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
@pytest.mark.parametrize("ties", [False, True])
def test_froc_matches_the_luna16_procedure(seed, ties):
    rng = np.random.default_rng(seed)
    lesions, candidates, cases = synthetic_detections(rng, 40, ties=ties)
    result = froc(lesions, candidates, cases)
    reference = luna16_reference(lesions, candidates, cases)
    full_fps, full_sens = reference[False]
    np.testing.assert_allclose(result.fp_per_case, full_fps, atol=1e-12)
    np.testing.assert_allclose(result.sensitivity, full_sens, atol=1e-12)
    # LUNA16 reads the sklearn default (intermediate points dropped): identical by linearity.
    fps, sens = reference[True]
    ours = [p.sensitivity for p in result.operating_points]
    np.testing.assert_allclose(ours, interp_at(RATES, fps, sens), atol=1e-12)
    assert result.cpm == pytest.approx(float(np.mean(interp_at(RATES, fps, sens))), abs=1e-12)
    grid = np.linspace(0.125, 8, 10001)  # LUNA16's own plotting grid
    np.testing.assert_allclose(result.sensitivity_at(grid), interp_at(grid, fps, sens), atol=1e-12)


# ---------------------------------------------------------------- FROC vs MONAI


def _paint(shape, lesions_voxel):
    """One label map with label i+1 for voxels strictly inside lesion i's radius (spacing 1 mm)."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    labels = np.zeros(shape, np.int64)
    for i, (centre, diameter) in enumerate(lesions_voxel):
        inside = ((grid - np.asarray(centre)) ** 2).sum(-1) < (diameter / 2.0) ** 2
        labels[inside] = i + 1
    return labels


def _monai_froc(per_case, n_cases, eval_thresholds=LUNA16_FP_RATES):
    from monai.metrics.froc import compute_fp_tp_probs_nd, compute_froc_curve_data, compute_froc_score

    fp_all, tp_all, targets = [], [], 0
    for labels, coords, probs in per_case:
        fp, tp, n = compute_fp_tp_probs_nd(probs, coords, labels)
        fp_all.append(np.asarray(fp, np.float64))
        tp_all.append(np.asarray(tp, np.float64))
        targets += n
    fps, sens = compute_froc_curve_data(np.concatenate(fp_all), np.concatenate(tp_all), targets, n_cases)
    return fps, sens, compute_froc_score(fps, sens, eval_thresholds)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_froc_matches_monai_where_conventions_agree(seed):
    """Non-overlapping spheres, candidates on voxel centres, unique scores exact in float32 (MONAI
    stores TP scores as float32), and at least one missed lesion (its 0 is the threshold MONAI skips)."""
    rng = np.random.default_rng(seed)
    shape = (48, 48, 48)
    cases = [f"c{i}" for i in range(12)]
    scores = iter(rng.permutation(np.arange(1, 1000)) / 1024.0)
    lesions, candidates, per_case = [], [], []
    for n, case in enumerate(cases):
        placed = []
        for _ in range(0 if n % 4 == 0 else rng.integers(1, 4)):
            for _attempt in range(50):
                centre, diameter = rng.integers(8, 40, 3), float(rng.integers(4, 13))
                if all(np.linalg.norm(centre - c) > (diameter + d) / 2 + 1 for c, d in placed):
                    placed.append((centre, diameter))
                    break
        coords = []
        for centre, _diameter in placed:
            for _ in range(rng.integers(0, 3)):
                coords.append(np.clip(centre + rng.integers(-3, 4, 3), 0, 47))
        coords += list(rng.integers(0, 48, (rng.integers(0, 10), 3)))
        coords = np.array(coords, np.int64).reshape(-1, 3)
        probs = np.array([next(scores) for _ in coords])
        lesions += [Lesion(case, c.astype(float), d) for c, d in placed]
        candidates += [Candidate(case, c.astype(float), p) for c, p in zip(coords, probs, strict=True)]
        per_case.append((_paint(shape, placed), coords, probs))
    result = froc(lesions, candidates, cases)
    assert 0 < result.n_found < result.n_lesions  # preconditions of agreement
    fps, sens, score = _monai_froc(per_case, len(cases))
    assert result.cpm == pytest.approx(float(score), abs=1e-12)
    monai_at_rates = np.interp(RATES, fps[::-1], sens[::-1])
    np.testing.assert_allclose([p.sensitivity for p in result.operating_points], monai_at_rates, atol=1e-12)


def test_monai_differences_hand_worked():
    from monai.metrics.froc import compute_froc_curve_data, compute_froc_score

    # 1. Every lesion found, lowest score a TP: MONAI never lowers its threshold to that score.
    lesions = [Lesion("a", (0, 0, 0), 10), Lesion("a", (50, 0, 0), 10)]
    candidates = [
        Candidate("a", (0, 0, 0), 0.9),
        Candidate("a", (99, 0, 0), 0.5),
        Candidate("a", (50, 0, 0), 0.3),
    ]
    ours = froc(lesions, candidates, ["a"])
    fps, sens = compute_froc_curve_data(np.array([0.5]), np.array([0.9, 0.3]), 2, 1)
    assert ours.operating_points[-1].sensitivity == 1.0  # the 0.3 lesion is reached at 2 FP/case
    assert np.interp(8.0, fps[::-1], sens[::-1]) == 0.5  # MONAI stops at the 0.5 threshold
    assert ours.cpm == pytest.approx((3 * 0.5 + 4 * 1.0) / 7)
    assert compute_froc_score(fps, sens, LUNA16_FP_RATES) == pytest.approx(0.5)

    # 2. MONAI's default rates (1/4 … 8, CAMELYON16) leave out 1/8.
    hand = froc(*_hand_worked())
    default = compute_froc_score(hand.fp_per_case[::-1], hand.sensitivity[::-1])
    assert default == pytest.approx(np.mean([p.sensitivity for p in hand.operating_points[1:]]))  # 3.5/6
    assert default != pytest.approx(hand.cpm)  # 3.75/7

    # 3. Overlapping spheres in one label map: the later label overwrites, one lesion is credited.
    placed = [(np.array([10, 10, 10]), 10.0), (np.array([14, 10, 10]), 10.0)]
    labels = _paint((24, 24, 24), placed)
    coords = np.array([[12, 10, 10]])
    _, _, monai_score = _monai_froc([(labels, coords, np.array([0.6]))], 1)
    overlapping = [Lesion("a", c.astype(float), d) for c, d in placed]
    ours = froc(overlapping, [Candidate("a", (12, 10, 10), 0.6)], ["a"])
    assert monai_score == pytest.approx(0.5) and ours.cpm == 1.0


# ---------------------------------------------------------------- ROC


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [None, 1])
def test_roc_matches_scikit_learn(seed, decimals):
    rng = np.random.default_rng(seed)
    truth = rng.random(80) < 0.4
    scores = rng.normal(size=80) + truth * 0.8
    if decimals is not None:
        scores = np.round(scores, decimals)  # many ties
    result = roc_curve(scores, truth)
    fpr, tpr, thresholds = sk_roc_curve(truth, scores, drop_intermediate=False)
    np.testing.assert_allclose(result.fpr, fpr, atol=1e-12)
    np.testing.assert_allclose(result.tpr, tpr, atol=1e-12)
    np.testing.assert_array_equal(result.thresholds, thresholds)
    assert result.auc == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    assert roc_auc(scores, truth.astype(int)) == pytest.approx(result.auc, abs=1e-15)
    assert (result.n_positive, result.n_negative) == (int(truth.sum()), int((~truth).sum()))


def test_roc_hand_worked():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)  # a tie counts one half
    assert roc_auc([0.9, 0.1], [False, True]) == 0.0


@pytest.mark.parametrize(
    ("scores", "truth", "field"),
    [
        ([0.1, 0.2], [0, 0], "truth"),
        ([0.1, 0.2], [1, 1], "truth"),
        ([0.1, 0.2, 0.3], [0, 1], "truth"),
        ([0.1, np.nan], [0, 1], "scores"),
        ([0.1, 0.2], [0, 2], "truth"),
    ],
)
def test_roc_refuses_bad_input(scores, truth, field):
    with pytest.raises(InputError) as caught:
        roc_curve(scores, truth)
    assert caught.value.field == field


# ---------------------------------------------------------------- bootstrap


def _percentiles(values, level=0.95):
    values = np.asarray(values)
    tail = (1 - level) / 2 * 100
    return np.percentile(values, [tail, 100 - tail])


def test_bootstrap_auc_equals_rebuilding_each_resample():
    rng = np.random.default_rng(5)
    truth = np.arange(10) < 2  # 2 abnormal of 10: ~11 % of resamples draw no abnormal case
    scores = np.round(rng.normal(size=10) + truth, 1)
    ci = bootstrap_auc(scores, truth, n_resamples=300, seed=42)
    naive = [
        roc_auc_score(truth[idx], scores[idx])
        for idx in resample_cases(10, 300, seed=42)
        if 0 < truth[idx].sum() < len(idx)
    ]
    assert ci.n_resamples == len(naive) < 300  # one-class resamples left out (small, unbalanced set)
    np.testing.assert_allclose([ci.low, ci.high], _percentiles(naive), atol=1e-12)


def test_bootstrap_froc_equals_rebuilding_each_resample():
    rng = np.random.default_rng(6)
    lesions, candidates, cases = synthetic_detections(rng, 30)
    boot = bootstrap_froc(lesions, candidates, cases, n_resamples=80, seed=7)
    cpms, sens = [], []
    for idx in resample_cases(len(cases), 80, seed=7):
        drawn = [f"{cases[j]}#{k}" for k, j in enumerate(idx)]
        rename = {}
        for k, j in enumerate(idx):
            rename.setdefault(cases[j], []).append(f"{cases[j]}#{k}")
        les = [Lesion(new, x.center_mm, x.diameter_mm) for x in lesions for new in rename.get(x.case_id, [])]
        cand = [Candidate(new, c.center_mm, c.score) for c in candidates for new in rename.get(c.case_id, [])]
        if not les:
            continue
        result = froc(les, cand, drawn)
        cpms.append(result.cpm)
        sens.append([p.sensitivity for p in result.operating_points])
    assert boot.cpm.n_resamples == len(cpms)
    np.testing.assert_allclose([boot.cpm.low, boot.cpm.high], _percentiles(cpms), atol=1e-12)
    sens = np.array(sens)
    for k, interval in enumerate(boot.sensitivity):
        np.testing.assert_allclose([interval.low, interval.high], _percentiles(sens[:, k]), atol=1e-12)


def test_bootstrap_mean_dice_draws_cases_not_lesions():
    rng = np.random.default_rng(8)
    values = rng.uniform(0.3, 0.9, 40)
    case_of = [f"p{i // 3}" for i in range(40)]  # three lesions per case (the last case has one)
    ci = bootstrap_mean_dice(values, case_of, n_resamples=200, seed=3)
    cases = sorted(set(case_of))
    naive = []
    for idx in resample_cases(len(cases), 200, seed=3):
        drawn = np.concatenate([values[[c == cases[j] for c in case_of]] for j in idx])
        naive.append(drawn.mean())
    np.testing.assert_allclose([ci.low, ci.high], _percentiles(naive), atol=1e-12)
    per_lesion = bootstrap_mean_dice(values, n_resamples=200, seed=3)
    assert (per_lesion.low, per_lesion.high) != (ci.low, ci.high)


def _anomaly(rng, n):
    truth = rng.random(n) < 0.4
    truth[:2] = [True, False]
    return rng.normal(size=n) + truth * 1.0, truth


def test_confidence_intervals_contain_the_point_estimate():
    rng = np.random.default_rng(9)
    lesions, candidates, cases = synthetic_detections(rng, 100)
    boot = bootstrap_froc(lesions, candidates, cases)
    assert boot.cpm.n_resamples == 1000 and boot.cpm.level == 0.95
    assert boot.estimate.cpm in boot.cpm and boot.cpm.width > 0
    for point, interval in zip(boot.estimate.operating_points, boot.sensitivity, strict=True):
        assert interval.low <= point.sensitivity <= interval.high
    assert np.all(boot.band_low <= boot.estimate.sensitivity_at(boot.band_fp_per_case) + 1e-12)
    assert np.all(boot.band_high >= boot.estimate.sensitivity_at(boot.band_fp_per_case) - 1e-12)
    scores, truth = _anomaly(rng, 100)
    assert roc_auc(scores, truth) in bootstrap_auc(scores, truth)
    values = rng.uniform(0.4, 0.9, 60)
    assert float(values.mean()) in bootstrap_mean_dice(values)


def test_confidence_intervals_narrow_with_more_cases():
    small_rng, large_rng = np.random.default_rng(10), np.random.default_rng(10)
    small = bootstrap_froc(*synthetic_detections(small_rng, 25), n_resamples=400)
    large = bootstrap_froc(*synthetic_detections(large_rng, 400), n_resamples=400)
    assert large.cpm.width < small.cpm.width / 2  # ~1/sqrt(16) expected
    rng = np.random.default_rng(11)
    few, many = _anomaly(rng, 30), _anomaly(rng, 480)
    assert bootstrap_auc(*many).width < bootstrap_auc(*few).width / 2
    assert (
        bootstrap_mean_dice(rng.uniform(0, 1, 480)).width
        < bootstrap_mean_dice(rng.uniform(0, 1, 30)).width / 2
    )


def test_bootstrap_is_reproducible_by_seed():
    rng = np.random.default_rng(12)
    data = synthetic_detections(rng, 40)
    a = bootstrap_froc(*data, n_resamples=200, seed=1)
    b = bootstrap_froc(*data, n_resamples=200, seed=1)
    c = bootstrap_froc(*data, n_resamples=200, seed=2)
    assert a.cpm == b.cpm and a.sensitivity == b.sensitivity
    np.testing.assert_array_equal(a.band_low, b.band_low)
    assert a.cpm != c.cpm
    scores, truth = _anomaly(rng, 50)
    assert bootstrap_auc(scores, truth, seed=np.random.default_rng(4)) == bootstrap_auc(scores, truth, seed=4)
    assert bootstrap_auc(scores, truth, seed=4) != bootstrap_auc(scores, truth, seed=5)


def test_bootstrap_refuses_bad_settings():
    with pytest.raises(InputError) as caught:
        bootstrap_auc([0.1, 0.9], [0, 1], level=1.5)
    assert caught.value.field == "level"
    with pytest.raises(InputError) as caught:
        bootstrap_auc([0.1, 0.9], [0, 1], n_resamples=0)
    assert caught.value.field == "n_resamples"
    with pytest.raises(InputError) as caught:
        bootstrap_mean_dice([0.5, 1.2])
    assert caught.value.field == "dice_values"
    with pytest.raises(InputError) as caught:
        bootstrap_mean_dice([0.5, 0.7], ["a"])
    assert caught.value.field == "case_ids"
    with pytest.raises(InputError):
        percentile_interval(np.array([np.nan, np.nan]))


# ---------------------------------------------------------------- plots


def _png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return data, np.asarray(image.convert("RGB"))


def test_froc_plot_is_a_plausible_png(tmp_path):
    rng = np.random.default_rng(13)
    boot = bootstrap_froc(*synthetic_detections(rng, 40), n_resamples=200)
    target = tmp_path / "report" / "froc.png"
    assert plot_froc(boot.estimate, target, ci=boot, label="test model") == target
    data, pixels = _png(target)
    assert pixels.shape == (720, 900, 3)  # 6 × 4.8 in at 150 dpi
    assert 15_000 < len(data) < 2_000_000
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)  # operating points
    assert red.sum() > 7 * 20
    band = (np.abs(pixels.astype(int) - [210, 226, 240]).sum(-1) < 30).sum()  # tab:blue at alpha 0.2
    assert band > 500
    assert [p.name for p in target.parent.iterdir()] == ["froc.png"]  # no temporary file left


def test_roc_plot_is_a_plausible_png(tmp_path):
    rng = np.random.default_rng(14)
    scores, truth = _anomaly(rng, 60)
    target = tmp_path / "roc.png"
    plot_roc(roc_curve(scores, truth), target, auc_ci=bootstrap_auc(scores, truth))
    data, pixels = _png(target)
    assert pixels.shape == (750, 780, 3)
    assert 10_000 < len(data) < 2_000_000
    assert pixels.min() < 50 and pixels.max() > 250
    assert [p.name for p in tmp_path.iterdir()] == ["roc.png"]
