"""Open-vocabulary 3D instances on synthetic rooms: ScanNet AP of mask clustering vs a baseline.

Per seed, one small synthetic room (the synthetic world; nothing here is real data):

* **ours**: superpoints of the room mesh + the simulated mask teacher's masks, back-projected and
  merged by view consensus (MaskClustering over superpoints, :mod:`sas_core.instances`), labelled
  by the mean fused feature (simulated dense teacher, multi-view fusion) against ScanNet-20;
* **fallback**: no masks, region growing over superpoints on the same fused features;
* **baseline**: connected components of same-label points (per-point argmax of the fused features
  on the points' kNN graph), measured in the same run on the same rooms and features.

AP / AP50 / AP25 (ScanNet's protocol, :mod:`sas_core.eval.instances`), class-agnostic and per class
(open vocabulary: labels from text), pooled over the rooms; time per room. Then the object query
API (:func:`sas_core.instances.instances_for_query`) on a ~1M-voxel map (rooms tiled side by side,
512-d features with the structure of distilled ones): the node's path is ``VoxelMap.query`` (matches
and exact scores) then the grouping; both are timed, and the chairs it returns are checked against
the ground-truth chair boxes (expanded by 10 cm).

Per-voxel instance ids kept in the map (:mod:`sas_core.instances.online`): the cost per update
(a) on a room streamed frame by frame through the Mapper (integrate, label pass, instance update,
as the node does) and (b) on the 1M-voxel map: the first grouping, a full regroup, an update with
nothing changed, and 640x480 frames (stride 2) of the same room integrated into its first tile.

    sas bench instances --json [--seeds 0 1 2] [--frames 40] [--voxels 1000000] [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _room(seed: int, frames: int, density: float):
    from sas_core.data.synthetic import SynthConfig, generate_scene

    return generate_scene(SynthConfig(seed=seed, n_frames=frames, with_lidar=False, points_per_m2=density,
                                      room_min=(4.5, 4.0), room_max=(6.0, 5.0)))


def _ap(scenes, names, agnostic):
    from sas_core.eval.instances import evaluate_instances

    r = evaluate_instances(scenes, names, class_agnostic=agnostic)
    pct = (lambda v: None if not np.isfinite(v) else round(v * 100, 1))
    return {"ap": pct(r["ap"]), "ap50": pct(r["ap50"]), "ap25": pct(r["ap25"])}, r


def _instance_rows(args) -> dict:
    import torch

    from sas_core.eval.instances import SceneInstances
    from sas_core.instances import InstanceConfig, label_components
    from sas_core.instances.synthetic import fused_teacher_features, scene_superpoints, simulated_teachers, \
        synthetic_instances
    from sas_core.text import SCANNET_20, SyntheticTextEncoder, class_embeddings, text_labels
    from sas_core.types import IGNORE_LABEL

    names = list(SCANNET_20)
    enc = SyntheticTextEncoder(names, dim=args.dim, seed=0)
    text = class_embeddings(enc, names).float().numpy()
    rows = {k: {"agnostic": [], "labelled": []} for k in ("ours", "fallback", "baseline")}
    times = {k: [] for k in ("ours", "fallback", "baseline", "fusion", "superpoints", "room")}
    per_room = []
    for seed in args.seeds:
        t = time.perf_counter()
        scene = _room(seed, args.frames, args.density)
        times["room"].append(time.perf_counter() - t)
        pc = scene.points
        teachers = simulated_teachers(enc, seed)
        t = time.perf_counter()
        feats = fused_teacher_features(scene, teachers, text, args.features)
        times["fusion"].append(time.perf_counter() - t)
        t = time.perf_counter()
        sp = scene_superpoints(scene)
        times["superpoints"].append(time.perf_counter() - t)
        cfg = InstanceConfig()
        for key, masks in (("ours", "teacher"), ("fallback", "none")):
            t = time.perf_counter()
            inst, _, _ = synthetic_instances(scene, enc, names, text, masks=masks, features=feats, superpoints=sp,
                                             config=cfg, teachers=teachers)
            times[key].append(time.perf_counter() - t)
            masks_ = [i.indices for i in inst]
            rows[key]["agnostic"].append(SceneInstances(pc.labels, pc.instances, masks_, None,
                                                        [i.confidence for i in inst]))
            rows[key]["labelled"].append(SceneInstances(pc.labels, pc.instances, masks_, [i.label for i in inst],
                                                        [i.score * i.confidence ** args.conf_power for i in inst]))
            if key == "ours":
                per_room.append({"seed": seed, "points": len(pc), "instances": len(inst),
                                 "gt_instances": int(len(np.unique(pc.instances[pc.instances >= 0])))})
        t = time.perf_counter()
        lab, score = text_labels(feats, text, normalize=True)
        lab, score = lab.numpy(), score.numpy()
        seen = torch.as_tensor(feats).float().abs().sum(1).numpy() > 0
        lab = np.where(seen, lab, IGNORE_LABEL)
        groups, glab = label_components(pc.positions, lab, min_points=cfg.min_points)
        conf = [float(score[g].mean()) for g in groups]
        times["baseline"].append(time.perf_counter() - t)
        rows["baseline"]["agnostic"].append(SceneInstances(pc.labels, pc.instances, groups, None, conf))
        rows["baseline"]["labelled"].append(SceneInstances(pc.labels, pc.instances, groups, glab, conf))
    out = {}
    per_class = None
    for key, r in rows.items():
        agn, _ = _ap(r["agnostic"], names, True)
        lab, full = _ap(r["labelled"], names, False)
        out[key] = {"class_agnostic": agn, "open_vocabulary": lab,
                    "seconds_per_room": round(float(np.mean(times[key])), 3)}
        if key == "ours":
            per_class = {n: {k: (None if not np.isfinite(v[k]) else round(v[k] * 100, 1)) for k in ("ap", "ap50", "ap25")}
                         | {"gt": v["gt_instances"]} for n, v in full["per_class"].items()}
    out["ours_per_class_open_vocabulary"] = per_class
    out["rooms"] = per_room
    out["seconds_per_room_inputs"] = {k: round(float(np.mean(times[k])), 3) for k in ("room", "fusion", "superpoints")}
    a50 = out["ours"]["open_vocabulary"]["ap50"]
    b50 = out["baseline"]["open_vocabulary"]["ap50"]
    out["goals"] = {
        "ap50_gain_over_baseline_points": None if a50 is None or b50 is None else round(a50 - b50, 1),
        "ap50_gain_goal": 15.0,
        "class_agnostic_ap25": out["ours"]["class_agnostic"]["ap25"], "class_agnostic_ap25_goal": 70.0,
    }
    out["goals"]["met"] = bool(out["goals"]["ap50_gain_over_baseline_points"] is not None
                               and out["goals"]["ap50_gain_over_baseline_points"] >= 15.0
                               and (out["ours"]["class_agnostic"]["ap25"] or 0) >= 70.0)
    return out


def _tiled_map(n_voxels: int, dim: int, seed: int, voxel: float, headroom: int = 0):
    """A VoxelMap of ~n_voxels voxels: synthetic rooms side by side, features = class text vector
    of the ground truth + a per-object offset + noise (the structure of distilled features)."""
    from sas_core.data.synthetic import CLASS_INDEX
    from sas_core.geometry.voxel_map import VoxelMap, VoxelMapConfig
    from sas_core.text import SCANNET_20, SyntheticTextEncoder

    room = _room(seed, 1, 900.0)
    pc = room.points
    keep = pc.labels != 255  # no ceiling
    pos, lab, ins = pc.positions[keep], pc.labels[keep], pc.instances[keep]
    cells, key = np.unique(np.floor(pos / voxel).astype(np.int64), axis=0, return_index=True)
    pos, lab, ins = ((cells + 0.5) * voxel).astype(np.float32), lab[key], ins[key]  # one point per voxel centre
    Lx, Ly, _ = room.room_size
    tiles = int(np.ceil(n_voxels / len(pos)))
    side = int(np.ceil(np.sqrt(tiles)))
    P, L, I = [], [], []
    n_inst = int(ins.max()) + 1
    step_x, step_y = np.ceil((Lx + 1.0) / voxel) * voxel, np.ceil((Ly + 1.0) / voxel) * voxel  # whole voxels
    for t in range(tiles):
        off = np.array([(t % side) * step_x, (t // side) * step_y, 0.0], np.float32)
        P.append(pos + off)
        L.append(lab)
        I.append(ins + t * n_inst)
    P, L, I = np.concatenate(P)[:n_voxels], np.concatenate(L)[:n_voxels], np.concatenate(I)[:n_voxels]
    enc = SyntheticTextEncoder(SCANNET_20, dim=dim)
    text = enc.class_vectors().astype(np.float32)
    rng = np.random.default_rng(seed)
    vmap = VoxelMap(VoxelMapConfig(voxel_size=voxel, max_points=len(P) + headroom, initial_capacity=len(P)))
    vmap.integrate(P)
    slots = vmap.lookup(P)
    offsets = rng.normal(size=(int(I.max()) + 1, dim)).astype(np.float32) * (0.3 / np.sqrt(dim))
    basis = np.linalg.qr(rng.normal(size=(dim, 32)))[0].astype(np.float32)
    for chunk in np.array_split(np.arange(len(P)), max(1, len(P) // 100_000)):
        f = text[L[chunk]] + offsets[I[chunk]] + (rng.normal(size=(len(chunk), 32)).astype(np.float32)
                                                  @ basis.T) * (0.5 / np.sqrt(32))
        vmap.set_features(slots[chunk], f)
    gt = {"positions": P, "labels": L, "instances": I, "slots": slots, "chair": CLASS_INDEX["chair"]}
    return vmap, enc, text, gt


def _query_rows(args) -> dict:
    from sas_core.instances import instances_for_query

    t = time.perf_counter()
    vmap, enc, text, gt = _tiled_map(args.voxels, 512, 0, args.voxel, headroom=args.voxels // 10)
    build_s = time.perf_counter() - t
    vmap.classify(text)
    vmap.refit_basis()
    positions = vmap.positions
    slot_inst = np.full(vmap.capacity, -1, np.int64)
    slot_inst[gt["slots"]] = gt["instances"]
    out = {"voxels": int(len(vmap)), "feature_dim": 512, "voxel_size": args.voxel, "build_s": round(build_s, 1),
           "threshold": args.threshold}
    for word in ("chair", "table"):
        t_emb = enc.encode_numpy([word])[0].astype(np.float32)
        q_ms, g_ms, cpu_ms, objs = [], [], [], None
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            res = vmap.query(t_emb, threshold=args.threshold, max_points=0)
            t1 = time.perf_counter()
            objs = instances_for_query(positions, None, None, voxel_size=args.voxel, index=res.slots,
                                       scores=res.scores, min_points=args.min_voxels, name=word)
            t2, c2 = time.perf_counter(), time.process_time()
            q_ms.append((t1 - t0) * 1e3)
            g_ms.append((t2 - t1) * 1e3)
            cpu_ms.append((c2 - c0) * 1e3)
        row = {"matching_voxels": int(res.count), "objects": len(objs),
               "map_query_ms_median": round(float(np.median(q_ms)), 1),
               "grouping_ms_median": round(float(np.median(g_ms)), 1),
               "object_query_ms_median": round(float(np.median(np.add(q_ms, g_ms))), 1),
               "object_query_cpu_ms_median (process CPU, all threads)": round(float(np.median(cpu_ms)), 1)}
        cls = gt["chair"] if word == "chair" else None
        if cls is not None:
            # each returned object's box inside one ground-truth chair's box expanded by 10 cm
            boxes = {}
            for i in np.unique(gt["instances"][gt["labels"] == cls]):
                p = gt["positions"][gt["instances"] == i]
                boxes[int(i)] = (p.min(0) - 0.1, p.max(0) + 0.1)
            inside, owners = 0, set()
            for o in objs:
                ids, cnt = np.unique(slot_inst[o.indices], return_counts=True)
                owner = int(ids[np.argmax(cnt)])
                lo, hi = boxes.get(owner, (np.full(3, np.inf), np.full(3, -np.inf)))
                if np.all(o.aabb_min >= lo) and np.all(o.aabb_max <= hi):
                    inside += 1
                    owners.add(owner)
            row.update(gt_chairs=len(boxes), objects_inside_one_gt_chair_box=inside, distinct_chairs_found=len(owners))
        out[word] = row
    out["goal_ms"] = 50
    import os

    out["load_average_1min"] = round(os.getloadavg()[0], 2)
    out["instance_updates"] = _map_update_rows(args, vmap)
    return out


def _stats(ms) -> dict:
    return {"median": round(float(np.median(ms)), 2), "p90": round(float(np.percentile(ms, 90)), 2),
            "max": round(float(np.max(ms)), 2)}


def _room_update_rows(args) -> dict:
    """Per-voxel instance ids kept up to date frame by frame on a room, as the node does it
    (Mapper, fusion mode with the simulated teacher: integrate, label pass, instance update)."""
    from sas_core.mapping import Mapper, MapperConfig

    scene = _room(args.seeds[0], args.frames, args.density)
    mapper = Mapper(MapperConfig(mode="fusion"))
    ms, changed, region = [], [], []
    for f in scene.frames:
        mapper.integrate_rgbd(f)
        mapper.label_pass()
        st = mapper.update_instances()
        ms.append(st["ms"])
        changed.append(st["changed"])
        region.append(st["region"])
    full = [mapper.update_instances(full=True)["ms"] for _ in range(3)]
    return {"seed": args.seeds[0], "frames": len(scene.frames), "voxels": len(mapper),
            "instances": mapper.stats()["instances"], "update_ms_per_frame": _stats(ms),
            "changed_voxels_per_frame_median": int(np.median(changed)),
            "region_voxels_per_frame_median": int(np.median(region)),
            "full_regroup_ms_median": round(float(np.median(full)), 1)}


def _map_update_rows(args, vmap) -> dict:
    """The same updates on the ~1M-voxel map: the first grouping, a full regroup, an update with
    nothing changed (change detection only), and 640x480 frames (pixel stride 2, the node's
    default) of the same room integrated into the map's first tile, their voxels labelled from the
    frames' ground-truth images (re-observed voxels, relabelled ones and new ones)."""
    from sas_core.data.synthetic import SynthConfig, generate_scene
    from sas_core.geometry.voxel_map import rgbd_points
    from sas_core.instances.online import VoxelInstances

    from sas_core.geometry.voxel_map import LOCK_SLICE

    inst = VoxelInstances()
    slices = []
    while True:  # as Mapper.update_instances does it: LOCK_SLICE changed voxels per lock hold
        t = time.perf_counter()
        st = inst.update(vmap, max_changed=LOCK_SLICE)
        slices.append((time.perf_counter() - t) * 1e3)
        if not st["remaining"]:
            break
    out = {"voxels": int(len(vmap)), "first_grouping_ms": round(float(np.sum(slices)), 1),
           "first_grouping_slices": len(slices), "first_grouping_longest_slice_ms": round(float(np.max(slices)), 1),
           "first_grouping_median_slice_ms": round(float(np.median(slices)), 1), "instances": inst.count(vmap)}
    full, same = [], []
    for _ in range(2):
        t = time.perf_counter()
        inst.update(vmap, full=True)
        full.append((time.perf_counter() - t) * 1e3)
    for _ in range(5):
        t = time.perf_counter()
        assert inst.update(vmap)["changed"] == 0
        same.append((time.perf_counter() - t) * 1e3)
    out["full_regroup_ms_median"] = round(float(np.median(full)), 1)
    out["unchanged_update_ms_median"] = round(float(np.median(same)), 1)
    scene = generate_scene(SynthConfig(seed=0, n_frames=max(args.repeats, 5), width=640, height=480,
                                       with_lidar=False, points_per_m2=50.0, room_min=(4.5, 4.0),
                                       room_max=(6.0, 5.0)))
    ms, cpu, changed, region, new = [], [], [], [], []
    for f in scene.frames:
        pts, _, pix = rgbd_points(f.depth, None, f.intrinsics, f.pose, 2, 0.1, 8.0)
        n0 = len(vmap)
        vmap.integrate(pts)
        vmap.labels[vmap.lookup(pts)] = f.semantic[pix[:, 0], pix[:, 1]]
        new.append(len(vmap) - n0)
        t, c = time.perf_counter(), time.process_time()
        st = inst.update(vmap)
        ms.append((time.perf_counter() - t) * 1e3)
        cpu.append((time.process_time() - c) * 1e3)
        changed.append(st["changed"])
        region.append(st["region"])
    out["frame_640x480_stride2"] = {
        "frames": len(scene.frames), "update_ms": _stats(ms), "update_cpu_ms_median": round(float(np.median(cpu)), 1),
        "new_voxels_per_frame_median": int(np.median(new)), "changed_voxels_per_frame_median": int(np.median(changed)),
        "region_voxels_per_frame_median": int(np.median(region))}
    return out


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="sas bench instances")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one synthetic room per seed")
    parser.add_argument("--frames", type=int, default=40, help="RGB-D frames per room")
    parser.add_argument("--density", type=float, default=300.0, help="surface points per m^2")
    parser.add_argument("--features", choices=("capability", "add", "dense"), default="capability",
                        help="per-point features: both simulated teachers by capability fusion (SAS), their mean, "
                             "or the dense teacher alone")
    parser.add_argument("--conf-power", type=float, default=0.0,
                        help="open-vocabulary ranking score: label cosine x confidence ** this")
    parser.add_argument("--dim", type=int, default=128, help="feature / text dimension of the AP rows")
    parser.add_argument("--voxels", type=int, default=1_000_000, help="voxels of the object-query map (0: skip)")
    parser.add_argument("--voxel", type=float, default=0.05, help="voxel size of the object-query map (m)")
    parser.add_argument("--threshold", type=float, default=0.5, help="object query: cosine threshold")
    parser.add_argument("--min-voxels", type=int, default=20, help="object query: smallest object")
    parser.add_argument("--repeats", type=int, default=7, help="object query: timed runs (median)")
    parser.add_argument("--quick", action="store_true", help="smoke run: one room, 20 frames, 100k voxels")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.frames, args.voxels, args.repeats = args.seeds[:1], 20, min(args.voxels, 100_000), 2
    t = time.perf_counter()
    out = {"world": "synthetic rooms (simulated mask and dense teachers; not real data)",
           "protocol": "ScanNet instance AP (18 classes: ScanNet-20 without wall/floor), pooled over rooms, percent",
           "seeds": list(args.seeds), "frames": args.frames}
    out.update(_instance_rows(args))
    out["instance_updates_room"] = _room_update_rows(args)
    if args.voxels:
        out["object_query"] = _query_rows(args)
    out["total_s"] = round(time.perf_counter() - t, 1)
    return out
