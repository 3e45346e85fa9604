"""The voxel map's block index (sas_core.geometry.voxel_index) and the int8 store's group-bounded
queries (#18): integration against a reference built with NumPy, the index against the map's slots
after eviction and removal, and queries against a full scan of the stored features."""

import numpy as np
import pytest

from sas_core.geometry.voxel_map import BLOCK, VoxelMap, VoxelMapConfig, block_keys


def _check_index(m):
    """The index agrees with the slot arrays: every live voxel found at its own key, nothing else."""
    live = np.flatnonzero(m.valid[:m._top])
    assert len(live) == len(m)
    keys = m._slot_key[live]
    assert len(np.unique(keys)) == len(keys)
    np.testing.assert_array_equal(m._index.lookup(keys), live)
    # slots() is the key order, and n_blocks counts the distinct blocks
    order = m.slots()
    np.testing.assert_array_equal(order, live[np.argsort(keys)])
    assert m.n_blocks() == len(np.unique(keys >> 9))
    # the voxel of each live slot's mean position is that slot (lookup by points)
    if len(live):
        np.testing.assert_array_equal(m.lookup(m.positions[live]), live)


def test_integration_matches_a_numpy_reference():
    """Running means of positions and colours, counts, distinct voxels: what np.unique + bincount
    over every point ever integrated gives (no eviction)."""
    rng = np.random.default_rng(0)
    m = VoxelMap(VoxelMapConfig(voxel_size=0.1, initial_capacity=16))
    allp, allc = [], []
    for i in range(12):  # overlapping frames, some points outside any earlier voxel
        p = (rng.random((rng.integers(1, 3000), 3)) * 2.0 + rng.normal(size=3) * 0.3).astype(np.float32)
        c = rng.integers(0, 256, (len(p), 3)).astype(np.uint8)
        if i == 5:
            p[::7] = np.nan  # ignored rows
        touched = m.integrate(p, c)
        ok = np.isfinite(p).all(1)
        allp.append(p[ok])
        allc.append(c[ok])
        # the returned slots are the frame's distinct voxels, in key order
        k = block_keys(np.floor(p[ok] * np.float32(10.0)))
        np.testing.assert_array_equal(m._slot_key[touched], np.unique(k))
        _check_index(m)
    P, C = np.concatenate(allp), np.concatenate(allc).astype(np.float64) / 255
    keys = block_keys(np.floor(P * np.float32(10.0)))
    uk, inv, cnt = np.unique(keys, return_inverse=True, return_counts=True)
    assert len(m) == len(uk)
    slots = m._index.lookup(uk)
    assert (slots >= 0).all()
    np.testing.assert_array_equal(m.counts[slots], cnt)
    for a in range(3):
        np.testing.assert_allclose(m.positions[slots, a], np.bincount(inv, P[:, a]) / cnt, atol=2e-5)
        np.testing.assert_allclose(m.colors[slots, a], np.bincount(inv, C[:, a]) / cnt, atol=2e-5)


@pytest.mark.parametrize("cfg", [dict(), dict(eviction="farthest"), dict(max_radius=2.0), dict(evict_fraction=0.0)])
def test_index_follows_eviction_removal_and_slot_reuse(cfg):
    rng = np.random.default_rng(1)
    m = VoxelMap(VoxelMapConfig(voxel_size=0.1, max_points=400, initial_capacity=16, **cfg))
    for i in range(60):
        p = rng.random((rng.integers(1, 1500), 3)) * rng.random() * 3 + rng.normal(size=3)
        touched = m.integrate(p, sensor_origin=rng.normal(size=3))
        assert len(m) <= 400 and m.valid[touched].all()  # a frame's own voxels are never evicted
        if i % 5 == 0 and len(m):
            gone = rng.choice(m.slots(), min(len(m), 40), replace=False)
            m.remove(np.concatenate([gone, gone[:3]]))   # a repeated slot is removed once
            assert not m.valid[gone].any()
            m.remove(gone[:5])                            # slots no longer in use are ignored
        _check_index(m)
    assert m.n_evicted > 0


def test_blocks_are_reused_so_memory_is_flat_and_a_frame_larger_than_the_map_is_cut():
    m = VoxelMap(VoxelMapConfig(voxel_size=0.1, max_points=2000, initial_capacity=64, evict_fraction=0.1))
    rng = np.random.default_rng(2)
    sizes, tables = [], []
    for i in range(80):  # a sensor moving on: every frame sees new blocks, old ones empty out
        m.integrate(rng.random((3000, 3)) * 0.9 + [i * 1.7, 0, 0])
        sizes.append(m.memory_bytes())
        tables.append(len(m._index.table))
    assert sizes[-1] == sizes[-30] and tables[-1] == tables[-30]
    assert len(m._index.table) < 80 * 8  # ids of emptied blocks were taken again
    _check_index(m)
    small = VoxelMap(VoxelMapConfig(voxel_size=0.1, max_points=50))
    s = small.integrate(rng.random((5000, 3)) * 3)
    assert len(s) == len(small) == 50
    _check_index(small)
    # box_slots reads blocks: equal to a filter of every voxel, also after removals
    m.remove(m.slots()[::3])
    live = m.slots()
    for _ in range(5):
        lo = np.array([rng.random() * 130, -0.2, -0.2])
        hi = lo + [rng.random() * 8, 0.5, 1.0]
        p = m.positions[live]
        want = live[((p >= lo.astype(np.float32)) & (p <= hi.astype(np.float32))).all(1)]
        np.testing.assert_array_equal(m.box_slots(lo, hi), want)  # in key order


