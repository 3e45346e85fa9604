"""Issue #15 items 1-2: scene-level label guidance (3DSS-VLG) and mask-level distillation (MaskField / XMask3D)."""

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_train import tiny_config, tiny_scenes  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------- scene labels


def test_masked_labels_never_pick_an_absent_class():
    from sas_core.train.scene_labels import MASKED_LOGIT, mask_scores, masked_text_labels
    from sas_core.train.tesd import TemporalEnsemble

    gen = torch.Generator().manual_seed(0)
    k, c, n = 7, 16, 400
    text = torch.nn.functional.normalize(torch.randn(k, c, generator=gen), dim=1)
    best = torch.randint(0, k, (n,), generator=gen)
    feats = text[best] + 0.05 * torch.randn(n, c, generator=gen)  # each row's unmasked argmax is `best`
    allowed = torch.rand(n, k, generator=gen) < 0.4
    allowed[torch.arange(n), (best + 1) % k] = True  # at least one class allowed per row
    allowed[torch.arange(n), best] = False  # ... and the class the row is closest to is absent
    labels, _ = masked_text_labels(feats, text, allowed)
    assert allowed[torch.arange(n), labels].all()
    # among the allowed classes it is still the best one
    scores = torch.nn.functional.normalize(feats, dim=1) @ text.t()
    assert torch.equal(labels, mask_scores(scores, allowed).argmax(1))
    assert float(mask_scores(scores, allowed)[~allowed].max()) == MASKED_LOGIT
    # one (K,) list for every row
    one = torch.zeros(k, dtype=torch.bool)
    one[[2, 5]] = True
    assert set(masked_text_labels(feats, text, one)[0].tolist()) <= {2, 5}
    # TESD pseudo-labels: one list per scene; superpoints never cross scenes
    seg = torch.arange(n) // 10  # 40 superpoints of 10 rows
    scene_allowed = torch.zeros(n, k, dtype=torch.bool)
    scene_allowed[: n // 2, [0, 1]] = True
    scene_allowed[n // 2:, [3, 4, 6]] = True
    for literal in (True, False):
        p, sp = TemporalEnsemble.pseudo_labels(feats, seg, text, point_from_superpoint=literal, allowed=scene_allowed)
        assert scene_allowed[torch.arange(n), p].all()
        assert set(sp[:20].tolist()) <= {0, 1} and set(sp[20:].tolist()) <= {3, 4, 6}
    unmasked, _ = TemporalEnsemble.pseudo_labels(feats, seg, text)
    assert not scene_allowed[torch.arange(n), unmasked].all()  # the lists did change something
    with pytest.raises(ValueError, match="allows no class"):
        masked_text_labels(feats, text, torch.zeros(k, dtype=torch.bool))


def test_scene_label_files_manifest_and_checks(tmp_path):
    from sas_core.train.scene_labels import attach_scene_labels, class_mask, load_scene_labels, scene_list, \
        write_scene_labels

    names = ["wall", "floor", "chair", "table"]
    write_scene_labels(tmp_path, "room0", ["wall", "chair"])
    (tmp_path / "room1.labels.txt").write_text("# a comment\nfloor\n\ntable\n")
    labels = load_scene_labels(tmp_path)
    assert labels == {"room0": ("wall", "chair"), "room1": ("floor", "table")}
    assert load_scene_labels(tmp_path / "room1.labels.txt") == {"room1": ("floor", "table")}
    manifest = tmp_path / "labels.json"
    manifest.write_text(json.dumps({"room0": ["wall"], "room2": ["table", "floor"]}))
    assert load_scene_labels(manifest)["room2"] == ("table", "floor")
    assert class_mask(["chair", "wall"], names).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="outside the vocabulary.*sofa"):
        class_mask(["sofa"], names, "room9")
    manifest.write_text(json.dumps({"room0": "wall"}))
    with pytest.raises(ValueError, match="manifest"):
        load_scene_labels(manifest)
    with pytest.raises(FileNotFoundError):
        load_scene_labels(tmp_path / "nope")
    assert scene_list({"a": ("wall",)}, "anything") == ("wall",)  # a single list applies to any scene
    with pytest.raises(KeyError, match="room7"):
        scene_list(labels, "room7")
    scenes, _ = tiny_scenes(2, 50)
    with pytest.raises(ValueError, match="no scene label list matches"):
        attach_scene_labels(scenes, labels, names)
    assert attach_scene_labels(scenes, {"scene1": ("wall",)}, names) == ["scene0"]
    assert scenes[1].classes == ("wall",) and scenes[0].classes is None


def test_segmenter_classify_keeps_to_the_scene_list():
    from sas_core.infer import Segmenter
    from sas_core.nn import build_model
    from sas_core.text import SyntheticTextEncoder

    names = ["wall", "floor", "chair", "table"]
    seg = Segmenter(build_model("MinkUNet14A", 3, 16), voxel_size=0.1, text_encoder=SyntheticTextEncoder(names, dim=16))
    seg.set_vocabulary(names)
    feats = torch.nn.functional.normalize(seg.text_embeddings.float().repeat(5, 1), dim=1)  # 20 rows, all classes
    labels, _ = seg.classify(feats)
    assert set(labels.tolist()) == {0, 1, 2, 3}
    labels, scores = seg.classify(feats, np.array([False, True, False, True]))
    assert set(labels.tolist()) == {1, 3} and np.isfinite(scores).all()
    with pytest.raises(ValueError, match="do not match"):
        seg.classify(feats, np.array([True, False]))


def test_adapter_specialises_features_towards_the_scene_list():
    from sas_core.train.adapter import AdapterConfig, build_adapter, masked_pseudo_labels, specialize_scenes

    scenes, text = tiny_scenes(2, 300)  # classes a, b, c as x-slabs
    names = ["a", "b", "c"]
    # the scene's list says "a" and "b" only: points of slab c get the better of a / b as pseudo-label
    for s in scenes:
        s.classes = ("a", "b")
    allowed = torch.tensor([True, True, False])
    out, history = specialize_scenes(scenes, text, names, AdapterConfig(epochs=30, lr=5e-2, batch_size=256))
    assert len(history) == 30 and history[-1]["loss"] < history[0]["loss"]
    for before, after in zip(scenes, out):
        x = torch.as_tensor(before.features.astype(np.float32))
        y = torch.as_tensor(after.features.astype(np.float32))
        target = masked_pseudo_labels(x, text, allowed)
        plain_before = masked_pseudo_labels(x, text, None)
        plain_after = masked_pseudo_labels(y, text, None)
        # without any mask at test time the adapted features follow the scene list more often
        assert (plain_after == target).float().mean() > (plain_before == target).float().mean() + 0.1
        assert after.features.shape == before.features.shape and after.features.dtype == np.float16
    # the residual form: alpha = 0 is the identity
    ident = build_adapter(8, AdapterConfig(alpha=0.0))
    v = torch.randn(4, 8)
    assert torch.equal(ident(v), v)
    hidden = [m for m in build_adapter(768).modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in hidden] == [(192, 768), (768, 192)]  # the paper's 768 -> 192 -> 768


# ---------------------------------------------------------------------------------------------- mask loss


def test_mask_loss_by_hand_and_its_gradient_flows():
    from sas_core.train.masks import mask_loss

    f3d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    # mask 0 = rows {0, 1}: pooled (0.5, 0.5) vs target (1, 0) -> 1 - 1/sqrt(2)
    # mask 1 = row {2} twice (two points in one voxel): pooled (1, 1) vs target (0, 2) -> 1 - 1/sqrt(2)
    # mask 2 = rows {0, 2}: pooled (1, 0.5) vs target (1, 0.5) -> 0
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    rows = torch.tensor([0, 1, 2, 2, 0, 2])
    targets = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.5]])
    c = 1 - 1 / math.sqrt(2)
    loss = mask_loss(f3d, ids, rows, targets)
    assert loss.item() == pytest.approx((c + c + 0.0) / 3, abs=1e-6)
    total, count = mask_loss(f3d, ids, rows, targets, reduction="sum")
    assert count == 3 and total.item() == pytest.approx(2 * c, abs=1e-6)
    loss.backward()
    assert f3d.grad is not None and f3d.grad.abs().sum() > 0 and torch.isfinite(f3d.grad).all()
    # the gradient matches finite differences
    eps, base = 1e-3, f3d.detach().double()
    num = torch.zeros_like(base)
    for i in range(3):
        for j in range(2):
            d = torch.zeros_like(base)
            d[i, j] = eps
            num[i, j] = (mask_loss(base + d, ids, rows, targets.double()) - mask_loss(base - d, ids, rows,
                                                                                      targets.double())) / (2 * eps)
    assert torch.allclose(f3d.grad.double(), num, atol=1e-5)


