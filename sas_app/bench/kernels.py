"""`sas bench kernels`: the fused CPU sparse-convolution kernel alone, and numba's compile cost.

Figures (each printed, so the README's numbers have a script behind them):

* ``gflops``: one submanifold 3x3x3 convolution, 96 -> 96 channels, on ``--size`` occupied voxels
  of synthetic room surfaces at 2 cm (the backbone benchmark's coordinates), fp32, median of
  ``--runs`` forwards after a warm-up; FLOPs = 2 x kernel-map pairs x 96 x 96 (one multiply-add
  per pair and channel pair). Reported per thread count in ``--threads``.
* ``numba``: the first-use cost of the kernels: a fresh process with an empty numba cache
  (``NUMBA_CACHE_DIR`` in a temporary folder) times its first forward of a small convolution
  (compilation included) against its second (compiled); a second fresh process on the now filled
  cache times its first forward again (cache load).

    sas bench kernels --json
    sas bench kernels --json --size 100000 --threads 1,2 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _conv_input(size: int, channels: int, seed: int = 0):
    import torch

    from sas_app.bench.backbone import surface_voxels
    from sas_core.nn.sparse import SparseTensor

    coords = torch.from_numpy(surface_voxels(size, seed=seed)).long()
    feats = torch.randn(len(coords), channels, generator=torch.Generator().manual_seed(seed))
    return SparseTensor(feats, coords)


def _gflops(size: int, threads: int, runs: int, channels: int = 96) -> dict:
    import torch

    from sas_core.nn.conv import MinkowskiConvolution, cpu_backend

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = _conv_input(size, channels)
        conv = MinkowskiConvolution(channels, channels, kernel_size=3)
        with torch.no_grad():
            conv(x)  # warm-up: kernel map, tiling, compilation or cache load
            _, kmap = x.manager.kernel_map(x.tensor_stride, 3, 1, 1)
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                conv(x)
                times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    pairs = int(kmap.n_pairs)
    med = statistics.median(times)
    flops = 2.0 * pairs * channels * channels
    return {"threads": threads, "voxels": int(len(x.features)), "pairs": pairs, "forward_s": round(med, 4),
            "gflops": round(flops / med / 1e9, 1), "gflops_per_thread": round(flops / med / 1e9 / threads, 1),
            "backend": cpu_backend()}


_PROBE = """
import json, time, torch
torch.set_num_threads(1)
from sas_app.bench.kernels import _conv_input
from sas_core.nn.conv import MinkowskiConvolution
x = _conv_input(5000, 32)
conv = MinkowskiConvolution(32, 32, kernel_size=3)
out = []
with torch.no_grad():
    for _ in range(2):
        t = time.perf_counter(); conv(x); out.append(time.perf_counter() - t)
print(json.dumps(out))
"""


def _numba_costs(timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="sas-bench-numba-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        runs = []
        for _ in range(2):
            proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env,
                                  timeout=timeout)
            if proc.returncode != 0:
                return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    (cold_first, cold_second), (warm_first, warm_second) = runs
    return {"compile_s": round(cold_first - cold_second, 3), "cache_load_s": round(warm_first - warm_second, 3),
            "first_forward_empty_cache_s": round(cold_first, 3), "first_forward_filled_cache_s": round(warm_first, 3),
            "compiled_forward_s": round(min(cold_second, warm_second), 4)}


def main(argv) -> dict:
    p = argparse.ArgumentParser(prog="sas bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=100_000, help="occupied voxels (default 100000)")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    p.add_argument("--runs", type=int, default=5, help="timed forwards per thread count (median)")
    p.add_argument("--no-numba", dest="numba", action="store_false", help="skip the compile/cache-load probe")
    p.add_argument("--quick", action="store_true", help="smoke run: 20k voxels, 1 thread, 2 runs")
    p.add_argument("--timeout", type=float, default=600, help="seconds per probe process")
    args = p.parse_args(list(argv))
    if args.quick:
        args.size, args.threads, args.runs = 20_000, "1", 2
    result = {"benchmark": "kernels", "data": "synthetic room surfaces, 2 cm voxels", "channels": 96,
              "kernel": "submanifold 3x3x3", "cpu_count": os.cpu_count(),
              "gflops": [_gflops(args.size, int(t), args.runs) for t in args.threads.split(",") if t.strip()]}
    if args.numba:
        result["numba"] = _numba_costs(args.timeout)
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
