"""Per-voxel instance ids kept up to date in the live map (sas_core.instances.online, Mapper)."""

import numpy as np
import pytest

from sas_core.geometry.voxel_map import VoxelMap, VoxelMapConfig
from sas_core.instances.online import VoxelInstances

VS = 0.1
CHAIR, FLOOR = 5, 1


def _box(lo, hi):
    """Voxel centres of the integer voxel box lo..hi (inclusive)."""
    g = np.stack(np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 3)
    return ((g + 0.5) * VS).astype(np.float32)


def _add(vmap, points, label):
    slots = vmap.integrate(points)
    vmap.labels[slots] = label
    return slots


def _room(max_points=100_000):
    """A floor (z = 0) and two chairs 1 m apart standing on it (z >= 1)."""
    vmap = VoxelMap(VoxelMapConfig(voxel_size=VS, max_points=max_points, initial_capacity=1024))
    floor = _add(vmap, _box((0, 0, 0), (29, 19, 0)), FLOOR)
    a = _add(vmap, _box((3, 3, 1), (6, 6, 5)), CHAIR)
    b = _add(vmap, _box((17, 3, 1), (20, 6, 5)), CHAIR)
    return vmap, floor, a, b


def _one_id(inst, vmap, slots):
    ids = inst.ids_of(vmap, slots)
    assert len(np.unique(ids)) == 1 and ids[0] >= 0, np.unique(ids)
    return int(ids[0])


def test_separate_objects_get_separate_stable_ids():
    vmap, floor, a, b = _room()
    inst = VoxelInstances()
    st = inst.update(vmap)
    assert st["changed"] == len(vmap) and inst.count(vmap) == 3
    assert 17 * vmap.capacity <= inst.memory_bytes() <= 17 * vmap.capacity + 8 * 4096
    ia, ib, i_floor = _one_id(inst, vmap, a), _one_id(inst, vmap, b), _one_id(inst, vmap, floor)
    assert len({ia, ib, i_floor}) == 3  # chairs touch the floor but have another label
    # nothing changed: nothing regrouped, same ids
    st = inst.update(vmap)
    assert st["changed"] == 0 and st["region"] == 0
    # the same chairs seen again (voxels re-observed, labels unchanged): same ids, no work
    vmap.integrate(_box((3, 3, 1), (6, 6, 5)))
    vmap.integrate(_box((17, 3, 1), (20, 6, 5)))
    assert inst.update(vmap)["changed"] == 0
    assert (_one_id(inst, vmap, a), _one_id(inst, vmap, b), _one_id(inst, vmap, floor)) == (ia, ib, i_floor)


def test_new_voxels_join_the_object_they_touch_and_bridges_merge():
    vmap, floor, a, b = _room()
    inst = VoxelInstances()
    inst.update(vmap)
    ia, ib = _one_id(inst, vmap, a), _one_id(inst, vmap, b)
    # a new frame extends chair a upwards: the new voxels take a's id before and after the update
    ext = _add(vmap, _box((3, 3, 6), (6, 6, 8)), CHAIR)
    assert np.all(inst.ids_of(vmap, ext) == -1)  # not grouped yet
    st = inst.update(vmap)
    assert st["changed"] == len(ext) and st["new"] == 0
    assert _one_id(inst, vmap, np.concatenate([a, ext])) == ia and _one_id(inst, vmap, b) == ib
    # a separate new chair gets a fresh id
    c = _add(vmap, _box((10, 14, 1), (12, 16, 4)), CHAIR)
    inst.update(vmap)
    ic = _one_id(inst, vmap, c)
    assert ic not in (ia, ib)
    # a bar of chair voxels bridging a and b (a chair seen in two fragments first): one object,
    # the older id wins everywhere
    bridge = _add(vmap, _box((7, 4, 3), (16, 4, 3)), CHAIR)
    st = inst.update(vmap)
    assert st["merged"] == 1
    assert _one_id(inst, vmap, np.concatenate([a, ext, b, bridge])) == min(ia, ib)
    assert _one_id(inst, vmap, c) == ic


def test_relabelled_voxels_leave_their_object():
    vmap, floor, a, b = _room()
    inst = VoxelInstances()
    inst.update(vmap)
    ia, i_floor = _one_id(inst, vmap, a), _one_id(inst, vmap, floor)
    legs = a[vmap.positions[a][:, 2] < 2 * VS]  # the bottom layer of chair a becomes floor
    vmap.labels[legs] = FLOOR
    inst.update(vmap)
    assert _one_id(inst, vmap, legs) == i_floor  # joined the floor they touch, without merging a into it
    rest = np.setdiff1d(a, legs)
    assert _one_id(inst, vmap, rest) == ia
    vmap.labels[legs] = 255  # unlabelled voxels are in no object
    inst.update(vmap)
    assert np.all(inst.ids_of(vmap, legs) == -1) and _one_id(inst, vmap, floor) == i_floor


