"""`sas bench map-scale [--json] [--sizes 1M,3M,10M] [--quick]`: building-scale maps (issue #18).

For each map size N (voxels) and each feature store (``int8``, the compact store; ``fp16``, today's
store, where it fits in memory), one subprocess (clean resident memory) builds a synthetic
building and measures:

* memory: the map's bytes by component (:meth:`VoxelMap.memory_model`), bytes per voxel, and the
  process's resident memory before and after building the map (RSS delta);
* integration of a 640x480 RGB-D frame into the full map (a camera inside one room, depth ray-cast
  against the room's box; pixel stride 1 and 2, the node's default), frames per second; and at
  stride 1 into the same room after its voxels were removed (frames that insert voxels);
* the key index: inserting a frame's new voxels and looking up a frame's points, against the
  sorted-array index it replaced (replayed on the same keys in the same run);
* region labelling: the frame's touched voxels relabelled (``classify``) and the segmenter's
  context box around them (``region_slots``, block-pruned, against a scan of every voxel);
* query latency (median of repeats, threshold 0.5, 5000 points returned): a vocabulary word,
  a free text, and a query restricted to one room's box;
* recall and precision at the threshold against the exact scores of the original float32
  features (computed while the features are generated: what a full scan of an exact store gives),
  and the largest error against the stated bound (:mod:`sas_core.geometry.feature_store`);
* saving (an incremental snapshot in ``LOCK_SLICE`` slices, as ``Mapper.save`` takes it: longest
  and median lock hold, then the write with no lock) and loading.

The synthetic building: rooms of 6 x 6 x 3 m in a grid, sharing walls, each with a floor, a
ceiling and eight box-shaped objects, voxelised at 5 cm (surface voxels only, ~50k a room).
Features are synthesised cheaply, as ``sas bench node`` does: the class's text vector of the
synthetic text space + a per-object offset (norm 0.3, random in all 512 dims) + noise in a 32-d
subspace (norm 0.5), L2-normalised. They are not a network's outputs: the figures measure the
map's cost, not accuracy on real data.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from sas_app.bench.node import _rss_mb, proc_mb  # one /proc reader for the benches

ROOM = (120, 120, 60)      # room size in voxels (6 x 6 x 3 m at 5 cm)
VOXEL = 0.05
N_OBJECTS = 8
CLASSES_OBJ = ("cabinet", "bed", "chair", "sofa", "table", "bookshelf", "desk", "refrigerator", "toilet", "sink",
               "bathtub", "otherfurniture", "counter")
QUERIES = {"vocabulary word 'chair'": "chair", "free text 'a wooden chair'": "a wooden chair"}
THRESHOLD = 0.5
MAX_POINTS = 5000


def _avail_mb() -> float:
    return proc_mb("/proc/meminfo", "MemAvailable")


def _room_voxels(ix: int, iy: int, rng, class_of: dict):
    """Integer voxel coords (M, 3), class (M,) and object id (M,) of room (ix, iy): floor, ceiling,
    its west and south walls (neighbours share them) and N_OBJECTS boxes."""
    W, L, H = ROOM
    x0, y0 = ix * W, iy * L
    gx, gy = np.meshgrid(np.arange(W), np.arange(L), indexing="ij")
    gx, gy = gx.ravel() + x0, gy.ravel() + y0
    parts, cls, obj = [], [], []
    base = (ix * 1000 + iy) * 16
    parts.append(np.stack([gx, gy, np.zeros_like(gx)], 1)); cls.append(class_of["floor"]); obj.append(base)
    parts.append(np.stack([gx, gy, np.full_like(gx, H - 1)], 1)); cls.append(class_of["wall"]); obj.append(base + 1)
    wz, wy = np.meshgrid(np.arange(1, H - 1), np.arange(L), indexing="ij")
    parts.append(np.stack([np.full(wz.size, x0), wy.ravel() + y0, wz.ravel()], 1)); cls.append(class_of["wall"])
    obj.append(base + 2)
    wz, wx = np.meshgrid(np.arange(1, H - 1), np.arange(1, W), indexing="ij")
    parts.append(np.stack([wx.ravel() + x0, np.full(wz.size, y0), wz.ravel()], 1)); cls.append(class_of["wall"])
    obj.append(base + 3)
    for k in range(N_OBJECTS):
        sx, sy, sz = rng.integers(8, 24), rng.integers(8, 24), rng.integers(8, 20)
        ox, oy = rng.integers(4, W - sx - 4) + x0, rng.integers(4, L - sy - 4) + y0
        g = np.stack(np.meshgrid(np.arange(sx), np.arange(sy), np.arange(1, sz), indexing="ij"), -1).reshape(-1, 3)
        shell = (g[:, 0] == 0) | (g[:, 0] == sx - 1) | (g[:, 1] == 0) | (g[:, 1] == sy - 1) | (g[:, 2] == sz - 1)
        kind = CLASSES_OBJ[(3 * (ix + 7 * iy) + k) % len(CLASSES_OBJ)]  # every class in every few rooms
        parts.append(g[shell] + [ox, oy, 0]); cls.append(class_of[kind])
        obj.append(base + 4 + k)
    coords = np.concatenate(parts)
    return coords, np.concatenate([np.full(len(p), c) for p, c in zip(parts, cls)]), \
        np.concatenate([np.full(len(p), o) for p, o in zip(parts, obj)])


def building(n: int, seed: int = 0):
    """Voxel coords (n, 3), class (n,), object id (n,) and the room grid (nx, ny) of a building of
    at least n surface voxels (the last room cut at n). Duplicates (shared edges) removed."""
    from sas_core.text import SCANNET_20

    class_of = {c: i for i, c in enumerate(SCANNET_20)}
    rng = np.random.default_rng(seed)
    per_room = 50_000
    rooms = max(1, int(np.ceil(n / per_room * 1.05)))
    nx = int(np.ceil(np.sqrt(rooms)))
    coords, cls, obj, total = [], [], [], 0
    for r in range(nx * nx):
        c, k, o = _room_voxels(r % nx, r // nx, rng, class_of)
        coords.append(c); cls.append(k); obj.append(o)
        total += len(c)
        if total >= n * 1.02:
            break
    coords, cls, obj = np.concatenate(coords), np.concatenate(cls), np.concatenate(obj)
    from sas_core.geometry.voxel_map import block_keys

    _, first = np.unique(block_keys(coords), return_index=True)
    first = np.sort(first)[:n]
    if len(first) < n:
        raise RuntimeError(f"building has only {len(first)} voxels for {n}")
    return coords[first], cls[first], obj[first], nx


class _FeatureSynth:
    """Unit features of voxels (module docstring), written into reused buffers (fresh 100 MB
    arrays cost more in page faults than the arithmetic on a loaded machine)."""

    def __init__(self, cls, obj, text, rows: int = 65536):
        self.cls, self.obj, self.text = cls, obj, text
        dim = text.shape[1]
        self.noise_t = np.ascontiguousarray(
            np.linalg.qr(np.random.default_rng(1).normal(size=(dim, 32)))[0].T.astype(np.float32)
            * np.float32(0.5 / np.sqrt(32)))
        self.buf = np.empty((rows, dim), np.float32)
        self.tmp = np.empty((rows, dim), np.float32)
        self.offsets = {}

    def _offsets(self, ids):
        missing = [int(u) for u in ids if int(u) not in self.offsets]
        for u in missing:
            v = np.random.default_rng(u).normal(size=self.text.shape[1]).astype(np.float32)
            self.offsets[u] = v * np.float32(0.3 / np.linalg.norm(v))
        return np.stack([self.offsets[int(u)] for u in ids])

    def __call__(self, a: int, b: int) -> np.ndarray:
        """(b - a, D) features of voxels a..b (a view of the reused buffer)."""
        k = b - a
        buf, tmp = self.buf[:k], self.tmp[:k]
        rng = np.random.default_rng(a)
        np.matmul(rng.standard_normal((k, 32), dtype=np.float32), self.noise_t, out=buf)
        np.take(self.text, self.cls[a:b], axis=0, out=tmp)
        buf += tmp
        uo, inv = np.unique(self.obj[a:b], return_inverse=True)
        np.take(self._offsets(uo), inv.reshape(-1), axis=0, out=tmp)
        buf += tmp
        buf /= np.sqrt(np.einsum("ij,ij->i", buf, buf))[:, None]
        return buf


def _camera_frame(room_box, yaw: float, stride: int):
    """World points of one 640x480 depth frame from the centre of a room, 1.5 m up, looking at
    ``yaw`` (depth ray-cast against the room's inner faces)."""
    from sas_core.geometry.voxel_map import rgbd_points
    from sas_core.types import CameraIntrinsics

    intr = CameraIntrinsics(525.0, 525.0, 319.5, 239.5, 640, 480)
    lo, hi = room_box
    origin = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, 1.5])
    fwd = np.array([np.cos(yaw), np.sin(yaw), 0.0])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    R = np.stack([right, down, fwd], 1)
    u, v = np.meshgrid(np.arange(640), np.arange(480))
    d_cam = np.stack([(u - intr.cx) / intr.fx, (v - intr.cy) / intr.fy, np.ones_like(u, float)], -1)
    d = d_cam @ R.T
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.full(d.shape[:2], np.inf)
        for a in range(3):
            for plane in (lo[a], hi[a]):
                ta = (plane - origin[a]) / d[..., a]
                t = np.where((ta > 0) & (ta < t), ta, t)
    depth = t.astype(np.float32)  # z of the camera ray is 1: t is the depth
    color = np.full((480, 640, 3), 128, np.uint8)
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = R, origin
    return depth, color, intr, pose


