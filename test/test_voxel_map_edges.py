"""The voxel map at its edges, through its public API only (from the mutation run of
``sas_core/geometry/voxel_map.py`` and ``feature_store.py``, issue #19): which voxels eviction
frees and in what order, inclusive box / radius / threshold bounds, ties at the ``max_points``
cut, the int8 store's error bound where it is tight (an unsound bound fails), the int8 kernels
against NumPy, snapshots across a refit and a store allocation, every saved field back after a
load, and the depth back-projection against a per-pixel loop.

Nothing here reads the key index (being rewritten by #18): slots come from ``integrate`` /
``lookup`` / ``slots()``, features from ``features`` / ``export()``."""

import numpy as np
import pytest

from sas_core.geometry import feature_store as fs
from sas_core.geometry.voxel_map import VoxelMap, VoxelMapConfig, map_arrays_path, rgbd_points


def _at(*xs, y=0.5, z=0.5):
    """Points at x = each of ``xs`` (one voxel each at voxel size 1)."""
    return np.array([[x, y, z] for x in xs], np.float32)


def _present(m, *xs):
    return [bool(m.lookup(_at(x))[0] >= 0) for x in xs]


# ---------------------------------------------------------------------------------------- eviction
def test_oldest_eviction_frees_the_least_recently_observed_and_protects_this_frames_voxels():
    m = VoxelMap(VoxelMapConfig(voxel_size=1.0, max_points=5, initial_capacity=2, evict_fraction=0.0))
    for x in (0.5, 1.5, 2.5, 3.5, 4.5):          # observed at integrations 1..5
        m.integrate(_at(x))
    m.integrate(_at(0.5))                         # voxel 0 observed again (6): now the newest
    m.integrate(_at(10.5, 11.5))                  # two new voxels: the two oldest (1, 2) go
    assert _present(m, 0.5, 1.5, 2.5, 3.5, 4.5, 10.5, 11.5) == [True, False, False, True, True, True, True]
    assert len(m) == 5 and m.n_evicted == 2
    # voxel 3 is the oldest now, but this frame sees it again next to a new voxel: 4 goes instead
    m.integrate(_at(3.5, 20.5))
    assert _present(m, 0.5, 3.5, 4.5, 10.5, 11.5, 20.5) == [True, True, False, True, True, True]
    assert len(m) == 5 and m.n_evicted == 3 and m.valid.sum() == 5


def test_eviction_frees_the_extra_fraction_beyond_what_is_needed():
    m = VoxelMap(VoxelMapConfig(voxel_size=1.0, max_points=10, evict_fraction=0.2))
    for i in range(10):
        m.integrate(_at(i + 0.5))
    m.integrate(_at(50.5))                        # 1 needed + 20 % of 10 = 3 freed: the 3 oldest
    assert len(m) == 8 and m.n_evicted == 3
    assert _present(m, 0.5, 1.5, 2.5, 3.5, 50.5) == [False, False, False, True, True]
    cap = m.capacity
    m.integrate(_at(60.5, 61.5))                  # fits in the freed slots: nothing else goes
    assert len(m) == 10 and m.n_evicted == 3 and m.capacity == cap == 10


def test_eviction_frees_exactly_the_n_oldest_of_many():
    rng = np.random.default_rng(3)
    m = VoxelMap(VoxelMapConfig(voxel_size=1.0, max_points=300, evict_fraction=0.0))
    xs = rng.permutation(300) + 0.5                  # observed one by one, in a random spatial order
    for x in xs:
        m.integrate(_at(x))
    m.integrate(_at(*(np.arange(1000, 1017) + 0.5)))  # 17 new voxels: the 17 observed first go
    gone = np.array([m.lookup(_at(x))[0] == -1 for x in xs])
    assert gone[:17].all() and not gone[17:].any() and len(m) == 300


def test_farthest_eviction_measures_from_the_current_sensor_and_falls_back_to_oldest():
    cfg = VoxelMapConfig(voxel_size=1.0, max_points=4, eviction="farthest", evict_fraction=0.0)
    m = VoxelMap(cfg)
    m.integrate(_at(0.5, 1.5, 2.5, 9.5), sensor_origin=np.zeros(3))
    m.integrate(_at(5.5), sensor_origin=np.array([9.0, 0.5, 0.5]))   # the sensor moved: 0.5 is farthest now
    assert _present(m, 0.5, 1.5, 2.5, 5.5, 9.5) == [False, True, True, True, True]
    m.integrate(_at(6.5))                                            # no origin: oldest first (1.5, 2.5 tie
    assert _present(m, 5.5, 6.5, 9.5) == [True, True, True]          # with 9.5; 5.5 is newer)
    assert len(m) == 4 and m.n_evicted == 2
    # the farthest voxel is seen again in the frame that needs room: it stays, the next farthest goes
    m = VoxelMap(cfg)
    m.integrate(_at(0.5, 1.5, 2.5, 9.5), sensor_origin=np.zeros(3))
    m.integrate(_at(9.5, 3.5), sensor_origin=np.zeros(3))
    assert _present(m, 0.5, 1.5, 2.5, 3.5, 9.5) == [True, True, False, True, True]
    # "oldest" ignores the sensor position
    m = VoxelMap(VoxelMapConfig(voxel_size=1.0, max_points=3, evict_fraction=0.0))
    for x in (9.5, 0.5, 1.5):
        m.integrate(_at(x), sensor_origin=np.zeros(3))
    m.integrate(_at(2.5), sensor_origin=np.zeros(3))
    assert _present(m, 0.5, 1.5, 2.5, 9.5) == [True, True, True, False]


