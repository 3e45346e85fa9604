"""Superpoint speed: ScanNet segmentator on a ~150k-point scene (target: under 5 s on CPU).

Times, side by side in one run (medians over ``--repeats``): the kNN-graph path with given normals,
the same with Open3D-estimated normals, the kNN path with the colour term, and the mesh path on a
dense grid mesh of the same size. The first (numba compilation) call is excluded and reported.

    sas bench superpoints --json [--points 150000] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def _scene(n_points: int, seed: int):
    """Surface samples of a synthetic room (positions, normals, colors, instances)."""
    try:
        from sas_core.data import synthetic
    except ImportError:  # pragma: no cover - synthetic world not installed
        synthetic = None
    if synthetic is not None:
        scene = synthetic.generate_scene(synthetic.SynthConfig(seed=seed, n_frames=1, with_lidar=False))
        pc = scene.points
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(pc), size=min(n_points, len(pc)), replace=False)
        if n_points > len(pc):  # densify with jittered copies on the same surfaces
            extra = rng.choice(len(pc), size=n_points - len(pc))
            idx = np.concatenate([idx, extra])
        pos = pc.positions[idx].astype(np.float64)
        dup = np.arange(len(idx)) >= len(pc)
        pos[dup] += rng.normal(0, 0.005, (dup.sum(), 3)) * (1 - np.abs(pc.normals[idx][dup]))
        return pos, pc.normals[idx], pc.colors[idx], pc.instances[idx], "synthetic room"
    rng = np.random.default_rng(seed)
    uv = rng.random((n_points, 2)) * 10
    pos = np.c_[uv, np.zeros(n_points)]
    return pos, np.tile([0, 0, 1.0], (n_points, 1)), np.full((n_points, 3), 0.5), np.zeros(n_points, int), "plane"


def _grid_mesh(n_vertices: int):
    side = int(np.sqrt(n_vertices))
    u = np.linspace(0, 10, side)
    uv = np.stack(np.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
    rng = np.random.default_rng(0)
    v = np.c_[uv, 0.01 * np.sin(uv[:, 0] * 3) + 0.002 * rng.standard_normal(len(uv))]
    i, j = np.meshgrid(np.arange(side - 1), np.arange(side - 1), indexing="ij")
    v0 = (i * side + j).reshape(-1)
    tri = np.concatenate([np.stack([v0, v0 + side, v0 + side + 1], 1), np.stack([v0, v0 + side + 1, v0 + 1], 1)])
    return v, tri


_CPU = {}


def _time(fn, repeats):
    """Median wall time; the median process CPU time goes to _CPU (a proxy on a busy machine)."""
    times, cpu, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    _CPU[fn] = statistics.median(cpu)
    return statistics.median(times), out


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="sas bench superpoints")
    parser.add_argument("--points", type=int, default=150_000, help="points in the scene")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 20k points, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.points, args.repeats = 20_000, 1

    from sas_core.geometry import superpoints as S

    pos, nrm, col, inst, source = _scene(args.points, args.seed)
    t0 = time.perf_counter()
    S.superpoints(pos[:2000], nrm[:2000])  # compile / load the numba kernel
    S.estimate_normals(pos[:2000])          # import Open3D
    warmup = time.perf_counter() - t0

    cpu = {}
    t_given, sp_given = _time(f := lambda: S.superpoints(pos, nrm), args.repeats)
    cpu["knn_given_normals"] = _CPU[f]
    t_est, sp_est = _time(f := lambda: S.superpoints(pos), args.repeats)
    cpu["knn_estimated_normals"] = _CPU[f]
    t_col, sp_col = _time(f := lambda: S.superpoints(pos, nrm, colors=col, color_weight=0.1), args.repeats)
    cpu["knn_color_term"] = _CPU[f]
    v, tri = _grid_mesh(len(pos))
    t_mesh, sp_mesh = _time(f := lambda: S.superpoints(v, mesh_triangles=tri), args.repeats)
    cpu["mesh"] = _CPU[f]
    return {
        "scene": f"{source} (synthetic)",
        "points": int(len(pos)),
        "repeats": args.repeats,
        "first_call_s (numba compile or cache load + Open3D import)": round(warmup, 3),
        "knn_given_normals_s": round(t_given, 3),
        "knn_estimated_normals_s": round(t_est, 3),
        "knn_color_term_s": round(t_col, 3),
        "mesh_s": round(t_mesh, 3),
        "mesh_vertices": int(len(v)),
        "cpu_s (process CPU time, all threads)": {k: round(x, 3) for k, x in cpu.items()},
        "load_average_1min": round(os.getloadavg()[0], 2),
        "superpoints": {"knn_given_normals": int(sp_given.max() + 1), "knn_estimated_normals": int(sp_est.max() + 1),
                        "knn_color_term": int(sp_col.max() + 1), "mesh": int(sp_mesh.max() + 1)},
        "boundary_error": {"knn_given_normals": round(S.boundary_error(sp_given, inst), 4),
                           "knn_estimated_normals": round(S.boundary_error(sp_est, inst), 4),
                           "knn_color_term": round(S.boundary_error(sp_col, inst), 4)},
        "ratio_estimated_over_given": round(t_est / t_given, 2),
        "target_s": 5.0,
        "meets_target": bool(max(t_given, t_est, t_mesh) < 5.0),
    }
