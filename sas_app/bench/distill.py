"""`sas bench distill`: seconds per training iteration of 3D distillation on CPU.

A 100k-voxel scene (2 cm voxels on the floor and two walls of a room, the density of a ScanNet
scene), 512-d fused targets, MinkUNet18A; stage-1 steps (point + superpoint cosine losses, at most
20k sampled voxels) and stage-2 steps (plus TESD) timed side by side, with 1 and 2 torch threads.
Reports medians over ``--iters`` timed steps after one warm-up step (wall-clock seconds, and
process CPU seconds, which stay meaningful on a shared machine), and the ratios.

    sas bench distill --json                 # the issue's setting
    sas bench distill --json --quick         # 10k voxels, one timed step (smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np


def room_scene(n_voxels: int, voxel: float, dim: int, seed: int = 0):
    """A SceneData of ~n_voxels points on voxel centres of a floor and two walls, random targets."""
    import torch

    from sas_core.train.datasets import scene_from_arrays

    rng = np.random.default_rng(seed)
    # floor a x b, walls a x h and b x h with h = 2.5 m; choose a = 1.25 b to reach n_voxels
    h = 2.5
    # n = (a b + a h + b h) / voxel^2 with a = 1.25 b  ->  solve 1.25 b^2 + 2.25 h b - n voxel^2 = 0
    area = n_voxels * voxel * voxel
    b = (-2.25 * h + np.sqrt((2.25 * h) ** 2 + 4 * 1.25 * area)) / (2 * 1.25)
    a = 1.25 * b
    g = lambda L: (np.arange(int(L / voxel)) + 0.5) * voxel  # noqa: E731
    fx, fy = np.meshgrid(g(a), g(b), indexing="ij")
    floor = np.stack([fx.ravel(), fy.ravel(), np.full(fx.size, 0.5 * voxel)], 1)
    wx, wz = np.meshgrid(g(a), g(h), indexing="ij")
    wall1 = np.stack([wx.ravel(), np.full(wx.size, 0.5 * voxel), wz.ravel()], 1)
    wy, wz2 = np.meshgrid(g(b), g(h), indexing="ij")
    wall2 = np.stack([np.full(wy.size, 0.5 * voxel), wy.ravel(), wz2.ravel()], 1)
    pts = np.concatenate([floor, wall1, wall2]).astype(np.float32)
    pts = pts[rng.permutation(len(pts))[:n_voxels]]
    feats = torch.nn.functional.normalize(torch.randn(len(pts), dim, generator=torch.Generator().manual_seed(seed)),
                                          dim=1).half()
    sp = (np.floor(pts / 0.5).astype(np.int64) * np.array([10000, 100, 1])).sum(1)  # 50 cm blocks
    return scene_from_arrays("bench_room", pts, feats, None, sp, None)


def _time_steps(cfg_kw: dict, scene, text, names, iters: int, tesd: bool, threads: int) -> list:
    import torch

    from sas_core.train.distill import DistillConfig, Distiller

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        d = Distiller(DistillConfig(out_dir=tmp, resume=False, progress=False, **cfg_kw), [scene], text, names)
        if tesd:
            d.initialize_tesd()
        batch = d.batch([0], 0)
        times, cpu = [], []
        for step in range(iters + 1):
            t, c = time.perf_counter(), time.process_time()
            d.train_step(batch, 0, step, tesd)
            if step:  # the first step is a warm-up
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
    return times, cpu


def main(argv: list) -> dict:
    import torch

    parser = argparse.ArgumentParser(prog="sas bench distill")
    parser.add_argument("--voxels", type=int, default=100_000, help="voxels in the scene (default 100k)")
    parser.add_argument("--arch", default="MinkUNet18A")
    parser.add_argument("--dim", type=int, default=512, help="feature size (default 512)")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per setting (after one warm-up)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to compare")
    parser.add_argument("--quick", action="store_true", help="10k voxels, 1 timed step, one thread count")
    args = parser.parse_args(argv)
    if args.quick:
        args.voxels, args.iters, args.threads = 10_000, 1, [1]
    voxel = 0.02
    scene = room_scene(args.voxels, voxel, args.dim)
    from sas_core.text import SCANNET_20

    text = torch.nn.functional.normalize(torch.randn(len(SCANNET_20), args.dim, generator=torch.Generator().manual_seed(1)),
                                         dim=1)
    cfg_kw = dict(arch=args.arch, mode="sp_tesd", epochs=10, voxel_size=voxel, augment=False)
    old = torch.get_num_threads()
    result = {"arch": args.arch, "dim": args.dim, "voxels": int(scene.n_points), "device": "cpu",
              "max_supervised_voxels": 20000, "iters": args.iters, "note": "median seconds per optimisation step"}
    try:
        for threads in args.threads:
            for tesd in (False, True):
                times, cpu = _time_steps(cfg_kw, scene, text, list(SCANNET_20), args.iters, tesd, threads)
                key = f"{'stage2_tesd' if tesd else 'stage1'}_threads{threads}"
                result[f"{key}_s_per_iter"] = statistics.median(times)
                result[f"{key}_cpu_s_per_iter"] = statistics.median(cpu)  # robust to a busy machine
    finally:
        torch.set_num_threads(old)
    t0 = args.threads[0]
    result["s_per_iter"] = result[f"stage1_threads{t0}_s_per_iter"]
    result["tesd_over_stage1"] = result[f"stage2_tesd_threads{t0}_s_per_iter"] / result[f"stage1_threads{t0}_s_per_iter"]
    if len(args.threads) > 1:
        t1 = args.threads[1]
        result[f"threads{t1}_over_threads{t0}"] = result[f"stage1_threads{t1}_s_per_iter"] / result["s_per_iter"]
    return result
