"""Multi-view fusion (OpenScene's rule): against a per-point Python loop, streaming == batch,
occlusion, invalid depth, the border rule, teacher validity, voxel rows, backends."""

import numpy as np
import pytest
import torch

from sas_core.geometry.camera import backproject_depth
from sas_core.geometry.multiview import (
    FeatureAccumulator,
    MultiViewFusionConfig,
    View,
    fuse_views,
    numba_available,
    visible_points,
)
from sas_core.types import CameraIntrinsics

BACKENDS = ["torch"] + (["numba"] if numba_available() else [])
INTR = CameraIntrinsics(60.0, 62.0, 31.5, 23.5, 64, 48)


def look_at(pos, target):
    """Camera-to-world pose (OpenCV optical frame, world z up) at pos looking at target."""
    pos, target = np.asarray(pos, float), np.asarray(target, float)
    fwd = (target - pos) / np.linalg.norm(target - pos)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = right, np.cross(fwd, right), fwd, pos
    return T


def reference_fusion(points, views, ratio=0.25, border=10, metric=None):
    """OpenScene's rule written as a plain loop over frames and points, in float64.

    Returns mean features, counts, and the points whose outcome depends on float rounding (a
    projection within 2e-4 px of a half pixel, or a depth difference within 1e-4 of the limit).
    """
    n = len(points)
    c = np.asarray(views[0][3]).shape[-1]
    sums, counts = np.zeros((n, c)), np.zeros(n, dtype=int)
    ambiguous = np.zeros(n, dtype=bool)
    for depth, pose, intr, feat, valid in views:
        feat = np.asarray(torch.as_tensor(feat).float())
        hf, wf = feat.shape[:2]
        h, w = intr.height, intr.width
        w2c = np.linalg.inv(pose)
        for i in range(n):
            x, y, z = w2c[:3, :3] @ points[i].astype(np.float64) + w2c[:3, 3]
            if z <= 0:
                continue
            u, v = intr.fx * x / z + intr.cx, intr.fy * y / z + intr.cy
            if min(abs(u - np.floor(u) - 0.5), abs(v - np.floor(v) - 0.5)) < 2e-4:
                ambiguous[i] = True
            ui, vi = int(np.round(u)), int(np.round(v))
            if not (border <= ui < w - border and border <= vi < h - border):
                continue
            if depth is not None:
                d = float(depth[vi, ui])
                if not (np.isfinite(d) and d > 0):
                    continue
                lim = metric if metric is not None else ratio * d
                if abs(abs(d - z) - lim) < 1e-4:
                    ambiguous[i] = True
                if abs(d - z) > lim:
                    continue
            fr = int(np.round(vi * (hf - 1) / (h - 1))) if hf != h else vi
            fc = int(np.round(ui * (wf - 1) / (w - 1))) if wf != w else ui
            if valid is not None and not valid[fr, fc]:
                continue
            sums[i] += feat[fr, fc]
            counts[i] += 1
    return sums / np.maximum(counts, 1)[:, None], counts, ambiguous


def wavy_depth(rng, h, w, base):
    v, u = np.mgrid[0:h, 0:w]
    d = base + 0.3 * np.sin(u / 5.0 + rng.uniform(0, 6)) + 0.2 * np.cos(v / 4.0)
    d = d.astype(np.float32)
    holes = rng.random((h, w))
    d[holes < 0.05] = np.nan
    d[(holes >= 0.05) & (holes < 0.08)] = 0.0
    return d


