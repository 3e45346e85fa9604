"""`sas bench backbone`: MinkUNet18A forward / forward+backward on CPU (and CUDA when present).

Sizes 50k, 100k and 200k occupied voxels of surface-like coordinates (a procedural room at 2 cm:
floor, walls, furniture boxes), median over runs after a warm-up, peak memory (``ru_maxrss``
delta of a fresh subprocess per size and per engine, so one measurement never inherits another's
peak; on the fused CPU path it includes numba's runtime, ~120 MB). Where ``spconv`` imports, the
same network (same coordinates, kernels and channel widths) is timed with spconv's CPU forward and
the ratio reported (ratio > 1: ours is faster); on CPU our per-offset torch path
(``SAS_SPARSE_CPU_BACKEND=torch``) is timed in the same alternation, giving the fused kernels'
gain. The engines alternate run by run in one process, so a busy machine slows all alike; spconv
2.x cannot run backward on CPU (it calls CUDA), so only forward is compared.

    sas bench backbone --json                # defaults: 50k,100k,200k, 5 runs, 1 warm-up
    sas bench backbone --json --quick        # smoke run: 20k voxels, 2 runs
    sas bench backbone --json --sizes 100000 --runs 9 --device cuda
    sas bench backbone --json --sizes 100000 --dtype bfloat16   # CPU bf16 (AVX512-BF16 / AMX)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the folder above sas_app (a clone or site-packages)


def surface_voxels(n: int, seed: int = 0, voxel_size: float = 0.02):
    """(n, 4) int32 [0, x, y, z] voxel coordinates on the surfaces of a synthetic room.

    Room size is chosen so the occupied surface voxels slightly exceed ``n``; the set is then
    cropped to exactly ``n`` along x (a spatially coherent crop, keeping surface structure).
    """
    import numpy as np

    from sas_core.geometry.voxelize import voxelize

    rng = np.random.default_rng(seed)
    side = max(np.sqrt(n * voxel_size ** 2 / 3.2) * 1.15, 0.5)  # room floor side (m), ~3.2 side^2 area
    h = min(2.6, side)
    pts = []

    def plane(origin, u, v, density=2.5):
        nu = int(np.linalg.norm(u) / voxel_size * density) + 1
        nv = int(np.linalg.norm(v) / voxel_size * density) + 1
        a = rng.random((nu * nv, 2))
        pts.append(origin + a[:, :1] * u + a[:, 1:] * v)

    o = np.zeros(3)
    X, Y, Z = np.array([side, 0, 0]), np.array([0, side, 0]), np.array([0, 0, h])
    plane(o, X, Y)                # floor
    plane(o, X, Z)                # walls
    plane(o, Y, Z)
    plane(o + Y, X, Z)
    plane(o + X, Y, Z)
    for _ in range(max(3, int(side * 2))):  # furniture boxes (top + sides)
        size = rng.uniform([0.3, 0.3, 0.4], [1.2, 1.0, 1.2]) * min(1.0, side / 3)
        c = rng.uniform([0, 0, 0], [side - size[0], side - size[1], 0])
        sx, sy, sz = np.diag(size)
        plane(c + [0, 0, size[2]], sx, sy)
        plane(c, sx, sz)
        plane(c, sy, sz)
        plane(c + sx, sy, sz)
        plane(c + sy, sx, sz)
    points = np.concatenate(pts).astype(np.float32)
    coords, _, _ = voxelize(points, voxel_size)
    order = np.lexsort((coords[:, 2], coords[:, 1], coords[:, 0]))
    coords = coords[order[:n]]
    if len(coords) < n:
        raise RuntimeError(f"synthetic room gave {len(coords)} voxels < {n}")
    return np.concatenate([np.zeros((n, 1), np.int32), coords], axis=1)


def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _median(xs):
    xs = sorted(xs)
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


def _worker(args) -> dict:
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    coords = torch.from_numpy(surface_voxels(args.size, seed=args.seed))
    dev = torch.device(args.device)
    res = {"engine": args.engine, "size": args.size, "device": args.device, "threads": torch.get_num_threads()}
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)

    def peak():
        if dev.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2 ** 20
        return _maxrss_mb()

    if args.engine == "pair":
        return _pair_worker(args, coords, dev, res, sync, peak)
    if args.engine == "ours":
        from sas_core.nn import SparseTensor, build_model

        dtype = getattr(torch, args.dtype)
        model = build_model(args.arch, 3, args.out_channels).to(dev, dtype)
        res["dtype"] = args.dtype

        def make_input():
            return SparseTensor(torch.ones(len(coords), 3, device=dev, dtype=dtype), coords.to(dev))

        def fwd():
            return model(make_input()).F

        if dev.type == "cpu":
            from sas_core.nn.conv import cpu_backend

            res["cpu_backend"] = cpu_backend()
    else:
        model, fwd_sp = _spconv_model(args, coords, dev)

        def fwd():
            return fwd_sp()

    def timed(fn, n, warm):
        for _ in range(warm):
            fn()
        sync()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return ts

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = peak()
    model.eval()
    with torch.inference_mode():
        ts = timed(fwd, args.runs, args.warmup)
    res["forward_s"] = _median(ts)
    res["forward_runs_s"] = [round(t, 4) for t in ts]
    res["forward_peak_mb"] = round(peak() - base, 1)
    if args.engine == "ours" and dev.type == "cpu":
        # share of the forward spent building coordinate sets and kernel maps
        from sas_core.nn import SparseTensor

        t = time.perf_counter()
        st = SparseTensor(torch.ones(len(coords), 3), coords)
        m = st.manager
        s = 1
        m.kernel_map(1, 5)
        for lvl in range(4):
            m.kernel_map(s, 3)
            s, _ = m.kernel_map(s, 2, 2)
        m.kernel_map(s, 3)
        res["kernel_maps_s"] = round(time.perf_counter() - t, 4)
        res["voxels_per_level"] = [m.n(2 ** i) for i in range(5)]
    if args.backward:
        model.train()

        def fb():
            out = fwd()
            out.float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)

        ts = timed(fb, args.runs, args.warmup)
        res["forward_backward_s"] = _median(ts)
        res["forward_backward_runs_s"] = [round(t, 4) for t in ts]
        res["forward_backward_peak_mb"] = round(peak() - base, 1)
    return res


def _pair_worker(args, coords, dev, res, sync, peak) -> dict:
    """spconv vs ours forward, alternating run by run in one process so both see the same load.

    On CPU our per-offset torch path (``set_cpu_backend("torch")``) joins the alternation, so the
    fused kernels' gain is measured side by side too. spconv's peak memory is taken first (before
    our model runs); the speed ratios are medians of per-run ratios (> 1: the first one faster).
    """
    import torch

    from sas_core.nn import SparseTensor, build_model
    from sas_core.nn.conv import cpu_backend, set_cpu_backend

    sp_model, sp_fwd = _spconv_model(args, coords, dev)
    sp_model.eval()
    ours = build_model(args.arch, 3, args.out_channels).to(dev).eval()
    paths = {"ours": cpu_backend()}
    if dev.type == "cpu" and cpu_backend() == "fused":
        paths["ours_torch_path"] = "torch"

    def our_fwd(path):
        before = set_cpu_backend(path)
        try:
            return ours(SparseTensor(torch.ones(len(coords), 3, device=dev), coords.to(dev))).F
        finally:
            set_cpu_backend(before)

    def once(fn, *a):
        t = time.perf_counter()
        fn(*a)
        sync()
        return time.perf_counter() - t

    with torch.inference_mode():
        base = peak()
        for _ in range(max(args.warmup, 1)):
            sp_fwd()
        res["spconv_forward_peak_mb"] = round(peak() - base, 1)
        for _ in range(args.warmup):
            for path in paths.values():
                our_fwd(path)
        times = {name: [] for name in list(paths) + ["spconv"]}
        for _ in range(args.runs):
            for name, path in paths.items():
                times[name].append(once(our_fwd, path))
            times["spconv"].append(once(sp_fwd))
    res["cpu_backend"] = paths["ours"] if dev.type == "cpu" else None
    for name, ts in times.items():
        res[f"{name}_forward_s"] = _median(ts)
        res[f"{name}_forward_runs_s"] = [round(t, 4) for t in ts]
    res["forward_speedup_vs_spconv"] = round(_median([b / a for a, b in zip(times["ours"], times["spconv"])]), 3)
    if "ours_torch_path" in times:
        res["fused_speedup_vs_torch_path"] = round(
            _median([b / a for a, b in zip(times["ours"], times["ours_torch_path"])]), 3)
    return res


def _spconv_model(args, coords, dev):
    """The same MinkUNet (kernels, strides, widths, cat order) written with spconv 2.x layers."""
    import spconv.pytorch as spconv
    import torch
    from torch import nn

    from sas_core.nn.minkunet import ARCHITECTURES

    arch = ARCHITECTURES[args.arch]
    P, L = arch.PLANES, arch.LAYERS

    def bn_relu(c):
        return nn.Sequential(nn.BatchNorm1d(c), nn.ReLU(inplace=True))

    class Block(nn.Module):
        def __init__(self, cin, c, key):
            super().__init__()
            self.c1 = spconv.SubMConv3d(cin, c, 3, bias=False, indice_key=key)
            self.n1 = bn_relu(c)
            self.c2 = spconv.SubMConv3d(c, c, 3, bias=False, indice_key=key)
            self.n2 = nn.BatchNorm1d(c)
            self.ds = nn.Linear(cin, c, bias=False) if cin != c else None
            self.dn = nn.BatchNorm1d(c) if cin != c else None

        def forward(self, x):
            out = self.c1(x)
            out = out.replace_feature(self.n1(out.features))
            out = self.c2(out)
            res = x.features if self.ds is None else self.dn(self.ds(x.features))
            return out.replace_feature(torch.relu(self.n2(out.features) + res))

    def layer(cin, c, n, key):
        return nn.Sequential(*[Block(cin if i == 0 else c, c, key) for i in range(n)])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = spconv.SubMConv3d(3, 32, 5, bias=False, indice_key="s1k5")
            self.bn0 = bn_relu(32)
            widths = [32, P[0], P[1], P[2]]
            self.downs = nn.ModuleList()
            self.dbn = nn.ModuleList()
            self.enc = nn.ModuleList()
            cin = 32
            for i in range(4):
                self.downs.append(spconv.SparseConv3d(cin, cin, 2, 2, bias=False, indice_key=f"down{i}"))
                self.dbn.append(bn_relu(cin))
                self.enc.append(layer(cin, P[i], L[i], f"sub{i + 1}"))
                cin = P[i]
            self.ups = nn.ModuleList()
            self.ubn = nn.ModuleList()
            self.dec = nn.ModuleList()
            skips = [P[2], P[1], P[0], 32]
            for j in range(4):
                self.ups.append(spconv.SparseInverseConv3d(cin, P[4 + j], 2, bias=False, indice_key=f"down{3 - j}"))
                self.ubn.append(bn_relu(P[4 + j]))
                self.dec.append(layer(P[4 + j] + skips[j], P[4 + j], L[4 + j], f"sub{3 - j}" if j < 3 else "s1k3"))
                cin = P[4 + j]
            self.final = nn.Linear(P[7], args.out_channels, bias=False)
            del widths

        def forward(self, x):
            x = self.stem(x)
            x = x.replace_feature(self.bn0(x.features))
            skips = [x]
            for i in range(4):
                x = self.downs[i](x)
                x = x.replace_feature(self.dbn[i](x.features))
                x = self.enc[i](x)
                skips.append(x)
            skips.pop()
            for j in range(4):
                x = self.ups[j](x)
                x = x.replace_feature(self.ubn[j](x.features))
                s = skips.pop()
                x = x.replace_feature(torch.cat([x.features, s.features], 1))
                x = self.dec[j](x)
            return self.final(x.features)

    net = Net().to(dev)
    c = coords.to(dev)
    lo = c[:, 1:].min(0).values
    c = torch.cat([c[:, :1], c[:, 1:] - lo], 1).int()
    shape = (c[:, 1:].max(0).values + 2).tolist()

    def fwd():
        x = spconv.SparseConvTensor(torch.ones(len(c), 3, device=dev), c, shape, 1)
        return net(x)

    return net, fwd


def _run_worker(size, engine, args) -> dict:
    cmd = [sys.executable, "-m", "sas_app.bench.backbone", "--worker", "--engine", engine, "--size", str(size),
           "--runs", str(args.runs), "--warmup", str(args.warmup), "--arch", args.arch,
           "--out-channels", str(args.out_channels), "--device", args.device, "--seed", str(args.seed),
           "--threads", str(args.threads), "--dtype", args.dtype]
    if not args.backward or engine == "pair":
        cmd.append("--no-backward")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"engine": engine, "size": size, "error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spconv_status():
    try:
        import spconv.pytorch  # noqa: F401
        import spconv

        return True, getattr(spconv, "__version__", "unknown")
    except Exception as e:  # noqa: BLE001 - report any import failure as the reason
        return False, f"{type(e).__name__}: {e}"


def _parser():
    p = argparse.ArgumentParser(prog="sas bench backbone", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="50000,100000,200000", help="comma-separated occupied voxel counts")
    p.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs")
    p.add_argument("--arch", default="MinkUNet18A", help="MinkUNet14A | MinkUNet18A | MinkUNet34C")
    p.add_argument("--out-channels", type=int, default=512, help="head width")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0, help="synthetic room seed")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="our network's dtype (bfloat16 on CPU runs the per-offset torch path; spconv is "
                        "compared in float32 only)")
    p.add_argument("--no-backward", dest="backward", action="store_false", help="skip forward+backward")
    p.add_argument("--no-spconv", dest="spconv", action="store_false", help="skip the spconv comparison")
    p.add_argument("--quick", action="store_true", help="smoke run: 20k voxels, 2 runs, no warm-up")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    p.add_argument("--json", action="store_true", help="(accepted for `sas bench backbone --json`)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv) -> dict:
    args = _parser().parse_args(list(argv))
    if args.worker:
        return _worker(args)
    if args.quick:
        args.sizes, args.runs, args.warmup = "20000", 2, 0
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    ok, sp_info = _spconv_status()
    result = {"benchmark": "backbone", "arch": args.arch, "device": args.device, "dtype": args.dtype, "runs": args.runs,
              "warmup": args.warmup, "data": "synthetic room surfaces, 2 cm voxels", "cpu_count": os.cpu_count(),
              "spconv": sp_info if ok else None, "spconv_unavailable": None if ok else sp_info,
              "sizes": {}}
    for n in sizes:
        entry = {"ours": _run_worker(n, "ours", args)}
        if args.spconv and ok and args.dtype == "float32":
            entry["vs_spconv"] = _run_worker(n, "pair", args)
            for key in ("forward_speedup_vs_spconv", "fused_speedup_vs_torch_path"):
                if key in entry["vs_spconv"]:
                    entry[key] = entry["vs_spconv"][key]
        result["sizes"][str(n)] = entry
    return result


if __name__ == "__main__":
    out = main(sys.argv[1:])
    print(json.dumps(out))