def test_one_frame_bigger_than_the_map_keeps_exactly_max_points_of_its_voxels():
    m = VoxelMap(VoxelMapConfig(voxel_size=1.0, max_points=7))
    pts = _at(*(np.arange(20) + 0.5))
    slots = m.integrate(pts)
    assert len(m) == len(slots) == 7 == len(set(slots.tolist()))
    got = m.positions[m.slots()]
    assert all(any(np.allclose(g, p) for p in pts) for g in got)   # real voxels of the frame


def test_max_radius_keeps_points_exactly_at_the_radius():
    m = VoxelMap(VoxelMapConfig(voxel_size=1.0, max_radius=2.0))
    m.integrate(np.array([[2.0, 0, 0], [0, -2.0, 0], [2.0001, 0, 0]]), sensor_origin=np.zeros(3))
    assert len(m) == 2                               # |p| = 2 kept, 2.0001 dropped
    m.integrate(np.array([[0.0, 0, 0]]), sensor_origin=np.zeros(3))   # the voxels stay at exactly 2 m
    assert len(m) == 3
    m.integrate(np.array([[0.0, 0.0, 0.5]]), sensor_origin=np.array([0.0, 0.0, 0.5]))   # now > 2 m away
    assert m.lookup(np.array([[2.0, 0, 0]]))[0] == -1 and len(m) == 1


def test_remove_frees_slots_that_new_voxels_reuse_and_dirty_flags():
    m = VoxelMap(VoxelMapConfig(voxel_size=1.0, initial_capacity=8))
    s = m.integrate(_at(0.5, 1.5, 2.5, 3.5))
    assert sorted(m.take_dirty().tolist()) == sorted(s.tolist()) and len(m.take_dirty()) == 0
    gone = m.lookup(_at(1.5, 2.5))
    m.remove(np.concatenate([gone, gone]))         # duplicates count once
    assert len(m) == 2 and m.n_evicted == 2 and _present(m, 1.5, 2.5) == [False, False]
    assert len(m.take_dirty()) == 0
    m.remove(np.zeros(0, np.int64))
    m.remove(m.lookup(_at(3.5)))
    assert m.n_evicted == 3 and len(m) == 1
    new = m.integrate(_at(7.5, 8.5, 9.5))
    assert set(gone.tolist()) | set(m.lookup(_at(3.5)).tolist()) - {-1} <= set(new.tolist()) and m.capacity == 8
    assert sorted(m.take_dirty().tolist()) == sorted(new.tolist())
    m.integrate(_at(0.5))                          # an update makes a voxel dirty again
    assert m.take_dirty().tolist() == m.lookup(_at(0.5)).tolist()


def test_colours_counts_and_lookup_of_unmappable_points():
    m = VoxelMap(VoxelMapConfig(voxel_size=1.0))
    m.integrate(_at(0.2, 0.8), colors=np.array([[0.2, 0.4, 1.0], [0.4, 0.0, 0.0]]))   # float colours as is
    s = m.lookup(_at(0.5))[0]
    np.testing.assert_allclose(m.colors[s], [0.3, 0.2, 0.5], atol=1e-6)
    assert m.counts[s] == 2
    m.integrate(_at(0.5), colors=np.array([[255, 255, 255, 7]], np.uint8))   # uint8 / 255; alpha ignored
    np.testing.assert_allclose(m.colors[s], [(0.6 + 1) / 3, (0.4 + 1) / 3, 2 / 3], atol=1e-6)
    assert m.export()["colors"][0].tolist() == [136, 119, 170]
    bad = np.array([[np.nan, 0, 0], [np.inf, 0, 0], [1e30, 0, 0], [-1e30, 0, 0], [0.5, 0.5, 0.5]])
    assert m.lookup(bad).tolist() == [-1, -1, -1, -1, s]
    assert VoxelMap().lookup(_at(0.5)).tolist() == [-1]
    assert VoxelMap().lookup(np.zeros((0, 3))).tolist() == []


def test_lookup_of_unmappable_points_never_finds_the_voxel_at_the_edge_of_the_range():
    """A voxel at the largest coordinate the map stores (2^20 - 2 voxels out) must not answer for a
    NaN, infinite or out-of-range point (found by the mutation run: they were clipped onto it)."""
    edge = float((1 << 20) - 2) + 0.5
    m = VoxelMap(VoxelMapConfig(voxel_size=1.0))
    assert len(m.integrate(np.array([[edge] * 3, [-edge + 1] * 3, [0.5] * 3]))) == 3
    inside = m.lookup(np.array([[edge] * 3, [-edge + 1] * 3]))
    assert (inside >= 0).all()
    for p in ([np.nan] * 3, [np.inf] * 3, [-np.inf] * 3, [1e30] * 3, [-1e30] * 3, [edge + 1] * 3, [-edge] * 3):
        assert m.lookup(np.array([p]))[0] == -1, p


