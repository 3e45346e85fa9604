"""`sas bench generalise` on a tiny setting: every row x N, cached rooms reused, the 2D-3D ensemble."""

import json

import numpy as np
import pytest
import torch

from sas_app.bench import generalise


def test_ensemble_takes_the_feature_with_the_higher_text_score():
    text = torch.eye(3)
    fused = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    mask = np.array([True, True, False, True])
    feats3d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    labels, share = generalise.ensemble_labels(fused, mask, feats3d, text)
    # point 0: 2D cos 0.99 < 3D 1.0 -> 3D (2); point 1: 2D 0.93 < 1 -> 3D; point 2: no fused -> 3D;
    # point 3: 2D cos 1.0 > 3D 0.71 -> 2D (1)
    assert labels.tolist() == [2, 2, 1, 1]
    assert share == pytest.approx(0.25)


@pytest.mark.slow
def test_generalise_bench_tiny_and_cached(tmp_path):
    argv = ["--quick", "--rooms", "1", "2", "--test-rooms", "1", "--own-map-rooms", "1", "--epochs", "2",
            "--no-augment", "--cache", str(tmp_path / "cache"), "--tesd-variant", "alpha=0.5,start=0.5"]
    first = generalise.main(argv)
    assert first["synthetic"] and first["rooms"] == [1, 2] and first["rooms_generated"] == 3  # 2 pool + 1 held
    keys = {(r["setting"], r["key"], r["n_rooms"]) for r in first["rows"]}
    for n in (1, 2):
        for key in ("teacher_a", "teacher_b", "add", "linear", "capability", "pixel_point", "sp", "sp_tesd",
                    "sp_tesd[alpha=0.5,start=0.5]", "ensemble"):
            assert ("held_out", key, n) in keys
        assert ("own_map", "sp_tesd", n) in keys
    for r in first["rows"]:
        assert 0.0 <= r["miou"] <= 100.0 and r["miou_per_seed"] and r["seeds"] == [0]
        assert 0.0 <= r["overall_acc_per_seed"][0] <= 100.0 and 0 <= r["classes_lost_per_seed"][0] <= 20
    by = {(r["setting"], r["key"], r["n_rooms"]): r["miou"] for r in first["rows"]}
    # the held-out rooms are the same for every N: the 2D rows do not change with N
    assert by[("held_out", "capability", 1)] == by[("held_out", "capability", 2)]
    assert first["goal"]["n_rooms"] == 2
    assert first["goal"]["sp_tesd_minus_capability"] == pytest.approx(
        by[("held_out", "sp_tesd", 2)] - by[("held_out", "capability", 2)])
    runs = {r["n"]: r for r in first["runs"]}
    curve = runs[2]["training_curves"]["sp_tesd"]  # 2 epochs, TESD in the last 30 %: the second one
    assert [c["tesd"] for c in curve] == [False, True] and "tesd_fit" not in curve[0]
    assert all(0.0 <= curve[1][k] <= 1.0 for k in ("tesd_fit", "tesd_pseudo_acc", "tesd_net_acc"))
    assert "tesd_fit" not in runs[2]["training_curves"]["sp"][-1] and "point" in runs[2]["training_curves"]["sp"][-1]
    assert runs[1]["steps_per_row"] == 2 and runs[2]["steps_per_row"] == 4 and runs[2]["distill_s"] > 0
    assert first["per_class_held_out"] and all(c["diagonal_m"] > 0 for c in first["per_class_held_out"])
    json.dumps(first)  # plain JSON
    assert "N = 1" in generalise.format_markdown(first)
    # a rerun only distils: nothing is generated, the 2D rows are the same numbers
    second = generalise.main(argv)
    assert second["rooms_generated"] == 0
    by2 = {(r["setting"], r["key"], r["n_rooms"]): r["miou"] for r in second["rows"]}
    for key in ("teacher_a", "add", "capability"):
        assert by2[("held_out", key, 2)] == by[("held_out", key, 2)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="--rooms"):
        generalise.main(["--rooms", "0"])
    with pytest.raises(SystemExit):
        generalise.main(["--epochs", "2", "--steps", "4"])  # one schedule or the other