def test_membership_terms_are_finite_and_differentiable():
    from sas_core.train.masks import membership_loss

    gen = torch.Generator().manual_seed(0)
    f3d = torch.randn(20, 8, generator=gen, requires_grad=True)
    ids = torch.tensor([0] * 10 + [1] * 10)
    rows = torch.arange(20)
    focal, dice = membership_loss(f3d, ids, rows, 2)
    assert 0 <= focal.item() and 0 <= dice.item() <= 1
    (focal + dice).backward()
    assert f3d.grad.abs().sum() > 0
    # perfectly separated masks score a lower Dice loss than random features
    sep = torch.zeros(20, 8)
    sep[:10, 0] = 1.0
    sep[10:, 1] = 1.0
    assert membership_loss(sep, ids, rows, 2)[1].item() < dice.item()


def test_scene_masks_back_project_onto_the_visible_points(tmp_path):
    from test_instances import INTR, _plane, _pose, _render

    from sas_core.train.masks import MaskConfig, SceneMasks, fused_mask_targets, scene_masks_from_views

    front = _plane(-1.0, 1.0)
    behind = _plane(-1.0, 1.0, z=5.0)  # hidden behind the front plane
    pts = np.concatenate([front, behind])
    depth, ids = _render([(-1.0, 0.0, 7), (0.0, 1.0, 3)])
    fmap = np.zeros(ids.shape + (2,), np.float32)
    fmap[ids == 7] = [1.0, 0.0]
    fmap[ids == 3] = [0.0, 1.0]
    masks = scene_masks_from_views(pts, [(depth, _pose(), INTR, ids, fmap)], MaskConfig(border=0))
    assert len(masks) == 2 and masks.n_points == len(pts)
    by_side = {}
    for m in range(2):
        p = masks.points(m)
        assert len(p) > 100 and p.max() < len(front)  # nothing behind the front plane
        side = set((front[p, 0] >= 0).tolist())
        assert len(side) == 1
        by_side[side.pop()] = m
    left, right = by_side[False], by_side[True]
    np.testing.assert_allclose(masks.features[left].astype(np.float32), [1.0, 0.0])
    np.testing.assert_allclose(masks.features[right].astype(np.float32), [0.0, 1.0])
    # round trip through the file next to the fused features
    path = masks.save(tmp_path / "room.masks.npz")
    back = SceneMasks.load(path)
    assert np.array_equal(back.indices, masks.indices) and np.array_equal(back.offsets, masks.offsets)
    assert np.array_equal(back.features, masks.features)
    # fused targets: the mean of the points' features inside each mask
    feats = np.c_[pts[:, 0], np.ones(len(pts))].astype(np.float32)
    has = np.ones(len(pts), bool)
    tgt, valid = fused_mask_targets(masks, feats, has)
    assert valid.all()
    assert tgt[left, 0] < 0 < tgt[right, 0]
    np.testing.assert_allclose(tgt[left], feats[masks.points(left)].mean(0), rtol=1e-5)
    with pytest.raises(ValueError):
        SceneMasks(np.array([0, 5]), np.arange(3), np.zeros(1), 10)