def test_lookup_and_keys_use_the_same_float32_arithmetic_as_integrate():
    """Float64 points on voxel borders: lookup finds the voxel integrate put each point in."""
    vs = 0.05
    m = VoxelMap(VoxelMapConfig(voxel_size=vs))
    k = np.arange(-300, 300)
    pts = np.stack([k * vs, k * vs * 0.5 + 1e-9, -k * vs], 1).astype(np.float64)
    m.integrate(pts)
    own = np.array([m.integrate(p[None])[0] for p in pts])   # the voxel of each point on its own
    np.testing.assert_array_equal(m.lookup(pts), own)
    inner = m.lookup(pts[:5])
    np.testing.assert_array_equal(m.keys_of(inner), np.floor(m.positions[inner] / np.float32(vs)).astype(np.int64))


# ---------------------------------------------------------------------------------------- boxes
def _cloud(n=3000, seed=0, vs=0.37):
    rng = np.random.default_rng(seed)
    m = VoxelMap(VoxelMapConfig(voxel_size=vs))
    m.integrate(rng.uniform(-9, 9, size=(n, 3)))   # across negative coordinates and many blocks
    return m, rng


def _brute_box(m, lo, hi):
    live = m.slots()
    p = m.positions[live]
    return np.sort(live[((p >= np.float32(lo)) & (p <= np.float32(hi))).all(1)])


def test_box_bounds_are_inclusive_on_every_face():
    m, rng = _cloud()
    live = m.slots()
    for _ in range(30):  # box faces exactly on voxels' positions
        a, b = m.positions[rng.choice(live, 2, replace=False)]
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        got = np.sort(m.box_slots(lo, hi))
        np.testing.assert_array_equal(got, _brute_box(m, lo, hi))
        corners = m.lookup(np.stack([a, b]))
        assert set(corners.tolist()) <= set(got.tolist())   # the voxels on the faces are in
    s = live[7]
    p = m.positions[s]
    assert m.box_slots(p, p).tolist() == [s]                 # a degenerate box holds its voxel
    up = np.nextafter(p, np.float32(np.inf))
    assert s not in m.box_slots(up, up + 1).tolist()
    assert len(m.box_slots(p + [0, 0, 1e-3], p)) == 0        # lo > hi on one axis: empty
    assert len(m.box_slots([-100] * 3, [100] * 3)) == len(m)


def test_box_of_a_map_with_one_voxel():
    m = VoxelMap(VoxelMapConfig(voxel_size=1.0))
    s = m.integrate(_at(0.5))
    assert m.box_slots([0, 0, 0], [1, 1, 1]).tolist() == s.tolist()
    assert m.region_slots(s, margin=0.0).tolist() == s.tolist()
    assert len(m.box_slots([2, 0, 0], [3, 1, 1])) == 0 and m.n_blocks() == 1


def test_region_slots_grow_the_box_of_the_given_voxels_by_the_margin():
    m, rng = _cloud(seed=1)
    live = m.slots()
    for margin in (0.0, 0.3, 1.7):
        some = rng.choice(live, 5, replace=False)
        lo = m.positions[some].min(0) - margin
        hi = m.positions[some].max(0) + margin
        np.testing.assert_array_equal(np.sort(m.region_slots(some, margin)), _brute_box(m, lo, hi))
    assert len(m.region_slots(np.zeros(0, np.int64))) == 0
    one = live[3:4]
    p = m.positions[one[0]]
    np.testing.assert_array_equal(np.sort(m.region_slots(one)), _brute_box(m, p - 1.0, p + 1.0))   # 1 m by default
    np.testing.assert_array_equal(m.region_slots(list(one), margin=0.0), one)


# ---------------------------------------------------------------------------------------- queries
def _tie_map(store="fp16", d=8):
    """Voxels whose features are ``a e0 + b e1``: with the text e0 every score is the stored
    first component, exactly (ties: 30 at the best value, 40 at the next, 50 at the third)."""
    m = VoxelMap(VoxelMapConfig(voxel_size=1.0, feature_store=store, query_rank=d, store_rank=d))
    groups = [(30, 0.96), (40, 0.8), (50, 0.6), (20, 0.1)]
    slots = m.integrate(_at(*(np.arange(140) + 0.5)))
    # groups scattered over the slots (slot order is not score order)
    gid = np.random.default_rng(0).permutation(np.repeat(np.arange(4), [n for n, _ in groups]))
    a = np.array([groups[g][1] for g in gid], np.float32)
    feats = np.zeros((len(slots), d), np.float32)
    feats[:, 0], feats[:, 1] = a, np.sqrt(1 - a * a)
    m.set_features(slots, feats)
    t = np.zeros(d, np.float32)
    t[0] = 1
    return m, slots, gid, t


