"""sas_core.geometry.voxel_map: incremental integration, bounded memory, exact reduced-store queries."""

import numpy as np
import pytest

from sas_core.geometry.voxel_map import VoxelMap, VoxelMapConfig, pack_keys, unpack_keys


def test_keys_roundtrip():
    c = np.array([[0, 0, 0], [-5, 7, 1000], [-(1 << 20) + 2, (1 << 20) - 2, -1]])
    np.testing.assert_array_equal(unpack_keys(pack_keys(c)), c)


def test_integrate_means_counts_and_colors():
    m = VoxelMap(VoxelMapConfig(voxel_size=1.0))
    pts = np.array([[0.1, 0.1, 0.1], [0.3, 0.5, 0.1], [1.5, 0.5, 0.5], [np.nan, 0, 0]])
    cols = np.array([[255, 0, 0], [0, 0, 255], [0, 255, 0], [0, 0, 0]], np.uint8)
    slots = m.integrate(pts, cols)
    assert len(m) == 2 and len(slots) == 2
    s0 = m.lookup(np.array([[0.5, 0.5, 0.5]]))[0]
    np.testing.assert_allclose(m.positions[s0], [0.2, 0.3, 0.1], atol=1e-6)
    np.testing.assert_allclose(m.colors[s0], [0.5, 0, 0.5], atol=1e-6)
    assert m.counts[s0] == 2
    m.integrate(np.array([[0.8, 0.9, 0.4]]), np.array([[0, 0, 0]], np.uint8))
    np.testing.assert_allclose(m.positions[s0], [0.4, 0.5, 0.2], atol=1e-6)
    assert m.counts[s0] == 3 and len(m) == 2
    assert m.lookup(np.array([[5.0, 5, 5]]))[0] == -1
    data = m.export()
    assert data["positions"].shape == (2, 3) and data["colors"].dtype == np.uint8


def test_bounded_memory_oldest_eviction():
    cfg = VoxelMapConfig(voxel_size=0.1, max_points=1000, initial_capacity=64, evict_fraction=0.1)
    m = VoxelMap(cfg)
    rng = np.random.default_rng(0)
    sizes = []
    for i in range(30):  # a moving sensor: each frame sees a new 0.6 m^3 region
        pts = rng.random((3000, 3)) * 0.6 + [i * 1.0, 0, 0]
        m.integrate(pts)
        assert len(m) <= cfg.max_points
        sizes.append(m.memory_bytes())
    assert m.capacity == cfg.max_points
    assert sizes[-1] == sizes[-10]  # flat once full
    # the newest region is kept, the oldest is gone
    assert m.lookup(np.array([[29.3, 0.3, 0.3]]))[0] >= 0
    assert m.lookup(np.array([[0.3, 0.3, 0.3]]))[0] == -1
    assert m.n_evicted > 0
    # key index and slot flags agree
    assert m.valid.sum() == len(m) and len(np.unique(m.slots())) == len(m)


def test_radius_and_farthest():
    m = VoxelMap(VoxelMapConfig(voxel_size=0.5, max_radius=3.0))
    m.integrate(np.array([[0.0, 0, 0], [2.0, 0, 0], [10.0, 0, 0]]), sensor_origin=np.zeros(3))
    assert len(m) == 2  # 10 m point outside the radius
    m.integrate(np.array([[6.0, 0, 0]]), sensor_origin=np.array([5.0, 0, 0]))
    assert m.lookup(np.array([[0.1, 0.1, 0.1]]))[0] == -1  # now 5 m from the sensor
    assert m.lookup(np.array([[2.1, 0.1, 0.1]]))[0] >= 0
    f = VoxelMap(VoxelMapConfig(voxel_size=1.0, max_points=3, eviction="farthest", evict_fraction=0))
    f.integrate(np.array([[0.5, 0, 0], [1.5, 0, 0], [9.5, 0, 0]]), sensor_origin=np.zeros(3))
    f.integrate(np.array([[2.5, 0, 0]]), sensor_origin=np.zeros(3))
    assert f.lookup(np.array([[9.5, 0, 0]]))[0] == -1 and len(f) == 3