def _slab_masks(scene, k=3):
    """Masks = class slab x y-half of a tiny_scenes room (clean shapes), with their class as frame id."""
    from sas_core.train.masks import SceneMasks

    p = scene.positions
    key = np.minimum((p[:, 0] / 4 * k).astype(np.int64), k - 1) * 2 + (p[:, 1] >= 2)
    order = np.argsort(key, kind="stable")
    sizes = np.bincount(key, minlength=2 * k)
    return SceneMasks(np.r_[0, np.cumsum(sizes)], order, np.arange(2 * k), scene.n_points)


def test_distiller_with_mask_loss_and_scene_labels(tmp_path):
    from sas_core.train.distill import DistillConfig, Distiller

    scenes, text = tiny_scenes(2, 300)
    for s in scenes:
        s.masks = _slab_masks(s)
        s.classes = ("a", "b")
    cfg = tiny_config(tmp_path, mode="sp_tesd", loss="point,superpoint,mask", membership_weight=0.5,
                      adapter_epochs=3)
    assert cfg.loss_terms == ("point", "superpoint", "mask")
    d = Distiller(cfg, scenes, text, ["a", "b", "c"])
    assert len(d.adapter_history) == 3 and set(d.allowed) == {"scene0", "scene1"}
    with pytest.raises(ValueError, match="tesd_guide"):  # fused-guided pseudo-labels: without scene lists only
        Distiller(tiny_config(tmp_path / "guide", mode="sp_tesd", tesd_guide=True), scenes, text, ["a", "b", "c"])
    batch = d.batch([0], epoch=0)
    res = d.losses(batch, 0, 0, tesd=False)
    assert {"point", "superpoint", "mask", "membership_focal", "membership_dice"} <= set(res)
    assert 0.0 <= res["mask"] <= 2.0
    d.model.eval()
    with torch.no_grad():
        before = d.losses(batch, 0, 0, tesd=False)["mask"]
    d.optimizer.zero_grad()
    d.losses(batch, 0, 0, tesd=False)["loss"].backward()
    d.optimizer.step()
    with torch.no_grad():
        assert d.losses(batch, 0, 0, tesd=False)["mask"] < before
    allowed = d._batch_allowed(batch)
    assert allowed.shape == (batch.n_voxels, 3) and not allowed[:, 2].any()
    d.initialize_tesd()
    res = d.losses(batch, 0, 0, tesd=True)
    assert "tesd_point" in res and "mask" in res
    result = d.run()
    assert result.history[-1]["epoch"] == cfg.epochs
    # configuration errors are clear
    with pytest.raises(ValueError, match="choose a comma-separated subset"):
        DistillConfig(loss="point,edge")
    with pytest.raises(ValueError, match="pixel_point has no superpoint"):
        DistillConfig(mode="pixel_point", loss="point,superpoint")
    with pytest.raises(ValueError, match="needs the mask term"):
        DistillConfig(membership_weight=1.0)
    bare, _ = tiny_scenes(1, 100)
    with pytest.raises(ValueError, match="needs masks for every training scene"):
        Distiller(tiny_config(tmp_path / "x", loss="point,mask"), bare, text, ["a", "b", "c"])
    assert DistillConfig(mode="pixel_point").loss_terms == ("point",)