@pytest.mark.parametrize("store", ["fp16", "int8"])
def test_threshold_is_inclusive_and_ties_at_the_cut_are_filled_from_the_tied_group(store):
    m, slots, gid, t = _tie_map(store)
    every = m.query(t, threshold=-1.0)
    assert every.count == len(slots) and len(every.slots) == len(slots)
    # the exact values: fp16, the stored features' (a query may return its reduced-store estimate,
    # within 1e-5, where that is already tighter than 1e-4); int8, the query's own full scan
    score_of = dict(zip(every.slots.tolist(), every.scores.tolist()))
    exact = m.stored_scores(t, slots) if store == "fp16" else np.array([score_of[s] for s in slots.tolist()], np.float32)
    np.testing.assert_allclose([score_of[s] for s in slots.tolist()], exact, atol=1e-5)
    val = {g: exact[gid == g] for g in range(4)}
    for g in range(4):  # one value per group (exact ties in fp16; within float rounding in int8)
        assert np.ptp(val[g]) <= 1e-6, g
    s0, s1, s2 = (float(val[g].min()) for g in range(3))
    assert s0 > s1 > s2
    for thr, n in ((s1, 70), (s2, 120), (s0, 30)):   # a threshold equal to a score counts that voxel
        res = m.query(t, threshold=thr)
        assert res.count == n and set(res.slots.tolist()) == set(slots[gid <= {70: 1, 120: 2, 30: 0}[n]].tolist())
    assert m.query(t, threshold=float(np.nextafter(val[0].max(), np.float32(2)))).count == 0
    for k in (1, 30, 50, 70, 100):                   # the cut inside a tied group
        for kw in ({}, {"exact_topk": True}):
            res = m.query(t, threshold=s2, max_points=k, **kw)
            assert res.count == 120 and len(res.slots) == k == len(set(res.slots.tolist()))
            want = np.sort(exact)[::-1][:k]
            np.testing.assert_allclose(res.scores, want, atol=1e-5)
            top = set(res.slots.tolist())
            for g in range(3):                      # better groups complete before a worse one starts
                n_better = int((gid < g).sum())
                if k > n_better:
                    assert set(slots[gid < g].tolist()) <= top
    # a region query ranks the same way (scored exactly)
    res = m.query(t, threshold=s2, max_points=50, region=([0, 0, 0], [200, 1, 1]))
    np.testing.assert_allclose(res.scores, np.sort(exact)[::-1][:50], atol=1e-6)
    assert res.count == 120 and res.best_score == pytest.approx(s0, abs=1e-6)


def test_fp16_scores_are_the_stored_values_exactly_at_the_threshold():
    m, slots, gid, t = _tie_map("fp16", d=16)   # rank 16 of 16: the query store is exact
    stored = m.features[slots].astype(np.float32)[:, 0]
    for g in range(4):
        v = float(stored[gid == g][0])
        res = m.query(t, threshold=v)
        assert res.count == int((stored >= v).sum()) and res.best_score == float(stored.max())
        np.testing.assert_array_equal(m.stored_scores(t, slots), stored)


def test_best_score_and_counts_with_voxels_without_features():
    m = VoxelMap(VoxelMapConfig(voxel_size=1.0))
    s = m.integrate(_at(0.5, 1.5, 2.5))
    m.set_features(s[:1], np.ones((1, 4)))          # two voxels have no feature (feature_counts 0)
    t = np.full(4, 0.5, np.float32)
    res = m.query(t, threshold=-1.0)
    assert res.count == 1 and res.slots.tolist() == [s[0]] and res.best_score == pytest.approx(1.0, abs=1e-3)
    assert m.query(t, region=([1, 0, 0], [3, 1, 1]), threshold=-1.0).count == 0
    m.classify(np.eye(4, dtype=np.float32))         # only the voxel with a feature gets a label
    assert m.labels[s].tolist() == [0, 255, 255]


# ---------------------------------------------------------------------------------------- int8 store
def _int8_map(n=400, d=64, rank=24, seed=0):
    rng = np.random.default_rng(seed)
    m = VoxelMap(VoxelMapConfig(voxel_size=0.05, feature_store="int8", store_rank=rank))
    slots = m.integrate(rng.random((n, 3)) * 2)
    text = rng.normal(size=(4, d)).astype(np.float32)
    feats = text[rng.integers(0, 4, len(slots))] + 0.6 * rng.normal(size=(len(slots), d)).astype(np.float32)
    m.set_features(slots, feats)
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)   # the originals, as the map normalises them
    return m, slots, f, rng


def _check_bound_along_the_error(m, slots, f, tight: bool, loose: float = 0.0):
    """For the text along each voxel's own error ``f - f_hat``, the score error is the whole
    ``|f - f_hat|``: the bound must reach it (and, fresh from an encoding, equal it closely)."""
    fh = m.features.float32(slots)
    e = f - fh
    for i in range(0, len(slots), 7):
        t = (e[i] / np.linalg.norm(e[i])).astype(np.float32)
        diff = float(f[i] @ t) - float(m.stored_scores(t, slots[i:i + 1])[0])
        bound = float(m.error_bound(t, slots[i:i + 1])[0])
        assert diff == pytest.approx(float(np.linalg.norm(e[i])), rel=1e-3)
        assert bound >= diff - 1e-5, (i, bound, diff)
        if tight:
            assert bound <= diff * 1.02 + 1e-4, (i, bound, diff)
        if loose:
            assert bound <= diff * loose + 0.02, (i, bound, diff)


@pytest.mark.parametrize("rank", [24, 48])
def test_int8_error_bound_is_sound_and_tight_along_each_voxels_error(rank):
    """rank 48: the codes have a tail past the 32 head columns (stored scores add both parts)."""
    m, slots, f, rng = _int8_map(rank=rank)
    _check_bound_along_the_error(m, slots, f, tight=True)
    # random texts: sound for every voxel at once
    for _ in range(5):
        t = rng.normal(size=f.shape[1]).astype(np.float32)
        t /= np.linalg.norm(t)
        err = np.abs(f @ t - m.stored_scores(t, slots))
        assert (err <= m.error_bound(t, slots) + 1e-5).all()
    # the stored score is what the decoded features give, and what a region query returns
    np.testing.assert_allclose(m.stored_scores(t, slots), m.features.float32(slots) @ t, atol=1e-5)
    res = m.query(t, threshold=-1.0, region=([0, 0, 0], [1, 1, 1]))
    inside = m.box_slots([0, 0, 0], [1, 1, 1])
    assert res.count == len(inside) > 0
    np.testing.assert_allclose(res.scores, np.sort(m.features.float32(inside) @ t)[::-1], atol=1e-5)


