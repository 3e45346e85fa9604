"""`sas bench seeds`: the seeds' other systems as extra rows of the synthetic Table 3 analogue (issue #15).

Per seed, one synthetic world as `sas demo` / `sas bench ablation` build it (rooms, simulated
teachers, capability tables, multi-view fusion, capability-fused targets, mesh superpoints:
:func:`sas_app.demo.prepare_world`), except that each room leaves ``--absent-classes`` object classes
out (the generator otherwise puts all 20 classes in every room, which makes every scene list the whole
vocabulary), then side by side, with the demo's distillation settings but ``--epochs`` (50) epochs:

* ``sas``: SP + TESD distillation as today (the demo's SAS row);
* ``scene_labels``: + scene-level labels (3DSS-VLG): every distillation room's class list (the classes
  present in it) restricts the TESD pseudo-labels, and the embeddings-specialisation adapter refines the
  fused targets before distillation (soft guidance);
* ``mask``: + the mask-level loss (MaskField / XMask3D): the simulated mask teacher's masks of every
  frame back-projected onto the points, ``--loss point,superpoint,mask`` in stage 1 and 2;
* ``scene_labels_tesd`` (ablation, ``--variants``): the lists in the TESD pseudo-labels only, no adapter.

Every row is evaluated on the distillation rooms ("own_map") and on held-out rooms ("held_out", no scene
list used in training or at test time), with mIoU / mAcc (OpenScene protocol) and boundary mIoU (points
within ``--boundary-radius`` of a ground-truth class boundary, :func:`sas_core.eval.boundary_miou`);
``miou_scene_lists`` is the same model classified with the room's class list at test time (the
robot-task-list use case; "when asked"). Means, spreads and per-seed values, and per-seed margins of
each option against ``sas``.

Extra rows (e.g. the Gaussian-segmentation rows of issue #15 item 3) plug in as *row builders*:
``builder(ctx: SeedContext) -> list of row dicts`` (each with ``key``, ``method``, ``setting`` and
metrics in percent such as ``miou``), called once per seed after the 3D rows and averaged over seeds
like the built-in ones. Register one with :func:`register_row_builder`, or define ``seed_rows(ctx)`` in
one of the modules of :data:`OPTIONAL_BUILDERS` (imported when importable).

    sas bench seeds --json                      # 3 seeds, the demo's world and schedule
    sas bench seeds --json --quick --seeds 1    # smoke test
Everything is measured on the SYNTHETIC world.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

#: the built-in rows: key -> (method, DistillConfig overrides, scene labels in training)
VARIANTS = (
    ("sas", "SP Dis. + TESD (SAS, as today)", {}, False),
    ("scene_labels", "+ scene-level labels (3DSS-VLG: masked pseudo-labels, adapter)", {}, True),
    ("mask", "+ mask-level loss (MaskField / XMask3D)", {"loss": "point,superpoint,mask"}, False),
    # ablation of the scene-label row (not run by default): lists in the TESD pseudo-labels only, no adapter
    ("scene_labels_tesd", "+ scene-level labels in TESD pseudo-labels only (no adapter)", {"scene_adapter": False},
     True),
)
DEFAULT_VARIANTS = ("sas", "scene_labels", "mask")

#: modules whose ``seed_rows(ctx)`` is called when importable (helper `splat` adds the Gaussian rows there)
OPTIONAL_BUILDERS = ("sas_app.bench.seeds_gaussians",)

ROW_BUILDERS: List[Callable] = []
"""Registered extra row builders, ``builder(ctx: SeedContext) -> list[dict]``."""


def register_row_builder(builder: Callable) -> Callable:
    """Add a row builder (usable as a decorator); see the module docstring."""
    if builder not in ROW_BUILDERS:
        ROW_BUILDERS.append(builder)
    return builder


@dataclass
class SeedContext:
    """What a row builder gets for one seed."""

    seed: int
    world: object  # sas_app.demo.World (rooms, teachers' fused targets, text, capability table)
    models: Dict[str, object]  # variant key -> trained 3D network
    work_dir: Path  # a scratch folder of this seed (removed afterwards)
    boundary_radius: float
    extra: dict = field(default_factory=dict)


def _builders() -> List[Callable]:
    found = list(ROW_BUILDERS)
    for name in OPTIONAL_BUILDERS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        fn = getattr(module, "seed_rows", None)
        if callable(fn) and fn not in found:
            found.append(fn)
    return found


def absent_classes(seed: int, n_absent: int):
    """``room index -> classes left out of that room``: ``n_absent`` object classes drawn per room.

    The synthetic generator places every class in every room; real scenes hold a subset (a ScanNet
    scene about half of the 20 classes), which is what makes a scene's class list informative."""
    from sas_core.text import SCANNET_20

    objects = [c for c in SCANNET_20 if c not in ("wall", "floor")]

    def pick(i: int):
        rng = np.random.default_rng([seed, i, 15])
        return tuple(sorted(rng.choice(objects, size=min(n_absent, len(objects)), replace=False).tolist()))

    return pick


