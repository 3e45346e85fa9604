"""sas_core.mapping.Mapper (no ROS): integration, labelling, vocabulary changes, queries, save/load,
typed rejects, and live fusion == `sas fuse` per voxel with occlusion."""


import numpy as np
import pytest

from sas_core.mapping import Mapper, MapperConfig, Rejected, strided_frame
from sas_core.types import CameraIntrinsics, Frame


@pytest.fixture(scope="module")
def scene():
    from sas_core.data.synthetic import SynthConfig, generate_scene

    return generate_scene(SynthConfig(seed=3, n_frames=6, with_lidar=True, n_lidar_sweeps=2))


def _gt(scene, positions, max_dist=0.06):
    from scipy.spatial import cKDTree

    d, i = cKDTree(scene.points.positions).query(positions)
    return np.where(d <= max_dist, scene.points.labels[i], 255)


class _FakeSegmenter:
    """A stand-in network: a fixed feature per 0.5 m cell of the input position (D = 8), so a
    feature written back to a voxel can be traced to the position the network saw."""

    def __init__(self, dim=8):
        from sas_core.text import SyntheticTextEncoder

        self.text_encoder = SyntheticTextEncoder(["chair", "table", "sofa"], dim=dim)
        self.dim = dim
        self.calls = []
        self.during = None  # callable run while the network "runs" (the mapper's lock is free)
        self.table = np.random.default_rng(0).normal(size=(997, dim)).astype(np.float32)

    def features(self, positions, colors=None):
        self.calls.append(len(positions))
        if self.during is not None:
            self.during()
        cell = np.floor(np.asarray(positions) / 0.5).astype(np.int64)
        key = (cell * np.array([73856093, 19349663, 83492791])).sum(1) % 997
        return self.table[key]


# ---------------------------------------------------------------------------------------- integration

def test_integrate_rgbd_and_sweeps_match_the_voxel_map(scene):
    from sas_core.geometry.voxel_map import VoxelMap, VoxelMapConfig, rgbd_points

    cfg = MapperConfig(mode="none")
    assert (cfg.min_depth, cfg.max_points, cfg.pixel_stride) == (0.1, 1_000_000, 2)  # the node's defaults
    mapper = Mapper(cfg)
    ref = VoxelMap(VoxelMapConfig(voxel_size=cfg.voxel_size, max_points=cfg.max_points))
    for f in scene.frames:
        n = mapper.integrate_rgbd(f)
        pts, cols, _ = rgbd_points(f.depth, f.color, f.intrinsics, f.pose, cfg.pixel_stride, cfg.min_depth,
                                   cfg.max_depth)
        assert n == len(ref.integrate(pts, cols, sensor_origin=f.pose[:3, 3]))
    a, b = mapper.export(), ref.export()
    np.testing.assert_array_equal(a["positions"], b["positions"])
    np.testing.assert_array_equal(a["colors"], b["colors"])
    d = _gt(scene, a["positions"], 0.05)
    assert (d != 255).mean() > 0.95  # on the scene's surfaces
    # LiDAR sweeps: sensor-frame points, grey levels from intensity
    n0 = len(mapper)
    for s in scene.lidar:
        pts = s.points.copy()
        pts[:3] = np.nan  # non-finite rows are dropped
        mapper.integrate_sweep(pts, s.pose, intensity=s.intensity)
    world = np.concatenate([s.points[3:].astype(np.float64) @ s.pose[:3, :3].T + s.pose[:3, 3] for s in scene.lidar])
    slots = mapper.map.lookup(world.astype(np.float32))
    assert (slots >= 0).all() and len(mapper) > n0
    st = mapper.stats()
    assert st["frames"] == len(scene.frames) and st["sweeps"] == len(scene.lidar) and st["points"] == len(mapper)