def test_int8_error_bound_stays_sound_after_a_refit_from_the_store():
    m, slots, f, rng = _int8_map(n=300)
    more = m.integrate(rng.random((700, 3)) * 2 + 3)
    g = rng.normal(size=(len(more), f.shape[1])).astype(np.float32)
    m.set_features(more, g)                          # the young map's basis is due again
    f = np.concatenate([f, g / np.linalg.norm(g, axis=1, keepdims=True)])
    slots = np.concatenate([slots, more])
    assert m.needs_refit()
    before = m.export()["code_basis"]
    m.refit_basis()
    assert not m.needs_refit() and not np.allclose(m.export()["code_basis"], before)
    _check_bound_along_the_error(m, slots, f, tight=False)


def test_int8_bound_after_a_refit_that_moves_the_basis_off_old_voxels():
    """Old voxels encoded well in one subspace, then many voxels in another: the refitted basis
    leaves the old voxels' f_hat partly outside it. Their bound (the triangle inequality of the
    re-encoding) must still reach the whole error along it, and stay within 1.5x of it."""
    rng = np.random.default_rng(6)
    d, r = 32, 8
    m = VoxelMap(VoxelMapConfig(voxel_size=1.0, feature_store="int8", store_rank=r))
    old = m.integrate(_at(*(np.arange(150) + 0.5)))
    new = m.integrate(_at(*(np.arange(150, 1300) + 0.5)))
    a = np.zeros((len(old), d), np.float32)
    a[:, :r] = rng.normal(size=(len(old), r))                 # in the first basis exactly
    b = np.zeros((len(new), d), np.float32)
    b[:, r:2 * r] = rng.normal(size=(len(new), r))             # in other directions
    b[:, :r] = 0.3 * rng.normal(size=(len(new), r))
    m.set_features(old, a)
    fa = a / np.linalg.norm(a, axis=1, keepdims=True)
    _check_bound_along_the_error(m, old, fa, tight=True)
    m.set_features(new, b)
    assert m.needs_refit()
    m.refit_basis()
    moved = np.linalg.norm(fa - m.features.float32(old), axis=1)
    assert np.median(moved) > 0.2                               # the refit did move them
    _check_bound_along_the_error(m, old, fa, tight=False, loose=1.5)


def test_quantize_error_term_bounds_the_error_tightly():
    rng = np.random.default_rng(0)
    c = rng.normal(size=(500, 40)).astype(np.float32) * rng.uniform(0.01, 3, size=(500, 1)).astype(np.float32)
    c[3] = 0
    c[4] = 0
    c[4, 5] = -2.5                                  # one non-zero coordinate: exact
    q, scale, qerr = fs.quantize(c)
    assert q.dtype == np.int8 and scale.dtype == qerr.dtype == np.float32
    np.testing.assert_array_equal(np.abs(q[np.arange(500) != 3]).max(1), 127)   # the scale uses the range
    np.testing.assert_allclose(scale, np.abs(c).max(1) / 127, rtol=1e-6)
    err = np.linalg.norm(c - q.astype(np.float32) * scale[:, None], axis=1)
    assert (err <= qerr).all()
    assert (qerr - err <= 3e-6).all()                # tight: float slack only
    assert scale[3] == 0 and not q[3].any() and qerr[3] <= 2e-6
    assert q[4, 5] == -127 and err[4] == 0
    q0, s0, e0 = fs.quantize(np.zeros((3, 0), np.float32))
    assert q0.shape == (3, 0) and not s0.any()


@pytest.mark.parametrize("contiguous", [True, False])
def test_int8_kernels_equal_numpy(contiguous):
    rng = np.random.default_rng(1)
    n, r = 1000, 20
    wide = rng.integers(-127, 128, size=(n, r + 3)).astype(np.int8)
    q = np.ascontiguousarray(wide[:, :r]) if contiguous else wide[:, :r]   # a view: the NumPy fallback
    scale = rng.uniform(0.001, 0.02, n).astype(np.float32)
    t = rng.normal(size=r).astype(np.float32)
    ref = (q.astype(np.float64) @ t.astype(np.float64)) * scale
    full = fs.int8_scores(q, scale, t)
    np.testing.assert_allclose(full, ref, rtol=1e-5, atol=1e-6)
    rows = rng.choice(n, 77, replace=False)
    np.testing.assert_allclose(fs.int8_scores(q, scale, t, rows=rows), ref[rows], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fs.int8_project(q, scale, rows), q[rows].astype(np.float32) * scale[rows, None])
    # the threshold scan: usable rows only, threshold inclusive, rows in increasing order
    valid = rng.random(n) > 0.2
    fcount = (rng.random(n) > 0.1).astype(np.float32)
    usable = valid & (fcount > 0)
    thr = float(np.sort(full[usable])[-100])       # a score that occurs: that row counts
    for block in (7, 64, 16384):                   # blocks that do not divide n, and one block
        out, best, idx = fs.int8_threshold_scan(q, scale, t, valid, fcount, thr, block=block)
        np.testing.assert_array_equal(idx, np.flatnonzero(usable & (full >= thr)))
        assert len(idx) == 100
        assert best == float(full[usable].max())
        np.testing.assert_array_equal(out[usable], full[usable])
        assert (out[~usable] < -1e38).all()
    out, best, idx = fs.int8_threshold_scan(q, scale, t, np.zeros(n, bool), fcount, -1e30)
    assert best == float("-inf") and len(idx) == 0
    out, best, idx = fs.int8_threshold_scan(q[:0], scale[:0], t, valid[:0], fcount[:0], 0.0)
    assert best == float("-inf") and len(idx) == 0 and len(out) == 0