def attach_masks(world) -> dict:
    """Back-project the simulated mask teacher's masks onto every distillation room (scene.masks)."""
    from sas_core.teachers import make_simulated_pair
    from sas_core.train.masks import scene_masks_from_views, teacher_mask_views

    _, mask_teacher = make_simulated_pair(world.encoder, seed=world.config.seed)  # the world's mask teacher
    counts = []
    for scene, data in zip(world.train, world.train_data):
        data.masks = scene_masks_from_views(scene.points.positions, teacher_mask_views(scene.frames, mask_teacher))
        counts.append(len(data.masks))
    return {"masks_per_room": counts,
            "points_per_mask_median": float(np.median(np.concatenate([d.masks.sizes for d in world.train_data])))}


def _train(world, key, overrides, scene_labels: bool, work_dir: Path, epochs: int):
    from sas_core.train.distill import DistillConfig, Distiller

    cfg = world.config
    scenes = []
    for scene, data in zip(world.train, world.train_data):
        scenes.append(dataclasses.replace(data, classes=tuple(scene.present_classes()) if scene_labels else None,
                                          masks=data.masks if "mask" in overrides.get("loss", "") else None))
    dc = DistillConfig(arch=cfg.arch, mode="sp_tesd", epochs=epochs, stage2_fraction=cfg.stage2_fraction,
                       batch_size=cfg.batch_size, lr=cfg.lr, final_lr=cfg.lr / 10, voxel_size=cfg.voxel_size,
                       tesd_alpha=cfg.tesd_alpha, tesd_temperature=cfg.tesd_temperature, seed=cfg.seed, val_every=0,
                       resume=False, progress=cfg.progress, threads=cfg.threads, input_color=cfg.input_color,
                       augment=cfg.augment, out_dir=str(work_dir / key), **overrides)
    d = Distiller(dc, scenes, world.text, world.class_names, None, world.encoder.config())
    model = d.run().model
    return model, {"adapter_last": d.adapter_history[-1] if d.adapter_history else None}


def evaluate_model(world, model, radii) -> Dict[str, dict]:
    """setting -> metrics (percent) of one model: mIoU, mAcc, boundary mIoU per radius, mIoU with scene lists."""
    from sas_core.eval import boundary_miou, evaluate, miou_macc
    from sas_core.train.distill import scene_point_features
    from sas_core.train.scene_labels import class_mask, masked_text_labels

    cfg = world.config
    out = {}
    for setting, rooms, datas in (("own_map", world.train, world.train_data), ("held_out", world.test, world.test_data)):
        if not datas:
            continue
        preds, listed, gts, pos = [], [], [], []
        for room, data in zip(rooms, datas):
            feats = scene_point_features(model, data, cfg.voxel_size, input_color=cfg.input_color)
            preds.append(masked_text_labels(feats, world.text)[0].numpy())
            allowed = class_mask(room.present_classes(), world.class_names, room.name)
            listed.append(masked_text_labels(feats, world.text, allowed)[0].numpy())
            gts.append(room.points.labels)
            pos.append(room.points.positions)
        pred, gt = np.concatenate(preds), np.concatenate(gts)
        res = evaluate(pred, gt, world.class_names)
        row = {"miou": 100 * res["miou"], "macc": 100 * res["macc"], "miou_present": 100 * res["miou_present"],
               "miou_scene_lists": 100 * evaluate(np.concatenate(listed), gt, world.class_names)["miou"]}
        for r in radii:
            # per room (a band never spans two rooms), pooled confusion
            b = [boundary_miou(p, g, x, world.class_names, radius=r) for p, g, x in zip(preds, gts, pos)]
            conf = sum(x["confusion"] for x in b)
            tag = f"{round(r * 100):g}cm"
            row[f"boundary_miou_{tag}"] = 100 * miou_macc(conf, world.class_names)["miou"]
            row[f"boundary_points_{tag}"] = int(sum(x["boundary_points"] for x in b))
        out[setting] = row
    return out


def _summary(values: list) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "per_seed": values}


