"""`sas bench kernels`: the FLOP count behind the reported GFLOP/s is the real kernel map's."""

import numpy as np


def test_kernel_bench_counts_the_submanifold_pairs():
    from sas_app.bench import kernels
    from sas_app.bench.backbone import surface_voxels

    out = kernels.main(["--no-numba", "--size", "3000", "--threads", "1", "--runs", "1"])
    (entry,) = out["gflops"]
    coords = surface_voxels(3000, seed=0)[:, 1:].astype(np.int64)
    # independent count: for every voxel, how many of its 27 neighbours (itself included) exist
    occupied = {tuple(c) for c in coords.tolist()}
    offsets = [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)]
    pairs = sum((x + i, y + j, z + k) in occupied for x, y, z in coords.tolist() for i, j, k in offsets)
    assert entry["voxels"] == len(coords) and entry["pairs"] == pairs
    assert entry["gflops"] > 0 and entry["forward_s"] > 0