def test_error_bound_function_is_the_documented_formula():
    rng = np.random.default_rng(2)
    b, _ = np.linalg.qr(rng.normal(size=(30, 6)))
    b = b.astype(np.float32)
    t = rng.normal(size=30).astype(np.float32)
    t /= np.linalg.norm(t)
    rho, qerr = rng.random(9).astype(np.float32), rng.random(9).astype(np.float32)
    t_r = b.T @ t
    tau = np.linalg.norm(t - b @ t_r)
    want = rho * tau + qerr * np.linalg.norm(t_r)
    got = fs.error_bound(rho, qerr, b, t)
    assert (got >= want).all() and (got - want <= 3e-5).all()
    inside = (b @ t_r) / np.linalg.norm(b @ t_r)     # a text in the basis: only the quantisation term
    np.testing.assert_allclose(fs.error_bound(rho, qerr, b, inside), qerr, atol=3e-5)


def test_decoded_features_index_like_an_array_and_assigning_keeps_counts():
    m, slots, f, _ = _int8_map(n=50, d=16, rank=8)
    feats = m.features
    cap = m.capacity
    assert feats.shape == (cap, 16) and len(feats) == cap and feats.dtype == np.float16 and feats.ndim == 2
    ref = feats.float32(np.arange(cap))
    s = int(slots[3])
    np.testing.assert_array_equal(feats[s], ref[s].astype(np.float16))
    np.testing.assert_array_equal(feats[s - cap], ref[s].astype(np.float16))       # negative index
    np.testing.assert_array_equal(feats[2:9], ref[2:9].astype(np.float16))
    mask = np.zeros(cap, bool)
    mask[slots[:5]] = True
    np.testing.assert_array_equal(feats[mask], ref[np.sort(slots[:5])].astype(np.float16))
    np.testing.assert_array_equal(feats[list(slots[:4])], ref[slots[:4]].astype(np.float16))
    arr = np.asarray(feats)
    assert arr.shape == (cap, 16) and arr.dtype == np.float16
    assert np.asarray(feats, dtype=np.float32).dtype == np.float32
    with pytest.raises(IndexError):
        feats[0, 1]
    assert feats.nbytes == cap * (m.rank + 16)
    counts = m.feature_counts[slots[:3]].copy()
    m.set_features(slots[:3], np.ones((3, 16)), counts=np.array([4, 5, 6]))
    new = np.zeros(16, np.float32)
    new[2] = 1
    feats[slots[:3]] = new                         # assigning encodes and keeps the counts
    assert m.feature_counts[slots[:3]].tolist() == [4, 5, 6] and counts.tolist() == [1, 1, 1]
    b = m.export()["code_basis"]
    np.testing.assert_allclose(feats.float32(slots[:3]), np.tile(b @ (b.T @ new), (3, 1)), atol=0.02)
    empty = VoxelMap(VoxelMapConfig(feature_store="int8", feature_dim=16))
    assert not empty.features.float32(np.arange(3)).any() and empty.query(new).count == 0


# ---------------------------------------------------------------------------------------- snapshots
def _drain(snap, rows):
    n = 0
    while not snap.step(rows=rows):
        n += 1
    return n


def _same(a, b):
    assert set(a) == set(b)
    for k, v in b.items():
        if v is None:
            assert a[k] is None, k
        else:
            np.testing.assert_array_equal(a[k], v, err_msg=k)


def test_snapshot_across_a_refit_that_swaps_the_int8_codes():
    m, slots, f, rng = _int8_map(n=600)
    more = m.integrate(rng.random((900, 3)) * 2 + 3)
    m.set_features(more, rng.normal(size=(len(more), f.shape[1])))
    snap = m.start_snapshot()
    assert not snap.step(rows=200)
    m.refit_basis()                                  # every voxel's codes change, and the basis
    assert _drain(snap, 200) >= 2
    _same(snap.export(), m.export())


def test_snapshot_restarts_after_a_reset_that_rebuilds_the_same_store():
    m, slots, f, rng = _int8_map(n=600)
    snap = m.start_snapshot()
    assert not snap.step(rows=100)
    m.reset()                                        # then the same kind of store again
    s = m.integrate(rng.random((300, 3)) * 2 + 1)
    m.set_features(s, rng.normal(size=(len(s), f.shape[1])))
    _drain(snap, 100)
    _same(snap.export(), m.export())


def test_snapshot_across_the_first_features_and_in_one_step():
    m = VoxelMap(VoxelMapConfig(voxel_size=0.1, initial_capacity=256))
    s = m.integrate(np.random.default_rng(0).random((500, 3)) * 3)
    snap = m.start_snapshot()
    assert not snap.step(rows=100)
    m.set_features(s, np.random.default_rng(1).normal(size=(len(s), 8)))   # the store appears
    m.classify(np.eye(8, dtype=np.float32))
    _drain(snap, 100)
    _same(snap.export(), m.export())
    with pytest.raises(RuntimeError, match="not complete"):
        m.start_snapshot().export()
    one = m.start_snapshot()
    assert one.step(rows=0) and one.step()           # one call copies everything; later calls are no-ops
    _same(one.export(), m.export())