def test_tesd_variant_specs():
    assert generalise.parse_variant("alpha=0.5") == ("sp_tesd[alpha=0.5]", {"tesd_alpha": 0.5})
    key, over = generalise.parse_variant("weight=0.1, start=0.5")
    assert key == "sp_tesd[start=0.5,weight=0.1]" and over == {"stage2_fraction": 0.5, "tesd_weight": 0.1}
    for bad in ("beta=1", "alpha", "alpha=x", ""):
        with pytest.raises(ValueError, match="tesd-variant"):
            generalise.parse_variant(bad)


def _part(seed, values):
    """A bench result of one seed: rows (setting, key) -> mIoU at N = 4."""
    rows = [{"setting": st, "key": k, "group": "g", "method": k, "n_rooms": 4, "miou": v, "miou_std": 0.0,
             "miou_per_seed": [v], "seeds": [seed]} for (st, k), v in values.items()]
    return {"rooms": [4], "test_rooms": 2, "own_map_rooms": 2, "schedule": "8 steps per row", "sensor": "none",
            "augment": True, "input_color": False, "voxel_size": 0.1, "quick": False, "lr": 0.01,
            "lr_schedule": "linear", "tesd_alpha": 0.9, "tesd_start": 0.3, "tesd_weight": 1.0, "tesd_variants": {},
            "pixel_point": True, "seeds": [seed], "rows": rows, "rooms_generated": 1, "seconds": 10.0 + seed,
            "runs": [{"n": 4, "seed": seed, "epochs": 2, "distill_s": 5.0, "steps_per_row": 8}]}