def _warm_up() -> None:
    """Imports and compiled kernels first, so the RSS delta is the map's."""
    from sas_core.geometry.voxel_map import VoxelMap, VoxelMapConfig

    for store in ("int8", "fp16"):
        m = VoxelMap(VoxelMapConfig(feature_store=store, store_rank=4, query_rank=4))
        s = m.integrate(np.random.default_rng(0).random((64, 3)))
        m.set_features(s, np.random.default_rng(0).normal(size=(len(s), 8)))
        m.classify(np.eye(8)[:3])
        m.query(np.eye(8)[0], 0.5, region=(np.zeros(3), np.ones(3)))
        m.query(np.eye(8)[0], 0.5)


def run_case(n: int, store: str, repeats: int, save: bool, rank: int) -> dict:
    """One (size, store) case in this process (see the module docstring)."""
    from sas_core.geometry.voxel_map import LOCK_SLICE, VoxelMap, VoxelMapConfig, rgbd_points, write_map
    from sas_core.text import SCANNET_20, SyntheticTextEncoder

    out = dict(voxels=n, store=store)
    t0 = time.perf_counter()
    coords, cls, obj, nx = building(n)
    enc = SyntheticTextEncoder(SCANNET_20, dim=512)
    text = enc.class_vectors().astype(np.float32)
    qtext = {k: enc.encode_numpy([v])[0].astype(np.float32) for k, v in QUERIES.items()}
    out["building"] = dict(rooms_grid=f"{nx}x{nx}", rooms=int(len(np.unique(obj // 16))), build_geometry_s=0.0)
    _warm_up()
    gc.collect()
    rss0 = _rss_mb()
    vmap = VoxelMap(VoxelMapConfig(voxel_size=VOXEL, max_points=n, initial_capacity=n, feature_store=store,
                                   store_rank=rank))
    points = ((coords + 0.5) * VOXEL).astype(np.float32)
    for a in range(0, n, 1_000_000):  # frame-sized pieces would take long; the index is the same
        vmap.integrate(points[a:a + 1_000_000])
    slots = vmap.lookup(points)
    out["building"]["build_geometry_s"] = round(time.perf_counter() - t0, 1)
    t1 = time.perf_counter()
    vmap.set_anchor(text)
    ref = {k: np.empty(n, np.float32) for k in qtext}  # exact scores of the original features
    synth = _FeatureSynth(cls, obj, text)
    step = len(synth.buf)
    for a in range(0, n, step):
        b = min(n, a + step)
        f = synth(a, b)
        for k, t in qtext.items():
            ref[k][a:b] = f @ t
        vmap.set_features(slots[a:b], f)
    del synth
    if not vmap.compact:
        vmap.refit_basis()
    out["build_features_s"] = round(time.perf_counter() - t1, 1)
    t1 = time.perf_counter()
    vmap.classify(text)
    out["classify_all_s"] = round(time.perf_counter() - t1, 2)
    del points
    gc.collect()
    mm = vmap.memory_model()
    extra_mb = (sum(r.nbytes for r in ref.values()) + slots.nbytes) / 2 ** 20  # the bench's own arrays
    out["memory"] = dict(rss_delta_mb=round(_rss_mb() - rss0 - extra_mb, 1),
                         map_mb=round(sum(mm.values()) / 2 ** 20, 1),
                         bytes_per_voxel=round(sum(mm.values()) / n, 1),
                         by_component_bytes_per_voxel={k: round(v / n, 1) for k, v in mm.items()},
                         mb_per_million=round(sum(mm.values()) / 2 ** 20 / (n / 1e6), 1))
    out["blocks"] = dict(n_blocks=vmap.n_blocks(), voxels_per_block=round(n / max(1, vmap.n_blocks()), 1))

    # queries: latency and agreement with the exact scores of the original features
    W, L, H = ROOM
    room_box = (np.array([W * VOXEL, 0.0, 0.0]), np.array([2 * W * VOXEL, L * VOXEL, H * VOXEL]))
    q = {}
    for label, t in qtext.items():
        times = []
        for _ in range(repeats):
            a = time.perf_counter()
            res = vmap.query(t, threshold=THRESHOLD, max_points=MAX_POINTS)
            times.append(time.perf_counter() - a)
        groups = getattr(vmap, "last_query_groups", (0, 0))
        rtimes = []
        for _ in range(repeats):
            a = time.perf_counter()
            rres = vmap.query(t, threshold=THRESHOLD, max_points=MAX_POINTS, region=room_box)
            rtimes.append(time.perf_counter() - a)
        truth = ref[label] >= THRESHOLD
        got = vmap.stored_scores(t, slots)
        if vmap.compact:
            bound = vmap.error_bound(t, slots)
            err = np.abs(got - ref[label])
            extra = dict(max_abs_error=round(float(err.max()), 4), median_abs_error=round(float(np.median(err)), 5),
                         bound_holds=bool((err <= bound + 1e-3).all()), median_bound=round(float(np.median(bound)), 4))
        else:
            extra = dict(max_abs_error=round(float(np.abs(got - ref[label]).max()), 4))
        pred = got >= THRESHOLD
        tp = int((pred & truth).sum())
        sweep = []
        for thr in np.arange(0.2, 0.9, 0.05):
            tr, pr = ref[label] >= thr, got >= thr
            if tr.any():
                sweep.append((int((tr & pr).sum()) / int(tr.sum()), int((tr & pr).sum()) / max(1, int(pr.sum()))))
        extra["recall_min_thresholds_0.2_0.85"] = round(min(r for r, _ in sweep), 4) if sweep else None
        extra["precision_min_thresholds_0.2_0.85"] = round(min(p for _, p in sweep), 4) if sweep else None
        q[label] = dict(ms_median=round(float(np.median(times)) * 1e3, 1),
                        region_room_ms_median=round(float(np.median(rtimes)) * 1e3, 2),
                        region_room_voxels=int(rres.rescored), rescored=int(res.rescored), count=int(res.count),
                        count_exact=int(truth.sum()),
                        recall=round(tp / max(1, int(truth.sum())), 4), precision=round(tp / max(1, int(pred.sum())), 4),
                        returned=len(res.slots), groups_read=int(groups[0]), groups=int(groups[1]), **extra)
    out["queries"] = q
    del ref
    gc.collect()

    # integration of 640x480 frames inside one room (most voxels re-observed: steady state), and the
    # label pass after each frame as the node runs it: relabel the voxels the frame touched (dirty),
    # and the segmenter's context box around them (block-pruned, against a scan of every voxel)
    integ = {}
    vmap.take_dirty()
    relabel, region, scan, n_dirty, n_box, same = [], [], [], [], [], True
    for stride in (1, 2):
        times, touched, new = [], [], []
        for i in range(8):
            depth, color, intr, pose = _camera_frame(room_box, yaw=i * 0.7, stride=stride)
            n_before = len(vmap)
            a = time.perf_counter()
            pts, cols, _ = rgbd_points(depth, color, intr, pose, stride=stride, max_depth=10.0)
            s = vmap.integrate(pts, cols, sensor_origin=pose[:3, 3])
            times.append(time.perf_counter() - a)
            touched.append(len(s))
            new.append(len(vmap) - n_before)
            if stride == 2:
                dirty = vmap.take_dirty()
                a = time.perf_counter()
                vmap.classify(text, dirty)
                relabel.append(time.perf_counter() - a)
                a = time.perf_counter()
                box = vmap.region_slots(dirty, margin=1.0)
                region.append(time.perf_counter() - a)
                a = time.perf_counter()
                live = vmap.slots()
                lo, hi = vmap.positions[dirty].min(0) - 1.0, vmap.positions[dirty].max(0) + 1.0
                p = vmap.positions[live]
                brute = live[((p >= lo) & (p <= hi)).all(1)]
                scan.append(time.perf_counter() - a)
                same &= bool(np.array_equal(np.sort(box), np.sort(brute)))
                n_dirty.append(len(dirty))
                n_box.append(len(box))
                del live, p, brute
        med = float(np.median(times))
        integ[f"stride{stride}"] = dict(ms_median=round(med * 1e3, 1), hz=round(1 / med, 1),
                                        voxels_touched=int(np.median(touched)), new_voxels_median=int(np.median(new)))
    # frames that add voxels: the room's voxels removed first, so each frame inserts what it sees
    # (the case the sorted key index paid O(N) for)
    vmap.remove(vmap.box_slots(*room_box))
    times, new = [], []
    for i in range(8):
        depth, color, intr, pose = _camera_frame(room_box, yaw=i * 0.7 + 0.35, stride=1)
        n_before = len(vmap)
        a = time.perf_counter()
        pts, cols, _ = rgbd_points(depth, color, intr, pose, stride=1, max_depth=10.0)
        vmap.integrate(pts, cols, sensor_origin=pose[:3, 3])
        times.append(time.perf_counter() - a)
        new.append(len(vmap) - n_before)
    med = float(np.median(times))
    integ["stride1_into_a_cleared_room"] = dict(ms_median=round(med * 1e3, 1), hz=round(1 / med, 1),
                                                new_voxels_median=int(np.median(new)), new_voxels_max=int(max(new)))
    out["integration_640x480"] = integ
    out["key_index"] = _index_costs(vmap, pts)
    ms = lambda v: round(float(np.median(v)) * 1e3, 1)  # noqa: E731
    out["region_labelling_per_frame"] = dict(dirty_voxels=int(np.median(n_dirty)), relabel_ms=ms(relabel),
                                             context_box_voxels=int(np.median(n_box)),
                                             context_box_blocks_ms=ms(region), context_box_full_scan_ms=ms(scan),
                                             same_voxels=same)
    gc.collect()

    if save:
        with tempfile.TemporaryDirectory(prefix="sas-bench-map-scale-", dir=os.environ.get("SAS_BENCH_TMP")) as tmp:
            a = time.perf_counter()
            data = vmap.export()  # what Mapper.save held the lock for before (one copy of everything)
            one_hold = time.perf_counter() - a
            del data
            gc.collect()
            holds = []
            a = time.perf_counter()
            snap = vmap.start_snapshot()
            done = False
            while not done:
                b = time.perf_counter()
                done = snap.step(LOCK_SLICE)
                holds.append(time.perf_counter() - b)
            snap_s = time.perf_counter() - a
            a = time.perf_counter()
            data = snap.export()
            path = write_map(os.path.join(tmp, "map"), data, VOXEL, list(SCANNET_20))
            write_s = time.perf_counter() - a
            del data, snap
            gc.collect()
            size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
            a = time.perf_counter()
            back, _ = VoxelMap.load(path, vmap.config)
            load_s = time.perf_counter() - a
            ok = len(back) == len(vmap)
            del back
            out["save_load"] = dict(export_in_one_lock_hold_s=round(one_hold, 2), snapshot_s=round(snap_s, 2),
                                    lock_slices=len(holds),
                                    max_lock_hold_ms=round(max(holds) * 1e3, 1),
                                    median_lock_hold_ms=round(float(np.median(holds)) * 1e3, 1),
                                    write_s_no_lock=round(write_s, 1), load_s=round(load_s, 1),
                                    folder_mb=round(size / 2 ** 20, 1), reloaded_same_size=bool(ok))
    out["peak_rss_mb"] = round(_peak_rss_mb(), 0)
    return out


def _index_costs(vmap, frame_points, n_new: int = 3348, repeats: int = 5) -> dict:
    """Insert and lookup cost of the map's key index against the sorted-array index it replaced,
    in one run: the old ``_slots_for`` steps (binary searches, ``np.insert`` of the new keys and
    their slots into the sorted arrays, the block keys) replayed on this map's keys, and a copy of
    the block index (:class:`sas_core.geometry.voxel_index.BlockIndex`) built from the same keys."""
    from sas_core.geometry.voxel_index import BlockIndex
    from sas_core.geometry.voxel_map import _LOCAL, block_keys

    order = vmap.slots()
    keys = vmap._slot_key[order]
    bkeys = np.unique(keys >> _LOCAL)
    frame_keys = block_keys(np.floor(frame_points * np.float32(1.0 / vmap.config.voxel_size)))
    rng = np.random.default_rng(0)
    lo, hi = keys.min(), keys.max()
    newk = np.setdiff1d(np.unique(rng.integers(lo, hi, 2 * n_new)), keys)[:n_new]  # keys not in the map
    new_slots = np.arange(len(keys), len(keys) + len(newk))
    sorted_ms, block_ms, lk_sorted, lk_block = [], [], [], []
    for _ in range(repeats):
        a = time.perf_counter()
        pos = np.searchsorted(keys, newk)
        k2, s2 = np.insert(keys, pos, newk), np.insert(order, pos, new_slots)
        nb = np.unique(newk >> _LOCAL)
        nb = nb[~np.isin(nb, bkeys, assume_unique=True)]
        b2 = np.insert(bkeys, np.searchsorted(bkeys, nb), nb)
        sorted_ms.append(time.perf_counter() - a)
        del k2, s2, b2
        a = time.perf_counter()
        p = np.minimum(np.searchsorted(keys, frame_keys), len(keys) - 1)
        np.where(keys[p] == frame_keys, order[p], -1)
        lk_sorted.append(time.perf_counter() - a)
    idx = BlockIndex(_LOCAL)
    idx.insert(keys, order)
    for _ in range(repeats):
        a = time.perf_counter()
        idx.insert(newk, new_slots)
        block_ms.append(time.perf_counter() - a)
        idx.remove(newk)
        a = time.perf_counter()
        idx.lookup(frame_keys)
        lk_block.append(time.perf_counter() - a)
    ms = lambda v: round(float(np.median(v)) * 1e3, 2)  # noqa: E731
    return dict(voxels=len(keys), new_voxels=len(newk), frame_points=len(frame_keys),
                insert_ms=dict(sorted_arrays_before=ms(sorted_ms), block_index_now=ms(block_ms)),
                lookup_frame_ms=dict(sorted_arrays_before=ms(lk_sorted), block_index_now=ms(lk_block)),
                block_index_mb=round(idx.nbytes / 2 ** 20, 1))


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1_000, "M": 1_000_000}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "KM" else s) * mult)


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="sas bench map-scale")
    p.add_argument("--sizes", default="1M,3M,10M", help="map sizes in voxels, comma separated (default 1M,3M,10M)")
    p.add_argument("--stores", default="int8,fp16", help="feature stores to compare (default int8,fp16)")
    p.add_argument("--repeats", type=int, default=7, help="query repeats (medians)")
    p.add_argument("--rank", type=int, default=128, help="rank of the int8 store (default 128)")
    p.add_argument("--no-save", action="store_true", help="skip the save/load figures")
    p.add_argument("--quick", action="store_true", help="smoke run: 100k voxels, 3 repeats")
    p.add_argument("--one", nargs=2, metavar=("N", "STORE"), help=argparse.SUPPRESS)  # internal: one case
    args = p.parse_args(argv)
    if args.one:
        return run_case(int(args.one[0]), args.one[1], args.repeats, not args.no_save, args.rank)
    if args.quick:
        args.sizes, args.repeats = "100k", 3
    sizes = [_parse_size(s) for s in args.sizes.split(",") if s.strip()]
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    result = dict(note="synthetic building and synthetic features (see sas_app/bench/map_scale.py); "
                       "goals: <= 300 MB per million voxels, 10M voxels on a 24 GB machine, queries <= 100 ms "
                       "median, integration >= 30 Hz",
                  threshold=THRESHOLD, max_points=MAX_POINTS, feature_dim=512, cases=[])
    for n in sizes:
        for store in stores:
            per_voxel = {"int8": 240 + args.rank, "fp16": 1390}[store]  # rough peak of the case
            need_mb = n * per_voxel * 1.3 / 2 ** 20  # the map + the bench's own arrays
            save_mb = n * per_voxel * 2.5 / 2 ** 20  # + the snapshot and the export copies (8.1 GB at 10M before)
            avail = _avail_mb()
            if need_mb > 0.6 * avail:
                result["cases"].append(dict(voxels=n, store=store, skipped=f"needs ~{need_mb:.0f} MB, "
                                            f"{avail:.0f} MB available"))
                continue
            no_save = args.no_save or save_mb > 0.6 * avail
            cmd = [sys.executable, "-c", "import json, sys; from sas_app.bench.map_scale import main; "
                   "print(json.dumps(main(sys.argv[1:])))", "--one", str(n), store,
                   "--repeats", str(args.repeats), "--rank", str(args.rank)] + (["--no-save"] if no_save else [])
            a = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                result["cases"].append(dict(voxels=n, store=store, failed=proc.stderr.strip().splitlines()[-3:]))
                continue
            case = json.loads(proc.stdout)
            case["case_wall_s"] = round(time.perf_counter() - a, 1)
            result["cases"].append(case)
            print(f"[map-scale] {n} {store}: done in {case['case_wall_s']} s", file=sys.stderr, flush=True)
    return result
