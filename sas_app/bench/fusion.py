"""Multi-view fusion speed: time per frame of sas_core.geometry.multiview against a straightforward
per-frame implementation (OpenScene's fusion loop written directly in torch), same frames, same run.

Cases (defaults from issue 3): 512-d fp16 features, a 320x240 frame against 150k points, and a
640x480 frame against 1M points; CPU. The scene is a 6 x 5 x 3 m room with a table-sized box and a
cupboard (points sampled on every surface, depth ray-cast analytically), seen from cameras inside
it, so the visible fraction and the occlusion test are realistic (`visible_per_frame` reports it).

Reported per case: median wall-clock milliseconds per frame (``*_ms``) for our default backend
(numba kernels on CPU), our torch backend, and the straightforward version, and their ratios; the
median process CPU time per frame (``*_cpu_ms``, all threads summed: on a busy shared machine this
is closer to what a quiet machine's wall time would be times the thread count); visible points per
frame; and a consistency check (fraction of points whose visibility count, or fused feature,
differs between ours and the straightforward version: only float32 rounding at pixel borders).

Usage: ``sas bench fusion [--json] [--quick] [--frames N] [--threads T] [--no-baseline]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

ROOM = np.array([[0.0, 0.0, 0.0], [6.0, 5.0, 3.0]])
BOXES = [np.array([[2.0, 1.5, 0.0], [3.5, 3.0, 0.8]]),  # table-sized block
         np.array([[4.8, 0.2, 0.0], [5.8, 1.0, 2.0]])]  # cupboard


def _sample_box_surface(rng, box, n, inside_faces=True, skip_bottom=False):
    """n points uniformly on the faces of an axis-aligned box (area-weighted)."""
    lo, hi = box
    ext = hi - lo
    faces = []  # (axis, side)
    areas = []
    for axis in range(3):
        a, b = [i for i in range(3) if i != axis]
        for side in (0, 1):
            if skip_bottom and axis == 2 and side == 0:
                continue
            faces.append((axis, side))
            areas.append(ext[a] * ext[b])
    areas = np.array(areas) / np.sum(areas)
    which = rng.choice(len(faces), size=n, p=areas)
    pts = lo + rng.random((n, 3)) * ext
    for f, (axis, side) in enumerate(faces):
        sel = which == f
        pts[sel, axis] = hi[axis] if side else lo[axis]
    return pts


def make_scene(n_points, seed=0):
    rng = np.random.default_rng(seed)
    n_room = int(n_points * 0.8)
    parts = [_sample_box_surface(rng, ROOM, n_room)]
    rest = n_points - n_room
    n0 = rest // 2
    parts.append(_sample_box_surface(rng, BOXES[0], n0, skip_bottom=True))
    parts.append(_sample_box_surface(rng, BOXES[1], rest - n0, skip_bottom=True))
    return np.concatenate(parts).astype(np.float32)


def camera_pose(rng):
    """A camera-to-world pose near the walls, 1.2-1.8 m high, looking across the room (as a
    person scanning a room does)."""
    lo, hi = ROOM[0] + 0.6, ROOM[1] - 0.6
    side = rng.integers(4)
    t = rng.random()
    xy = [(lo[0] + t * (hi[0] - lo[0]), lo[1]), (lo[0] + t * (hi[0] - lo[0]), hi[1]),
          (lo[0], lo[1] + t * (hi[1] - lo[1])), (hi[0], lo[1] + t * (hi[1] - lo[1]))][side]
    pos = np.array([xy[0], xy[1], rng.uniform(1.2, 1.8)])
    target = np.array([3.0 + rng.uniform(-1, 1), 2.5 + rng.uniform(-1, 1), rng.uniform(0.3, 1.2)])
    fwd = (target - pos) / np.linalg.norm(target - pos)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = right, down, fwd, pos
    return T


def render_depth(pose, intr):
    """(H, W) float32 depth (camera z) of the room and boxes, by analytic ray casting."""
    H, W = intr.height, intr.width
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    rays_cam = np.stack([(u - intr.cx) / intr.fx, (v - intr.cy) / intr.fy, np.ones_like(u)], -1)
    d = rays_cam @ pose[:3, :3].T  # world direction with unit camera-z: ray parameter = depth
    o = pose[:3, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        t1, t2 = (ROOM[0] - o) * inv, (ROOM[1] - o) * inv
        best = np.min(np.maximum(t1, t2), axis=-1)  # exit from the room (camera inside)
        for box in BOXES:
            t1, t2 = (box[0] - o) * inv, (box[1] - o) * inv
            tn, tf = np.max(np.minimum(t1, t2), -1), np.min(np.maximum(t1, t2), -1)
            hit = (tn <= tf) & (tn > 0)
            best = np.where(hit & (tn < best), tn, best)
    return best.astype(np.float32)


def straightforward_add(sums, counts, points, depth, pose, intr, feat, ratio=0.25, border=10):
    """OpenScene's per-frame loop, literally, in torch: project every point, gather a feature for
    every point, add the visible ones."""
    import torch

    n = points.shape[0]
    w2c = torch.from_numpy(np.linalg.inv(pose)).float()
    ph = torch.cat([points, torch.ones(n, 1)], dim=1) @ w2c.T
    u = ph[:, 0] * intr.fx / ph[:, 2] + intr.cx
    v = ph[:, 1] * intr.fy / ph[:, 2] + intr.cy
    ui, vi = torch.round(u).nan_to_num(-1).long(), torch.round(v).nan_to_num(-1).long()
    inside = (ui >= border) & (vi >= border) & (ui < intr.width - border) & (vi < intr.height - border)
    d = torch.from_numpy(depth)[vi.clamp(0, intr.height - 1), ui.clamp(0, intr.width - 1)]
    mask = inside & ((d - ph[:, 2]).abs() <= ratio * d) & (d > 0)
    feat_3d = feat[vi.clamp(0, intr.height - 1), ui.clamp(0, intr.width - 1)]  # (N, C)
    counts[mask] += 1
    sums[mask] += feat_3d[mask].float()
    return int(mask.sum())


def _median_ms(times):
    return round(1000.0 * statistics.median(times), 2)


def run_case(name, n_points, width, height, n_frames, n_base, dim, baseline, seed=0):
    import torch

    from sas_core.geometry.multiview import FeatureAccumulator, MultiViewFusionConfig
    from sas_core.types import CameraIntrinsics

    f = 577.87 * width / 640.0
    intr = CameraIntrinsics(f, f, (width - 1) / 2, (height - 1) / 2, width, height)
    points = make_scene(n_points, seed)
    pts_t = torch.from_numpy(points)
    rng = np.random.default_rng(seed + 1)
    poses = [camera_pose(rng) for _ in range(n_frames)]
    depths = [render_depth(p, intr) for p in poses]
    g = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(2):  # two distinct maps, alternated, so caches do not flatter anyone
        x = torch.randn(height, width, dim, generator=g)
        feats.append(torch.nn.functional.normalize(x, dim=-1).half())
        del x

    results = {"points": n_points, "image": f"{width}x{height}", "dim": dim, "frames": n_frames}
    for backend in ("auto", "torch"):
        acc = FeatureAccumulator(n_points, dim, points=pts_t, config=MultiViewFusionConfig(backend=backend))
        acc.add(depths[0], poses[0], intr, feats[0])  # warm-up (numba compiles / loads its cache)
        acc.reset()
        times, cpu, vis = [], [], []
        for i in range(n_frames):
            t0, c0 = time.perf_counter(), time.process_time()
            vis.append(acc.add(depths[i], poses[i], intr, feats[i % 2]))
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        results[f"{backend}_ms"] = _median_ms(times)
        results[f"{backend}_cpu_ms"] = _median_ms(cpu)
        results["visible_per_frame"] = int(statistics.median(vis))
        del acc  # sums are n_points x dim x 4 bytes (2 GB for 1M points): one at a time
    results["ours_ms"] = results.pop("auto_ms")
    results["ours_torch_ms"] = results.pop("torch_ms")
    results["ours_cpu_ms"] = results.pop("auto_cpu_ms")
    results["ours_torch_cpu_ms"] = results.pop("torch_cpu_ms")

    if baseline:
        sums = torch.zeros(n_points, dim)
        counts = torch.zeros(n_points, dtype=torch.int32)
        times, cpu = [], []
        for i in range(n_base):
            t0, c0 = time.perf_counter(), time.process_time()
            straightforward_add(sums, counts, pts_t, depths[i], poses[i], intr, feats[i % 2])
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        results["baseline_frames"] = n_base
        results["straightforward_ms"] = _median_ms(times)
        results["straightforward_cpu_ms"] = _median_ms(cpu)
        results["speedup_vs_straightforward"] = round(results["straightforward_ms"] / results["ours_ms"], 2)
        results["speedup_torch_backend_vs_straightforward"] = round(
            results["straightforward_ms"] / results["ours_torch_ms"], 2)
        # consistency on the frames both ran: same visibility and the same mean features, up to
        # float32 rounding of projections that fall within ~1e-4 px of a pixel border
        ref = FeatureAccumulator(n_points, dim, points=pts_t)
        for i in range(n_base):
            ref.add(depths[i], poses[i], intr, feats[i % 2])
        same = (ref.counts == counts)
        results["check_counts_agree_fraction"] = round(float(same.float().mean()), 6)
        sel = same & (counts > 0)
        if bool(sel.any()):
            a = ref.sums[sel] / ref.counts[sel, None].float()
            b = sums[sel] / counts[sel, None].float()
            diff = (a - b).abs().amax(1)
            results["check_feature_mismatch_fraction"] = round(float((diff > 1e-3).float().mean()), 6)
        del sums, counts, ref
    return results


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="sas bench fusion", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (seconds)")
    parser.add_argument("--frames", type=int, default=None, help="timed frames per case (default 12 / 6)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and numba")
    parser.add_argument("--dim", type=int, default=512, help="feature channels")
    parser.add_argument("--no-baseline", action="store_true", help="skip the straightforward version")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # `sas bench fusion --json`
    args = parser.parse_args(argv)

    import torch

    from sas_core.geometry import multiview

    if args.threads:
        torch.set_num_threads(args.threads)
        if multiview.numba_available():
            import numba

            numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    if args.quick:
        cases = [("small", 20_000, 160, 120, args.frames or 4, 2),
                 ("large", 60_000, 320, 240, args.frames or 3, 2)]
    else:
        fr = args.frames
        cases = [("320x240_150k", 150_000, 320, 240, fr or 12, min(fr or 6, 6)),
                 ("640x480_1M", 1_000_000, 640, 480, fr or 6, min(fr or 3, 3))]
    out = {
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "numba": multiview.numba_available(),
        "quick": bool(args.quick),
        "goal_ms": {"320x240_150k": 20, "640x480_1M": 150},
    }
    for name, n, w, h, nf, nb in cases:
        out[name] = run_case(name, n, w, h, nf, nb, args.dim, not args.no_baseline)
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(main(sys.argv[1:]), indent=2))
