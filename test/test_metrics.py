"""OpenScene-protocol metrics against confusion matrices worked out by hand."""

import numpy as np
import pytest

from sas_core.eval import metrics as M


def test_confusion_and_means_by_hand():
    gt = np.array([0, 0, 0, 1, 1, 2, 2, 2, 255, 255])
    pred = np.array([0, 0, 1, 1, 2, 2, 2, 0, 0, 1])
    conf = M.confusion_matrix(pred, gt, 3)
    # rows: ground truth, columns: prediction, last column: no feature
    expected = np.array([[2, 1, 0, 0],
                         [0, 1, 1, 0],
                         [1, 0, 2, 0]])
    np.testing.assert_array_equal(conf, expected)
    r = M.miou_macc(conf, ["a", "b", "c"])
    # class a: tp 2, fp 1, fn 1 -> 2/4 ; b: 1/(1+1+1) ; c: 2/4
    np.testing.assert_allclose(r["iou"], [0.5, 1 / 3, 0.5])
    np.testing.assert_allclose(r["acc"], [2 / 3, 1 / 2, 2 / 3])
    assert r["miou"] == pytest.approx(4 / 9)
    assert r["macc"] == pytest.approx(11 / 18)
    assert r["points"] == 8  # the two 255 points are not evaluated
    assert r["overall_acc"] == pytest.approx(5 / 8)
    assert r["per_class"]["b"] == {"iou": pytest.approx(1 / 3), "acc": 0.5, "points": 2}


def test_no_feature_is_wrong_for_accuracy_and_left_out_of_iou_like_openscene():
    gt = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 256, 256, 1, 1, 1])
    conf = M.confusion_matrix(pred, gt, 2)
    np.testing.assert_array_equal(conf, [[1, 1, 2], [0, 2, 0]])
    r = M.miou_macc(conf)
    # class 0: tp 1, fp 0, fn 1 (the two no-feature points are in neither) -> 1/2; acc 1/4
    # class 1: tp 2, fp 1, fn 0 -> 2/3; acc 1
    np.testing.assert_allclose(r["iou"], [1 / 2, 2 / 3])
    np.testing.assert_allclose(r["acc"], [1 / 4, 1.0])
    assert r["no_feature_points"] == 2
    strict = M.miou_macc(conf, no_feature="wrong")
    np.testing.assert_allclose(strict["iou"], [1 / 4, 2 / 3])  # fn 3 now
    np.testing.assert_allclose(strict["acc"], r["acc"])


def test_absent_class_counts_as_zero_in_openscene_mean_only():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])
    r = M.evaluate(pred, gt, ["a", "b", "c"])
    assert np.isnan(r["iou"][2]) and not r["present"][2]
    np.testing.assert_allclose(r["iou"][:2], [0.5, 1.0])
    assert r["miou"] == r["miou_openscene"] == pytest.approx(1.5 / 3)
    assert r["miou_present"] == pytest.approx(0.75)
    assert r["macc_openscene"] == pytest.approx(0.5)
    assert r["macc_present"] == pytest.approx(0.75)
    assert M.miou_macc(r["confusion"], average="present")["miou"] == pytest.approx(0.75)
    assert "c" not in r["per_class"]


def _openscene_oracle(pred, gt, k):
    """OpenScene's formulas written out independently: confusion[pred, gt], no-feature row cropped."""
    pred = pred.copy()
    keep = gt != 255
    pred[pred == 256] = k
    c = np.zeros((k + 1, k + 1), dtype=np.int64)
    np.add.at(c, (pred[keep], gt[keep]), 1)
    c = c[:k, :k]
    miou = macc = 0.0
    for i in range(k):
        n = (gt == i).sum()
        if n == 0:
            continue
        tp = c[i, i]
        miou += tp / (c[i, :].sum() + c[:, i].sum() - tp)
        macc += tp / n
    return miou / k, macc / k


@pytest.mark.parametrize("seed", range(5))
def test_random_labels_match_openscene_formulas(seed):
    rng = np.random.default_rng(seed)
    k, n = 7, 3000
    gt = rng.integers(0, k, n)
    gt[rng.random(n) < 0.1] = 255
    gt[gt == 3] = 255  # an absent class
    pred = np.where(rng.random(n) < 0.6, gt, rng.integers(0, k, n))
    pred[pred == 255] = 0
    pred[rng.random(n) < 0.05] = 256
    r = M.evaluate(pred, gt, [str(i) for i in range(k)])
    miou, macc = _openscene_oracle(pred, gt, k)
    assert r["miou"] == pytest.approx(miou)
    assert r["macc"] == pytest.approx(macc)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="same length"):
        M.confusion_matrix(np.zeros(3, int), np.zeros(4, int), 2)
    with pytest.raises(ValueError, match="outside"):
        M.confusion_matrix(np.array([0, 5]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="outside"):
        M.confusion_matrix(np.array([0, 1]), np.array([0, 7]), 2)
    with pytest.raises(ValueError, match="integer"):
        M.confusion_matrix(np.array([0.0, 1.0]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="class names"):
        M.miou_macc(np.zeros((2, 3)), ["only one"])


def test_long_tail_groups_and_group_means():
    g = M.long_tail_groups(160)
    assert [len(v) for v in g.values()] == [40, 40, 80]
    assert list(M.long_tail_groups(21)) == ["head"] and len(M.long_tail_groups(21)["head"]) == 21
    gt = np.array([0, 0, 45, 45, 100])
    pred = np.array([0, 1, 45, 0, 3])
    r = M.evaluate(pred, gt, [str(i) for i in range(160)])
    means = M.group_means(r, g)
    # class 0: tp 1, fp 1 (gt 45 -> 0), fn 1 -> 1/3 ; class 45: tp 1, fn 1 -> 1/2 ; class 100: 0
    assert means["head"] == {"miou": pytest.approx(1 / 3), "macc": 0.5, "classes": 1}
    assert means["common"]["miou"] == pytest.approx(0.5)
    assert means["tail"]["miou"] == 0.0


def test_table_and_json():
    r = M.evaluate(np.array([0, 1, 1]), np.array([0, 1, 0]), ["wall", "floor"])
    table = M.format_table(r)
    assert "| wall | 50.0 | 50.0 | 2 |" in table and "| mean |" in table
    js = M.to_json(r)
    import json

    json.dumps(js)
    assert js["miou"] == pytest.approx(r["miou"])