# ---------------------------------------------------------------------------------------- save / load
def test_int8_save_load_returns_every_field(tmp_path):
    m, slots, f, rng = _int8_map(n=300)
    m.integrate(rng.random((20, 3)) * 2 + 5, colors=rng.integers(0, 256, (20, 3)).astype(np.uint8))   # no features
    m.classify(rng.normal(size=(5, 64)).astype(np.float32))
    m.set_features(slots[:10], rng.normal(size=(10, 64)), counts=np.arange(10) + 2)
    path = m.save(tmp_path / "m", class_names=list("abcde"))
    back, names = VoxelMap.load(path, m.config)
    assert names == list("abcde") and back.compact and len(back) == len(m)
    a, b = m.export(), back.export()
    assert {"codes", "code_scale", "code_resid", "code_qerr", "code_basis", "feature_counts"} <= set(a)
    _same(b, a)
    assert (a["feature_counts"] == 0).sum() == 20 and a["feature_counts"].max() == 11
    t = f[0] / np.linalg.norm(f[0])
    np.testing.assert_array_equal(back.error_bound(t, back.slots()), m.error_bound(t, m.slots()))
    r0, r1 = m.query(t, 0.2, 30), back.query(t, 0.2, 30)
    assert r0.count == r1.count > 0 and np.array_equal(r0.scores, r1.scores)
    np.testing.assert_array_equal(back.positions[r1.slots], m.positions[r0.slots])


def test_legacy_npz_maps_and_their_names(tmp_path):
    m, slots, f, _ = _int8_map(n=50, d=16, rank=8)
    arrays = {k: v for k, v in m.export().items() if v is not None}
    np.savez(tmp_path / "run.1.npz", voxel_size=np.float32(0.05), **arrays)
    for name in ("run.1", "run.1.npz"):            # run.1 reads run.1.npz (a suffix is not swapped)
        assert map_arrays_path(tmp_path / name) == tmp_path / "run.1.npz"
        back, names = VoxelMap.load(tmp_path / name, m.config)
        assert names is None
        _same(back.export(), m.export())
    with pytest.raises(FileNotFoundError):
        map_arrays_path(tmp_path / "run")


def test_load_at_exactly_max_points_without_coords_and_never_unpickles(tmp_path):
    m, slots, f, _ = _int8_map(n=60, d=16, rank=8)
    a = m.export()
    arrays = {k: v for k, v in a.items() if v is not None and k != "coords"}   # an older file: no coords
    np.savez(tmp_path / "old.npz", voxel_size=np.float32(0.05), **arrays)
    cfg = VoxelMapConfig(voxel_size=0.05, feature_store="int8", store_rank=8, max_points=len(m))
    back, _ = VoxelMap.load(tmp_path / "old.npz", cfg)          # exactly max_points voxels: fits
    _same(back.export(), a)                                     # the voxel keys come from the positions
    arrays["labels"] = np.array([object()] * len(m), dtype=object)   # a pickled array is refused
    np.savez(tmp_path / "pickled.npz", voxel_size=np.float32(0.05), **arrays)
    with pytest.raises(ValueError):
        VoxelMap.load(tmp_path / "pickled.npz", cfg)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("positions"), "no 'positions'"),
    (lambda a: a.update(labels=a["labels"][:-1]), "labels has"),
    (lambda a: a.update(coords=np.zeros_like(a["coords"])), "share one voxel key"),
    (lambda a: a.update(codes=a["codes"].astype(np.int16)), "inconsistent int8"),
    (lambda a: a.update(code_qerr=a["code_qerr"][:-1]), "inconsistent int8"),
    (lambda a: a.update(code_basis=a["code_basis"][:, :-1]), "inconsistent int8"),
])
def test_load_refuses_inconsistent_arrays(tmp_path, change, message):
    m, _, _, _ = _int8_map(n=40, d=16, rank=8)
    arrays = {k: v for k, v in m.export().items() if v is not None}
    change(arrays)
    np.savez(tmp_path / "bad.npz", voxel_size=np.float32(0.05), **arrays)
    with pytest.raises(ValueError, match=message):
        VoxelMap.load(tmp_path / "bad.npz", m.config)


