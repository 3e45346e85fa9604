"""`sas bench node [--json] [--quick] [--duration S] [--points N]`: the mapping node's figures.

1. RGB-D integration rate at 640x480: decode the Image messages (msg_codec) +
   ``Mapper.integrate_rgbd`` (back-projection + VoxelMap.integrate), per frame, at pixel stride 1 and 2 side by side (the node's default is 2).
2. Query latency on an N-point map (default 1M voxels, 512-d fp16 features with the structure of
   distilled features: class text vector + per-object offset + noise): the reduced store with exact
   rescoring vs a naive full fp16 scan, for a vocabulary word and a free text; results checked equal.
3. End-to-end latency from a frame's arrival to the ~/labelled_cloud containing it (live rclpy node
   over loopback, 15 Hz synthetic stream, fusion mode).
4. Resident memory while a synthetic stream loops through the live node for ``--duration`` seconds
   (default 600); each loop is shifted by 2 m so the map would grow without bound but for the
   ``max_points`` cap: RSS must be flat once the cap is reached.
5. The live teacher (``teacher``): (a) the dense CLIP teacher on a 320x240 frame against the ViT
   forwards it is made of (its six 224 px windows through ``encode_image``), measured side by side
   (interleaved), with a full-size ViT-B/16 of random weights (the released weights cannot be
   downloaded here; same FLOPs); goal: within 1.3x. (b) The node's teacher worker with
   ``teacher: dense_clip`` loaded from a models file: teacher rate (frames/s), forward+fusion time
   and arrival-to-map latency from ``~/stats``, while frames stream at 15 Hz and the keep-latest
   teacher queue skips what the teacher cannot take (tiny ViT with ``--quick``, ViT-B/16 else).

Timings are medians; the machine's load shows in them, so re-run on a quiet machine.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import numpy as np


def proc_mb(path: str, field: str) -> float:
    """A ``Field:   N kB`` line of a /proc file in MiB (NaN where the file or field is missing)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _rss_mb() -> float:
    return proc_mb("/proc/self/status", "VmRSS")


def bench_integration(n_frames: int, strides=(1, 2)) -> dict:
    from sas_core.data import msg_codec as mc
    from sas_core.data.synthetic import SynthConfig, generate_scene
    from sas_core.mapping import Mapper, MapperConfig
    from sas_core.types import Frame

    scene = generate_scene(SynthConfig(seed=0, n_frames=n_frames, width=640, height=480, with_lidar=False))
    msgs = [(mc.image_fields(f.color, "rgb8"), mc.image_fields(f.depth, "16UC1"), f.pose) for f in scene.frames]
    intr = scene.intrinsics
    out = {}
    for stride in strides:
        mapper = Mapper(MapperConfig(mode="none", pixel_stride=stride))  # the node's pipeline
        times, cpu = [], []
        for rep in range(2):  # second pass: the map already holds the room (steady state)
            for color_f, depth_f, pose in msgs:
                t0, c0 = time.perf_counter(), time.process_time()
                color = mc.image_to_numpy(type("M", (), color_f))
                depth = mc.depth_to_metres(type("M", (), depth_f))
                n = mapper.integrate_rgbd(Frame(color=color, depth=depth, intrinsics=intr, pose=pose))
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        med, med_cpu = float(np.median(times)), float(np.median(cpu))
        out[f"stride{stride}"] = dict(ms_median=round(med * 1e3, 2), hz=round(1.0 / med, 1),
                                      cpu_ms_median=round(med_cpu * 1e3, 2), hz_from_cpu=round(1.0 / max(med_cpu, 1e-9), 1),
                                      map_points=len(mapper),
                                      voxels_per_frame=int(n))
    out["resolution"] = "640x480"
    out["goal_hz"] = 30
    return out