def test_merge_joins_seeds_and_recomputes_the_goal():
    a = _part(1, {("held_out", "capability"): 40.0, ("held_out", "pixel_point"): 30.0, ("held_out", "sp"): 38.0,
                  ("held_out", "sp_tesd"): 44.0, ("own_map", "sp_tesd"): 50.0})
    b = _part(0, {("held_out", "capability"): 40.0, ("held_out", "pixel_point"): 32.0, ("held_out", "sp"): 42.0,
                  ("held_out", "sp_tesd"): 38.0, ("own_map", "sp_tesd"): 40.0})
    m = generalise.merge_results([a, b])
    by = {(r["setting"], r["key"]): r for r in m["rows"]}
    sp_tesd = by[("held_out", "sp_tesd")]
    assert sp_tesd["seeds"] == [0, 1] and sp_tesd["miou_per_seed"] == [38.0, 44.0]  # sorted by seed
    assert sp_tesd["miou"] == pytest.approx(41.0) and sp_tesd["miou_std"] == pytest.approx(3.0)
    assert m["seeds"] == [0, 1] and [r["seed"] for r in m["runs"]] == [0, 1] and m["seconds"] == 11.0
    # means 31 < 40 < 41 and 41 >= capability 40: reached on the means, though seed 0 alone would not be
    assert m["goal"]["sp_tesd_minus_capability"] == pytest.approx(1.0) and m["goal"]["reached"]
    assert m["own_map_minus_held_out"][4]["sp_tesd"] == pytest.approx(45.0 - 41.0)
    # the paired per-seed differences behind the means (seed 0 first): SP+TESD - SP is -4 and +6
    tesd = m["goal"]["paired"]["sp_tesd-sp"]
    assert tesd["seeds"] == [0, 1] and tesd["per_seed"] == pytest.approx([-4.0, 6.0]) and tesd["wins"] == 1
    assert tesd["mean"] == pytest.approx(1.0) and tesd["sem"] == pytest.approx(5.0)  # stdev 7.07 / sqrt 2
    assert m["goal"]["paired"]["sp-pixel_point"]["per_seed"] == pytest.approx([10.0, 8.0])
    assert set(m["goal"]["paired"]) == {"sp_tesd-capability", "sp-capability", "sp-pixel_point", "sp_tesd-sp"}
    text = generalise.format_markdown(m)
    assert "N = 4" in text and "- sp_tesd - sp: +1.0 ± 5.0 (1 of 2)" in text
    with pytest.raises(ValueError, match="seeds repeat"):
        generalise.merge_results([a, {**a, "rows": [{**r, "miou_per_seed": [r["miou"] + 1]} for r in a["rows"]]}])
    # the rows of one seed split over two processes: the 2D row is in both (same value), the 3D rows in one
    pp = _part(0, {("held_out", "capability"): 40.0, ("held_out", "pixel_point"): 32.0})
    rest = _part(0, {("held_out", "capability"): 40.0, ("held_out", "sp"): 42.0, ("held_out", "sp_tesd"): 38.0})
    rest["runs"][0]["distill_s"] = 9.0
    pp["runs"][0]["training_curves"] = {"pixel_point": [{"epoch": 2, "point": 0.5}]}
    rest["runs"][0]["training_curves"] = {"sp": [{"epoch": 2, "point": 0.4}]}
    one = generalise.merge_results([pp, rest])
    assert {r["key"]: r["miou_per_seed"] for r in one["rows"]} == {"capability": [40.0], "pixel_point": [32.0],
                                                                   "sp": [42.0], "sp_tesd": [38.0]}
    assert len(one["runs"]) == 1 and one["runs"][0]["distill_s"] == 9.0  # the parts ran at the same time
    assert set(one["runs"][0]["training_curves"]) == {"pixel_point", "sp"}  # every part's rows
    assert one["goal"]["ordering_pixel_point_lt_sp_lt_sp_tesd"] is False
    # a merged result merges again: the same as merging its parts with the new one at once
    c2 = _part(2, {("held_out", "capability"): 40.0, ("held_out", "pixel_point"): 31.0, ("held_out", "sp"): 40.0,
                   ("held_out", "sp_tesd"): 41.0, ("own_map", "sp_tesd"): 45.0})
    again, at_once = generalise.merge_results([m, c2]), generalise.merge_results([a, b, c2])
    assert again["rows"] == at_once["rows"] and again["goal"] == at_once["goal"]
    assert again["merged_parts"] == 3 and again["seconds_per_part"] == at_once["seconds_per_part"]
    assert again["rows_3d"] == at_once["rows_3d"] and len(again["load_average_start"]) == 3
    # a result from before tesd_temperature was recorded ran with its default, 0.07
    assert generalise.merge_results([{**a, "tesd_temperature": 0.07}, b])["seeds"] == [0, 1]
    with pytest.raises(ValueError, match="tesd_temperature"):
        generalise.merge_results([{**a, "tesd_temperature": 0.0}, b])
    c = {**_part(2, {("held_out", "capability"): 1.0}), "schedule": "9 steps per row"}
    with pytest.raises(ValueError, match="schedule"):
        generalise.merge_results([a, c])


def test_merge_keeps_the_per_seed_accuracy_and_lost_classes_of_every_row():
    a = _part(1, {("held_out", "capability"): 40.0, ("held_out", "sp"): 38.0, ("held_out", "sp_tesd"): 36.0})
    b = _part(0, {("held_out", "capability"): 40.0, ("held_out", "sp"): 42.0, ("held_out", "sp_tesd"): 38.0})
    for part, acc, lost in ((a, 70.0, 2), (b, 75.0, 3)):
        for r in part["rows"]:
            r["overall_acc_per_seed"], r["classes_lost_per_seed"] = [acc + (r["key"] == "sp_tesd")], [lost]
    b["rows"] = [{k: v for k, v in r.items() if k != "classes_lost_per_seed"} if r["key"] == "sp" else r
                 for r in b["rows"]]  # a result written before the field existed
    old = _part(0, {("held_out", "capability"): 40.0, ("held_out", "sp"): 42.0})  # the same seed 0 rows, no extras
    m = {r["key"]: r for r in generalise.merge_results([a, b, old])["rows"]}
    assert m["sp_tesd"]["overall_acc_per_seed"] == [76.0, 71.0] and m["sp_tesd"]["classes_lost_per_seed"] == [3, 2]
    assert m["sp"]["overall_acc_per_seed"] == [75.0, 70.0] and m["sp"]["classes_lost_per_seed"] == [None, 2]