def main(argv: list) -> dict:
    from sas_app.demo import HELD_OUT_NOTE, SYNTHETIC_NOTE, _log, config_note, demo_config, prepare_world

    parser = argparse.ArgumentParser(prog="sas bench seeds")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (worlds) to average over")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None,
                        help="distillation epochs per row (default 50, TESD in the last 30%%; --quick: 3; the demo: "
                             "100; 50 keeps 3 seeds x 3 rows near 15 min on 2 loaded cores)")
    parser.add_argument("--absent-classes", type=int, default=8,
                        help="object classes left out of each room (default 8 of 18: rooms hold 12 of the 20 "
                             "classes, so scene lists say something; 0: every class in every room, as the demo)")
    parser.add_argument("--train-rooms", type=int, default=None, help="override the demo's distillation rooms")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick world (smoke test)")
    parser.add_argument("--boundary-radius", type=float, nargs="+", default=[0.05, 0.10],
                        help="boundary bands in metres (default: 0.05 0.10)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        choices=[k for k, *_ in VARIANTS],
                        help=f"built-in rows to train (default: {' '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--no-gaussians", action="store_true",
                        help="leave out the Gaussian segmentation rows (sas_app/bench/seeds_gaussians.py: the seed's "
                             "world as splat scenes, 2D mIoU of the distilled network vs the best teacher)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    t0 = time.time()
    per_seed, cfg, notes, timings = [], None, [], []
    builders = _builders()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        overrides = {"seed": seed, "progress": args.progress, "ros": False}
        if args.train_rooms:
            overrides["train_rooms"] = args.train_rooms
        cfg = demo_config("quick" if args.quick else None, **overrides)
        cfg.epochs = args.epochs or (cfg.epochs if args.quick else 50)
        if cfg.threads > 0:
            import torch

            torch.set_num_threads(cfg.threads)
        ts = {"seed": seed}
        t = time.time()
        world = prepare_world(cfg, t0, absent_classes(seed, args.absent_classes) if args.absent_classes else None)
        ts["world_s"] = time.time() - t
        t = time.time()
        mask_info = attach_masks(world)
        ts["masks_s"] = time.time() - t
        rows, models = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for key, method, over, labels in VARIANTS:
                if key not in args.variants:
                    continue
                t = time.time()
                models[key], info = _train(world, key, over, labels, Path(tmp), cfg.epochs)
                ts[f"{key}_train_s"] = time.time() - t
                _log(f"seed {seed}: {key} distilled ({cfg.epochs} epochs, {ts[f'{key}_train_s']:.0f} s)", t0)
                for setting, metrics in evaluate_model(world, models[key], args.boundary_radius).items():
                    rows[setting, key] = {"setting": setting, "key": key, "method": method, **metrics}
                if info["adapter_last"]:
                    mask_info["adapter_last_epoch"] = info["adapter_last"]
            ctx = SeedContext(seed, world, models, Path(tmp), args.boundary_radius[0],
                              {"masks": mask_info, "gaussians": not args.no_gaussians})
            for builder in builders:
                t = time.time()
                for r in builder(ctx) or []:
                    rows[r.get("setting", "held_out"), r["key"]] = dict(r)
                ts[f"{getattr(builder, '__name__', 'builder')}_s"] = time.time() - t
        per_seed.append(rows)
        notes.append({"seed": seed, **mask_info,
                      "classes_per_room": [len(r.present_classes()) for r in world.train + world.test]})
        timings.append(ts)
    # aggregate
    keys = []
    for rows in per_seed:
        for k in rows:
            if k not in keys:
                keys.append(k)
    table = []
    for setting, key in keys:
        have = [s[setting, key] for s in per_seed if (setting, key) in s]
        metrics = [m for m, v in have[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        row = {"setting": setting, "key": key, "method": have[0].get("method", key), "seeds": len(have)}
        for m in metrics:
            vals = [float(h[m]) for h in have if m in h]
            s = _summary(vals)
            row[m], row[f"{m}_std"], row[f"{m}_per_seed"] = s["mean"], s["std"], s["per_seed"]
        table.append(row)
    margins = {}
    for setting in ("own_map", "held_out"):
        for key, *_ in VARIANTS:
            if key == "sas" or not all((setting, key) in s and (setting, "sas") in s for s in per_seed):
                continue
            for m in [m for m in per_seed[0][setting, "sas"] if m.startswith(("miou", "boundary_miou"))]:
                per = [s[setting, key][m] - s[setting, "sas"][m] for s in per_seed]
                margins.setdefault(setting, {}).setdefault(key, {})[m] = {
                    "mean": statistics.fmean(per), "per_seed": per, "better_in_seeds": sum(p > 0 for p in per)}
    return {
        "synthetic": True, "note": SYNTHETIC_NOTE, "held_out_note": HELD_OUT_NOTE,
        "config": config_note(cfg) if cfg else "", "epochs": cfg.epochs if cfg else None,
        "seeds": list(range(args.first_seed, args.first_seed + args.seeds)), "quick": args.quick,
        "absent_classes_per_room": args.absent_classes,
        "boundary_radius_m": args.boundary_radius,
        "scene_lists": "each room's classes present (ground truth), used in training by the scene_labels row; "
                       "miou_scene_lists applies them at test time to every row",
        "masks": notes, "rows": table, "margins_vs_sas": margins, "timings": timings,
        "row_builders": [getattr(b, "__module__", "") + "." + getattr(b, "__name__", "") for b in builders],
        "seconds": time.time() - t0,
    }
