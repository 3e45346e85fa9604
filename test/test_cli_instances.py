"""`sas segment --instances` and `sas eval --instances` end to end (tiny random checkpoint, synthetic room)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sas_core.eval.instances import SceneInstances, evaluate_instances  # noqa: E402
from sas_core.io import read_ply  # noqa: E402
from sas_core.nn import build_model, save_checkpoint  # noqa: E402
from sas_core.text import SCANNET_20, SyntheticTextEncoder  # noqa: E402


def run_sas(capsys, *args):
    from sas_app import cli

    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _boxes(n_per=300, seed=0):
    """Three boxes' surfaces side by side on nothing: positions, labels (chair, table, chair), instance ids."""
    rng = np.random.default_rng(seed)
    pts, lab, ins = [], [], []
    for i, (x, c) in enumerate(((0.0, 4), (1.0, 6), (2.0, 4))):
        p = rng.random((n_per, 3)) * 0.4
        face = rng.integers(0, 3, n_per)
        p[np.arange(n_per), face] = rng.integers(0, 2, n_per) * 0.4  # points on the box faces
        pts.append(p + [x, 0, 0])
        lab += [c] * n_per
        ins += [i] * n_per
    return np.concatenate(pts).astype(np.float32), np.array(lab), np.array(ins)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    enc = SyntheticTextEncoder(dim=32)
    save_checkpoint(path, build_model("MinkUNet14A", 3, 32), {"voxel_size": 0.05, "text_encoder": enc.config()})
    return path


def test_segment_instances_then_eval_instances(tmp_path, ckpt, capsys):
    pts, lab, ins = _boxes()
    torch.save((pts, np.zeros_like(pts), lab, ins), tmp_path / "scene.pth")
    np.savez(tmp_path / "gt.npz", labels=lab, instances=ins)
    code, out, err = run_sas(capsys, "segment", ckpt, tmp_path / "scene.pth", "--out", tmp_path / "seg.ply",
                             "--instances", "--instance-min-points", 50, "--instance-feature-cosine", -1.0)
    assert code == 0, err
    ply = read_ply(tmp_path / "seg.ply")
    doc = json.loads((tmp_path / "seg.instances.json").read_text())
    assert doc["format"] == "sas-instances/1" and doc["points"] == len(pts)
    # feature cosine -1 joins every adjacent superpoint: the three separate boxes are the three instances
    assert len(doc["instances"]) == 3
    for rec in doc["instances"]:
        idx = np.array(rec["indices"])
        assert np.all(ply["instance"][idx] == rec["id"]) and rec["points"] == len(idx)
        assert len(np.unique(ins[idx])) == 1
        assert np.allclose(rec["aabb_min"], pts[idx].min(0), atol=1e-3)
    assert "3 instances" in out
    code, out, err = run_sas(capsys, "eval", "--instances", "--pred", tmp_path / "seg.ply", "--gt", tmp_path / "gt.npz",
                             "--json", tmp_path / "m.json", "--markdown", tmp_path / "m.md")
    assert code == 0, err
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["class_agnostic"]["ap"] == pytest.approx(1.0)  # the boxes are found exactly
    masks = [np.array(r["indices"]) for r in doc["instances"]]
    labels = [int(np.bincount(ply["label"][i]).argmax()) for i in masks]
    ref = evaluate_instances([SceneInstances(lab, ins, masks, labels, [r["score"] for r in doc["instances"]])],
                             SCANNET_20)
    assert m["per_class"]["ap"] == pytest.approx(ref["ap"])
    assert "| mean |" in (tmp_path / "m.md").read_text()
    # the same through --checkpoint --data (instance ids in the .pth's 4th element)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "scene.pth").write_bytes((tmp_path / "scene.pth").read_bytes())
    code, out, err = run_sas(capsys, "eval", "--instances", "--checkpoint", ckpt, "--data", tmp_path / "val",
                             "--instance-min-points", 50, "--instance-feature-cosine", -1.0,
                             "--json", tmp_path / "m2.json")
    assert code == 0, err
    assert json.loads((tmp_path / "m2.json").read_text())["class_agnostic"]["ap"] == pytest.approx(1.0)


def test_eval_instances_errors(tmp_path, capsys):
    pts, lab, ins = _boxes(120)
    torch.save((pts, np.zeros_like(pts), lab), tmp_path / "noinst.pth")
    from sas_core.io import write_ply

    write_ply(tmp_path / "p.ply", pts, labels=lab)
    code, out, err = run_sas(capsys, "eval", "--instances", "--pred", tmp_path / "p.ply", "--gt", tmp_path / "noinst.pth")
    assert code == 1 and "instance" in err and "Traceback" not in err
    write_ply(tmp_path / "p2.ply", pts, labels=lab, instance=ins.astype(np.int32))
    code, out, err = run_sas(capsys, "eval", "--instances", "--pred", tmp_path / "p2.ply", "--gt",
                             tmp_path / "noinst.pth")
    assert code == 1 and "--instance-gt" in err
    (tmp_path / "ids").mkdir()
    np.save(tmp_path / "ids" / "noinst.npy", ins)
    code, out, err = run_sas(capsys, "eval", "--instances", "--pred", tmp_path / "p2.ply", "--gt",
                             tmp_path / "noinst.pth", "--instance-gt", tmp_path / "ids")
    assert code == 0, err
    assert "class-agnostic: AP 100.0" in out


def test_eval_instances_on_a_synthetic_room(tmp_path, capsys):
    code, out, err = run_sas(capsys, "eval", "--instances", "--synthetic", 3, "--frames", 12,
                             "--json", tmp_path / "s.json")
    assert code == 0, err
    m = json.loads((tmp_path / "s.json").read_text())
    assert m["synthetic"] is True and m["masks"] == "teacher"
    assert m["class_agnostic"]["ap25"] > 0.5 and "chair" in m["per_class"]["per_class"]
