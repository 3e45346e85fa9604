"""`sas bench gaussians`: 3D Gaussian segmentation on the synthetic world (SAS section 4.4, Table 5).

Per seed, the demo's world (:func:`sas_app.demo.prepare_world`: rooms, two simulated teachers,
capability tables from probe renders; by default one distillation room at 0.6 of the default size,
so that two distillations per seed and three seeds fit in ten minutes on two busy cores) and, for
each distillation room, a Gaussian splat scene of
its surface (:func:`sas_core.data.gaussians.synthetic_gaussians`: its own, denser surface samples,
so the Gaussians are not the points the point-cloud rows use). The paper's recipe for Gaussians:

* fuse each teacher's features onto the Gaussian centres (the same multi-view fusion,
  :func:`sas_core.geometry.multiview.fuse_frames`) and the two teachers with capability-guided
  fusion (:func:`sas_app.demo.fusion_rows`);
* re-distil a 3D network on the centres from the fused features, *without* the superpoint / TESD
  strategy (mode ``pixel_point``, the demo's schedule otherwise), and label every Gaussian;
* render the labelled Gaussians into novel views of the room (half-way between the recorded
  frames) with the CPU splatting renderer and score 2D mIoU / mAcc against the rendered
  ground-truth label images (:func:`sas_core.eval.gaussians.evaluate_gaussians`).

Rows (own map: the rooms the network is distilled on, as the robot use case; no labels used):
``gt_labels`` (ground-truth class per Gaussian: the renderer's ceiling), ``teacher_a`` /
``teacher_b`` (each teacher's fused feature on the centres, argmax against the text), ``capability``
(capability-fused features, no 3D network), ``teacher_distilled`` (a network distilled from the
better single teacher alone: the Semantic Gaussians analogue, Table 5's baseline) and
``distilled`` (distilled from the capability-fused features: SAS). "Best teacher" is chosen by
its rendered mIoU (an oracle choice that favours the baseline).

    sas bench gaussians --json                 # 3 seeds, the demo's world
    sas bench gaussians --json --quick         # 1 seed, the demo's --quick world (smoke test)
Everything is measured on the SYNTHETIC world.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROWS = (
    ("gt_labels", "ground-truth label per Gaussian (renderer ceiling)"),
    ("teacher_a", "teacher A, fused onto the centres"),
    ("teacher_b", "teacher B, fused onto the centres"),
    ("capability", "capability-fused 2D features (no 3D network)"),
    ("teacher_distilled", "distilled from the best single teacher (Semantic Gaussians analogue)"),
    ("distilled", "distilled from capability-fused features (SAS)"),
)

NOTE = ("SYNTHETIC DATA: 2D mIoU/mAcc of labelled Gaussians rendered into novel views of synthetic rooms "
        "(simulated teachers), not ScanNet; the paper's Table 5 is 12 ScanNet scenes.")


def _distill_labels(data, world, work_dir: Path, what: str):
    """Distil a pixel-point network (no superpoints, no TESD) on ``data``; labels of every centre."""
    from sas_app.demo import distill_settings, label_points
    from sas_core.train.distill import DistillConfig, Distiller, scene_point_features

    cfg = world.config
    dcfg = DistillConfig(mode="pixel_point", out_dir=str(work_dir / what), **distill_settings(cfg))
    model = Distiller(dcfg, data, world.text, world.class_names, None, world.encoder.config()).run().model
    out = []
    for scene in data:
        feats = scene_point_features(model, scene, cfg.voxel_size, input_color=cfg.input_color)
        out.append(label_points(feats, None, world.text))
    return out


def gaussian_rows(world, work_dir, gaussian_config=None, n_views: int = 8, teacher_distill: bool = True,
                  t0: Optional[float] = None) -> dict:
    """The Gaussian segmentation rows of one prepared world (:class:`sas_app.demo.World`).

    Uses ``world.train`` (the distillation rooms), ``world.encoder``, ``world.text``,
    ``world.capability`` and ``world.config`` (teachers re-made from its seed). Returns
    ``{"rows": {key: {"miou", "macc", "miou_present", "macc_present", "covered"}} (percent),
    "best_teacher", "gaussians", "views", "seconds": {...}}``.
    """
    import torch

    from sas_app.demo import _log, fusion_rows, label_points
    from sas_core.data.gaussians import SyntheticGaussianConfig, synthetic_gaussians, synthetic_views
    from sas_core.eval.gaussians import evaluate_gaussians
    from sas_core.geometry.multiview import fuse_frames
    from sas_core.teachers import make_simulated_pair
    from sas_core.train.datasets import scene_from_arrays

    t0 = t0 or time.time()
    work_dir = Path(work_dir)
    cfg = world.config
    gcfg = gaussian_config or SyntheticGaussianConfig(seed=cfg.seed)
    teacher_a, teacher_b = make_simulated_pair(world.encoder, seed=cfg.seed)
    cap = world.capability.matrix([teacher_a.name, teacher_b.name], world.class_names)
    seconds = {}
    t = time.time()
    rooms = []  # (gaussians, gt, views, {row: (features, mask)})
    for room in world.train:
        g, gt = synthetic_gaussians(room, gcfg)
        views = synthetic_views(room, n_views)
        fa = fuse_frames(g.positions, room.frames, teacher_a, progress=False)
        fb = fuse_frames(g.positions, room.frames, teacher_b, progress=False)
        rooms.append((g, gt, views, fusion_rows(fa.features, fa.mask, fb.features, fb.mask, world.text, cap,
                                                cfg.tau)))
    seconds["gaussians_fusion"] = time.time() - t
    _log(f"Gaussian scenes of {len(rooms)} rooms ({sum(len(r[0]) for r in rooms)} Gaussians), both teachers "
         "fused onto the centres", t0)

    labels = {"gt_labels": [r[1] for r in rooms]}
    for key in ("teacher_a", "teacher_b", "capability"):
        labels[key] = [label_points(*r[3][key], world.text) for r in rooms]

    results = {}

    def score(key):
        t = time.time()
        results[key] = evaluate_gaussians([(r[0], lab, r[2]) for r, lab in zip(rooms, labels[key])],
                                          world.class_names)
        seconds["render_eval"] = seconds.get("render_eval", 0.0) + time.time() - t

    for key in ("gt_labels", "teacher_a", "teacher_b", "capability"):
        score(key)
    best = max(("teacher_a", "teacher_b"), key=lambda k: results[k]["miou"])

    def scene_data(key):
        return [scene_from_arrays(f"{world.train[i].name}_gaussians", r[0].positions, r[3][key][0].to(torch.float16),
                                  r[3][key][1], None, r[1], r[0].base_colors()) for i, r in enumerate(rooms)]

    t, render_before = time.time(), seconds["render_eval"]
    labels["distilled"] = _distill_labels(scene_data("capability"), world, work_dir, "gaussians_capability")
    score("distilled")
    _log(f"Gaussians: distilled from capability-fused features ({cfg.epochs} epochs, pixel-point)", t0)
    if teacher_distill:
        labels["teacher_distilled"] = _distill_labels(scene_data(best), world, work_dir, f"gaussians_{best}")
        score("teacher_distilled")
        _log(f"Gaussians: distilled from {best} alone", t0)
    seconds["distill"] = time.time() - t - (seconds["render_eval"] - render_before)
    rows = {}
    for key, _ in ROWS:
        if key in results:
            r = results[key]
            rows[key] = {"miou": 100 * float(r["miou"]), "macc": 100 * float(r["macc"]),
                         "miou_present": 100 * float(r["miou_present"]),
                         "macc_present": 100 * float(r["macc_present"]), "covered": 100 * float(r["covered"])}
    return {"rows": rows, "best_teacher": best, "gaussians": int(sum(len(r[0]) for r in rooms)),
            "views": int(sum(len(r[2]) for r in rooms)), "seconds": seconds}


def main(argv: list) -> dict:
    from sas_app.demo import config_note, demo_config, prepare_world
    from sas_core.data.gaussians import SyntheticGaussianConfig

    parser = argparse.ArgumentParser(prog="sas bench gaussians")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (worlds) to average over (default 3)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override the demo's distillation epochs")
    parser.add_argument("--rooms", type=int, default=1, help="distillation rooms per seed (default 1; the demo: 2)")
    parser.add_argument("--room-scale", type=float, default=0.6,
                        help="room footprint relative to the synthetic world's default (default 0.6: two "
                             "distillations per seed, three seeds in about ten minutes on two busy cores)")
    parser.add_argument("--views", type=int, default=8, help="novel views rendered per room (default 8)")
    parser.add_argument("--density", type=float, default=SyntheticGaussianConfig.points_per_m2,
                        help=f"Gaussians per m^2 of surface (default {SyntheticGaussianConfig.points_per_m2:g})")
    parser.add_argument("--no-teacher-distill", action="store_true",
                        help="skip the network distilled from the best single teacher (one distillation less)")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick world, one seed (smoke test)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    if args.quick and "--seeds" not in argv:
        args.seeds = 1
    t_start = time.time()
    per_seed, cfg = [], None
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        size = {} if args.quick else {"train_rooms": args.rooms, "room_scale": args.room_scale}
        cfg = demo_config("quick" if args.quick else None, seed=seed, progress=args.progress, ros=False, test_rooms=0,
                          **size)
        if args.epochs:
            cfg.epochs = args.epochs
        world = prepare_world(cfg, t_start)
        with tempfile.TemporaryDirectory() as tmp:
            per_seed.append(gaussian_rows(world, Path(tmp), SyntheticGaussianConfig(points_per_m2=args.density,
                                                                                    seed=seed),
                                          n_views=args.views, teacher_distill=not args.no_teacher_distill,
                                          t0=t_start))
    table = []
    for key, label in ROWS:
        vals = [s["rows"][key] for s in per_seed if key in s["rows"]]
        if not vals:
            continue
        row = {"key": key, "method": label}
        for metric in ("miou", "macc", "miou_present", "macc_present", "covered"):
            xs = [v[metric] for v in vals]
            row[metric] = statistics.fmean(xs)
            row[f"{metric}_std"] = statistics.pstdev(xs)
            row[f"{metric}_per_seed"] = xs
        table.append(row)

    def margin(a, b):
        per = [s["rows"][a]["miou"] - s["rows"][b]["miou"] for s in per_seed if a in s["rows"] and b in s["rows"]]
        return {"mean": statistics.fmean(per), "per_seed": per} if per else None

    best_direct = [s["rows"][s["best_teacher"]]["miou"] for s in per_seed]
    return {
        "synthetic": True, "note": NOTE, "config": config_note(cfg) if cfg else "",
        "protocol": ("own map: Gaussians of the distillation rooms, rendered into novel views (half-way between "
                     "the recorded frames); labels rendered as the argmax of the composited class one-hot; pixels "
                     "covered < 50% by labelled Gaussians count as no feature (wrong for mAcc, out of IoU); "
                     "means over the 20 ScanNet classes (absent classes count 0, OpenScene's average)"),
        "seeds": list(range(args.first_seed, args.first_seed + args.seeds)), "quick": args.quick,
        "gaussians_per_seed": [s["gaussians"] for s in per_seed], "views_per_seed": [s["views"] for s in per_seed],
        "best_teacher_per_seed": [s["best_teacher"] for s in per_seed],
        "best_teacher_miou": statistics.fmean(best_direct), "best_teacher_miou_per_seed": best_direct,
        "margins": {"distilled_vs_best_teacher": margin_best(per_seed, "distilled"),
                    "distilled_vs_teacher_distilled": margin("distilled", "teacher_distilled"),
                    "distilled_vs_capability": margin("distilled", "capability")},
        "rows": table, "seconds": time.time() - t_start,
        "seconds_per_seed": [s["seconds"] for s in per_seed],
    }


def margin_best(per_seed, key: str) -> dict:
    """Per-seed mIoU of ``key`` minus that of the seed's best single teacher (fused, no network)."""
    per = [s["rows"][key]["miou"] - s["rows"][s["best_teacher"]]["miou"] for s in per_seed]
    return {"mean": statistics.fmean(per), "per_seed": per}