def _clustered_int8_map(n_obj=60, seed=0, dim=64, rank=48):
    """Objects (balls of voxels) with one class each: features = class text + object offset +
    noise, so that whole slot groups are far from a query (what the group bounds prune)."""
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(8, dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    m = VoxelMap(VoxelMapConfig(voxel_size=0.05, feature_store="int8", store_rank=rank, max_points=200_000))
    m.set_anchor(text)
    for o in range(n_obj):
        c = rng.random(3) * 20
        slots = m.integrate(c + rng.normal(size=(600, 3)) * 0.15)
        f = text[o % 8] + 0.4 * rng.normal(size=dim).astype(np.float32) + \
            0.3 * rng.normal(size=(len(slots), dim)).astype(np.float32)
        m.set_features(slots, f)
    return m, text, rng


def _full_scan(m, t):
    live = m.slots()
    usable = live[m.feature_counts[live] > 0]
    return usable, m.stored_scores(t, usable)


def _assert_equals_full_scan(m, t, threshold, k):
    res = m.query(t, threshold=threshold, max_points=k)
    live, ref = _full_scan(m, t)
    above = ref >= threshold
    assert res.count == int(above.sum()), (threshold, k)
    assert res.best_score == pytest.approx(float(ref.max()), abs=1e-6)
    order = np.argsort(-ref[above], kind="stable")
    want, want_s = live[above][order], ref[above][order]
    n = min(k, len(want)) if k else len(want)
    assert len(res.slots) == n
    if n and (n == len(want) or want_s[n - 1] - want_s[n] > 1e-5):  # no tie at the cut
        assert set(res.slots.tolist()) == set(want[:n].tolist()), (threshold, k)
    np.testing.assert_allclose(res.scores, want_s[:n], atol=1e-6)
    assert (np.diff(res.scores) <= 0).all()
    return res


def test_group_bounded_query_equals_a_full_scan_and_reads_few_groups():
    m, text, rng = _clustered_int8_map()
    near = text[2] + 0.05 * rng.normal(size=64).astype(np.float32)   # free text near the head
    for t in (text[2], text[5], near / np.linalg.norm(near)):
        for thr, k in ((0.5, 0), (0.5, 25), (0.3, 500), (-1.0, 40), (0.99, 0), (0.99, 5), (2.0, 3)):
            _assert_equals_full_scan(m, t, thr, k)
    res = _assert_equals_full_scan(m, text[2], 0.5, 25)
    read, groups = m.last_query_groups
    assert 0 < read < groups / 2  # most groups were skipped by their bound
    assert res.count > 25 and res.rescored < res.count  # sure matches counted without rescoring


def test_group_bounds_follow_changed_removed_and_new_voxels():
    m, text, rng = _clustered_int8_map(seed=3)
    t = text[1]
    _assert_equals_full_scan(m, t, 0.5, 50)  # bounds computed
    # voxels of another class now match the text strongly: their groups' bounds must grow
    other = m.query(text[4], threshold=0.4).slots[:300]
    m.set_features(other, np.tile(t, (len(other), 1)) + 0.01 * rng.normal(size=(len(other), 64)))
    res = _assert_equals_full_scan(m, t, 0.5, 50)
    assert set(other.tolist()) & set(res.slots.tolist())
    # removed voxels leave, reused slots take new features, a refit swaps the codes
    m.remove(res.slots[:20])
    new = m.integrate(rng.random((2000, 3)) * 2 + [30, 30, 30])
    m.set_features(new, np.tile(-t, (len(new), 1)))
    for thr, k in ((0.5, 50), (0.9, 0), (-0.9, 10)):
        _assert_equals_full_scan(m, t, thr, k)
        _assert_equals_full_scan(m, -t, thr, k)
    # groups of identical voxels: their bound is their score, a threshold just below it must find them
    s = float(m.stored_scores(-t, new[:1])[0])
    assert _assert_equals_full_scan(m, -t, s - 1e-4, 0).count >= len(new)
    assert _assert_equals_full_scan(m, -t, s + 1e-4, 0).count < len(new)
    m.refit_basis()
    _assert_equals_full_scan(m, t, 0.5, 50)