def test_typed_rejects(scene):
    f = scene.frames[0]
    mapper = Mapper(MapperConfig(mode="none"))
    nan = Frame(color=f.color, depth=np.full_like(f.depth, np.nan), intrinsics=f.intrinsics, pose=f.pose)
    with pytest.raises(Rejected) as e:
        mapper.integrate_rgbd(nan)
    assert e.value.reason == "nan_depth"
    far = Frame(color=f.color, depth=np.full_like(f.depth, 50.0), intrinsics=f.intrinsics, pose=f.pose)
    with pytest.raises(Rejected, match="no valid") as e:
        mapper.integrate_rgbd(far)  # beyond max_depth: nothing to integrate
    bad = Frame(color=f.color, depth=f.depth, intrinsics=f.intrinsics, pose=f.pose)
    bad.depth = f.depth[::2, ::2]
    with pytest.raises(Rejected) as e:
        mapper.integrate_rgbd(bad)
    assert e.value.reason == "size_mismatch"
    pose = f.pose.copy()
    pose[0, 3] = np.inf
    with pytest.raises(Rejected) as e:
        mapper.integrate_rgbd(Frame(color=f.color, depth=f.depth, intrinsics=f.intrinsics, pose=pose))
    assert e.value.reason == "bad_pose"
    for pts in (np.zeros((0, 3)), np.full((4, 3), np.nan)):
        with pytest.raises(Rejected) as e:
            mapper.integrate_sweep(pts, np.eye(4))
        assert e.value.reason == "empty_cloud"
    with pytest.raises(Rejected) as e:
        mapper.query(["chair"])
    assert e.value.reason == "no_encoder"
    with pytest.raises(Rejected) as e:
        mapper.set_vocabulary(["chair"])
    assert e.value.reason == "no_encoder"
    assert len(mapper) == 0 and mapper.n_frames == 0  # nothing of the rejected input went in

    fusion = Mapper(MapperConfig(mode="fusion", text_dim=64))
    with pytest.raises(Rejected) as e:
        fusion.query(["chair"])
    assert e.value.reason == "no_features"
    with pytest.raises(Rejected) as e:
        fusion.query(["  "])
    assert e.value.reason == "empty_query"
    with pytest.raises(Rejected) as e:
        fusion.query(["flux capacitor"])
    assert e.value.reason == "bad_query" and "flux" in " ".join(e.value.words)
    with pytest.raises(Rejected) as e:
        fusion.set_vocabulary(["chair", "flux capacitor"])
    assert e.value.reason == "unknown_word" and "flux capacitor" in " ".join(e.value.words)
    with pytest.raises(Rejected) as e:
        fusion.set_vocabulary(["chair"], "no placeholder")
    assert e.value.reason == "bad_template"
    assert len(fusion.vocabulary) == 20  # unchanged
    with pytest.raises(Rejected) as e:
        fusion.integrate_rgbd(Frame(color=f.color, depth=f.depth, intrinsics=f.intrinsics, pose=f.pose))
    assert e.value.reason == "no_ground_truth"


def test_bad_settings_fail_with_one_clear_line():
    with pytest.raises(ValueError, match="mode"):
        Mapper(MapperConfig(mode="magic"))
    with pytest.raises(ValueError, match="unknown vocabulary 'scanet20'"):
        Mapper(MapperConfig(mode="fusion", vocabulary="scanet20"))
    with pytest.raises(ValueError, match="checkpoint"):
        Mapper(MapperConfig(mode="segmenter"))
    with pytest.raises(ValueError, match="template"):
        Mapper(MapperConfig(mode="none", prompt_template="nothing"))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available") as e:
            Mapper(MapperConfig(mode="segmenter", device="cuda", checkpoint="x.ckpt"))
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not a torch device"):
        Mapper(MapperConfig(mode="fusion", device="gpu0"))


# ---------------------------------------------------------------------------------------- labelling