def _feature_map(n=5000, dim=64, k=6, noise=0.3, seed=0, rank=16):
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(k, dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    m = VoxelMap(VoxelMapConfig(voxel_size=0.05, max_points=n * 2, query_rank=rank))
    pts = rng.random((n, 3)).astype(np.float32) * 10
    slots = m.integrate(pts)
    gt = rng.integers(0, k, len(slots))
    feats = text[gt] + noise * rng.normal(size=(len(slots), dim)).astype(np.float32)
    return m, slots, gt, feats, text, rng


def test_classify_and_query_exact_vs_scan():
    m, slots, gt, feats, text, rng = _feature_map()
    m.set_features(slots, feats)
    m.classify(text)
    assert (m.labels[slots] == gt).mean() > 0.95
    live = m.slots()
    for t in [text[2], rng.normal(size=64).astype(np.float32)]:  # a vocabulary word and a free text
        t = t / np.linalg.norm(t)
        ref = m.scan_query(t)
        for thr, k, exact_topk in [(0.3, 0, False), (0.0, 0, False), (0.3, 50, True), (0.3, 50, False),
                                   (0.99, 0, False)]:
            res = m.query(t, threshold=thr, max_points=k, exact_topk=exact_topk)
            above = ref >= thr
            assert res.count == above.sum()
            want = live[above][np.argsort(-ref[above], kind="stable")]
            if k:
                want = want[:k]
                assert len(res.slots) == min(k, above.sum())
            if exact_topk or not k:
                assert set(res.slots.tolist()) == set(want.tolist())
            else:  # all truly above the threshold, and no worse than the exact k-th score minus the band
                assert set(res.slots.tolist()) <= set(live[above].tolist())
                assert res.scores.min() >= ref[np.isin(live, want)].min() - 0.5
            np.testing.assert_allclose(np.sort(res.scores), np.sort(ref[np.isin(live, res.slots)]), atol=1e-5)
            assert np.all(np.diff(res.scores) <= 1e-7)
        assert res.best_score == pytest.approx(ref.max(), abs=1e-5)
    # a vocabulary word lies in the basis: no exact rescoring beyond the returned points
    res = m.query(text[1], threshold=0.5, max_points=10)
    assert res.rescored < 200


def test_stepwise_refit_keeps_queries_exact_and_encodes_every_voxel():
    """A vocabulary change refits the query basis in steps; between steps the map changes (new
    features, removals, growth) and queries stay equal to a full scan; afterwards every voxel is
    encoded with the new basis."""
    m, slots, gt, feats, text, rng = _feature_map(n=3000)
    m.set_features(slots, feats)
    m.classify(text[:3])
    m.refit_basis()
    assert not m.needs_refit()
    m.classify(text)                              # new vocabulary: the basis is due, not dropped
    assert m.needs_refit() and m._basis is not None
    m.start_refit()
    assert m.refit_pending and not m.needs_refit()
    steps = 0
    while not m.refit_step(rows=500):
        steps += 1
        if steps == 1:                            # changed features and removed voxels mid-refit
            m.set_features(slots[:100], -feats[:100])
            m.remove(slots[100:150])
        if steps == 2:                            # new voxels: the slot arrays grow
            new = m.integrate(rng.random((2000, 3)).astype(np.float32) * 10 + 20)
            m.set_features(new, text[rng.integers(0, len(text), len(new))])
        t = text[4]
        ref = m.scan_query(t)
        res = m.query(t, threshold=0.3)
        assert res.count == int((ref >= 0.3).sum())
    assert steps >= 4 and not m.refit_pending and not m.needs_refit()
    # every voxel's coefficients and residual belong to the swapped-in basis, which spans the vocabulary
    live = m.slots()
    live = live[m.feature_counts[live] > 0]
    f = m.features[live].astype(np.float32)
    np.testing.assert_allclose(m._codes[live], f @ m._basis, atol=1e-4)
    np.testing.assert_allclose(m._resid[live], np.linalg.norm(f - (f @ m._basis) @ m._basis.T, axis=1), atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(m._basis.T @ text.T, axis=0), 1.0, atol=1e-4)


def test_centers_and_feature_counts():
    m = VoxelMap(VoxelMapConfig(voxel_size=0.5, query_rank=2))
    s = m.integrate(np.array([[0.1, 0.2, 0.3], [0.2, 0.4, 0.1], [-0.1, 1.2, 0.7]]))
    assert len(s) == 2
    c = m.centers(m.lookup(np.array([[0.1, 0.2, 0.3], [-0.1, 1.2, 0.7]])))
    np.testing.assert_allclose(c, [[0.25, 0.25, 0.25], [-0.25, 1.25, 0.75]])
    # more points move the mean position, never the centre
    m.integrate(np.array([[0.45, 0.45, 0.45]]))
    np.testing.assert_allclose(m.centers(m.lookup(np.array([[0.1, 0.2, 0.3]]))), [[0.25, 0.25, 0.25]])
    m.set_features(np.sort(s), np.array([[1.0, 0, 0], [0, 2.0, 0]]), counts=np.array([3, 0]))
    assert m.feature_counts[np.sort(s)].tolist() == [3.0, 1.0]  # at least 1: the voxel has a feature
    np.testing.assert_allclose(np.linalg.norm(m.features[np.sort(s)].astype(float), axis=1), 1.0, atol=1e-3)


def test_load_reads_what_save_writes(tmp_path):
    m, slots, gt, feats, text, _ = _feature_map(n=300)
    m.integrate(np.random.default_rng(1).random((10, 3)), np.full((10, 3), 200, np.uint8))
    m.set_features(slots, feats)
    m.classify(text)
    npz = m.save(tmp_path / "map", class_names=["a", "b"])  # the map folder
    back, names = VoxelMap.load(npz, m.config)
    assert names == ["a", "b"] and len(back) == len(m)
    a, b = m.export(), back.export()
    for key in ("positions", "colors", "labels", "scores", "counts", "coords", "features", "feature_counts"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    np.testing.assert_array_equal(back.lookup(a["positions"]), back.slots())  # the key index works
    r0, r1 = m.query(text[2], threshold=0.3), back.query(text[2], threshold=0.3)
    assert r0.count == r1.count > 0 and abs(r0.best_score - r1.best_score) < 1e-5
    back.integrate(a["positions"][:5])  # a loaded map keeps integrating into the same voxels
    assert len(back) == len(m)
    with pytest.raises(ValueError, match="voxel size"):
        VoxelMap.load(npz, VoxelMapConfig(voxel_size=0.2))
    with pytest.raises(ValueError, match="max_points"):
        VoxelMap.load(npz, VoxelMapConfig(voxel_size=m.config.voxel_size, max_points=10))
    with pytest.raises(FileNotFoundError):
        VoxelMap.load(tmp_path / "nothing")


def test_save_and_reset(tmp_path):
    from sas_core.io import read_ply

    m, slots, gt, feats, text, _ = _feature_map(n=300)
    m.integrate(np.random.default_rng(1).random((10, 3)), np.full((10, 3), 200, np.uint8))
    m.set_features(slots, feats)
    m.classify(text)
    folder = m.save(tmp_path / "map", class_names=[f"c{i}" for i in range(6)])
    ply, npz = folder / "map.ply", folder / "map.npz"
    table = read_ply(ply)
    assert len(table["x"]) == len(m) and "label" in table and "score" in table
    with np.load(npz) as z:
        assert z["features"].dtype == np.float16 and z["features"].shape == (len(m), 64)
        assert list(z["class_names"]) == [f"c{i}" for i in range(6)]
    assert not list(tmp_path.glob(".*"))  # no temp files left
    m.reset()
    assert len(m) == 0 and m.query(text[0]).count == 0


def test_bad_input():
    m = VoxelMap()
    with pytest.raises(ValueError, match="N, 3"):
        m.integrate(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="colours"):
        m.integrate(np.zeros((4, 3)), np.zeros((3, 3), np.uint8))
    assert len(m.integrate(np.full((5, 3), np.nan))) == 0
    with pytest.raises(ValueError, match="voxel_size"):
        VoxelMap(VoxelMapConfig(voxel_size=0))
    m.integrate(np.zeros((1, 3)))
    m.set_features(m.slots(), np.ones((1, 8)))
    with pytest.raises(ValueError, match="dims"):
        m.query(np.ones(4))
