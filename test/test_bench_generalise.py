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
            "--no-augment", "--cache", str(tmp_path / "cache")]
    first = generalise.main(argv)
    assert first["synthetic"] and first["rooms"] == [1, 2] and first["rooms_generated"] == 3  # 2 pool + 1 held
    keys = {(r["setting"], r["key"], r["n_rooms"]) for r in first["rows"]}
    for n in (1, 2):
        for key in ("teacher_a", "teacher_b", "add", "linear", "capability", "pixel_point", "sp", "sp_tesd",
                    "ensemble"):
            assert ("held_out", key, n) in keys
        assert ("own_map", "sp_tesd", n) in keys
    for r in first["rows"]:
        assert 0.0 <= r["miou"] <= 100.0 and r["miou_per_seed"] and r["seeds"] == [0]
    by = {(r["setting"], r["key"], r["n_rooms"]): r["miou"] for r in first["rows"]}
    # the held-out rooms are the same for every N: the 2D rows do not change with N
    assert by[("held_out", "capability", 1)] == by[("held_out", "capability", 2)]
    assert first["goal"]["n_rooms"] == 2
    assert first["goal"]["sp_tesd_minus_capability"] == pytest.approx(
        by[("held_out", "sp_tesd", 2)] - by[("held_out", "capability", 2)])
    runs = {r["n"]: r for r in first["runs"]}
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