def test_fusion_mode_labels_and_queries(scene):
    mapper = Mapper(MapperConfig(mode="fusion"))
    for f in scene.frames:
        mapper.integrate_rgbd(f)
    assert mapper.label_pass()
    data = mapper.export()
    gt = _gt(scene, data["positions"])
    labelled = (gt != 255) & (data["labels"] != 255)
    assert labelled.mean() > 0.6 and (data["labels"][labelled] == gt[labelled]).mean() > 0.7
    assert not mapper.label_pass()  # nothing changed since
    counts = np.bincount(gt[gt != 255], minlength=256)
    counts[[0, 1]] = 0
    cls = int(np.argmax(counts))
    answers = mapper.query([scene.class_names[cls], "a chair"], threshold=0.6, max_points=300)
    a = answers[0]
    assert a.text == scene.class_names[cls] and 0 < len(a.slots) <= 300 and a.count >= len(a.slots)
    assert np.all(a.scores >= 0.6) and np.all(np.diff(a.scores) <= 1e-6) and a.best >= a.scores[0] - 1e-6
    np.testing.assert_array_equal(a.positions, mapper.map.positions[a.slots])
    np.testing.assert_allclose(a.centroid, a.positions.mean(0), atol=1e-5)
    np.testing.assert_allclose(a.bbox_min, a.positions.min(0))
    np.testing.assert_allclose(a.bbox_max, a.positions.max(0))
    assert (_gt(scene, a.positions) == cls).mean() > 0.8
    none = mapper.query(["chair"], threshold=1.0)[0]
    assert none.best < 1.0 and none.count == 0 and len(none.positions) == 0 and np.isnan(none.centroid).all()
    with pytest.raises(Rejected, match=r"\[-1, 1\]"):  # a cosine threshold beyond 1 is refused
        mapper.query(["chair"], threshold=1.01)
    # objects: separate ground-truth chairs, never one box around all of them (the test:
    # each object's box inside one ground-truth chair's box grown by 10 cm, no chair twice)
    a = mapper.query(["chair"], threshold=0.6, max_points=5000)[0]
    chair = scene.class_names.index("chair")
    inst, pos = scene.points.instances, scene.points.positions
    boxes = {i: (pos[inst == i].min(0) - 0.1, pos[inst == i].max(0) + 0.1)
             for i in np.unique(inst[scene.points.labels == chair])}
    assert len(boxes) >= 2
    owners = []
    for k, obj in enumerate(a.objects):
        assert np.array_equal(np.flatnonzero(a.object_of == k), obj.indices)
        assert obj.n_points >= mapper.config.object_min_points
        if obj.n_points < 50:  # fragments of a partly seen chair, or a teacher's false positive
            continue
        inside = [i for i, (lo, hi) in boxes.items() if np.all(obj.aabb_min >= lo) and np.all(obj.aabb_max <= hi)]
        assert len(inside) == 1, (k, obj.aabb_min, obj.aabb_max, inside)
        owners.append(inside[0])
    assert len(owners) >= 2 and len(set(owners)) == len(owners)  # two objects are two chairs
    assert len(mapper.query(["chair"], threshold=0.6, max_points=5000, max_objects=1)[0].objects) == 1
    with pytest.raises(Rejected, match="max_objects"):
        mapper.query(["chair"], max_objects=-1)


