"""`sas synth --gaussians`, `sas segment --gaussians`, `sas eval --gaussians`, `sas bench gaussians`."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sas_core.data.gaussians import load_views, read_gaussians  # noqa: E402
from sas_core.text import SCANNET_20  # noqa: E402

DIM = 32


def run_sas(capsys, *args):
    from sas_app import cli

    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from sas_core.nn import build_model, save_checkpoint
    from sas_core.text import SyntheticTextEncoder

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(path, build_model("MinkUNet14A", 3, DIM),
                    {"voxel_size": 0.1, "text_encoder": SyntheticTextEncoder(dim=DIM).config()})
    return path


def test_synth_segment_eval_gaussians(tmp_path, ckpt, capsys):
    from sas_core.data.openscene import read_pth
    from sas_core.eval.gaussians import evaluate_gaussians
    from sas_core.viz import label_colors

    w = tmp_path / "world"
    code, out, err = run_sas(capsys, "synth", "--out", w, "--frames", 4, "--width", 64, "--height", 48,
                             "--points-per-m2", 20, "--no-lidar", "--no-bag", "--gaussians", "--gaussian-points-per-m2", 40)
    assert code == 0, err
    name = "synth_00000"
    splat = w / "gaussians" / f"{name}.ply"
    assert "Gaussian splat" in out and splat.is_file()
    g = read_gaussians(splat)
    views = load_views(w / "gaussians" / f"{name}_views.npz")
    assert len(views) == 4 and views.labels.shape == (4, 48, 64)
    pts, _, labels = read_pth(w / "openscene_gaussians" / "train" / f"{name}.pth")
    np.testing.assert_allclose(pts, g.positions, atol=1e-6)  # the centres, for `sas fuse` / `sas distill`
    assert (w / "openscene_gaussians" / "2d" / name / "pose").is_dir()
    manifest = json.loads((w / "synth.json").read_text())
    assert manifest["scenes"][0]["n_gaussians"] == len(g)

    code, out, err = run_sas(capsys, "segment", ckpt, splat, "--gaussians", "--out", tmp_path / "seg.ply")
    assert code == 0, err
    seg = read_gaussians(tmp_path / "seg.ply")
    lab = np.load(tmp_path / "seg.npy")
    np.testing.assert_array_equal(seg.labels, lab)
    assert seg.labels.max() < 20 and seg.scores.shape == (len(g),)
    np.testing.assert_allclose(seg.base_colors() * 255, label_colors(lab), atol=1e-3)
    np.testing.assert_array_equal(seg.positions, g.positions)
    np.testing.assert_array_equal(seg.scales, g.scales)

    code, out, err = run_sas(capsys, "eval", "--gaussians", "--pred", tmp_path / "seg.ply", "--gt",
                             w / "gaussians" / f"{name}_views.npz", "--json", tmp_path / "m.json",
                             "--render-dir", tmp_path / "render")
    assert code == 0, err
    assert "2D mIoU" in out
    m = json.loads((tmp_path / "m.json").read_text())
    expect = evaluate_gaussians([(g, lab, views)], SCANNET_20)
    assert m["miou"] == pytest.approx(expect["miou"]) and m["macc"] == pytest.approx(expect["macc"])
    assert len(list((tmp_path / "render").glob("view_*.png"))) == 4

    # an unlabelled splat, a missing --gt, a point cloud given as a splat: one clear line each
    code, out, err = run_sas(capsys, "eval", "--gaussians", "--pred", splat, "--gt",
                             w / "gaussians" / f"{name}_views.npz")
    assert code == 1 and "no 'label' property" in err and "Traceback" not in err
    code, out, err = run_sas(capsys, "eval", "--gaussians", "--pred", tmp_path / "seg.ply")
    assert code == 1 and "--gt VIEWS.npz" in err
    code, out, err = run_sas(capsys, "segment", ckpt, w / "overview" / f"{name}_labels.ply", "--gaussians",
                             "--out", tmp_path / "x.ply")
    assert code == 1 and "not a 3D Gaussian splat PLY" in err


@pytest.mark.slow
def test_bench_gaussians_quick(capsys):
    from sas_app.bench import gaussians

    r = gaussians.main(["--quick", "--epochs", "2"])
    assert r["synthetic"] and r["seeds"] == [0]
    rows = {row["key"]: row for row in r["rows"]}
    assert set(rows) >= {"gt_labels", "teacher_a", "teacher_b", "capability", "distilled"}
    for row in rows.values():
        assert 0 <= row["miou"] <= 100 and len(row["miou_per_seed"]) == 1
    # the renderer's ceiling beats every labelling from the teachers
    assert rows["gt_labels"]["miou"] > max(rows[k]["miou"] for k in ("teacher_a", "teacher_b", "capability"))
    assert r["margins"]["distilled_vs_best_teacher"]["per_seed"][0] == pytest.approx(
        rows["distilled"]["miou"] - r["best_teacher_miou"])