def make_views(rng, n_views=4, dim=8, feat_hw=None, with_valid=True):
    """Cameras around the origin; wavy depth surfaces; points lifted from the depth images
    (so many are visible) plus random points (mostly occluded or outside)."""
    views, pts = [], []
    for k in range(n_views):
        a = 2 * np.pi * k / n_views
        pose = look_at([3 * np.cos(a), 3 * np.sin(a), 0.5 + 0.1 * k], [0.0, 0.0, 0.0])
        depth = wavy_depth(rng, INTR.height, INTR.width, 3.0)
        hf, wf = feat_hw or (INTR.height, INTR.width)
        feat = torch.from_numpy(rng.normal(size=(hf, wf, dim)).astype(np.float32)).half()
        valid = rng.random((hf, wf)) > 0.1 if with_valid else None
        views.append((depth, pose, INTR, feat, valid))
        p, _ = backproject_depth(depth, INTR, pose)
        p = p[rng.choice(len(p), 60, replace=False)]
        p += rng.normal(scale=0.05, size=p.shape).astype(np.float32)
        pts.append(p)
    pts.append(rng.uniform(-2.0, 2.0, size=(120, 3)).astype(np.float32))
    return np.concatenate(pts).astype(np.float32), views


def check_against_reference(fused, points, views, **kw):
    ref_feat, ref_counts, amb = reference_fusion(points, views, **kw)
    ok = ~amb
    assert amb.mean() < 0.02, "the test scene should not sit on rounding boundaries"
    np.testing.assert_array_equal(fused.counts.numpy()[ok], ref_counts[ok])
    np.testing.assert_array_equal(fused.mask.numpy()[ok], ref_counts[ok] > 0)
    np.testing.assert_allclose(fused.features.float().numpy()[ok], ref_feat[ok], atol=1e-3)
    assert (ref_counts > 0).sum() > 50 and (ref_counts == 0).sum() > 50  # both outcomes occur
    assert ref_counts.max() >= 2  # some points are seen by several views