def test_boundary_band_by_hand():
    from sas_core.eval import boundary_mask, boundary_miou

    # a line of points 1 cm apart: class 0 for x < 0.5, class 1 after; one ignored point far away
    x = np.arange(100) * 0.01
    pos = np.c_[x, np.zeros(100), np.zeros(100)]
    gt = (x >= 0.5).astype(np.int64)
    gt[-1] = 255
    band = boundary_mask(pos, gt, radius=0.045)
    assert np.flatnonzero(band).tolist() == list(range(46, 54))  # within 4.5 cm of the other class
    pred = gt.copy()
    pred[pred == 255] = 0
    pred[46:50] = 1  # the boundary moved by 4 cm
    res = boundary_miou(pred, gt, pos, ["a", "b"], radius=0.045)
    assert res["boundary_points"] == 8
    # inside the band: class 0 has 0 of 4 right (IoU 0), class 1 is predicted on 8 points, 4 of them its own
    assert res["miou"] == pytest.approx((0.0 + 4 / 8) / 2)
    assert boundary_miou(gt.clip(0, 1), gt, pos, ["a", "b"], radius=0.045)["miou"] == pytest.approx(1.0)
    assert boundary_mask(pos, np.zeros(100, np.int64)).sum() == 0
    with pytest.raises(ValueError):
        boundary_mask(pos, gt, radius=0)


# ---------------------------------------------------------------------------------------------- CLI


def _openscene(tmp_path, dim=16):
    """conftest.tiny_openscene plus masks next to the features and scene label lists."""
    from conftest import tiny_openscene
    from sas_core.train.datasets import scene_from_arrays

    text, rooms = tiny_openscene(tmp_path, dim)
    for s, p in enumerate(rooms):
        _slab_masks(scene_from_arrays(f"room{s}", p)).save(tmp_path / "feat" / f"room{s}.masks.npz")
        (tmp_path / "train" / f"room{s}.labels.txt").write_text("wall\nfloor\n")
    (tmp_path / "val" / "room9.labels.txt").write_text("wall\nfloor\ncabinet\n")
    return text