def test_region_labelling_writes_back_only_unmoved_voxels(scene):
    seg = _FakeSegmenter()
    mapper = Mapper(MapperConfig(mode="segmenter", vocabulary="chair,table,sofa", full_update_every=0,
                                 region_margin=0.5), segmenter=seg)
    f0 = scene.frames[0]
    mapper.integrate_rgbd(f0)
    assert mapper.label_pass() and seg.calls[-1] == len(mapper)  # first pass: all is new
    first = mapper.export()
    assert (first["labels"] < 3).all()
    # a frame far away: only that region (+ margin) goes through the network
    shifted = f0.pose.copy()
    shifted[:3, 3] += [30.0, 0, 0]
    n_before = len(mapper)
    mapper.integrate_rgbd(Frame(color=f0.color, depth=f0.depth, intrinsics=f0.intrinsics, pose=shifted))
    assert mapper.label_pass()
    assert seg.calls[-1] == len(mapper) - n_before
    old = mapper.map.lookup(first["positions"])
    np.testing.assert_array_equal(mapper.map.features[old], first["features"])  # untouched
    assert (mapper.map.feature_counts[mapper.map.slots()] > 0).all()
    # voxels that leave the map while the network runs never receive its (stale) features
    mapper.integrate_rgbd(Frame(color=f0.color, depth=f0.depth, intrinsics=f0.intrinsics, pose=f0.pose))
    victims = mapper.map.slots()[:50]

    def evict_and_reuse():
        with mapper.lock:
            mapper.map.remove(victims)
            mapper.integrate_sweep(np.array([[100.0, 100.0, 100.0 + 0.2 * i] for i in range(50)]), np.eye(4))
    seg.during = evict_and_reuse
    assert mapper.label_pass(full=True)
    seg.during = None
    reused = mapper.map.lookup(np.array([[100.0, 100.0, 100.0 + 0.2 * i] for i in range(50)]))
    assert set(reused.tolist()) == set(victims.tolist())  # the freed slots hold the new voxels
    assert (mapper.map.feature_counts[reused] == 0).all() and (mapper.map.labels[reused] == 255).all()
    assert mapper.label_pass()  # the next pass labels them
    assert (mapper.map.feature_counts[reused] > 0).all()


def test_full_update_every(scene):
    seg = _FakeSegmenter()
    mapper = Mapper(MapperConfig(mode="segmenter", vocabulary="chair,table", full_update_every=3), segmenter=seg)
    mapper.integrate_rgbd(scene.frames[0])
    assert mapper.label_pass()        # 1: the new voxels
    assert not mapper.label_pass()    # 2: nothing changed
    assert mapper.label_pass()        # 3: full pass
    assert seg.calls == [len(mapper), len(mapper)]


def test_sliced_vocabulary_change_releases_the_lock_and_newest_wins(scene, monkeypatch):
    import sas_core.mapping as mapping

    mapper = Mapper(MapperConfig(mode="fusion"))
    for f in scene.frames[:3]:
        mapper.integrate_rgbd(f)
    mapper.label_pass(full=True)
    n = len(mapper)
    monkeypatch.setattr(mapping, "LOCK_SLICE", 500)
    events = []  # "slice" per classify call, "free" whenever the lock is fully released

    class TracingLock:
        """The mapper's RLock, recording when it becomes free (no thread timing involved)."""

        def __init__(self, inner):
            self.inner, self.depth = inner, 0

        def acquire(self, *a, **k):
            ok = self.inner.acquire(*a, **k)
            if ok:
                self.depth += 1
            return ok

        def release(self):
            self.depth -= 1
            if self.depth == 0:
                events.append("free")
            self.inner.release()

        __enter__ = acquire

        def __exit__(self, *exc):
            self.release()

    mapper.lock = TracingLock(mapper.lock)
    sizes = []
    orig = mapper.map.classify

    def slow_classify(text, slots=None):
        assert mapper.lock.depth > 0  # each slice runs under the lock
        events.append("slice")
        sizes.append(len(slots))
        return orig(text, slots)

    mapper.map.classify = slow_classify
    assert mapper.set_vocabulary(["chair", "table"])
    calls = [e for e in events if e == "slice"]
    assert len(calls) == n // 500 + 1 and max(sizes) <= 501
    # between any two slices the lock was released (queries and integration get in there)
    order = "".join("s" if e == "slice" else "f" for e in events)
    assert "ss" not in order, order
    has = mapper.map.slots()[mapper.map.feature_counts[mapper.map.slots()] > 0]
    assert set(np.unique(mapper.map.labels[has]).tolist()) <= {0, 1}

    # a newer vocabulary arriving mid-way wins: the older change stops, the map ends on the newer
    calls.clear()
    newer = {}

    def interrupting(text, slots=None):  # between two slices of the first change, a second one
        calls.append(len(slots))
        out = orig(text, slots)
        if len(calls) == 2 and not newer:
            newer["done"] = mapper.set_vocabulary(["sofa", "bed", "table"])
        return out

    mapper.map.classify = interrupting
    assert mapper.set_vocabulary(["chair", "door"]) is False
    assert newer["done"] is True and mapper.vocabulary == ["sofa", "bed", "table"]
    mapper.map.classify = orig
    text = mapper.class_text
    sims = mapper.map.features[has].astype(np.float32) @ text.T
    np.testing.assert_array_equal(mapper.map.labels[has], sims.argmax(1))
    # the query basis is refitted in slices and then spans the new words
    assert mapper.refit_query_basis(rows=400)
    np.testing.assert_allclose(np.linalg.norm(mapper.map._basis.T @ text.T, axis=0), 1.0, atol=1e-3)
    assert not mapper.refit_query_basis()  # nothing due


