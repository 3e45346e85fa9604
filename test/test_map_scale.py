"""Building-scale maps (#18): the int8 feature store, voxel blocks and box queries, incremental snapshots."""

import json

import numpy as np
import pytest

from sas_core.geometry.voxel_map import (BLOCK, VoxelMap, VoxelMapConfig, block_keys, read_map_manifest,
                                         unblock_keys, write_map)


def _text(k=6, d=64, seed=0):
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(k, d)).astype(np.float32)
    return t / np.linalg.norm(t, axis=1, keepdims=True)


def _scene(n=3000, d=64, seed=0, store="fp16", rank=24, **cfg):
    """A map of n voxels in a 3 m cube with features = class text + noise (the structure of real features)."""
    rng = np.random.default_rng(seed)
    m = VoxelMap(VoxelMapConfig(voxel_size=0.05, feature_store=store, store_rank=rank, query_rank=16, **cfg))
    pts = rng.random((n, 3)) * 3.0
    slots = m.integrate(pts)
    text = _text(6, d, seed)
    cls = rng.integers(0, len(text), len(slots))
    feats = text[cls] + 0.35 * rng.normal(size=(len(slots), d)).astype(np.float32)
    return m, slots, feats, text


def test_block_keys_roundtrip_and_block_major_order():
    rng = np.random.default_rng(1)
    c = rng.integers(-(1 << 20), 1 << 20, size=(2000, 3))
    k = block_keys(c)
    np.testing.assert_array_equal(unblock_keys(k), c)
    # voxels of one block are one contiguous run of the sorted keys
    order = np.argsort(k)
    blocks = [tuple(b) for b in (c[order] // BLOCK)]
    runs = [blocks[0]] + [b for a, b in zip(blocks, blocks[1:]) if a != b]
    assert len(runs) == len(set(blocks))


def test_box_slots_and_region_queries_equal_brute_force():
    m, slots, feats, text = _scene()
    m.set_features(slots, feats)
    assert 0 < m.n_blocks() < len(m)
    live = m.slots()
    rng = np.random.default_rng(2)
    for _ in range(5):
        lo = rng.random(3) * 2.5 - 0.2
        hi = lo + rng.random(3) * 1.5
        got = np.sort(m.box_slots(lo, hi))
        p = m.positions[live]
        want = np.sort(live[((p >= lo.astype(np.float32)) & (p <= hi.astype(np.float32))).all(1)])
        np.testing.assert_array_equal(got, want)
        res = m.query(text[1], threshold=0.3, region=(lo, hi))
        ref = m.features[want].astype(np.float32) @ text[1]
        assert res.count == int((ref >= 0.3).sum())
        if len(want):
            assert res.best_score == pytest.approx(float(ref.max()), abs=1e-6)
        assert set(res.slots.tolist()) == set(want[ref >= 0.3].tolist())
    # region_slots (the segmenter's context) reads blocks and agrees with the box it describes
    some = live[:50]
    box = m.region_slots(some, margin=0.2)
    lo, hi = m.positions[some].min(0) - 0.2, m.positions[some].max(0) + 0.2
    p = m.positions[live]
    np.testing.assert_array_equal(np.sort(box), np.sort(live[((p >= lo) & (p <= hi)).all(1)]))
    m.remove(live[::2])  # the block index follows removals
    assert set(np.unique(m._keys >> 9).tolist()) == set(m._bkeys.tolist())


def test_int8_store_is_a_full_scan_of_itself_and_within_its_bound_of_fp16():
    full, slots, feats, text = _scene(store="fp16")
    comp, slots8, _, _ = _scene(store="int8", rank=40)
    np.testing.assert_array_equal(slots, slots8)
    for m in (full, comp):
        m.set_anchor(text)
    full.set_features(slots, feats)
    comp.set_features(slots, feats)
    assert comp.rank == 40 and comp._q.dtype == np.int8
    free = _text(1, 64, seed=7)[0] * 0.6 + text[2] * 0.8  # a free text partly outside the span
    free /= np.linalg.norm(free)
    for t in list(text[:3]) + [free]:
        ref8 = comp.scan_query(t)                              # decoded f_hat, float32
        res = comp.query(t, threshold=0.4, max_points=50)
        assert res.count == int((ref8 >= 0.4).sum())
        assert res.best_score == pytest.approx(float(ref8.max()), abs=1e-4)
        live = comp.slots()
        pos = {s: i for i, s in enumerate(live)}
        np.testing.assert_allclose(res.scores, ref8[[pos[s] for s in res.slots]], atol=1e-4)
        assert (np.diff(res.scores) <= 0).all() and len(res.slots) == min(50, res.count)
        # against the fp16 store: |f.t - f_hat.t| <= the stated bound, for every voxel
        ref16 = full.scan_query(t)
        bound = comp.error_bound(t, live)
        assert (np.abs(ref16 - ref8) <= bound + 2e-3).all()   # + fp16 rounding of the full store
    # a vocabulary word is in the basis: only the quantisation error is left
    assert comp.error_bound(text[0], comp.slots()).max() < 0.02
    # labels agree with an argmax over the decoded features
    comp.classify(text)
    live = comp.slots()
    dec = comp.features.float32(live) @ text.T
    np.testing.assert_array_equal(comp.labels[live], dec.argmax(1))
    np.testing.assert_allclose(comp.scores[live], dec.max(1), atol=1e-4)
    # memory: r + 12 bytes a voxel for the store (plus the basis and the refit sample)
    mm = comp.memory_model()
    per = sum(getattr(comp, k).nbytes for k in ("_q", "_qt", "_qtn", "_qscale", "_resid", "_qerr")) / comp.capacity
    assert per == comp.rank + 16
    assert mm["features"] < full.memory_model()["features"] and mm["query_store"] == 0
    assert comp.features[live[:3]].shape == (3, 64) and comp.features.dtype == np.float16


def test_int8_refit_reencodes_from_the_store_and_keeps_the_bound():
    full, slots, feats, text = _scene(store="fp16")
    comp, _, _, _ = _scene(store="int8")
    full.set_features(slots, feats)
    comp.set_features(slots[:100], feats[:100])       # basis fitted on 100 voxels
    comp.set_features(slots[100:], feats[100:])
    assert comp.needs_refit()
    comp.start_refit()
    while not comp.refit_step(rows=700):
        pass
    assert not comp.needs_refit() and comp._fit_n == len(slots)
    for t in text[:3]:
        diff = np.abs(full.scan_query(t) - comp.scan_query(t))
        assert (diff <= comp.error_bound(t, comp.slots()) + 2e-3).all()


@pytest.mark.parametrize("rank", [24, 48])
def test_int8_head_scan_with_tail_rescoring_equals_a_full_scan(rank):
    """rank 48: the query scans the 32 head columns, rescoring candidates with the 16 tail ones
    (or scans both parts when the text is far from the head); rank 24: no tail."""
    comp, slots, feats, text = _scene(store="int8", rank=rank)
    comp.set_anchor(text)
    comp.set_features(slots, feats)
    rng = np.random.default_rng(3)
    near = text[1] + 0.02 * rng.normal(size=64).astype(np.float32)   # mostly in the head
    far = rng.normal(size=64).astype(np.float32)                      # anywhere
    for t in [text[1], near / np.linalg.norm(near), far / np.linalg.norm(far)]:
        ref = comp.scan_query(t)
        live = comp.slots()
        pos = {s: i for i, s in enumerate(live)}
        for thr, k in ((0.3, 0), (0.5, 40), (0.99, 0), (-1.0, 10)):
            res = comp.query(t, threshold=thr, max_points=k)
            assert res.count == int((ref >= thr).sum()), (thr, k)
            assert res.best_score == pytest.approx(float(ref.max()), abs=1e-4)
            np.testing.assert_allclose(res.scores, ref[[pos[s] for s in res.slots]], atol=1e-4)
            want = np.sort(ref[ref >= thr])[::-1][: k or None]
            np.testing.assert_allclose(res.scores, want, atol=1e-4)
    if rank > 32:  # a vocabulary word rescored only a few candidates, not the map
        assert comp.query(text[1], threshold=0.5).rescored < len(comp) // 2
        assert comp._qt.shape[1] == rank - 32


@pytest.mark.parametrize("store", ["fp16", "int8"])
def test_snapshot_equals_the_map_when_it_completes(store):
    m, slots, feats, text = _scene(store=store, initial_capacity=1024)
    m.set_features(slots, feats)
    m.classify(text)
    snap = m.start_snapshot()
    rng = np.random.default_rng(5)
    steps = 0
    while not snap.step(rows=400):
        steps += 1
        if steps == 1:   # new voxels (the map grows past the slots being copied)
            new = m.integrate(rng.random((2000, 3)) * 3.0 + [4.0, 0, 0])
            m.set_features(new, text[rng.integers(0, 6, len(new))])
        elif steps == 2:  # changed features, labels, positions and removed voxels
            m.set_features(slots[:200], -feats[:200])
            m.classify(text, slots[:300])
            m.integrate(m.positions[slots[300:400]] + 0.001)
            m.remove(slots[500:700])
        elif steps == 3:  # removed slots reused by other voxels
            m.integrate(rng.random((150, 3)) * 0.5 + [-3.0, 0, 0])
    assert steps >= 4
    got, want = snap.export(), m.export()
    assert set(got) == set(want)
    for key, arr in want.items():
        if arr is None:
            assert got[key] is None
        else:
            np.testing.assert_array_equal(got[key], arr, err_msg=key)
    # later changes do not leak into the finished snapshot
    m.set_features(m.slots()[:10], np.ones((10, 64)))
    np.testing.assert_array_equal(snap.export()["labels"], want["labels"])


def test_snapshot_restarts_after_a_reset():
    m, slots, feats, _ = _scene(store="int8")
    m.set_features(slots, feats)
    snap = m.start_snapshot()
    assert not snap.step(rows=100)
    m.reset()
    m.integrate(np.array([[0.1, 0.1, 0.1]]))
    while not snap.step(rows=100):
        pass
    assert len(snap.export()["positions"]) == 1


def test_int8_maps_save_load_and_cross_load(tmp_path):
    comp, slots, feats, text = _scene(store="int8")
    comp.set_anchor(text)
    comp.set_features(slots, feats)
    comp.classify(text)
    path = comp.save(tmp_path / "m8", class_names=[f"c{i}" for i in range(6)])
    man = read_map_manifest(path)
    assert man["format_version"] == 2 and man["feature_dim"] == 64
    back, names = VoxelMap.load(path, VoxelMapConfig(voxel_size=0.05, feature_store="int8", store_rank=24))
    assert names == [f"c{i}" for i in range(6)]
    for t in text[:2]:
        np.testing.assert_array_equal(back.scan_query(t), comp.scan_query(t))
        a, b = comp.query(t, 0.4, 20), back.query(t, 0.4, 20)
        assert a.count == b.count and np.allclose(a.scores, b.scores)
    # an int8 map into a full-store map: f_hat decoded into fp16 (unit length, as that store keeps them)
    full, _ = VoxelMap.load(path, VoxelMapConfig(voxel_size=0.05))
    assert not full.compact and full.features.dtype == np.float16
    norm = np.linalg.norm(comp.features.float32(comp.slots()), axis=1)
    np.testing.assert_allclose(full.scan_query(text[0]), comp.scan_query(text[0]) / norm, atol=2e-3)
    # a full-store (format 1) map into the int8 store: encoded on load, within the bound
    f16, s16, feats16, _ = _scene(store="fp16")
    f16.set_features(s16, feats16)
    p16 = f16.save(tmp_path / "m16")
    assert json.loads((p16 / "manifest.json").read_text())["format_version"] == 1
    c8, _ = VoxelMap.load(p16, VoxelMapConfig(voxel_size=0.05, feature_store="int8", store_rank=24))
    assert c8.compact and len(c8) == len(f16)
    diff = np.abs(f16.scan_query(text[3]) - c8.scan_query(text[3]))
    assert (diff <= c8.error_bound(text[3], c8.slots()) + 2e-3).all()


def test_write_map_of_a_snapshot_matches_save(tmp_path):
    m, slots, feats, _ = _scene(store="int8", n=500)
    m.set_features(slots, feats)
    snap = m.start_snapshot()
    while not snap.step(rows=64):
        pass
    a = write_map(tmp_path / "a", snap.export(), 0.05)
    b = m.save(tmp_path / "b")
    za, zb = np.load(a / "map.npz"), np.load(b / "map.npz")
    assert set(za.files) == set(zb.files)
    for k in za.files:
        np.testing.assert_array_equal(za[k], zb[k])


def test_bad_store_settings():
    with pytest.raises(ValueError, match="feature_store"):
        VoxelMap(VoxelMapConfig(feature_store="pq"))
    with pytest.raises(ValueError, match="store_rank"):
        VoxelMap(VoxelMapConfig(store_rank=0))


def test_mapper_with_the_int8_store_labels_like_fp16_and_saves_while_integrating(tmp_path):
    """Fusion mode end to end with feature_store=int8: labels agree with the fp16 store, queries
    find the same voxels, and Mapper.save (sliced snapshot) releases the lock between slices."""
    from sas_core.data.synthetic import SynthConfig, generate_scene
    from sas_core.geometry import voxel_map
    from sas_core.mapping import Mapper, MapperConfig

    scene = generate_scene(SynthConfig(seed=3, n_frames=4, with_lidar=False))
    mappers = {s: Mapper(MapperConfig(mode="fusion", feature_store=s)) for s in ("fp16", "int8")}
    for m in mappers.values():
        for f in scene.frames:
            m.integrate_rgbd(f)
        m.label_pass()
    a, b = mappers["fp16"].export(), mappers["int8"].export()
    np.testing.assert_array_equal(a["positions"], b["positions"])
    has = a["labels"] != 255
    assert has.mean() > 0.5 and (a["labels"][has] == b["labels"][has]).mean() > 0.97
    assert b["features"] is None and b["codes"].dtype == np.int8
    qa, qb = mappers["fp16"].query(["chair"], 0.6, 5000)[0], mappers["int8"].query(["chair"], 0.6, 5000)[0]
    sa, sb = set(qa.slots.tolist()), set(qb.slots.tolist())
    assert len(sa) > 20 and len(sa & sb) >= 0.97 * len(sa) and len(sa & sb) >= 0.97 * len(sb)
    m8 = mappers["int8"]
    assert m8.map.memory_model()["features"] < mappers["fp16"].map.memory_model()["features"] / 3
    # save in small slices: the lock is taken and released once per slice (never held throughout)
    entries = []

    class CountingLock:
        def __init__(self, lock):
            self.lock = lock

        def __enter__(self):
            self.lock.acquire()
            entries.append(1)

        def __exit__(self, *exc):
            self.lock.release()

    original = voxel_map.MapSnapshot.step
    voxel_map.MapSnapshot.step = lambda self, rows=voxel_map.LOCK_SLICE: original(self, 500)
    real, m8.lock = m8.lock, CountingLock(m8.lock)
    try:
        path = m8.save(tmp_path / "m8")
    finally:
        voxel_map.MapSnapshot.step = original
        m8.lock = real
    assert len(entries) >= 1 + len(m8.map) // 500  # one hold to start, one per 500-slot slice
    back = Mapper(MapperConfig(mode="fusion", feature_store="int8"))
    assert back.load(path) == len(m8)
    np.testing.assert_array_equal(back.export()["codes"], b["codes"])


def test_map_scale_bench_case_runs_and_checks_itself():
    from sas_app.bench.map_scale import run_case

    out = run_case(30_000, "int8", repeats=1, save=True, rank=32)
    assert out["voxels"] == 30_000 and out["memory"]["bytes_per_voxel"] > 0
    for q in out["queries"].values():
        assert q["bound_holds"] and q["count"] >= 0 and q["returned"] <= 5000
    assert out["region_labelling_per_frame"]["same_voxels"]
    assert out["save_load"]["reloaded_same_size"]
    assert set(out["memory"]["by_component_bytes_per_voxel"]) >= {"geometry", "features", "index"}
    # frames into a cleared room insert voxels; the index costs are replayed on the map's keys
    assert out["integration_640x480"]["stride1_into_a_cleared_room"]["new_voxels_median"] > 0
    ki = out["key_index"]
    assert ki["voxels"] > 0 and ki["new_voxels"] > 0 and ki["frame_points"] > 0
    assert set(ki["insert_ms"]) == set(ki["lookup_frame_ms"]) == {"sorted_arrays_before", "block_index_now"}
