"""ScanNet instance AP (sas_core.eval.instances) against hand-computed cases."""

import numpy as np
import pytest

from sas_core.eval.instances import OVERLAPS, SceneInstances, _average_precision, evaluate_instances

NAMES = ["wall", "floor", "chair", "table"]  # wall/floor are not instance classes


def _scene(sizes=(200, 300), labels=(2, 3), void=100):
    """Objects of ``sizes`` points (classes ``labels``), then ``void`` wall points."""
    lab, inst = [], []
    for i, (n, c) in enumerate(zip(sizes, labels)):
        lab += [c] * n
        inst += [i] * n
    lab += [0] * void
    inst += [len(sizes)] * void
    return np.array(lab), np.array(inst)


def test_overlaps_are_scannets():
    assert len(OVERLAPS) == 10 and OVERLAPS[-1] == 0.25
    np.testing.assert_allclose(OVERLAPS[:9], [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9])


def test_perfect_prediction_is_100():
    lab, inst = _scene()
    s = SceneInstances(lab, inst, [inst == 0, inst == 1], [2, 3], [0.9, 0.8])
    r = evaluate_instances([s], NAMES)
    assert r["ap"] == pytest.approx(1.0) and r["ap50"] == pytest.approx(1.0) and r["ap25"] == pytest.approx(1.0)
    assert r["per_class"]["chair"]["ap"] == pytest.approx(1.0)
    assert set(r["per_class"]) == {"chair", "table"}  # wall and floor are not evaluated


def test_half_overlap_needs_iou_strictly_above():
    lab, inst = _scene(sizes=(200,), labels=(2,), void=0)
    half = np.zeros(len(lab), bool)
    half[:100] = True  # IoU exactly 0.5
    r = evaluate_instances([SceneInstances(lab, inst, [half], [2], [1.0])], NAMES)
    assert r["ap50"] == 0.0 and r["ap25"] == pytest.approx(1.0)
    assert r["ap"] == 0.0
    # 0.5 < IoU: 101 of 200 points -> AP50 counts, 0.55 does not
    half[100] = True
    r = evaluate_instances([SceneInstances(lab, inst, [half], [2], [1.0])], NAMES)
    assert r["ap50"] == pytest.approx(1.0)
    assert r["ap_table"][0, 1] == 0.0
    assert r["ap"] == pytest.approx(1 / 9)


def test_duplicate_prediction_is_a_false_positive_by_hand():
    lab, inst = _scene(sizes=(200,), labels=(2,), void=0)
    m = inst == 0
    # two identical matches: the lower confidence is a false positive
    r = evaluate_instances([SceneInstances(lab, inst, [m, m], [2, 2], [0.9, 0.5])], NAMES)
    # scores ascending [0.5 (FP), 0.9 (TP)]: curve points (p=1/2, r=1), (p=1, r=1), artificial (1, 0)
    # steps: (1 - 1)/2 = 0, (1 - 0)/2 = 1/2, (1 - 0)/2 = 1/2 -> AP = 1/2 * 1 + 1/2 * 1 = 1.0
    assert r["ap50"] == pytest.approx(1.0)
    # the duplicate scored higher than the match: the match keeps the max, FP gets the min -> same
    r2 = evaluate_instances([SceneInstances(lab, inst, [m, m], [2, 2], [0.5, 0.9])], NAMES)
    assert r2["ap50"] == pytest.approx(1.0)


def test_false_positive_above_the_match_lowers_ap_by_hand():
    lab, inst = _scene(sizes=(200, 200), labels=(2, 2), void=200)
    a, b = inst == 0, inst == 1
    junk = np.zeros(len(lab), bool)
    junk[np.flatnonzero(inst == 0)[:60]] = True  # a chair-labelled prediction on 60 chair points +
    junk[np.flatnonzero(inst == 1)[:60]] = True  # 60 of the other chair: IoU 60/340 with each
    # scores: a 0.9 (TP), junk 0.8 (FP), b 0.7 (TP)
    r = evaluate_instances([SceneInstances(lab, inst, [a, junk, b], [2, 2, 2], [0.9, 0.8, 0.7])], NAMES)
    # ascending: 0.7 T, 0.8 F, 0.9 T -> thresholds: >=0.7: p=2/3 r=1; >=0.8: p=1/2 r=1/2; >=0.9: p=1 r=1/2;
    # artificial (p=1, r=0). recall seq [1, 1/2, 1/2, 0]; steps [(1-1/2)/2, (1-1/2)/2, (1/2-0)/2, (1/2-0)/2]
    expected = 2 / 3 * 0.25 + 0.5 * 0.25 + 1 * 0.25 + 1 * 0.25
    assert r["ap50"] == pytest.approx(expected)
    assert _average_precision(np.array([1.0, 0, 1]), np.array([0.7, 0.8, 0.9]), 0) == pytest.approx(expected)