def test_full_update_splits_an_object_cut_in_two():
    vmap = VoxelMap(VoxelMapConfig(voxel_size=VS, max_points=10_000, initial_capacity=1024))
    bar = _add(vmap, _box((0, 0, 0), (29, 0, 0)), CHAIR)  # 30 voxels in a row
    inst = VoxelInstances()
    inst.update(vmap)
    i0 = _one_id(inst, vmap, bar)
    order = np.argsort(vmap.positions[bar][:, 0])
    left, cut, right = bar[order[:20]], bar[order[20:22]], bar[order[22:]]
    vmap.remove(cut)
    st = inst.update(vmap)  # incremental: an object cut in two keeps one id
    assert st["left"] == 2 and _one_id(inst, vmap, np.concatenate([left, right])) == i0
    st = inst.update(vmap, full=True)  # the full pass splits it; the larger part keeps the id
    assert st["full"] and _one_id(inst, vmap, left) == i0
    assert _one_id(inst, vmap, right) != i0


def test_evicted_slots_do_not_pass_their_id_on():
    """A small map evicts the oldest voxels; their slots are reused by voxels of another object,
    which must not inherit the evicted object's id."""
    vmap = VoxelMap(VoxelMapConfig(voxel_size=VS, max_points=400, initial_capacity=64, evict_fraction=0.0))
    first = _add(vmap, _box((0, 0, 0), (9, 9, 2)), CHAIR)  # 300 voxels
    inst = VoxelInstances()
    inst.update(vmap)
    i_first = _one_id(inst, vmap, first)
    second = _add(vmap, _box((50, 0, 0), (59, 9, 2)), CHAIR)  # 300 more: 200 of the first are evicted
    assert vmap.n_evicted >= 200 and len(np.intersect1d(second, first)) > 0  # slots reused
    st = inst.update(vmap)
    assert st["left"] == vmap.n_evicted
    i_second = _one_id(inst, vmap, second)
    assert i_second != i_first
    kept = first[vmap.valid[first] & ~np.isin(first, second)]
    assert len(kept) and _one_id(inst, vmap, kept) == i_first


def test_ids_follow_voxels_that_move_to_other_slots():
    """Compaction or a rebuild puts the same voxels in other slots: ids are looked up by voxel key."""
    vmap, floor, a, b = _room()
    inst = VoxelInstances()
    inst.update(vmap)
    before = dict(zip(map(tuple, vmap.keys_of(vmap.slots()).tolist()), inst.export(vmap).tolist()))
    moved = VoxelMap(VoxelMapConfig(voxel_size=VS, max_points=100_000, initial_capacity=1024))
    pos = vmap.positions[vmap.slots()]
    half = len(pos) // 2
    s = np.concatenate([moved.integrate(pos[half:]), moved.integrate(pos[:half])])  # other slots
    moved.labels[moved.lookup(pos)] = vmap.labels[vmap.lookup(pos)]
    assert (moved.lookup(pos) != vmap.lookup(pos)).mean() > 0.9
    st = inst.update(moved)
    assert st["changed"] == 0, st  # nothing regrouped: every voxel found its id by key
    after = dict(zip(map(tuple, moved.keys_of(moved.slots()).tolist()), inst.export(moved).tolist()))
    assert after == before and len(s) == len(vmap)


