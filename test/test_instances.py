"""Instance proposals (sas_core.instances): back-projection, view consensus, semantics, boxes, queries."""

import math

import numpy as np
import pytest

from sas_core.instances import (BackProjectionConfig, InstanceConfig, MaskView, backproject_masks, cluster_masks,
                                describe_instances, grid_components, instance_ids, instances_for_query,
                                label_components, oriented_box, propose_instances, region_growing)
from sas_core.types import CameraIntrinsics

INTR = CameraIntrinsics(100.0, 100.0, 99.5, 74.5, 200, 150)
Z = 3.0


def _plane(x0, x1, y0=-0.6, y1=0.6, z=Z, step=0.02):
    """Points of a rectangle facing a camera at the origin looking down +z."""
    xs, ys = np.arange(x0 + step / 2, x1, step), np.arange(y0 + step / 2, y1, step)
    g = np.stack(np.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2)
    return np.c_[g, np.full(len(g), z)].astype(np.float32)


def _pose(tx=0.0):
    p = np.eye(4)
    p[0, 3] = tx
    return p


def _render(rects, tx=0.0, z=Z):
    """(depth, mask ids) of axis-aligned rectangles [(x0, x1, id)] at depth z seen from camera x = tx."""
    v, u = np.mgrid[0:INTR.height, 0:INTR.width]
    x = (u - INTR.cx) * z / INTR.fx + tx
    y = (v - INTR.cy) * z / INTR.fy
    ids = np.full(u.shape, -1, np.int64)
    depth = np.zeros(u.shape, np.float32)
    for x0, x1, i in rects:
        hit = (x >= x0) & (x < x1) & (y >= -0.6) & (y < 0.6)
        ids[hit] = i
        depth[hit] = z
    return depth, ids


def _quadrant_superpoints(pts, x_split):
    return (pts[:, 0] >= x_split).astype(np.int64) * 2 + (pts[:, 1] >= 0).astype(np.int64)


def test_backprojection_lands_on_the_right_superpoints():
    front = _plane(-1.0, 1.0)
    behind = _plane(-1.0, 1.0, z=5.0)  # hidden behind the front plane: fails the depth test
    pts = np.concatenate([front, behind])
    sp = np.concatenate([_quadrant_superpoints(front, 0.0), 4 + _quadrant_superpoints(behind, 0.0)])
    depth, ids = _render([(-1.0, 0.0, 7), (0.0, 1.0, 3)])
    bp = backproject_masks(pts, sp, [MaskView(depth, _pose(), INTR, ids)])
    assert bp.n_masks == 2 and bp.n_frames == 1
    members = {tuple(sorted(bp.member[m].indices.tolist())) for m in range(bp.n_masks)}
    assert members == {(0, 1), (2, 3)}  # left half: superpoints 0, 1; right half: 2, 3; none behind
    assert bp.visible[4:].sum() == 0
    m_left = next(m for m in range(2) if 0 in bp.member[m].indices)
    np.testing.assert_array_equal(bp.mask_points(m_left), np.flatnonzero(np.isin(sp, [0, 1])))
    # a superpoint only a quarter inside a mask does not join it (member_ratio 0.5)
    depth2, ids2 = _render([(-1.0, -0.75, 0)])
    bp2 = backproject_masks(pts, sp, [MaskView(depth, _pose(), INTR, ids2)])
    assert bp2.member.nnz == 0
    bp3 = backproject_masks(pts, sp, [MaskView(depth, _pose(), INTR, ids2)], BackProjectionConfig(member_ratio=0.2))
    assert sorted(bp3.member[0].indices.tolist()) == [0, 1]


def test_two_views_of_one_object_merge():
    pts = _plane(-0.5, 0.5)
    sp = _quadrant_superpoints(pts, 0.0)
    views = []
    for k, tx in enumerate((-0.1, 0.0, 0.1, 0.2)):
        depth, ids = _render([(-0.5, 0.5, 10 + k)], tx=tx)
        views.append(MaskView(depth, _pose(tx), INTR, ids))
    bp = backproject_masks(pts, sp, views)
    assert bp.n_masks == 4
    groups, conf, n_masks = cluster_masks(bp, pts, InstanceConfig(min_points=10))
    assert len(groups) == 1 and n_masks.tolist() == [4]
    np.testing.assert_array_equal(groups[0], np.arange(len(pts)))
    assert conf[0] == pytest.approx(1.0)