def test_predictions_on_ignored_points_are_not_false_positives():
    lab, inst = _scene(sizes=(200, 50), labels=(2, 2), void=300)
    good = inst == 0
    on_wall = inst == 2                                 # void (wall is not evaluated): ignored
    small = np.zeros(len(lab), bool)
    small[np.flatnonzero(inst == 1)] = True             # the 50-point chair is below min_region_size
    small[np.flatnonzero(inst == 2)[:60]] = True        # + 60 wall points: 110 points, all ignored
    r = evaluate_instances([SceneInstances(lab, inst, [good, on_wall, small], [2, 2, 2], [0.5, 0.9, 0.8])],
                           NAMES)
    assert r["ap50"] == pytest.approx(1.0)
    assert r["per_class"]["chair"]["gt_instances"] == 1  # the 50-point chair is not evaluated
    # the same wall prediction on an evaluated class's points is a false positive
    lab2 = lab.copy()
    lab2[inst == 2] = 3  # the wall becomes a table instance: not void any more; a chair there is a FP
    r2 = evaluate_instances([SceneInstances(lab2, inst, [good, on_wall], [2, 2], [0.5, 0.9])], NAMES)
    assert r2["per_class"]["chair"]["ap50"] < 1.0
    assert r2["per_class"]["table"]["ap50"] == 0.0       # ground truth, no prediction: 0, not NaN


def test_nan_without_ground_truth_and_small_predictions_dropped():
    lab, inst = _scene(sizes=(200,), labels=(2,), void=0)
    r = evaluate_instances([SceneInstances(lab, inst, [inst == 0], [2], [1.0])], NAMES)
    assert np.isnan(r["per_class"]["table"]["ap"]) and np.isnan(r["per_class"]["table"]["ap50"])
    assert r["ap"] == pytest.approx(1.0)  # NaN classes do not enter the mean
    tiny = np.zeros(len(lab), bool)
    tiny[:99] = True
    r = evaluate_instances([SceneInstances(lab, inst, [tiny], [2], [1.0])], NAMES, min_region_size=100)
    assert r["per_class"]["chair"]["predictions"] == 0 and r["ap"] == 0.0


def test_class_agnostic_ignores_labels_and_per_class_needs_them():
    lab, inst = _scene()
    s = SceneInstances(lab, inst, [inst == 0, inst == 1], [3, 2], [0.9, 0.8])  # labels swapped
    assert evaluate_instances([s], NAMES)["ap"] == 0.0
    r = evaluate_instances([s], NAMES, class_agnostic=True)
    assert r["classes"] == ["object"] and r["ap"] == pytest.approx(1.0)
    s_nolabel = SceneInstances(lab, inst, [inst == 0], None, [1.0])
    # one of the two objects found (recall 1/2 at precision 1): curve points (1, 1/2), (1, 0) -> 1/2
    assert evaluate_instances([s_nolabel], NAMES, class_agnostic=True)["ap25"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="pred_labels"):
        evaluate_instances([s_nolabel], NAMES)


def test_several_scenes_pool_before_the_curve():
    lab, inst = _scene(sizes=(200,), labels=(2,), void=0)
    hit = SceneInstances(lab, inst, [inst == 0], [2], [0.9])
    miss = SceneInstances(lab, inst, [], np.zeros(0, int), np.zeros(0))
    r = evaluate_instances([hit, miss], NAMES)
    # one TP (recall 1/2 at precision 1): curve (1, 1/2), (1, 0): steps (1/2-1/2)/2... = 0 + 1/4 + 1/4
    assert r["ap50"] == pytest.approx(0.5)


def test_bad_inputs():
    lab, inst = _scene()
    with pytest.raises(ValueError, match="scores"):
        SceneInstances(lab, inst, [inst == 0], [2], [0.1, 0.2])
    with pytest.raises(ValueError, match="mask of shape"):
        SceneInstances(lab, inst, [np.ones(3, bool)], [2], [0.1])
    with pytest.raises(ValueError, match="outside"):
        SceneInstances(lab, inst, [np.array([0, 10_000])], [2], [0.1])


def test_prediction_ids_do_not_collide_across_scenes():
    lab, inst = _scene(sizes=(200,), labels=(2,), void=0)
    a = SceneInstances(lab, inst, [inst == 0], [2], [0.9])
    b = SceneInstances(lab, inst, [inst == 0], [2], [0.8])  # prediction 0 of another scene
    r = evaluate_instances([a, b], NAMES)
    assert r["ap50"] == pytest.approx(1.0)
