"""`sas bench ablation`: the Table 3 analogue of the demo over several seeds (mean and spread).

Each seed generates a new synthetic world (rooms, teachers, probe renders), fuses, distils the three
3D rows and evaluates every row, exactly as `sas demo` does, in two settings: on the distillation rooms
("own_map", transductive: the robot use case, no labels used in training) and on held-out rooms
("held_out"); the 2D fusion rows are computed on the same rooms in each setting. Reports, per
row, the mean and standard deviation of mIoU / mAcc over seeds, and the two orderings the issue
asks about (3D distillation vs capability fusion; SP + TESD vs SP), with their per-seed margins.

    sas bench ablation --seeds 3 --json
    sas bench ablation --seeds 2 --quick --json      # smoke test
Everything is measured on the SYNTHETIC world.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main(argv: list) -> dict:
    from sas_app.demo import HELD_OUT_NOTE, ROWS, SETTINGS, SYNTHETIC_NOTE, config_note, demo_config, run_world

    parser = argparse.ArgumentParser(prog="sas bench ablation")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (worlds) to average over")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override the demo's distillation epochs")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick world (smoke test)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    per_seed = []  # one dict per seed: (setting, key) -> row
    t0 = time.time()
    cfg = None
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        cfg = demo_config("quick" if args.quick else None, seed=seed, progress=args.progress, ros=False)
        if args.epochs:
            cfg.epochs = args.epochs
        with tempfile.TemporaryDirectory() as tmp:
            _, _, _, rows = run_world(cfg, Path(tmp), time.time())
        per_seed.append({(r["setting"], r["key"]): r for r in rows})
    table = []
    for setting, _ in SETTINGS:
        for key, group, label in ROWS:
            vals = [s[setting, key]["miou"] for s in per_seed if (setting, key) in s]
            accs = [s[setting, key]["macc"] for s in per_seed if (setting, key) in s]
            if not vals:
                continue
            table.append({"setting": setting, "key": key, "group": group, "method": label,
                          "miou": statistics.fmean(vals), "miou_std": statistics.pstdev(vals), "miou_per_seed": vals,
                          "macc": statistics.fmean(accs), "macc_std": statistics.pstdev(accs)})
    by = {(r["setting"], r["key"]): r for r in table}

    def margin(setting, a, b):
        per = [s[setting, a]["miou"] - s[setting, b]["miou"] for s in per_seed]
        return {"mean": statistics.fmean(per), "per_seed": per, "holds_on_mean": statistics.fmean(per) >= 0}

    orderings = {}
    for setting, _ in SETTINGS:
        if (setting, "capability") not in by:
            continue
        best_3d = max(("pixel_point", "sp", "sp_tesd"), key=lambda k: by[setting, k]["miou"])
        orderings[setting] = {
            "distillation_vs_capability_fusion": {**margin(setting, best_3d, "capability"), "best_3d_row": best_3d},
            "sp_tesd_vs_capability_fusion": margin(setting, "sp_tesd", "capability"),
            "sp_tesd_vs_sp": margin(setting, "sp_tesd", "sp"),
            "sp_vs_pixel_point": margin(setting, "sp", "pixel_point"),
            "capability_vs_best_teacher": {k: by[setting, k]["miou"] for k in ("capability", "teacher_a", "teacher_b")},
        }
    return {
        "synthetic": True, "note": SYNTHETIC_NOTE, "held_out_note": HELD_OUT_NOTE,
        "settings": dict(SETTINGS), "config": config_note(cfg) if cfg else "",
        "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
        "quick": args.quick, "seconds": time.time() - t0, "rows": table, "orderings": orderings,
    }