@pytest.mark.parametrize("backend", BACKENDS)
def test_fusion_matches_per_point_loop(backend):
    rng = np.random.default_rng(0)
    points, views = make_views(rng)
    fused = fuse_views(points, views, MultiViewFusionConfig(backend=backend))
    assert fused.features.dtype == torch.float16 and fused.features.shape == (len(points), 8)
    assert fused.mask.dtype == torch.bool and fused.counts.dtype == torch.int32
    check_against_reference(fused, points, views)
    assert torch.all(fused.features[~fused.mask] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fusion_metric_threshold_and_low_resolution_features(backend):
    rng = np.random.default_rng(1)
    points, views = make_views(rng, feat_hw=(12, 16))
    cfg = MultiViewFusionConfig(backend=backend, metric_threshold=0.08)
    fused = fuse_views(points, views, cfg)
    check_against_reference(fused, points, views, metric=0.08)


def test_streaming_equals_batch_and_backends_agree():
    rng = np.random.default_rng(2)
    points, views = make_views(rng, n_views=5)
    results = []
    for backend in BACKENDS:
        cfg = MultiViewFusionConfig(backend=backend)
        batch = fuse_views(points, [View(*v) for v in views], cfg)
        acc = FeatureAccumulator(len(points), 8, points=torch.from_numpy(points), config=cfg)
        seen = 0
        for v in views:
            seen += acc.add(*v)
        stream = acc.result()
        assert seen == int(stream.counts.sum())
        assert torch.equal(stream.counts, batch.counts) and torch.equal(stream.mask, batch.mask)
        assert torch.equal(stream.features, batch.features)
        results.append(stream)
    for other in results[1:]:  # the numba and torch paths give the same fusion
        assert (other.counts != results[0].counts).sum() <= 1
        same = other.counts == results[0].counts
        torch.testing.assert_close(other.features[same].float(), results[0].features[same].float(),
                                   atol=1e-3, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_voxel_rows_sum_their_points(backend):
    rng = np.random.default_rng(3)
    points, views = make_views(rng)
    cfg = MultiViewFusionConfig(backend=backend)
    per_point = FeatureAccumulator(len(points), 8, points=points, config=cfg)
    slots = rng.integers(0, 40, size=len(points))
    per_voxel = FeatureAccumulator(40, 8, config=cfg)
    for v in views:
        per_point.add(*v)
        per_voxel.add(*v, points=points, index=slots)
    want_sums = torch.zeros(40, 8).index_add_(0, torch.from_numpy(slots), per_point.sums)
    want_counts = torch.zeros(40, dtype=torch.int32).index_add_(0, torch.from_numpy(slots), per_point.counts)
    torch.testing.assert_close(per_voxel.sums, want_sums, atol=1e-4, rtol=1e-5)
    assert torch.equal(per_voxel.counts, want_counts)
    torch.testing.assert_close(per_voxel.mean(), want_sums / want_counts.clamp(min=1)[:, None].float())
    per_voxel.grow(50)
    assert per_voxel.sums.shape == (50, 8) and int(per_voxel.counts[40:].sum()) == 0


def two_plane_scene():
    """Camera at the origin looking along +z. A 1 x 1 m square at z = 2 hides part of a large
    back wall at z = 4."""
    intr = CameraIntrinsics(50.0, 50.0, 49.5, 49.5, 100, 100)
    v, u = np.mgrid[0:100, 0:100].astype(np.float64)
    x, y = (u - intr.cx) / intr.fx, (v - intr.cy) / intr.fy  # ray direction at unit depth
    front = (np.abs(2 * x) <= 0.5) & (np.abs(2 * y) <= 0.5)
    depth = np.where(front, 2.0, 4.0).astype(np.float32)
    return intr, depth


@pytest.mark.parametrize("backend", BACKENDS)
def test_occlusion_two_planes(backend):
    intr, depth = two_plane_scene()
    hidden = np.array([[0.0, 0.0, 4.0], [0.3, -0.2, 4.0], [-0.45, 0.45, 4.0]])  # behind the square
    wall = np.array([[1.6, 0.0, 4.0], [-1.5, 1.5, 4.0], [0.0, -1.4, 4.0]])  # beside its shadow
    square = np.array([[0.0, 0.0, 2.0], [0.2, 0.2, 2.0]])
    pts = np.concatenate([hidden, wall, square]).astype(np.float32)
    cfg = MultiViewFusionConfig(backend=backend)
    idx, _ = visible_points(pts, depth, np.eye(4), intr, cfg)
    np.testing.assert_array_equal(idx, [3, 4, 5, 6, 7])
    # without the depth test (no depth image) the hidden points are "visible"
    idx_nd, _ = visible_points(pts, None, np.eye(4), intr, cfg)
    np.testing.assert_array_equal(idx_nd, np.arange(8))
    # the hidden points receive no feature in a fusion either
    feat = torch.ones(100, 100, 4)
    fused = fuse_views(pts, [(depth, np.eye(4), intr, feat)], cfg)
    np.testing.assert_array_equal(fused.mask.numpy(), [0, 0, 0, 1, 1, 1, 1, 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_depth_is_never_visible(backend):
    intr = CameraIntrinsics(50.0, 50.0, 49.5, 49.5, 100, 100)
    rng = np.random.default_rng(4)
    pts, _ = backproject_depth(np.full((100, 100), 2.0, np.float32), intr)
    pts = pts[rng.choice(len(pts), 500, replace=False)]
    cfg = MultiViewFusionConfig(backend=backend, max_depth=5.0)
    assert len(visible_points(pts, np.full((100, 100), 2.0, np.float32), np.eye(4), intr, cfg)[0]) > 300
    for bad in (np.nan, 0.0, -2.0, np.inf):
        depth = np.full((100, 100), bad, np.float32)
        assert len(visible_points(pts, depth, np.eye(4), intr, cfg)[0]) == 0, bad
    far = pts * np.float32(3.0)  # the same pixels at 6 m, with a 6 m depth reading beyond range
    assert len(visible_points(far, np.full((100, 100), 6.0, np.float32), np.eye(4), intr, cfg)[0]) == 0
    near_cfg = MultiViewFusionConfig(backend=backend, min_depth=2.5)
    assert len(visible_points(pts, np.full((100, 100), 2.0, np.float32), np.eye(4), intr, near_cfg)[0]) == 0
    # a point in front of a half-NaN image is visible only where depth exists
    depth = np.full((100, 100), 2.0, np.float32)
    depth[:, 50:] = np.nan
    idx, pix = visible_points(pts, depth, np.eye(4), intr, cfg)
    assert len(idx) > 100 and np.all(pix % 100 < 50)


@pytest.mark.parametrize("backend", BACKENDS)
def test_border_rule_and_rounding(backend):
    # fx = 64, cx = cy = 0.5, z = 1: u = 64 x + 0.5 exactly (x multiples of 1/128), same for v.
    intr = CameraIntrinsics(64.0, 64.0, 0.5, 0.5, 40, 30)
    cols = np.array([8.5, 9.0, 9.5, 10.0, 10.5, 28.0, 28.5, 29.0, 29.5, 30.0])
    # np.round: 8.5->8 out, 9->9 out, 9.5->10 in, 10 in, 10.5->10 in, 28 in, 28.5->28 in,
    # 29 in (= W-1-border), 29.5->30 out, 30 out
    want_col = [False, False, True, True, True, True, True, True, False, False]
    x = (cols - 0.5) / 64.0
    pts = np.stack([x, np.full_like(x, (15.0 - 0.5) / 64.0), np.ones_like(x)], 1).astype(np.float32)
    rows = np.array([9.5, 10.0, 19.0, 19.5, 20.0])  # H = 30: rows 10..19 are inside
    want_row = [True, True, True, False, False]
    y = (rows - 0.5) / 64.0
    pts_r = np.stack([np.full_like(y, (20.0 - 0.5) / 64.0), y, np.ones_like(y)], 1).astype(np.float32)
    depth = np.ones((30, 40), np.float32)
    cfg = MultiViewFusionConfig(backend=backend)
    mask = np.zeros(len(cols), bool)
    mask[visible_points(pts, depth, np.eye(4), intr, cfg)[0]] = True
    np.testing.assert_array_equal(mask, want_col)
    mask_r = np.zeros(len(rows), bool)
    mask_r[visible_points(pts_r, depth, np.eye(4), intr, cfg)[0]] = True
    np.testing.assert_array_equal(mask_r, want_row)
    # border = 0: every pixel of the image counts, nothing outside
    cfg0 = MultiViewFusionConfig(backend=backend, border=0)
    edge = np.array([[-0.5 / 64, -0.5 / 64, 1], [38.9 / 64, 28.9 / 64, 1], [40.0 / 64, 0, 1]], np.float32)
    np.testing.assert_array_equal(visible_points(edge, depth, np.eye(4), intr, cfg0)[0], [0, 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_teacher_pixels_do_not_count(backend):
    intr, depth = two_plane_scene()
    pts = np.array([[0.0, 0.0, 2.0], [1.5, 0.0, 4.0]], np.float32)
    feat = torch.arange(100 * 100 * 2, dtype=torch.float32).reshape(100, 100, 2)
    valid = np.ones((100, 100), bool)
    _, pix = visible_points(pts, depth, np.eye(4), intr)
    valid.reshape(-1)[pix[0]] = False
    cfg = MultiViewFusionConfig(backend=backend, out_dtype="float32")
    acc = FeatureAccumulator(2, 2, points=pts, config=cfg)
    assert acc.add(depth, np.eye(4), intr, feat, valid) == 1
    assert acc.add(depth, np.eye(4), intr, feat * 3) == 2
    res = acc.result()
    assert res.counts.tolist() == [1, 2] and res.features.dtype == torch.float32
    torch.testing.assert_close(res.features[0], 3 * feat.reshape(-1, 2)[pix[0]])
    torch.testing.assert_close(res.features[1], 2 * feat.reshape(-1, 2)[pix[1]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_special_values_are_summed_exactly(backend):
    intr, depth = two_plane_scene()
    pts = np.array([[0.0, 0.0, 2.0]], np.float32)
    specials = torch.tensor([6e-8, -6e-8, 6.1e-5, 65504.0, -0.0, 1.0 / 3, 1e-3, -7.5], dtype=torch.float16)
    feat = specials.repeat(100, 100, 1)
    acc = FeatureAccumulator(1, 8, points=pts, config=MultiViewFusionConfig(backend=backend))
    acc.add(depth, np.eye(4), intr, feat)
    assert torch.equal(acc.sums[0], specials.float())


def test_input_errors():
    intr, depth = two_plane_scene()
    pts = np.zeros((3, 3), np.float32)
    feat = torch.zeros(100, 100, 4)
    acc = FeatureAccumulator(3, 4, points=pts)
    with pytest.raises(ValueError, match="depth"):
        acc.add(depth[:50], np.eye(4), intr, feat)
    with pytest.raises(ValueError, match="channels"):
        acc.add(depth, np.eye(4), intr, torch.zeros(100, 100, 5))
    with pytest.raises(ValueError, match="valid"):
        acc.add(depth, np.eye(4), intr, feat, valid=np.ones((10, 10), bool))
    with pytest.raises(ValueError, match="index"):
        acc.add(depth, np.eye(4), intr, feat, points=pts, index=[0, 1, 7])
    with pytest.raises(ValueError, match="pose"):
        acc.add(depth, np.full((4, 4), np.nan), intr, feat)
    with pytest.raises(ValueError):
        FeatureAccumulator(3, 4).add(depth, np.eye(4), intr, feat)  # no points anywhere
    with pytest.raises(ValueError, match="at least one view"):
        fuse_views(pts, [])
    with pytest.raises(ValueError):
        MultiViewFusionConfig(depth_ratio=-1)
    with pytest.raises(ValueError):
        MultiViewFusionConfig(out_dtype="int8")
    empty = fuse_views(np.zeros((0, 3), np.float32), [(depth, np.eye(4), intr, feat)])
    assert empty.features.shape == (0, 4) and empty.mask.shape == (0,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(5)
    points, views = make_views(rng)
    cpu = fuse_views(points, views)
    gpu = fuse_views(torch.from_numpy(points).cuda(), views)
    assert gpu.features.device.type == "cuda"
    same = gpu.counts.cpu() == cpu.counts
    assert (~same).sum() <= 1
    torch.testing.assert_close(gpu.features.cpu()[same].float(), cpu.features[same].float(), atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------- synthetic world

@pytest.fixture(scope="module")
def synthetic_scene():
    synthetic = pytest.importorskip("sas_core.data.synthetic")
    return synthetic.generate_scene(synthetic.SynthConfig(seed=0, n_frames=0, with_lidar=False, points_per_m2=250))


def test_occlusion_floor_under_table_seen_from_above(synthetic_scene):
    """A camera above a table, looking straight down: the floor under the table top is in the
    image but hidden, the table top and the floor around it are visible."""
    from sas_core.data.synthetic import CLASS_INDEX, render_frames

    scene = synthetic_scene
    pts, labels, inst = scene.points.positions, scene.points.labels, scene.points.instances
    floor = labels == CLASS_INDEX["floor"]
    chosen = None
    for i in np.unique(inst[labels == CLASS_INDEX["table"]]):
        p = pts[inst == i]
        top = p[p[:, 2] > p[:, 2].max() - 0.01]
        lo, hi = top[:, :2].min(0), top[:, :2].max(0)
        if np.all(hi - lo > 0.4):
            chosen = (lo, hi, float(p[:, 2].max()))
            break
    if chosen is None:
        pytest.skip("no table with a large enough top in this synthetic room")
    lo, hi, top_z = chosen
    centre = (lo + hi) / 2
    eye_z = min(scene.room_size[2] - 0.15, top_z + 1.3)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2] = [1, 0, 0], [0, -1, 0], [0, 0, -1]  # looking down
    pose[:3, 3] = [centre[0], centre[1], eye_z]
    frame = render_frames(scene, [pose], scene.intrinsics)[0]
    inner = np.all((pts[:, :2] > lo + 0.05) & (pts[:, :2] < hi - 0.05), axis=1)
    under = np.flatnonzero(floor & inner)
    assert len(under) > 20
    # the hidden floor points do project into the image (they would be "visible" without depth)
    idx_nodepth, _ = visible_points(pts[under], None, pose, scene.intrinsics)
    assert len(idx_nodepth) > 0.9 * len(under)
    for backend in BACKENDS:
        cfg = MultiViewFusionConfig(backend=backend)
        vis = np.zeros(len(pts), bool)
        vis[visible_points(pts, frame.depth, pose, scene.intrinsics, cfg)[0]] = True
        assert not vis[under].any(), f"{backend}: floor under the table seen through it"
        table_top = (labels == CLASS_INDEX["table"]) & (pts[:, 2] > top_z - 0.01) & inner
        assert vis[table_top].mean() > 0.9
        assert vis[floor & ~np.all((pts[:, :2] > lo - 0.3) & (pts[:, :2] < hi + 0.3), axis=1)].any()


@pytest.mark.slow
def test_sas_fuse_on_openscene_layout_and_synthetic_report(tmp_path, capsys):
    """`sas fuse --data` writes OpenScene files equal to an in-process fusion; `--synthetic
    --report --json` prints each simulated teacher's fused 3D mIoU."""
    import json

    synthetic = pytest.importorskip("sas_core.data.synthetic")
    from sas_app.cli import main
    from sas_core.geometry.multiview import fuse_frames
    from sas_core.data.fused_features import load_fused_features, load_scene_features
    from sas_core.data.openscene import load_openscene_scene, write_openscene_scene
    from sas_core.teachers.simulated import make_simulated_pair
    from sas_core.text import SyntheticTextEncoder

    scene = synthetic.generate_scene(synthetic.SynthConfig(seed=3, n_frames=4, with_lidar=False, points_per_m2=80))
    root, out = tmp_path / "data", tmp_path / "fused"
    write_openscene_scene(scene, root)
    assert main(["fuse", "--data", str(root), "--teacher", "sim_dense", "--out", str(out), "--n-files", "2",
                 "--split-points", str(len(scene.points) // 2), "--quiet"]) == 0
    files = sorted(out.glob("*.pt"))
    assert [p.name for p in files] == [f"{scene.name}_0.pt", f"{scene.name}_1.pt"]
    feat0, mask0 = load_fused_features(files[0], dim=512)
    assert feat0.dtype == torch.float16 and mask0.shape == (len(scene.points),)
    cloud, frames = load_openscene_scene(root, scene.name)
    teacher = make_simulated_pair(SyntheticTextEncoder(), seed=0)[0]
    want = fuse_frames(cloud.positions, frames, teacher, MultiViewFusionConfig(), progress=False)
    assert not bool((mask0 & ~want.mask).any()) and int(mask0.sum()) > 100
    torch.testing.assert_close(feat0.float(), want.features[mask0].float(), atol=1e-3, rtol=0)
    merged = load_scene_features(out, scene.name, n_points=len(cloud))
    assert int(merged.mask.sum()) > int(mask0.sum())
    capsys.readouterr()

    assert main(["fuse", "--synthetic", "--report", "--json", "--n-frames", "4", "--points-per-m2", "60",
                 "--seed", "3", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "SYNTHETIC" in report["source"]
    assert set(report["teachers"]) == {"sim_dense", "sim_mask"}
    for r in report["teachers"].values():
        assert 0.0 < r["miou"] <= 1.0 and 0.0 < r["coverage"] < 1.0
        assert "floor" in r["per_class"] and 0.0 <= r["per_class"]["floor"]["iou"] <= 1.0
    assert main(["fuse", "--synthetic", "--data", str(root)]) == 1  # one source only
