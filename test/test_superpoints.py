"""Superpoints (ScanNet segmentator): hand-built geometry, object boundaries, cache, identity mode."""

import numpy as np
import pytest

from sas_core.geometry import superpoints as S


def grid(n=40, size=1.0):
    """(n*n, 2) regular grid in [0, size]^2 and its triangles (2 per cell)."""
    u = np.linspace(0.0, size, n)
    uv = np.stack(np.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
    i, j = np.meshgrid(np.arange(n - 1), np.arange(n - 1), indexing="ij")
    v0 = (i * n + j).reshape(-1)
    tri = np.concatenate([np.stack([v0, v0 + n, v0 + n + 1], 1), np.stack([v0, v0 + n + 1, v0 + 1], 1)])
    return uv, tri


def l_shape_mesh(n=40):
    """Floor (z = 0) and a wall (y = 0) meeting at a 90 degree crease, sharing the crease vertices."""
    uv, tri = grid(n)
    floor = np.c_[uv[:, 0], uv[:, 1], np.zeros(len(uv))]                 # y from 0 to 1
    wall = np.c_[uv[:, 0], np.zeros(len(uv)), uv[:, 1]]                  # z from 0 to 1
    # wall row j=0 (z=0) is the crease: reuse the floor's y=0 vertices
    wall_ids = np.arange(len(uv)) + len(uv)
    crease = uv[:, 1] == 0
    wall_ids[crease] = np.where(uv[:, 1] == 0)[0]
    keep = ~crease
    remap = np.full(len(uv), -1)
    remap[keep] = len(uv) + np.arange(keep.sum())
    remap[crease] = np.where(uv[:, 1] == 0)[0]
    vertices = np.concatenate([floor, wall[keep]])
    wall_tri = remap[tri][:, ::-1]  # flip winding so the wall's normal faces the room (+y)
    is_wall = np.r_[np.zeros(len(uv), bool), np.ones(keep.sum(), bool)]
    return vertices, np.concatenate([tri, wall_tri]), is_wall


def test_mesh_two_planes_at_90_degrees_give_two_segments():
    v, tri, is_wall = l_shape_mesh()
    normals = S.mesh_vertex_normals(v, tri)
    np.testing.assert_allclose(normals[5], [0, 0, 1], atol=1e-9)  # interior floor vertex
    sp = S.superpoints(v, mesh_triangles=tri)
    assert sp.max() + 1 == 2
    # every vertex off the crease is with its own plane (crease vertices join either side)
    interior = np.abs(v[:, 1]) + np.abs(v[:, 2]) > 0
    for side in (is_wall, ~is_wall):
        assert len(np.unique(sp[side & interior])) == 1
    assert sp[is_wall & interior][0] != sp[~is_wall & interior][0]


def test_flat_plane_is_one_segment_and_min_verts_merges_small_ones():
    uv, tri = grid(30)
    v = np.c_[uv, np.zeros(len(uv))]
    assert np.all(S.superpoints(v, mesh_triangles=tri) == 0)
    # noisy normals: FH splits into small segments, the min_verts pass joins them up
    rng = np.random.default_rng(0)
    n = np.tile([0.0, 0.0, 1.0], (len(v), 1)) + rng.normal(0, 0.08, (len(v), 3))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    fine = S.superpoints(v, n, mesh_triangles=tri, min_verts=0)
    merged = S.superpoints(v, n, mesh_triangles=tri, min_verts=60)
    assert fine.max() + 1 > 10
    sizes = np.bincount(merged)
    assert sizes.min() >= 60 and len(sizes) < fine.max() + 1
    # a plane smaller than min_verts with no neighbours stays one segment of its own
    uv2, tri2 = grid(5)
    v2 = np.c_[uv2 * 0.1 + 5.0, np.zeros(len(uv2))]
    sp = S.superpoints(np.r_[v, v2], mesh_triangles=np.r_[tri, tri2 + len(v)])
    assert len(np.unique(sp[len(v):])) == 1 and sp[len(v)] != sp[0]


def test_point_cloud_two_planes_and_parallel_planes_not_bridged():
    uv, _ = grid(40)
    floor = np.c_[uv, np.zeros(len(uv))]
    wall = np.c_[uv[:, 0], np.zeros(len(uv)), uv[:, 1] + 1.0 / 39]
    pts = np.r_[floor, wall]
    normals = np.r_[np.tile([0, 0, 1.0], (len(uv), 1)), np.tile([0, 1.0, 0], (len(uv), 1))]
    sp = S.superpoints(pts, normals)
    assert len(np.unique(sp[: len(uv)])) == 1 and len(np.unique(sp[len(uv):])) == 1
    assert sp[0] != sp[-1]
    # two parallel planes 0.5 m apart: same normals, but kNN edges never span the gap
    top = floor + [0, 0, 0.5]
    sp2 = S.superpoints(np.r_[floor, top], np.tile([0, 0, 1.0], (2 * len(uv), 1)))
    assert sp2.max() + 1 == 2 and sp2[0] != sp2[-1]


def test_estimated_normals_two_planes_mostly_separated():
    uv, _ = grid(40)
    floor = np.c_[uv, np.zeros(len(uv))]
    wall = np.c_[uv[:, 0], np.zeros(len(uv)), uv[:, 1] + 1.0 / 39]
    pts = np.r_[floor, wall]
    inst = np.r_[np.zeros(len(uv), int), np.ones(len(uv), int)]
    sp = S.superpoints(pts)  # normals from Open3D
    assert S.boundary_error(sp, inst) < 0.05  # only the blurred crease band may mix
    assert sp.max() + 1 <= 4


def room(spacing=0.03, seed=0):
    """A small room sampled as points with normals and instance ids: floor, 2 walls, boxes, a table."""
    rng = np.random.default_rng(seed)
    pts, nrm, ins = [], [], []

    def rect(origin, e1, e2, normal, inst):
        a, b = np.linalg.norm(e1), np.linalg.norm(e2)
        m = int(a * b / spacing ** 2)
        uv = rng.random((m, 2))
        pts.append(origin + uv[:, :1] * e1 + uv[:, 1:] * e2)
        nrm.append(np.tile(normal, (m, 1)))
        ins.append(np.full(m, inst))

    def box(lo, hi, inst):
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        d = hi - lo
        ex, ey, ez = np.diag(d)
        rect(np.r_[lo[:2], hi[2]], ex, ey, [0, 0, 1], inst)           # top
        rect(lo, ex, ez, [0, -1, 0], inst)
        rect(lo + ey, ex, ez, [0, 1, 0], inst)
        rect(lo, ey, ez, [-1, 0, 0], inst)
        rect(lo + ex, ey, ez, [1, 0, 0], inst)

    rect(np.zeros(3), [4, 0, 0], [0, 4, 0], [0, 0, 1], 0)                # floor
    rect(np.zeros(3), [4, 0, 0], [0, 0, 2.5], [0, 1, 0], 1)              # wall y = 0
    rect(np.zeros(3), [0, 4, 0], [0, 0, 2.5], [1, 0, 0], 2)              # wall x = 0
    box([0.8, 0.8, 0], [1.4, 1.3, 0.5], 3)                                # cabinet on the floor
    box([2.5, 0.0, 0], [3.5, 0.6, 0.9], 4)                                # counter against the wall
    box([2.0, 2.2, 0.7], [3.2, 3.0, 0.75], 5)                             # table top
    for x, y in ((2.05, 2.25), (3.1, 2.25), (2.05, 2.9), (3.1, 2.9)):
        box([x, y, 0], [x + 0.05, y + 0.05, 0.7], 5)                      # its legs
    box([0.0, 2.0, 1.4], [0.3, 2.8, 1.8], 6)                              # wall cabinet
    # (a picture a few mm proud of its wall would join the wall: normals alone cannot tell them apart,
    # on ScanNet meshes as here)
    return np.concatenate(pts), np.concatenate(nrm), np.concatenate(ins)


def test_room_superpoints_do_not_cross_objects():
    pts, nrm, inst = room()
    sp = S.superpoints(pts, nrm)
    err = S.boundary_error(sp, inst)
    assert err < 0.02, err
    assert 8 <= sp.max() + 1 < len(pts) / 60  # segments, not points; not one blob
    # wrong on purpose: a single segment crosses everything
    assert S.boundary_error(np.zeros(len(pts), int), inst) > 0.5


def test_synthetic_scene_superpoints_do_not_cross_instances():
    synthetic = pytest.importorskip("sas_core.data.synthetic")
    scene = synthetic.generate_scene(synthetic.SynthConfig(seed=0, n_frames=2, with_lidar=False))
    # mesh graph (as ScanNet): a vertex's instance is the instance of (one of) its triangles
    tri = np.asarray(scene.triangles)
    v_inst = np.full(len(scene.vertices), -1, dtype=np.int64)
    v_inst[tri.reshape(-1)] = np.repeat(np.asarray(scene.triangle_instances), 3)
    v_sp = S.superpoints(scene.vertices, mesh_triangles=tri)
    assert S.boundary_error(v_sp, v_inst) < 0.02
    # the surface samples inherit them through the triangle they lie on
    pc = scene.points
    sp = S.mesh_superpoints_at(pc.positions, pc.extra["triangle"], scene.vertices, tri)
    assert S.boundary_error(sp, pc.instances) < 0.02
    assert 20 < len(np.unique(sp)) < len(pc) / 100
    # kNN graph on the samples: normals alone merge pictures / windows / curtains into their wall
    # (a few mm apart, parallel normals); the colour term separates them
    knn_plain = S.boundary_error(S.superpoints(pc.positions, pc.normals), pc.instances)
    knn_color = S.boundary_error(
        S.superpoints(pc.positions, pc.normals, colors=pc.colors, color_weight=0.1), pc.instances)
    assert knn_color < 0.03 and knn_color < knn_plain


def test_identity_mode_cache_and_errors(tmp_path):
    pts, nrm, _ = room(spacing=0.08)
    np.testing.assert_array_equal(S.superpoints(pts, method="points"), np.arange(len(pts)))
    cfg = S.SuperpointConfig()
    scene = tmp_path / "scene0000_00.pth"
    sp = S.cached_superpoints(scene, pts, cfg, normals=nrm)
    path = S.cache_path(scene, cfg)
    assert path.exists() and path.parent == tmp_path
    np.testing.assert_array_equal(np.load(path), sp)
    np.save(path, np.zeros(len(pts), np.int64) + 7)        # a cached file is used as is
    assert np.all(S.cached_superpoints(scene, pts, cfg, normals=nrm) == 7)
    np.save(path, np.zeros(3, np.int64))                    # stale (wrong length): recomputed
    np.testing.assert_array_equal(S.cached_superpoints(scene, pts, cfg, normals=nrm), sp)
    other = S.SuperpointConfig(k_thresh=0.05)
    assert S.cache_path(scene, other) != path
    assert not list(tmp_path.glob(".*"))                    # no temporary files left behind
    with pytest.raises(ValueError, match="normals"):
        S.superpoints(pts, nrm[:-1])
    with pytest.raises(ValueError, match="NaN"):
        S.superpoints(np.full((4, 3), np.nan))
    with pytest.raises(ValueError, match="method"):
        S.superpoints(pts, method="voxels")
    with pytest.raises(ValueError, match="mesh_triangles"):
        S.superpoints(pts, mesh_triangles=np.array([[0, 1, len(pts)]]))
    assert S.superpoints(np.zeros((0, 3))).shape == (0,)


def _scannet_reference(n, a, b, w, c, min_verts):
    """ScanNet's segment_graph + small-segment pass, literally (pure Python, for small graphs)."""
    parent, rank, size = list(range(n)), [0] * n, [1] * n

    def find(x):
        y = x
        while y != parent[y]:
            y = parent[y]
        parent[x] = y
        return y

    def join(x, y):
        if rank[x] > rank[y]:
            parent[y] = x
            size[x] += size[y]
        else:
            parent[x] = y
            size[y] += size[x]
            if rank[x] == rank[y]:
                rank[y] += 1

    order = np.argsort(w, kind="stable")
    threshold = [c] * n
    for i in order:
        x, y = find(a[i]), find(b[i])
        if x != y and w[i] <= threshold[x] and w[i] <= threshold[y]:
            join(x, y)
            x = find(x)
            threshold[x] = w[i] + c / size[x]
    for i in order:
        x, y = find(a[i]), find(b[i])
        if x != y and (size[x] < min_verts or size[y] < min_verts):
            join(x, y)
    return np.array([find(i) for i in range(n)])


@pytest.mark.parametrize("seed", range(3))
def test_union_find_matches_scannet_reference(seed):
    rng = np.random.default_rng(seed)
    n, e = 400, 1600
    a, b = rng.integers(0, n, e), rng.integers(0, n, e)
    w = (rng.random(e) ** 3 * 0.05).astype(np.float32)
    for min_verts in (0, 10):
        order = np.argsort(w, kind="stable")
        ours = S._segment_graph(n, a[order], b[order], w[order], 0.01, min_verts)
        ref = _scannet_reference(n, a, b, w, np.float32(0.01), min_verts)
        # same partition (root ids may differ): the pairs (ours, ref) are one-to-one
        pairs = np.unique(np.c_[ours, ref], axis=0)
        assert len(pairs) == len(np.unique(ours)) == len(np.unique(ref))
        assert len(np.unique(ours)) < n and (min_verts or len(np.unique(ours)) > 1)


def test_scannet_segs_json(tmp_path):
    p = tmp_path / "scene0000_00_vh_clean_2.0.010000.segs.json"
    p.write_text('{"params":{"kThresh":0.01,"segMinVerts":20},"sceneId":"scene0000_00","segIndices":[7,7,3,9,3]}')
    np.testing.assert_array_equal(S.load_scannet_segs(p, 5), [1, 1, 0, 2, 0])
    with pytest.raises(ValueError, match="expected"):
        S.load_scannet_segs(p, 6)
    p.write_text("{}")
    with pytest.raises(ValueError, match="segs.json"):
        S.load_scannet_segs(p)