def test_two_touching_objects_stay_apart_despite_one_joint_mask():
    a, b = _plane(-0.6, 0.0), _plane(0.0, 0.6)
    pts = np.concatenate([a, b])
    sp = np.concatenate([_quadrant_superpoints(a, -0.3), 4 + _quadrant_superpoints(b, 0.3)])
    views = []
    for k, tx in enumerate(np.linspace(-0.2, 0.2, 10)):
        rects = [(-0.6, 0.0, 2 * k), (0.0, 0.6, 2 * k + 1)] if k != 4 else [(-0.6, 0.6, 99)]  # one joint mask
        depth, ids = _render(rects, tx=tx)
        views.append(MaskView(depth, _pose(tx), INTR, ids))
    bp = backproject_masks(pts, sp, views)
    groups, conf, n_masks = cluster_masks(bp, pts, InstanceConfig(min_points=10))
    got = sorted(tuple(g.tolist()) for g in groups)
    assert got == sorted([tuple(range(len(a))), tuple(range(len(a), len(pts)))])
    # and with every view joining them, they become one object
    joint = []
    for tx in np.linspace(-0.2, 0.2, 5):
        depth, ids = _render([(-0.6, 0.6, 0)], tx=tx)
        joint.append(MaskView(depth, _pose(tx), INTR, ids))
    groups, _, _ = cluster_masks(backproject_masks(pts, sp, joint), pts, InstanceConfig(min_points=10))
    assert len(groups) == 1 and len(groups[0]) == len(pts)


def test_region_growing_joins_by_feature_and_splits_touching_objects():
    a, b = _plane(-0.6, 0.0), _plane(0.0, 0.6)
    pts = np.concatenate([a, b])
    sp = np.concatenate([_quadrant_superpoints(a, -0.3), 4 + _quadrant_superpoints(b, 0.3)])
    rng = np.random.default_rng(0)
    fa, fb = rng.normal(size=16), rng.normal(size=16)
    feats = np.concatenate([np.tile(fa, (len(a), 1)), np.tile(fb, (len(b), 1))]).astype(np.float32)
    feats += rng.normal(scale=0.02, size=feats.shape).astype(np.float32)
    groups, conf = region_growing(pts, sp, feats, InstanceConfig(min_points=10))
    assert sorted(len(g) for g in groups) == sorted([len(a), len(b)])
    assert all(c > 0.99 for c in conf)
    # propose_instances falls back to it without masks, and labels the instances
    text = np.stack([fa, fb]) / np.linalg.norm(np.stack([fa, fb]), axis=1, keepdims=True)
    inst = propose_instances(pts, sp, features=feats, text=text, class_names=["a", "b"],
                             config=InstanceConfig(min_points=10))
    assert sorted(i.name for i in inst) == ["a", "b"]
    ids = instance_ids(len(pts), inst)
    assert len(np.unique(ids[: len(a)])) == 1 and ids[0] != ids[-1]
    with pytest.raises(ValueError, match="masks"):
        propose_instances(pts, sp)