def test_cli_scene_labels_and_mask_loss_on_tiny_data(tmp_path, capsys):
    from sas_app.cli import main

    _openscene(tmp_path)
    out = tmp_path / "run"
    rc = main(["distill", "--data", str(tmp_path), "--features", str(tmp_path / "feat"), "--superpoints", "points",
               "--text-encoder", "synthetic", "--text-dim", "16", "--arch", "MinkUNet14A", "--epochs", "2",
               "--stage2-fraction", "0.5", "--voxel-size", "0.25", "--out", str(out), "--quiet", "--threads", "1",
               "--scene-labels", str(tmp_path / "train"), "--loss", "point,superpoint,mask", "--adapter-epochs", "2"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert "mask" in printed["last"] and "tesd_point" in printed["last"]
    ckpt = out / "last.pt"
    # segment with a scene list: only wall / floor come out
    cloud = tmp_path / "val" / "room9.pth"
    seg_out = tmp_path / "seg.ply"
    assert main(["segment", str(ckpt), str(cloud), "--out", str(seg_out),
                 "--scene-labels", str(tmp_path / "train" / "room0.labels.txt")]) == 0
    labels = np.load(seg_out.with_suffix(".npy"))
    assert set(labels.tolist()) <= {0, 1}
    # eval with the val split's lists
    js = tmp_path / "m.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path / "val"), "--scene-labels",
                 str(tmp_path / "val"), "--json", str(js)]) == 0
    assert json.loads(js.read_text())["scene_labels"]["restricted_scenes"] == 1
    # a missing mask file is one clear error
    (tmp_path / "feat" / "room1.masks.npz").unlink()
    assert main(["distill", "--data", str(tmp_path), "--features", str(tmp_path / "feat"), "--superpoints", "points",
                 "--text-encoder", "synthetic", "--text-dim", "16", "--arch", "MinkUNet14A", "--epochs", "1",
                 "--out", str(tmp_path / "run2"), "--quiet", "--loss", "point,mask"]) == 1
    assert "masks" in capsys.readouterr().err


def test_synth_writes_scene_lists_and_fuse_saves_masks(tmp_path):
    from sas_app.cli import main
    from sas_core.train.masks import SceneMasks
    from sas_core.train.scene_labels import load_scene_labels

    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--width", "64", "--height", "48", "--frames", "3", "--points-per-m2",
                 "40", "--no-bag", "--no-lidar"]) == 0
    manifest = json.loads((out / "synth.json").read_text())
    scene = manifest["scenes"][0]
    split = out / "openscene" / scene["split"]
    assert load_scene_labels(split) == {scene["name"]: tuple(scene["classes"])}
    feat = tmp_path / "feat"
    assert main(["fuse", "--data", str(out / "openscene"), "--split", scene["split"], "--teacher", "sim_mask",
                 "--out", str(feat), "--save-masks", "--quiet"]) == 0
    masks = SceneMasks.load(feat / f"{scene['name']}.masks.npz")
    assert len(masks) > 3 and masks.n_points == scene["n_points"] and masks.features is not None
    # a dense teacher has no masks: one clear error
    assert main(["fuse", "--data", str(out / "openscene"), "--split", scene["split"], "--teacher", "sim_dense",
                 "--out", str(tmp_path / "f2"), "--save-masks", "--quiet"]) == 1


def test_synthetic_rooms_can_leave_classes_out():
    from sas_core.data.synthetic import SynthConfig, generate_scene

    base = dict(seed=3, n_frames=0, width=32, height=24, with_lidar=False, points_per_m2=10.0)
    full = generate_scene(SynthConfig(**base))
    again = generate_scene(SynthConfig(**base, absent_classes=()))
    assert np.array_equal(full.vertices, again.vertices)  # the default room is unchanged
    gone = ("sofa", "bed", "chair", "bathtub", "shower curtain")
    part = generate_scene(SynthConfig(**base, absent_classes=gone))
    present = set(part.present_classes())
    assert not present & set(gone) and {"wall", "floor", "table"} <= present
    assert set(gone) & set(full.present_classes())
    with pytest.raises(ValueError, match="not wall/floor"):
        generate_scene(SynthConfig(**base, absent_classes=("floor",)))


def test_bench_seeds_room_subsets_and_row_builders():
    from sas_app.bench import seeds

    pick = seeds.absent_classes(0, 8)
    assert pick(0) == pick(0) and pick(0) != pick(1) and len(pick(0)) == 8
    assert not {"wall", "floor"} & set(pick(0))

    def extra_rows(ctx):
        return [{"key": "x", "method": "x", "setting": "held_out", "miou": 1.0}]

    try:
        assert seeds.register_row_builder(extra_rows) is extra_rows
        seeds.register_row_builder(extra_rows)
        assert seeds._builders().count(extra_rows) == 1
    finally:
        seeds.ROW_BUILDERS.remove(extra_rows)
