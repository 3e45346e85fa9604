"""Benchmark of `sas synth`: seconds per stage for one room (medians over repeats).

    sas bench synth [--frames 60] [--repeats 3] [--quick] --json

Stages: layout (mesh + surface samples), render (RGB-D frames), lidar, write_openscene,
bag_sqlite3, bag_mcap, overview, and ``total`` (the sum, what `sas synth --scenes 1` spends
after start-up). ``import_s`` is the one-off cost of importing open3d/torch/rosbags in this
process. The issue's goal: `sas synth --scenes 1 --frames 60` under 30 s on 2 cores.
Also reported: ratio of mcap to sqlite3 bag writing time, rays per second of the renderer, and
``peak_rss_mb``, the process's peak resident memory (imports included).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="sas bench synth")
    p.add_argument("--frames", type=int, default=60, help="frames per room (default 60)")
    p.add_argument("--repeats", type=int, default=3, help="repeats; medians are reported (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 10 frames, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.repeats = 10, 1

    t = time.perf_counter()
    import open3d  # noqa: F401
    import rosbags.rosbag2  # noqa: F401
    import torch  # noqa: F401

    from sas_core.data.synthetic import write_overview
    from sas_core.data import synthetic as S
    from sas_core.data.openscene import write_openscene_scene
    from sas_core.data.rosbag_io import write_bag

    import_s = time.perf_counter() - t
    stages: dict[str, list[float]] = {k: [] for k in (
        "layout", "render", "lidar", "write_openscene", "bag_sqlite3", "bag_mcap", "overview", "total")}
    n_points = n_rays = 0
    for r in range(args.repeats):
        cfg = S.SynthConfig(seed=args.seed, n_frames=args.frames)
        with tempfile.TemporaryDirectory(prefix="sas-bench-synth-") as tmp:
            tmp = Path(tmp)
            times = {}
            t = time.perf_counter()
            scene = S.generate_scene(S.SynthConfig(seed=args.seed, n_frames=0, with_lidar=False))
            scene.config = cfg
            times["layout"] = time.perf_counter() - t
            stamps = [S.START_STAMP + i / S.CAMERA_HZ for i in range(cfg.n_frames)]
            t = time.perf_counter()
            scene.frames = S.render_frames(scene, [scene.camera_pose(s) for s in stamps], scene.intrinsics, stamps)
            times["render"] = time.perf_counter() - t
            n_sweeps = int(cfg.n_frames / S.CAMERA_HZ * S.LIDAR_HZ)
            lstamps = [S.START_STAMP + k / S.LIDAR_HZ for k in range(n_sweeps)]
            t = time.perf_counter()
            scene.lidar = S.render_lidar(scene, [S._lidar_pose(scene.room_size, cfg, s) for s in lstamps], lstamps)
            times["lidar"] = time.perf_counter() - t
            t = time.perf_counter()
            write_openscene_scene(scene, tmp / "openscene")
            times["write_openscene"] = time.perf_counter() - t
            for storage in ("sqlite3", "mcap"):
                t = time.perf_counter()
                write_bag(scene, tmp / f"bag_{storage}", storage=storage)
                times[f"bag_{storage}"] = time.perf_counter() - t
            t = time.perf_counter()
            write_overview(scene, tmp / "overview")
            times["overview"] = time.perf_counter() - t
            times["total"] = sum(times.values())
            for k, v in times.items():
                stages[k].append(v)
            n_points = len(scene.points)
            n_rays = cfg.n_frames * cfg.width * cfg.height
    med = {k: round(statistics.median(v), 3) for k, v in stages.items()}
    out = {f"{k}_s": v for k, v in med.items()}
    out.update({
        "import_s": round(import_s, 3), "frames": args.frames, "repeats": args.repeats, "points": n_points,
        "render_rays_per_s": round(n_rays / med["render"]) if med["render"] > 0 else None,
        "ratio_bag_mcap_over_sqlite3": round(med["bag_mcap"] / med["bag_sqlite3"], 3) if med["bag_sqlite3"] else None,
        "goal_total_s": 30.0, "data": "synthetic",
        # the whole process, imports included (what `time ./sas synth --scenes 1` reports as max RSS)
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
    })
    return out
