"""Segmenter facade round trip with a tiny randomly initialised MinkUNet, point cloud files, CLI."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sas_core import infer  # noqa: E402
from sas_core.io import read_ply, write_ply  # noqa: E402
from sas_core.nn import build_model, save_checkpoint  # noqa: E402
from sas_core.text import SCANNET_20, SyntheticTextEncoder, UnknownWordError, class_embeddings  # noqa: E402

DIM = 32


def cloud(n=600, seed=0):
    """A floor and a box: (n, 3) float32 points; the last 20 share voxels (5 cm) with the first 20."""
    rng = np.random.default_rng(seed)
    m = n - 20
    floor = np.c_[rng.random((m // 2, 2)) * 1.5, np.full(m // 2, 0.01)]
    box = np.c_[0.5 + rng.random((m - m // 2, 2)) * 0.4, 0.01 + rng.random(m - m // 2) * 0.4]
    pts = np.r_[floor, box]
    centres = (np.floor(pts[:20] / 0.05) + 0.5) * 0.05
    return np.r_[pts, centres].astype(np.float32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    enc = SyntheticTextEncoder(dim=DIM)
    save_checkpoint(path, build_model("MinkUNet14A", 3, DIM), {"voxel_size": 0.05, "text_encoder": enc.config()})
    return path


@pytest.fixture(scope="module")
def seg_and_feats(ckpt):
    seg = infer.Segmenter.from_checkpoint(ckpt)
    pts = cloud()
    return seg, pts, seg.features(pts)


def test_features_labels_and_relevance(seg_and_feats):
    seg, pts, f = seg_and_feats
    assert seg.config.voxel_size == 0.05 and seg.dim == DIM
    assert isinstance(f, torch.Tensor) and f.dtype == torch.float16 and f.shape == (len(pts), DIM)
    np.testing.assert_allclose(f.float().norm(dim=1).numpy(), 1.0, atol=2e-3)
    # points of one voxel share its feature
    assert torch.equal(f[:20], f[-20:])
    assert not torch.equal(f[0], f[1])

    seg.set_vocabulary(SCANNET_20)
    labels, scores = seg.classify(f)
    assert labels.dtype == np.int64 and labels.shape == (len(pts),)
    assert scores.dtype == np.float32 and scores.shape == (len(pts),)
    text = class_embeddings(SyntheticTextEncoder(dim=DIM), SCANNET_20)            # independent
    sim = f.float() @ text.T
    np.testing.assert_array_equal(labels, sim.argmax(1).numpy())
    np.testing.assert_allclose(scores, sim.max(1).values.numpy(), atol=1e-5)
    assert len(np.unique(labels)) > 1
    np.testing.assert_allclose(seg.class_scores(f), sim.numpy(), atol=1e-5)

    rel = seg.relevance(f, "a chair in a scene")
    assert rel.dtype == np.float32 and rel.shape == (len(pts),)
    assert rel.min() >= -1.0 and rel.max() <= 1.0
    np.testing.assert_allclose(rel, sim[:, SCANNET_20.index("chair")].numpy(), atol=1e-5)
    # NumPy features work too
    l2, _ = seg.classify(f.numpy())
    np.testing.assert_array_equal(l2, labels)


def test_custom_vocabulary_and_clear_errors(seg_and_feats):
    seg, _, f = seg_and_feats
    seg.set_vocabulary(["chair", "table", "floor"])
    labels, _ = seg.classify(f)
    assert set(np.unique(labels)) <= {0, 1, 2} and seg.class_names == ("chair", "table", "floor")
    with pytest.raises(UnknownWordError, match="zeppelin"):
        seg.set_vocabulary(["chair", "zeppelin"])
    assert seg.class_names == ("chair", "table", "floor")  # unchanged after the failure
    with pytest.raises(ValueError, match="zeppelin"):
        seg.relevance(f, "a zeppelin")
    with pytest.raises(ValueError, match="duplicate"):
        seg.set_vocabulary(["chair", "chair"])
    with pytest.raises(ValueError, match="empty"):
        seg.features(np.zeros((0, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        seg.features(np.zeros((5, 2), np.float32))
    with pytest.raises(ValueError, match="features must be"):
        seg.classify(np.zeros((4, DIM + 1), np.float32))


def test_checkpoint_errors(tmp_path, ckpt):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        infer.Segmenter.from_checkpoint(tmp_path / "nope.pth")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(ckpt.read_bytes()[:2000])
    with pytest.raises(ValueError, match="corrupt.pth"):
        infer.Segmenter.from_checkpoint(bad)
    junk = tmp_path / "junk.pth"
    torch.save({"weights": torch.zeros(3)}, junk)
    with pytest.raises(ValueError, match="junk.pth"):
        infer.Segmenter.from_checkpoint(junk)
    # no text encoder stored: features work, vocabulary needs one
    plain = tmp_path / "plain.pth"
    save_checkpoint(plain, build_model("MinkUNet14A", 3, DIM), {"voxel_size": 0.05})
    seg = infer.Segmenter.from_checkpoint(plain)
    with pytest.raises(ValueError, match="text encoder"):
        seg.set_vocabulary(["chair"])
    with pytest.raises(ValueError, match="dims"):
        infer.Segmenter.from_checkpoint(plain, text_encoder=SyntheticTextEncoder(dim=16)).set_vocabulary(["chair"])
    with pytest.raises(ValueError, match="set_vocabulary"):
        seg.classify(np.zeros((2, DIM), np.float32))


def test_tiled_inference_matches_one_pass(seg_and_feats):
    seg, pts, f = seg_and_feats
    n_voxels = len(np.unique(np.floor(pts / 0.05), axis=0))
    # 3 x-y tiles; margins wider than the scene give every tile full context: identical outputs
    cfg = infer.InferenceConfig(max_voxels=n_voxels - 1, chunk_margin=1000)
    tiled = infer.Segmenter(seg.model, voxel_size=0.05, config=cfg)
    calls = []
    forward = tiled._forward
    tiled._forward = lambda c, x: calls.append(len(c)) or forward(c, x)
    ft = tiled.features(pts)
    assert len(calls) >= 2
    np.testing.assert_allclose(ft.float().numpy(), f.float().numpy(), atol=2e-3)


def test_bf16_precision_on_cpu_and_clear_errors(seg_and_feats, ckpt, tmp_path, capsys):
    seg, pts, f = seg_and_feats
    low = infer.Segmenter(seg.model, voxel_size=0.05, config=infer.InferenceConfig(precision="bf16"))
    fb = low.features(pts)
    assert fb.dtype == f.dtype and fb.shape == f.shape
    assert low._bf16_model is not None and next(low._bf16_model.parameters()).dtype == torch.bfloat16
    assert next(seg.model.parameters()).dtype == torch.float32          # the fp32 model is untouched
    cos = torch.nn.functional.cosine_similarity(fb.float(), f.float(), dim=1)
    assert cos.min() > 0.98 and not torch.equal(fb, f)                 # bf16 really ran, close to fp32
    with pytest.raises(ValueError, match="fp16 runs on CUDA only"):
        infer.Segmenter(seg.model, config=infer.InferenceConfig(precision="fp16"))
    with pytest.raises(ValueError, match="precision must be one of"):
        infer.Segmenter(seg.model, config=infer.InferenceConfig(precision="int8"))
    np.save(tmp_path / "c.npy", pts)
    code, out, err = run_sas(capsys, "segment", ckpt, tmp_path / "c.npy", "--precision", "bf16",
                             "--out", tmp_path / "s.ply")
    assert code == 0, err
    ref = infer.Segmenter.from_checkpoint(ckpt)
    ref.set_vocabulary(SCANNET_20)
    assert np.mean(np.load(tmp_path / "s.npy") == ref.classify(ref.features(pts))[0]) > 0.9


def test_openscene_ensemble_rule():
    text = torch.eye(3)[:2]                                     # 2 classes in a 3-d space
    f3 = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.5, 0.7], [0.0, 0.2, 1.0]])
    f2 = torch.tensor([[0.0, 0.8, 0.0], [0.0, 1.0, 0.1], [0.0, 0.0, 0.0]])
    out, use_2d = infer.ensemble_features(f3, f2, text)
    # best class score after normalisation: point 0: 3D 0.994 < 2D 1.000 -> 2D;
    # point 1: 3D 0.506 < 2D 0.995 -> 2D; point 2: 2D is zero (score 0) < 3D 0.196 -> 3D
    np.testing.assert_array_equal(use_2d, [True, True, False])
    assert torch.equal(out[2].float(), f3[2].half().float()) and torch.equal(out[1].float(), f2[1].half().float())
    _, use_2d = infer.ensemble_features(f3, f2, text, mask=np.array([False, True, True]))
    np.testing.assert_array_equal(use_2d, [False, True, False])


def test_point_cloud_files(tmp_path):
    pts = cloud(50)
    cols = np.random.default_rng(0).random((50, 3)).astype(np.float32)
    labels = np.arange(50) % 3
    write_ply(tmp_path / "a.ply", pts, colors=cols, labels=labels)
    pc = infer.load_point_cloud(tmp_path / "a.ply")
    np.testing.assert_allclose(pc.positions, pts)
    np.testing.assert_allclose(pc.colors, cols, atol=1 / 255)
    np.testing.assert_array_equal(pc.labels, labels)
    torch.save((pts, cols * 2 - 1, labels), tmp_path / "scene0000_00.pth")
    pc = infer.load_point_cloud(tmp_path / "scene0000_00.pth")
    np.testing.assert_allclose(pc.colors, cols, atol=1e-6)
    np.testing.assert_array_equal(pc.labels, labels)
    np.save(tmp_path / "b.npy", np.c_[pts, cols * 255])
    pc = infer.load_point_cloud(tmp_path / "b.npy")
    np.testing.assert_allclose(pc.colors, cols, atol=1e-6)
    (tmp_path / "x.xyz").write_text("1 2 3")
    with pytest.raises(ValueError, match="unsupported"):
        infer.load_point_cloud(tmp_path / "x.xyz")
    np.save(tmp_path / "nan.npy", np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="NaN"):
        infer.load_point_cloud(tmp_path / "nan.npy")
    (tmp_path / "bad.pth").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="bad.pth"):
        infer.load_point_cloud(tmp_path / "bad.pth")


def test_parse_vocabulary(tmp_path):
    from sas_core.text import MATTERPORT_160, parse_vocabulary

    assert not hasattr(infer, "parse_vocabulary")  # one home: sas_core.text
    assert parse_vocabulary("scannet20") == SCANNET_20 and parse_vocabulary("Matterport-160") == MATTERPORT_160
    assert parse_vocabulary(" chair, table ,lamp") == ("chair", "table", "lamp")
    assert parse_vocabulary("chair,") == ("chair",)
    assert parse_vocabulary(["chair", "sofa"]) == ("chair", "sofa")
    f = tmp_path / "v.txt"
    f.write_text("# mine\nchair\n\nsofa\n")
    assert parse_vocabulary(str(f)) == ("chair", "sofa")
    for typo in ("scanet20", "chair"):  # never a one-class vocabulary named like the typo
        with pytest.raises(ValueError, match="unknown vocabulary"):
            parse_vocabulary(typo)
    with pytest.raises(ValueError, match="duplicate class names.*chair"):
        parse_vocabulary("chair,sofa,chair")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        parse_vocabulary(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="empty vocabulary"):
        parse_vocabulary("  ")
    with pytest.raises(ValueError, match="no class names"):
        parse_vocabulary(",,")


def run_sas(capsys, *args):
    """Run the CLI in this process (no torch re-import): (exit code, stdout, stderr)."""
    from sas_app import cli

    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_segment_query_eval(tmp_path, ckpt, capsys):
    pts = cloud(400)
    gt = np.where(pts[:, 2] > 0.02, 4, 1).astype(np.int64)  # chair above the floor (ScanNet-20 indices)
    gt[:10] = 255                                            # some unlabelled points
    torch.save((pts, np.zeros_like(pts), gt), tmp_path / "scene.pth")
    code, out, err = run_sas(capsys, "segment", ckpt, tmp_path / "scene.pth", "--vocab", "scannet20",
                             "--out", tmp_path / "seg.ply")
    assert code == 0, err
    ply = read_ply(tmp_path / "seg.ply")
    labels = np.load(tmp_path / "seg.npy")
    assert labels.shape == (400,) and np.array_equal(ply["label"], labels) and labels.max() < 20
    code, out, err = run_sas(capsys, "query", "a chair", "--checkpoint", ckpt, "--cloud", tmp_path / "scene.pth",
                             "--out", tmp_path / "rel.ply", "--top", 3)
    assert code == 0, err
    rel = read_ply(tmp_path / "rel.ply")
    assert rel["score"].shape == (400,) and rel["score"].max() <= 1 and "red" in rel
    assert len([ln for ln in out.splitlines() if ln.strip().startswith(("1.", "2.", "3."))]) == 3
    code, out, err = run_sas(capsys, "eval", "--pred", tmp_path / "seg.npy", "--gt", tmp_path / "scene.pth",
                             "--vocab", "scannet20", "--json", tmp_path / "m.json")
    assert code == 0, err
    assert "mIoU" in out
    import json

    m = json.loads((tmp_path / "m.json").read_text())
    from sas_core.eval import evaluate

    assert m["miou"] == pytest.approx(evaluate(labels, gt, SCANNET_20)["miou"])
    code, out, err = run_sas(capsys, "segment", ckpt, tmp_path / "scene.pth", "--vocab", "chair,zeppelin",
                             "--out", tmp_path / "x.ply")
    assert code == 1 and "zeppelin" in err and "Traceback" not in err
    code, out, err = run_sas(capsys, "query", "a chair")
    assert code == 1 and "--checkpoint" in err


def test_cli_eval_checkpoint_over_a_folder(tmp_path, ckpt, capsys):
    """`sas eval --checkpoint --data`: fusion features with missing points count as 256 (no feature)."""
    from sas_core.data.fused_features import save_fused_features

    pts = cloud(200)
    gt = np.where(pts[:, 2] > 0.02, 4, 1).astype(np.int64)
    (tmp_path / "val").mkdir()
    torch.save((pts, np.zeros_like(pts), gt), tmp_path / "val" / "s1.pth")
    mask = np.arange(len(pts)) % 4 != 0
    text = class_embeddings(SyntheticTextEncoder(dim=DIM), SCANNET_20)
    feat = text[gt[mask]].half()                                  # perfect 2D features where visible
    save_fused_features(tmp_path / "fused" / "s1_0.pt", feat, torch.from_numpy(mask))
    code, out, err = run_sas(capsys, "eval", "--checkpoint", ckpt, "--data", tmp_path / "val", "--fused",
                             tmp_path / "fused", "--feature-type", "fusion", "--json", tmp_path / "m.json")
    assert code == 0, err
    import json

    m = json.loads((tmp_path / "m.json").read_text())
    assert m["no_feature_points"] == int((~mask).sum())
    # visible points all right: IoU 1 (no-feature points left out), accuracy = visible share
    assert m["per_class"]["chair"]["iou"] == pytest.approx(1.0)
    assert m["per_class"]["chair"]["acc"] == pytest.approx(np.mean(mask[gt == 4]))


def test_cli_eval_long_tail(tmp_path, capsys):
    """Matterport K=21/40 from one set of (fused) features: each K classifies with its own vocabulary."""
    from sas_core.data.fused_features import save_fused_features
    from sas_core.text import MATTERPORT_21, MATTERPORT_40, MATTERPORT_160

    enc = SyntheticTextEncoder(vocabulary=tuple(dict.fromkeys(MATTERPORT_21 + MATTERPORT_160)), dim=DIM)
    ckpt = tmp_path / "mp.pth"
    save_checkpoint(ckpt, build_model("MinkUNet14A", 3, DIM), {"voxel_size": 0.05, "text_encoder": enc.config()})
    pts = cloud(200)
    names = np.array(["wall", "floor", "chair", "table"])[np.arange(len(pts)) % 4]
    gt21 = np.array([MATTERPORT_21.index(n) for n in names])
    gt40 = np.array([MATTERPORT_40.index(n) for n in names])
    gt40[:8] = 255
    for k, gt in ((21, gt21), (40, gt40)):
        d = tmp_path / ("matterport_3d" if k == 21 else f"matterport_3d_{k}") / "test"
        d.mkdir(parents=True)
        torch.save((pts, np.zeros_like(pts), gt), d / "s1.pth")
    text = class_embeddings(enc, MATTERPORT_21)
    mask = np.ones(len(pts), bool)
    mask[-10:] = False
    save_fused_features(tmp_path / "fused" / "s1_0.pt", text[gt21[mask]].half(), torch.from_numpy(mask))
    code, out, err = run_sas(capsys, "eval", "--checkpoint", ckpt, "--data", tmp_path, "--long-tail",
                             "--fused", tmp_path / "fused", "--feature-type", "fusion", "--json", tmp_path / "lt.json")
    assert code == 0, err
    import json

    m = json.loads((tmp_path / "lt.json").read_text())["long_tail"]
    assert sorted(m) == ["21", "40"]
    for k in ("21", "40"):
        assert m[k]["miou_present"] == pytest.approx(1.0)        # IoU leaves no-feature points out
        assert m[k]["macc_present"] < 1.0                         # accuracy counts them as wrong
        assert m[k]["no_feature_points"] == 10 - (k == "40") * int((~mask[:8]).sum())
    assert m["40"]["points"] == len(pts) - 8
    assert m["40"]["groups"]["head"]["classes"] == 4 and "| 40 |" in out