def test_load_refuses_a_corrupt_file_and_mismatched_fp16_features(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        VoxelMap.load(tmp_path / "junk.npz")
    m = VoxelMap(VoxelMapConfig(voxel_size=0.05))
    s = m.integrate(np.random.default_rng(0).random((30, 3)))
    m.set_features(s, np.ones((len(s), 4)))
    arrays = {k: v for k, v in m.export().items() if v is not None}
    arrays["features"] = arrays["features"][:-1]
    np.savez(tmp_path / "f.npz", voxel_size=np.float32(0.05), **arrays)
    with pytest.raises(ValueError, match="features are"):
        VoxelMap.load(tmp_path / "f.npz")


# ---------------------------------------------------------------------------------------- depth
def test_rgbd_points_equal_a_per_pixel_loop():
    from sas_core.types import CameraIntrinsics

    rng = np.random.default_rng(0)
    h, w = 9, 12
    depth = rng.uniform(0.2, 4.0, size=(h, w)).astype(np.float32)
    depth[0, 0], depth[1, 2], depth[2, 4] = 0.0, np.nan, 0.5     # invalid, invalid, exactly min_depth
    depth[3, 6] = 3.0                                             # exactly max_depth: kept
    color = rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)
    K = CameraIntrinsics(fx=7.0, fy=9.0, cx=5.5, cy=4.0, width=w, height=h)
    a = 0.4
    pose = np.array([[np.cos(a), -np.sin(a), 0, 1.0], [np.sin(a), np.cos(a), 0, -2.0], [0, 0, 1, 0.5], [0, 0, 0, 1]])
    for stride in (1, 2, 3):
        pts, cols, pix = rgbd_points(depth, color, K, pose, stride=stride, min_depth=0.5, max_depth=3.0)
        want_p, want_c, want_px = [], [], []
        for v in range(0, h, stride):
            for u in range(0, w, stride):
                z = float(depth[v, u])
                if not (z > 0.5 and z <= 3.0):
                    continue
                cam = np.array([(u - K.cx) / K.fx * z, (v - K.cy) / K.fy * z, z, 1.0])
                want_p.append((pose @ cam)[:3])
                want_c.append(color[v, u])
                want_px.append((v, u))
        np.testing.assert_allclose(pts, np.array(want_p), atol=1e-5)
        np.testing.assert_array_equal(cols, np.array(want_c))
        np.testing.assert_array_equal(pix, np.array(want_px))
        assert (3, 6) in [tuple(p) for p in pix] if stride in (1, 3) else True
        assert (2, 4) not in [tuple(p) for p in pix]
    pts, cols, _ = rgbd_points(depth, None, K, np.eye(4))
    assert cols is None and len(pts) == int(np.sum(np.nan_to_num(depth) > 0))


# ---------------------------------------------------------------------------------------- refits
def test_fp16_basis_refit_is_due_when_the_voxels_with_features_double():
    rng = np.random.default_rng(0)
    m = VoxelMap(VoxelMapConfig(voxel_size=1.0, query_rank=4))
    s = m.integrate(_at(*(np.arange(2500) + 0.5)))
    assert len(s) == 2500
    m.set_features(s[:600], rng.normal(size=(600, 8)))
    assert m.needs_refit() and m.maybe_refit() and not m.needs_refit() and not m.maybe_refit()
    m.set_features(s[600:1000], rng.normal(size=(400, 8)))
    assert not m.needs_refit()                  # 1000 voxels: not above the 1000 floor
    m.set_features(s[1000:1200], rng.normal(size=(200, 8)))
    assert not m.needs_refit()                  # 1200 = 2 * 600: not above
    m.set_features(s[1200:1201], rng.normal(size=(1, 8)))
    assert m.needs_refit()                      # 1201 > max(2 * 600, 1000)
    m.refit_basis()
    m.set_features(s[1201:2402], rng.normal(size=(1201, 8)))
    assert not m.needs_refit()                  # 2402 = 2 * 1201
    m.set_features(s[2402:2403], rng.normal(size=(1, 8)))
    assert m.needs_refit()
    m.set_anchor(np.eye(8, dtype=np.float32)[:2])
    m.refit_basis()
    assert not m.needs_refit()
    m.set_anchor(np.eye(8, dtype=np.float32)[1:3])   # a new vocabulary
    assert m.needs_refit()


def test_refit_calls_without_a_refit_to_do():
    m = VoxelMap(VoxelMapConfig(voxel_size=1.0))
    m.integrate(_at(0.5))
    m.start_refit()                                  # no features: nothing to fit
    assert not m.refit_pending and m.refit_step() and m.refit_step(rows=0)   # a `while not step()` loop ends
    assert not m.needs_refit() and not m.maybe_refit()
    c = VoxelMap(VoxelMapConfig(voxel_size=1.0, feature_store="int8", feature_dim=8))
    c.start_refit()                                  # int8 without a basis yet
    assert not c.refit_pending and c.refit_step() and not c.needs_refit()


@pytest.mark.parametrize("store", ["fp16", "int8"])
def test_a_refit_under_way_survives_the_slot_arrays_growing(store):
    rng = np.random.default_rng(4)
    m = VoxelMap(VoxelMapConfig(voxel_size=0.05, initial_capacity=512, feature_store=store, query_rank=8,
                                store_rank=8))
    s = m.integrate(rng.random((400, 3)) * 2)
    m.set_features(s, rng.normal(size=(len(s), 32)))
    s2 = m.integrate(rng.random((400, 3)) * 2 + 3)
    m.set_features(s2, rng.normal(size=(len(s2), 32)))
    m.start_refit()
    assert m.refit_pending and not m.refit_step(rows=100)
    new = m.integrate(rng.random((3000, 3)) * 2 + 6)              # the slot arrays grow mid-refit
    assert m.capacity > 512
    f = rng.normal(size=(len(new), 32)).astype(np.float32)
    m.set_features(new, f)
    while not m.refit_step(rows=300):
        pass
    t = rng.normal(size=32).astype(np.float32)
    t /= np.linalg.norm(t)
    ref = m.scan_query(t)
    res = m.query(t, threshold=0.1)
    assert res.count == int((ref >= 0.1).sum()) > 0
    live = m.slots()
    pos = {x: i for i, x in enumerate(live.tolist())}
    np.testing.assert_allclose(res.scores, ref[[pos[x] for x in res.slots.tolist()]], atol=1e-4)
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    err = np.abs(fn @ t - m.stored_scores(t, new))
    assert (err <= m.error_bound(t, new) + (2e-3 if store == "fp16" else 1e-5)).all()