def test_mapper_keeps_ids_through_save_and_load(tmp_path):
    from sas_core.mapping import Mapper, MapperConfig

    mapper = Mapper(MapperConfig(mode="none", voxel_size=VS))
    vmap, floor, a, b = _room()
    with mapper.lock:
        mapper.map = vmap
    st = mapper.update_instances()
    assert st["changed"] == len(vmap) and st["ms"] >= 0 and mapper.stats()["instances"] == 3
    data = mapper.export()
    assert data["instance"].dtype == np.int32 and len(data["instance"]) == len(data["positions"])
    folder = mapper.save(tmp_path / "m")
    with np.load(folder / "map.npz") as z:
        np.testing.assert_array_equal(z["instance"], data["instance"])
    other = Mapper(MapperConfig(mode="none", voxel_size=VS))
    other.load(folder)
    np.testing.assert_array_equal(other.export()["instance"], data["instance"])
    assert other.update_instances()["changed"] == 0  # the loaded ids count as grouped
    np.testing.assert_array_equal(other.export()["instance"], data["instance"])
    # an old map without the array still loads; its ids come with the next update
    with np.load(folder / "map.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "instance"}
    old = tmp_path / "old.npz"
    np.savez(old, **arrays)
    assert other.load(old) == len(vmap)
    assert np.all(other.export()["instance"] == -1)
    assert other.update_instances()["changed"] == len(vmap) and other.stats()["instances"] == 3
    ids = other.export()["instance"]
    groups = {tuple(np.unique(ids[data["instance"] == k]).tolist()) for k in np.unique(data["instance"])}
    assert all(len(g) == 1 for g in groups) and len(groups) == 3  # the same partition
    other.reset()
    assert len(other.export()["instance"]) == 0


def test_restore_refuses_a_wrong_length():
    vmap, *_ = _room()
    with pytest.raises(ValueError, match="instance ids"):
        VoxelInstances().restore(vmap, np.zeros(3, np.int32))


def test_live_room_instances_are_the_chairs_and_stay_stable():
    """Frame by frame through the Mapper (fusion, synthetic room seed 3; label pass + instance
    update after each frame, as the node does): the chair-labelled voxels of every well-seen
    ground-truth chair are mostly one instance, different chairs are different instances, and voxels whose label did not change keep
    their id from one frame to the next (up to merges into the older id)."""
    from scipy.spatial import cKDTree

    from sas_core.data.synthetic import SynthConfig, generate_scene
    from sas_core.mapping import Mapper, MapperConfig

    scene = generate_scene(SynthConfig(seed=3, n_frames=6, with_lidar=False))
    mapper = Mapper(MapperConfig(mode="fusion"))
    prev = None
    kept = []
    for f in scene.frames:
        mapper.integrate_rgbd(f)
        mapper.label_pass()
        st = mapper.update_instances()
        assert st["changed"] > 0 and not st["full"]
        data = mapper.export()
        now = {tuple(c): (i, l) for c, i, l in zip(data["coords"].tolist(), data["instance"].tolist(),
                                                  data["labels"].tolist())}
        if prev is not None:
            same = [(now[c][0], i) for c, (i, l) in prev.items() if c in now and now[c][1] == l and i >= 0]
            kept.append(np.mean([a == b or a < b for a, b in same]))  # kept, or merged into an older id
        prev = now
    assert min(kept) > 0.99, kept
    d, nn = cKDTree(scene.points.positions).query(data["positions"])
    gt_inst = np.where(d < 0.06, scene.points.instances[nn], -1)
    chair = scene.class_names.index("chair")
    chairs = np.unique(scene.points.instances[scene.points.labels == chair])
    owners = []
    for c in chairs.tolist():
        ids = data["instance"][(gt_inst == c) & (data["labels"] == chair)]  # its voxels labelled chair
        if len(ids) < 50:
            continue
        top = np.bincount(ids).argmax()
        assert (ids == top).mean() > 0.8, (c, np.unique(ids, return_counts=True))
        owners.append(int(top))
    assert len(owners) >= 2 and len(set(owners)) == len(owners), owners
    # the incremental ids group as a full regrouping does, on the chairs
    full = Mapper(MapperConfig(mode="fusion"))
    for f in scene.frames:
        full.integrate_rgbd(f)
    full.label_pass()
    full.update_instances(full=True)
    ids_full = full.export()["instance"]
    for top in owners:
        mine = ids_full[data["instance"] == top]
        assert (mine == np.bincount(mine[mine >= 0]).argmax()).mean() > 0.95


def test_sliced_updates_group_as_one_update():
    """A mass change (a vocabulary change relabels every voxel) regrouped in slices of a few
    voxels, the lock free in between, gives the partition of one update."""
    vmap, floor, a, b = _room()
    bridge = _add(vmap, _box((7, 4, 3), (16, 4, 3)), CHAIR)
    whole, sliced = VoxelInstances(), VoxelInstances()
    whole.update(vmap)
    calls = 0
    while True:
        st = sliced.update(vmap, max_changed=97)
        calls += 1
        assert st["changed"] <= 97
        if not st["remaining"]:
            break
    assert calls > 5
    x, y = whole.export(vmap), sliced.export(vmap)
    assert np.all((x >= 0) == (y >= 0))
    pairs = set(zip(x.tolist(), y.tolist()))
    assert len(pairs) == len(set(x.tolist())) == len(set(y.tolist()))  # one-to-one: the same partition
    assert len({int(v) for v in x[np.isin(vmap.slots(), np.concatenate([a, b, bridge]))]}) == 1