def _feature_map(n_points: int, dim: int = 512, seed: int = 0):
    """A VoxelMap of n_points voxels whose features look like a distilled network's output."""
    from sas_core.geometry.voxel_map import VoxelMap, VoxelMapConfig
    from sas_core.text import SCANNET_20, SyntheticTextEncoder

    enc = SyntheticTextEncoder(SCANNET_20, dim=dim)
    text = enc.class_vectors().astype(np.float32)
    rng = np.random.default_rng(seed)
    side = int(np.ceil(n_points ** (1 / 3)))
    idx = rng.permutation(side ** 3)[:n_points]
    grid = np.stack(np.unravel_index(idx, (side, side, side)), 1).astype(np.float32)
    vmap = VoxelMap(VoxelMapConfig(voxel_size=0.05, max_points=n_points, initial_capacity=n_points))
    points = (grid + 0.5) * 0.05
    vmap.integrate(points)
    slots = vmap.lookup(points)  # one voxel per grid point, in grid order
    n_obj = 2000
    obj = (grid[:, 0] // 8 * 7919 + grid[:, 1] // 8 * 31 + grid[:, 2] // 8).astype(np.int64) % n_obj
    obj_class = rng.integers(0, len(text), n_obj)
    obj_offset = rng.normal(size=(n_obj, dim)).astype(np.float32) * (0.3 / np.sqrt(dim))
    noise_basis = np.linalg.qr(rng.normal(size=(dim, 32)))[0].astype(np.float32)
    for chunk in np.array_split(np.arange(len(slots)), max(1, len(slots) // 100_000)):
        o = obj[chunk]
        f = text[obj_class[o]] + obj_offset[o] + (rng.normal(size=(len(chunk), 32)).astype(np.float32)
                                                  @ noise_basis.T) * (0.5 / np.sqrt(32))
        vmap.set_features(slots[chunk], f)
    return vmap, enc, text


def _vocabulary_change(vmap, enc) -> dict:
    """Map-lock holds of a vocabulary change as the node does it (relabel, then refit the query
    basis, in LOCK_SLICE slices), against the same work in one hold; the map ends on the old
    vocabulary again, refitted, so the query timings that follow are unaffected."""
    from sas_core.geometry.voxel_map import LOCK_SLICE
    from sas_core.text import SCANNET_20

    old = vmap._anchor.copy()
    new = enc.encode_numpy(list(SCANNET_20[:10])).astype(np.float32)  # a smaller vocabulary
    t0 = time.perf_counter()
    vmap.classify(new)
    vmap.refit_basis()
    one_hold = time.perf_counter() - t0
    holds = []
    t_all = time.perf_counter()
    vmap.set_anchor(old)
    slots = vmap.slots()
    for chunk in np.array_split(slots, max(1, len(slots) // LOCK_SLICE + 1)):
        t0 = time.perf_counter()
        vmap.classify(old, chunk)
        holds.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    vmap.start_refit()
    holds.append(time.perf_counter() - t0)
    done = False
    while not done:
        t0 = time.perf_counter()
        done = vmap.refit_step(LOCK_SLICE)
        holds.append(time.perf_counter() - t0)
    return dict(one_hold_ms=round(one_hold * 1e3, 1), sliced_total_ms=round((time.perf_counter() - t_all) * 1e3, 1),
                slices=len(holds), max_hold_ms=round(max(holds) * 1e3, 1),
                median_hold_ms=round(float(np.median(holds)) * 1e3, 1))


def bench_query(n_points: int, repeats: int = 7, max_points: int = 5000) -> dict:
    vmap, enc, text = _feature_map(n_points)
    t0 = time.perf_counter()
    vmap.classify(text)
    classify_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    vmap.refit_basis()
    refit_ms = (time.perf_counter() - t0) * 1e3
    out = dict(points=len(vmap), threshold=0.5, max_points=max_points, feature_dim=vmap.feature_dim, rank=vmap._codes.shape[1],
               classify_all_ms=round(classify_ms, 1), refit_basis_ms=round(refit_ms, 1),
               store_mb=dict(full_fp16=round(vmap.features[: len(vmap)].nbytes / 2 ** 20, 1),
                             reduced_f32=round(vmap._codes[: len(vmap)].nbytes / 2 ** 20, 1)))
    out["vocabulary_change"] = _vocabulary_change(vmap, enc)
    live = vmap.slots()
    queries = {"vocabulary word 'chair'": enc.encode_numpy(["chair"])[0],
               "free text 'a wooden chair'": enc.encode_numpy(["a wooden chair"])[0]}
    import torch

    top = vmap._top
    feats_t = torch.from_numpy(vmap.features[:top])
    for label, t in queries.items():
        t = t.astype(np.float32)
        fast, fast_cpu, scan32, scan16 = [], [], [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            res = vmap.query(t, threshold=0.5, max_points=max_points)
            fast.append(time.perf_counter() - t0)
            fast_cpu.append(time.process_time() - c0)
            # naive scans of the contiguous full fp16 store, then the same threshold + top-k selection
            t0 = time.perf_counter()
            scores = np.concatenate([vmap.features[i:i + 65536].astype(np.float32) @ t for i in range(0, top, 65536)])
            above = np.flatnonzero(scores >= 0.5)
            above[np.argsort(-scores[above])][:max_points]
            scan32.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            scores = (feats_t @ torch.from_numpy(t.astype(np.float16))).float().numpy()
            above = np.flatnonzero(scores >= 0.5)
            above[np.argsort(-scores[above])][:max_points]
            scan16.append(time.perf_counter() - t0)
        ref = vmap.scan_query(t)  # exact float32 reference over the live voxels
        ok = res.count == int((ref >= 0.5).sum()) and abs(res.best_score - float(ref.max())) < 1e-4
        f_ms = np.median(fast) * 1e3
        naive_ms = min(np.median(scan32), np.median(scan16)) * 1e3
        out[label] = dict(reduced_ms_median=round(f_ms, 2), reduced_cpu_ms_median=round(np.median(fast_cpu) * 1e3, 2),
                          scan_f32_chunks_ms_median=round(np.median(scan32) * 1e3, 2),
                          scan_torch_fp16_ms_median=round(np.median(scan16) * 1e3, 2),
                          speedup_vs_best_scan=round(naive_ms / f_ms, 1), count=res.count, rescored=res.rescored,
                          exact_match=bool(ok), returned=len(res.slots))
    del vmap
    gc.collect()
    out["goal_ms"] = 50
    return out


def bench_live(n_frames: int, duration: float, max_points: int) -> dict:
    """End-to-end latency and RSS of a live node (rclpy over loopback, fusion mode)."""
    from sensor_msgs.msg import PointCloud2

    from sas_core.data.synthetic import SynthConfig, generate_scene
    from sas_ros.live_demo import FramePlayer, running_node

    scene = generate_scene(SynthConfig(seed=2, n_frames=n_frames, with_lidar=False))
    params = dict(mode="fusion", pose_source="pose", update_period=0.25, max_points=max_points, stats_period=1.0,
                  reliable_inputs=True)
    with running_node("sas_bench_node", params, "sas_bench_player") as (node, helper):
        player = FramePlayer(helper, ground_truth=True)
        clouds = []
        helper.create_subscription(PointCloud2, "/sas_bench_node/labelled_cloud", lambda m: clouds.append(1), 2)
        player.wait_for_subscribers(15.0)
        # (a) latency: one pass at up to 15 Hz, each frame sent once the node has taken the previous
        # one (no backlog: the figure is the node's own latency, not queueing behind a slow CPU)
        for f in scene.frames:
            t0 = time.monotonic()
            before = node.n_frames + sum(node.drops.values())
            player.publish(f)
            while node.n_frames + sum(node.drops.values()) <= before and time.monotonic() < t0 + 10.0:
                time.sleep(0.002)
            time.sleep(max(0.0, 1 / 15 - (time.monotonic() - t0)))
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and (node.queue or not node.e2e_ms):
            time.sleep(0.05)
        n = len(clouds)
        while time.monotonic() < deadline and len(clouds) <= n:
            time.sleep(0.05)
        s = node.stats()
        latency = dict(frame_to_cloud_ms_median=s["frame_to_cloud_ms_median"], integrate_ms_median=s["integrate_ms_median"],
                       update_ms_median=s["update_ms_median"], update_period_s=params["update_period"],
                       frames_sent=len(scene.frames), frames_integrated=s["frames"], drops=s["drops"])
        # (b) memory: loop the stream, each loop shifted by 2 m, paced by the node
        samples, t_start, loop = [], time.monotonic(), 0
        next_sample = t_start
        while time.monotonic() - t_start < duration:
            loop += 1
            for f in scene.frames:
                if time.monotonic() - t_start >= duration:
                    break
                pose = f.pose.copy()
                pose[0, 3] += 2.0 * loop
                shifted = type(f)(color=f.color, depth=f.depth, intrinsics=f.intrinsics, pose=pose,
                                  stamp=f.stamp + loop * 1000.0, semantic=f.semantic, instance=f.instance)
                before = node.n_frames + sum(node.drops.values())
                player.publish(shifted)
                deadline = time.monotonic() + 5.0
                while node.n_frames + sum(node.drops.values()) <= before and time.monotonic() < deadline:
                    time.sleep(0.002)
                if time.monotonic() >= next_sample:
                    samples.append((time.monotonic() - t_start, _rss_mb(), len(node.map)))
                    next_sample += max(1.0, duration / 60)
        samples.append((time.monotonic() - t_start, _rss_mb(), len(node.map)))
        t = np.array([x[0] for x in samples])
        rss = np.array([x[1] for x in samples])
        half = t >= t[-1] / 2
        slope = float(np.polyfit(t[half], rss[half], 1)[0] * 60) if half.sum() >= 3 else float("nan")
        memory = dict(duration_s=round(float(t[-1]), 1), loops=loop, frames=node.n_frames, max_points=max_points,
                      map_points_end=int(samples[-1][2]), rss_mb_start=round(float(rss[0]), 1),
                      rss_mb_mid=round(float(rss[len(rss) // 2]), 1), rss_mb_end=round(float(rss[-1]), 1),
                      rss_mb_per_min_second_half=round(slope, 2), evicted=node.map.n_evicted,
                      map_bytes=node.map.memory_bytes())
        return dict(end_to_end=latency, memory=memory)


def bench_dense_clip(repeats: int = 3, model_name: str = "ViT-B-16") -> dict:
    """Dense CLIP teacher vs its ViT forwards on a 320x240 frame, interleaved (random weights)."""
    import logging

    import open_clip
    import torch

    from sas_core.teachers.dense_clip import DenseClipConfig, DenseClipTeacher

    logging.disable(logging.WARNING)  # open_clip: "no pretrained weights" (random init on purpose)
    try:
        torch.manual_seed(0)
        model = open_clip.create_model(model_name, pretrained=None).eval()
    finally:
        logging.disable(logging.NOTSET)
    teacher = DenseClipTeacher(DenseClipConfig(), model=model)  # the defaults: sclip, short side 336, 224/112
    rgb = (np.random.default_rng(0).random((240, 320, 3)) * 255).astype(np.uint8)
    scale = teacher.config.short_side / 240
    ch, cw, boxes = teacher._windows(round(240 * scale), round(320 * scale))
    windows = torch.randn(len(boxes), 3, ch, cw)
    enc, tea = [], []
    for _ in range(repeats):
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.encode_image(windows)
            enc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        teacher.image_features(rgb)
        tea.append(time.perf_counter() - t0)
    return dict(model=f"{model_name} (random init: the FLOPs of the released weights)", frame="320x240",
                windows=len(boxes), window_px=ch, torch_threads=torch.get_num_threads(),
                encode_image_s_median=round(float(np.median(enc)), 3), teacher_s_median=round(float(np.median(tea)), 3),
                encode_image_s_min=round(min(enc), 3), teacher_s_min=round(min(tea), 3),
                ratio_median=round(float(np.median(tea) / np.median(enc)), 3), ratio_min=round(min(tea) / min(enc), 3),
                goal_ratio=1.3)


def bench_teacher_live(n_frames: int, quick: bool) -> dict:
    """The node's teacher worker (dense_clip from a models file) on a 15 Hz stream: ~/stats figures."""
    import tempfile

    import torch

    from sas_core.data.synthetic import SynthConfig, generate_scene
    from sas_ros.live_demo import FramePlayer, running_node

    scene = generate_scene(SynthConfig(seed=2, n_frames=n_frames, with_lidar=False))
    with tempfile.TemporaryDirectory(prefix="sas-bench-teacher-") as folder:
        if quick:
            from sas_core.clip import TINY_CLIP_NAME, save_tiny_clip

            name, ckpt = TINY_CLIP_NAME, save_tiny_clip(f"{folder}/clip.pt")
        else:  # a full-size ViT-B/16 of random weights, saved like downloaded weights (fp16 halves the file)
            import logging

            import open_clip

            logging.disable(logging.WARNING)
            try:
                model = open_clip.create_model("ViT-B-16", pretrained=None)
            finally:
                logging.disable(logging.NOTSET)
            name, ckpt = "ViT-B-16-gelu", f"{folder}/clip.pt"
            torch.save({k: v.half() for k, v in model.state_dict().items()}, ckpt)
            del model
        with open(f"{folder}/models.yaml", "w") as f:
            f.write(f"clip_model: {name}\nclip_checkpoint: {ckpt}\n")
        params = dict(mode="fusion", teacher="dense_clip", models_file=f"{folder}/models.yaml", pose_source="pose",
                      update_period=0.5, stats_period=1.0, teacher_queue=1)
        with running_node("sas_bench_teacher", params, "sas_bench_teacher_player") as (node, helper):
            player = FramePlayer(helper)
            player.wait_for_subscribers(15.0)
            t_start = time.monotonic()
            for i, f in enumerate(scene.frames):
                player.publish(f)
                time.sleep(max(0.0, t_start + (i + 1) / 15.0 - time.monotonic()))
            deadline = time.monotonic() + 300.0
            while time.monotonic() < deadline and (node.teacher_pending or node.queue):
                time.sleep(0.05)
            wall = time.monotonic() - t_start
            s = node.stats()
            return dict(model=name, stream_hz=15, frames_sent=len(scene.frames), frames_integrated=s["frames"],
                        teacher_frames=s["teacher_frames"], teacher_skipped=s["teacher_skipped"],
                        teacher_hz=s["teacher_hz"], teacher_frames_per_s_overall=round(s["teacher_frames"] / wall, 3),
                        teacher_ms_median=s["teacher_ms_median"], teacher_latency_ms_median=s["teacher_latency_ms_median"],
                        integrate_ms_median=s["integrate_ms_median"], drops=s["drops"], torch_threads=torch.get_num_threads())


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="sas bench node")
    parser.add_argument("--quick", action="store_true", help="small sizes, 20 s memory loop")
    parser.add_argument("--duration", type=float, default=None, help="memory loop seconds (default 600)")
    parser.add_argument("--points", type=int, default=None, help="query map size (default 1,000,000)")
    parser.add_argument("--frames", type=int, default=None, help="640x480 frames for the integration rate")
    parser.add_argument("--max-points", type=int, default=None,
                        help="map cap during the memory loop (default 150,000; 30,000 with --quick)")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # when given after NAME
    parser.add_argument("--skip-live", action="store_true", help="skip the rclpy parts (3, 4 and 5b)")
    parser.add_argument("--only-teacher", action="store_true", help="only part 5 (the live teacher)")
    args = parser.parse_args(argv)
    duration = args.duration if args.duration is not None else (20.0 if args.quick else 600.0)
    points = args.points or (200_000 if args.quick else 1_000_000)
    frames = args.frames or (6 if args.quick else 20)
    result = dict(cpu_count=os.cpu_count(), quick=bool(args.quick))
    if args.only_teacher:
        result["teacher"] = dict(dense_clip=bench_dense_clip(2 if args.quick else 5))
        if not args.skip_live:
            result["teacher"]["live"] = bench_teacher_live(12 if args.quick else 90, args.quick)
        return result
    result["integration"] = bench_integration(frames)
    result["query"] = bench_query(points)
    if not args.skip_live:
        cap = args.max_points or (30_000 if args.quick else 150_000)
        result.update(bench_live(12 if args.quick else 30, duration, cap))
    result["teacher"] = dict(dense_clip=bench_dense_clip(2 if args.quick else 5))
    if not args.skip_live:
        result["teacher"]["live"] = bench_teacher_live(12 if args.quick else 90, args.quick)
    return result