def test_oriented_box_recovers_a_rotated_rectangle():
    rng = np.random.default_rng(1)
    local = np.c_[rng.uniform(-1.0, 1.0, 4000), rng.uniform(-0.25, 0.25, 4000), rng.uniform(0, 0.8, 4000)]
    yaw = 0.6
    R = np.array([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
    pts = local @ R.T + [2.0, 3.0, 0.0]
    center, size, got = oriented_box(pts)
    assert got == pytest.approx(yaw, abs=0.02)
    np.testing.assert_allclose(size, [2.0, 0.5, 0.8], atol=0.03)
    np.testing.assert_allclose(center, [2.0, 3.0, 0.4], atol=0.03)
    inst = describe_instances(pts, [np.arange(len(pts))])[0]
    corners = inst.obb_corners()
    assert corners.shape == (8, 3)
    np.testing.assert_allclose(corners.mean(0), center, atol=1e-5)
    assert inst.to_json()["obb"]["yaw"] == pytest.approx(yaw, abs=0.02)
    np.testing.assert_allclose(inst.size, pts.max(0) - pts.min(0), atol=1e-5)


def test_instances_for_query_splits_matching_voxels_into_objects():
    rng = np.random.default_rng(2)
    g = np.stack(np.meshgrid(np.arange(6), np.arange(6), np.arange(3), indexing="ij"), -1).reshape(-1, 3)
    blob = (g + 0.5) * 0.05
    pos = np.concatenate([blob, blob + [1.0, 0, 0], blob + [0, 1.0, 0]]).astype(np.float32)
    t = np.zeros(8, np.float32)
    t[0] = 1
    other = np.zeros(8, np.float32)
    other[1] = 1
    feats = np.concatenate([np.tile(t, (len(blob), 1)), np.tile(t, (len(blob), 1)), np.tile(other, (len(blob), 1))])
    feats = feats + rng.normal(scale=0.05, size=feats.shape).astype(np.float32)
    objs = instances_for_query(pos, feats, t, threshold=0.5, voxel_size=0.05, min_points=10, name="thing")
    assert len(objs) == 2 and all(o.n_points == len(blob) for o in objs)
    assert {round(float(o.centroid[0])) for o in objs} == {0, 1} and objs[0].name == "thing"
    assert objs[0].score >= objs[1].score
    # precomputed matches (a VoxelMap.query result) give the same objects
    cos = feats @ t / np.linalg.norm(feats, axis=1)
    idx = np.flatnonzero(cos >= 0.5)
    objs2 = instances_for_query(pos, None, None, voxel_size=0.05, index=idx, scores=cos[idx], min_points=10)
    assert sorted(tuple(o.indices) for o in objs2) == sorted(tuple(o.indices) for o in objs)
    assert instances_for_query(pos, feats, -t, threshold=0.5, voxel_size=0.05) == []
    # a gap of two voxels separates, touching cells connect (26-neighbourhood)
    comp = grid_components(np.array([[0, 0, 0], [0.05, 0.05, 0.05], [0.2, 0, 0]]), 0.05)
    assert comp[0] == comp[1] != comp[2]


def test_label_components_baseline():
    a, b = _plane(-0.6, -0.1), _plane(0.1, 0.6)
    pts = np.concatenate([a, b, _plane(-0.05, 0.05)])
    labels = np.concatenate([np.zeros(len(a), int), np.zeros(len(b), int), np.full(len(pts) - len(a) - len(b), 255)])
    groups, glab = label_components(pts, labels, min_points=10)
    assert sorted(len(g) for g in groups) == sorted([len(a), len(b)]) and glab.tolist() == [0, 0]


@pytest.fixture(scope="module")
def synthetic_room():
    from sas_core.data.synthetic import SynthConfig, generate_scene
    from sas_core.instances.synthetic import fused_teacher_features, simulated_teachers
    from sas_core.text import SCANNET_20, SyntheticTextEncoder, class_embeddings

    scene = generate_scene(SynthConfig(seed=1, n_frames=30, with_lidar=False, points_per_m2=300,
                                       room_min=(4.5, 4.0), room_max=(6.0, 5.0)))
    names = list(SCANNET_20)
    enc = SyntheticTextEncoder(names, dim=32, seed=0)
    text = class_embeddings(enc, names).float().numpy()
    teachers = simulated_teachers(enc, 1)
    feats = fused_teacher_features(scene, teachers, text, "capability")
    return scene, enc, names, text, teachers, feats


def _chair_boxes(scene):
    from sas_core.data.synthetic import CLASS_INDEX

    pc = scene.points
    boxes = {}
    for i in np.unique(pc.instances[pc.labels == CLASS_INDEX["chair"]]):
        p = pc.positions[pc.instances == i]
        boxes[int(i)] = (p.min(0) - 0.1, p.max(0) + 0.1)
    return boxes


def _owner(boxes, lo, hi):
    inside = [i for i, (a, b) in boxes.items() if np.all(lo >= a) and np.all(hi <= b)]
    return inside[0] if len(inside) == 1 else None


def test_separate_chairs_come_out_separate_on_a_synthetic_room(synthetic_room):
    from sas_core.instances.synthetic import synthetic_instances

    scene, enc, names, text, teachers, feats = synthetic_room
    inst, _, _ = synthetic_instances(scene, enc, names, text, masks="teacher", features=feats, teachers=teachers)
    boxes = _chair_boxes(scene)
    chairs = [i for i in inst if i.name == "chair"]
    assert len(boxes) >= 2 and len(chairs) >= 2
    owners = [_owner(boxes, c.aabb_min, c.aabb_max) for c in chairs]
    assert None not in owners, "a predicted chair's box is not inside exactly one ground-truth chair box"
    assert len(set(owners)) >= 2, "separate chairs were merged or missed"
    # the object query separates them too; features with the structure of distilled ones (the class
    # text of the ground truth + a per-object offset + noise), so the teachers' mislabelled objects
    # do not enter this check of the grouping
    pc = scene.points
    rng = np.random.default_rng(0)
    offset = rng.normal(scale=0.3 / np.sqrt(text.shape[1]), size=(int(pc.instances.max()) + 2, text.shape[1]))
    labels = np.where(pc.labels == 255, 0, pc.labels)
    clean = text[labels] + offset[pc.instances] + rng.normal(scale=0.3 / np.sqrt(text.shape[1]), size=(len(pc), text.shape[1]))
    objs = instances_for_query(pc.positions, clean.astype(np.float32), text[names.index("chair")], threshold=0.5,
                               voxel_size=0.1, min_points=50)
    q_owners = [_owner(boxes, o.aabb_min, o.aabb_max) for o in objs]
    assert len(objs) == len(boxes) and None not in q_owners and len(set(q_owners)) == len(boxes)


def test_sam_mask_source_gives_a_mask_id_image():
    pytest.importorskip("segment_anything")
    from sas_core.instances import SamMaskSource
    from sas_core.teachers.mask_teacher import MaskTeacherConfig, build_tiny_sam
    from sas_core.types import Frame

    intr = CameraIntrinsics(40.0, 40.0, 31.5, 31.5, 64, 64)
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[16:48, 16:48] = 200
    frame = Frame(color=rgb, depth=np.ones((64, 64), np.float32), intrinsics=intr, pose=np.eye(4))
    source = SamMaskSource(MaskTeacherConfig(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                             min_area=1), sam=build_tiny_sam())
    ids = source(frame)
    assert ids.shape == (64, 64) and ids.dtype == np.int64 and ids.min() >= -1
    with pytest.raises(ValueError, match="no SAM checkpoint"):
        SamMaskSource(MaskTeacherConfig(sam_checkpoint=None))
