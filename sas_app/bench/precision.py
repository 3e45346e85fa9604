"""`sas bench precision`: bf16 vs fp32 inference of a distilled checkpoint on synthetic rooms.

    sas bench precision --json --checkpoint demo_output/model.pt      # the demo's distilled model
    sas bench precision --json --quick                                 # smoke run (random model)

For each room the same Segmenter runs in fp32 and in bf16 (alternating, so both see the same
machine load); reported: the share of points whose label agrees, both mIoUs (OpenScene
protocol), the median time of each and their ratio, and whether this CPU has native bf16. Without
``--checkpoint`` a randomly initialised MinkUNet14A in the synthetic text space is used: its
agreement measures bf16 rounding on an untrained network only (said in ``model``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="sas bench precision")
    p.add_argument("--checkpoint", default=None, help="distilled SAS-ROS checkpoint (default: a random MinkUNet14A)")
    p.add_argument("--rooms", type=int, default=2, help="synthetic rooms (default 2)")
    p.add_argument("--seed", type=int, default=100, help="seed of the first room (default 100: not a demo room)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per precision and room (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 small room, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.rooms, args.repeats = 1, 1

    import numpy as np
    import torch

    from sas_core.data.synthetic import SynthConfig, generate_scene
    from sas_core.eval import evaluate
    from sas_core.infer import InferenceConfig, Segmenter
    from sas_core.text import SCANNET_20

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="sas-bench-precision-") as tmp:
        if args.checkpoint:
            path, model_note = Path(args.checkpoint), f"checkpoint {args.checkpoint}"
        else:
            from sas_core.nn import build_model, save_checkpoint
            from sas_core.text import SyntheticTextEncoder

            torch.manual_seed(0)
            encoder = SyntheticTextEncoder(SCANNET_20)
            net = build_model("MinkUNet14A", 3, encoder.dim)
            path = Path(tmp) / "random.pt"
            save_checkpoint(path, net, config={"arch": "MinkUNet14A", "in_channels": 3, "out_channels": encoder.dim,
                                               "voxel_size": 0.05, "input_color": False,
                                               "text_encoder": encoder.config()})
            model_note = "random init MinkUNet14A (agreement of an untrained network: rounding only)"
        segs = {prec: Segmenter.from_checkpoint(path, config=InferenceConfig(precision=prec))
                for prec in ("fp32", "bf16")}
        names = list(segs["fp32"].checkpoint_config.get("vocabulary") or SCANNET_20)
        for seg in segs.values():
            seg.set_vocabulary(names)
        times = {"fp32": [], "bf16": []}
        labels = {"fp32": [], "bf16": []}
        gts = []
        points = 0
        for r in range(args.rooms):
            scene = generate_scene(SynthConfig(seed=args.seed + r, n_frames=0, with_lidar=False,
                                               points_per_m2=800 if args.quick else SynthConfig().points_per_m2))
            pos = scene.points.positions
            points += len(pos)
            gts.append(scene.points.labels)
            for k in range(args.repeats):
                for prec in ("fp32", "bf16") if k % 2 == 0 else ("bf16", "fp32"):
                    t = time.perf_counter()
                    lab, _ = segs[prec].segment(pos)
                    times[prec].append(time.perf_counter() - t)
                    if k == 0:
                        labels[prec].append(np.asarray(lab))
    lab32, lab16, gt = (np.concatenate(x) for x in (labels["fp32"], labels["bf16"], gts))
    m32 = evaluate(lab32, gt, names)["miou"]
    m16 = evaluate(lab16, gt, names)["miou"]
    med = {p: statistics.median(v) for p, v in times.items()}
    return {
        "model": model_note, "rooms": args.rooms, "points": int(points), "threads": torch.get_num_threads(),
        "label_agreement": round(float((lab32 == lab16).mean()), 5),
        "miou_fp32": round(100 * float(m32), 2), "miou_bf16": round(100 * float(m16), 2),
        "segment_fp32_s": round(med["fp32"], 3), "segment_bf16_s": round(med["bf16"], 3),
        "ratio_fp32_over_bf16": round(med["fp32"] / med["bf16"], 3) if med["bf16"] else None,
        "cpu_native_bf16": _cpu_has_bf16(), "data": "synthetic",
    }