def test_save_load_roundtrip_and_reset(scene, tmp_path):
    mapper = Mapper(MapperConfig(mode="fusion"))
    for f in scene.frames[:3]:
        mapper.integrate_rgbd(f)
    mapper.label_pass(full=True)
    mapper.set_vocabulary(["chair", "table", "wall", "floor"])
    folder = mapper.save(tmp_path / "m")
    assert {p.name for p in folder.iterdir()} == {"map.npz", "map.ply", "manifest.json"}
    other = Mapper(MapperConfig(mode="fusion"))
    assert other.load(folder) == len(mapper)
    assert other.vocabulary == ["chair", "table", "wall", "floor"]
    a, b = mapper.export(), other.export()
    for key in ("positions", "colors", "labels", "counts", "coords", "features"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    q0, q1 = mapper.query(["chair"], 0.5, 100)[0], other.query(["chair"], 0.5, 100)[0]
    assert q0.count == q1.count and abs(q0.best - q1.best) < 1e-5
    np.testing.assert_array_equal(np.sort(q0.scores), np.sort(q1.scores))
    # the loaded map keeps integrating and fusing
    other.integrate_rgbd(scene.frames[3])
    assert len(other) >= len(mapper)
    with pytest.raises(Rejected) as e:
        Mapper(MapperConfig(mode="fusion", voxel_size=0.1)).load(folder)
    assert e.value.reason == "bad_map"
    other.reset()
    assert len(other) == 0 and other.vocabulary == ["chair", "table", "wall", "floor"]
    other.integrate_rgbd(scene.frames[0])
    assert other.label_pass() and len(other) > 0


# ---------------------------------------------------------------------------------------- live fusion

_W, _H, _F = 96, 72, 70.0
_NEAR, _FAR = 1.51, 3.01       # a 0.6 m square at 1.51 m in front of a wall at 3.01 m
_SHIFTS = (0.0, 0.45, -0.45)   # camera x positions of the three frames


def _occlusion_frames():
    """Frames of a near square hiding part of a far wall; analytic depth; each frame its stamp."""
    intr = CameraIntrinsics(_F, _F, (_W - 1) / 2, (_H - 1) / 2, _W, _H)
    v, u = np.mgrid[0:_H, 0:_W]
    dx, dy = (u - intr.cx) / _F, (v - intr.cy) / _F
    frames = []
    for k, tx in enumerate(_SHIFTS):
        near = (np.abs(tx + _NEAR * dx) <= 0.3) & (np.abs(_NEAR * dy) <= 0.3)
        depth = np.where(near, _NEAR, _FAR).astype(np.float32)
        pose = np.eye(4)
        pose[0, 3] = tx
        color = np.full((_H, _W, 3), 80 + 60 * k, np.uint8)
        frames.append(Frame(color=color, depth=depth, intrinsics=intr, pose=pose, stamp=float(k)))
    return frames


class _FrameTeacher:
    """Feature of pixel (v, u) in frame k: e_k + 0.5 e_(3 + near) + a small pixel term (D = 8)."""

    dim = 8

    def features(self, frame):
        import torch

        k = int(frame.stamp)
        h, w = frame.depth.shape
        f = np.zeros((h, w, self.dim), np.float32)
        f[..., k] = 1.0
        f[..., 3] = 0.5 * (frame.depth >= 2.0)
        f[..., 4] = 0.5 * (frame.depth < 2.0)
        f[..., 5] = np.linspace(0, 0.2, w)[None, :]
        valid = np.ones((h, w), bool)
        valid[:, :3] = False  # a strip without prediction
        return torch.from_numpy(f).half(), torch.from_numpy(valid)


@pytest.mark.parametrize("teacher_stride", [1, 2])
def test_live_fusion_equals_sas_fuse_with_occlusion(teacher_stride):
    """The Mapper's live fusion and `sas fuse` (fuse_frames on the voxel centres) give the same
    per-voxel features, and a voxel hidden behind the near square in a frame gets nothing from it."""
    from sas_core.geometry.multiview import fuse_frames

    teacher = _FrameTeacher()
    mapper = Mapper(MapperConfig(mode="fusion", vocabulary="chair,table", text_dim=8, pixel_stride=1,
                                 teacher_stride=teacher_stride, voxel_size=0.05), teacher=teacher)
    frames = _occlusion_frames()
    mapper.integrate_rgbd(frames[0])
    slots = mapper.map.slots()  # voxels that existed since the first frame: they saw every frame
    for f in frames[1:]:
        mapper.integrate_rgbd(f)
    centres = mapper.map.centers(slots)
    fused = fuse_frames(centres, [strided_frame(f, teacher_stride) for f in frames], teacher, mapper.fusion_config,
                        progress=False)
    mask = fused.mask.numpy()
    live_counts = mapper.map.feature_counts[slots]
    np.testing.assert_array_equal(live_counts, fused.counts.numpy().astype(np.float32))
    np.testing.assert_array_equal(live_counts > 0, mask)
    assert mask.mean() > 0.5
    ref = fused.features.float().numpy()[mask]
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    live = mapper.map.features[slots[mask]].astype(np.float32)
    np.testing.assert_allclose(live, ref, atol=2e-3)  # fp16 rounding

    # occlusion: far-wall voxels behind the square as seen from frame 1 get no frame-1 feature
    far = np.abs(centres[:, 2] - _FAR) < 0.05
    cx, cz = centres[:, 0], centres[:, 2]
    x_at_near = _SHIFTS[1] + (cx - _SHIFTS[1]) * _NEAR / cz  # where the ray to the voxel crosses z = NEAR
    y_at_near = centres[:, 1] * _NEAR / cz
    square = (np.abs(x_at_near) <= 0.3) & (np.abs(y_at_near) <= 0.3)  # the square is x, y in [-0.3, 0.3]
    hidden = far & mask & (np.abs(x_at_near) <= 0.25) & (np.abs(y_at_near) <= 0.25)
    in_view = far & ~square & ((np.abs(x_at_near) > 0.35) | (np.abs(y_at_near) > 0.35)) \
        & (np.abs((cx - _SHIFTS[1]) / cz * _F) < _W / 2 - 15) & (np.abs(centres[:, 1] / cz * _F) < _H / 2 - 15)
    feats = mapper.map.features[slots].astype(np.float32)
    assert hidden.sum() >= 20 and in_view.sum() >= 20, (hidden.sum(), in_view.sum())
    assert np.all(feats[hidden, 1] == 0)  # seen in other frames (mask), never in frame 1
    assert np.all(feats[in_view, 1] > 0)
    assert np.all(feats[far & mask, 4] == 0)  # no near-square feature ever lands on the wall
    # labels follow from the fused means
    assert mapper.label_pass()
    assert (mapper.map.labels[slots[mask]] < 2).all()
