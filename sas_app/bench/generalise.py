"""`sas bench generalise`: does distillation generalise? The held-out Table 3 analogue against the
number of distillation rooms N.

For each world seed (text space, simulated teachers, capability table, network initialisation) and
each N of ``--rooms``, the three 3D rows of the demo (pixel-point, SP, SP + TESD) are distilled on
the first N rooms of one fixed pool of synthetic rooms (so the N = 2 rooms are among the N = 8
rooms) and every row of the Table 3 analogue is evaluated on the SAME ``--test-rooms`` held-out
rooms (fixed room seeds, never in the pool), plus the OpenScene 2D-3D ensemble (per point, the
capability-fused or the SP + TESD feature, whichever has the higher text score). The own-map
setting (the first ``--own-map-rooms`` distillation rooms) gives the train / held-out gap.

The pipeline pieces are those of `sas demo` (``sas_app.demo``: rooms, teachers, capability, fusion,
``distill_rows``, ``evaluate_rows``). Rooms' points, superpoints and both teachers' fused features
are cached under ``--cache DIR`` (keyed by the room's SynthConfig, the world seed and the text
size), so a rerun only distils.

    sas bench generalise --json --rooms 2 8 32 --seeds 0 1 2 --cache /tmp/gen_cache
    sas bench generalise --json --rooms 2 8 --steps 200 --sensor kinect --cache /tmp/gen_cache

``--epochs E`` trains E epochs (epoch = one pass over the N rooms: more rooms, more steps, as in the
paper); ``--steps S`` instead fixes the optimiser steps of every N (E = ceil(S / N)), which keeps
the compute the same and varies only the data. Everything is measured on the SYNTHETIC world.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

#: first room seed of the distillation pool and of the held-out rooms (disjoint ranges)
POOL_SEED = 10_000
HELD_OUT_SEED = 90_000
EXTRA_ROWS = (("ensemble", "2D-3D", "2D-3D ensemble (OpenScene): fused or SP+TESD, higher text score"),)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sas bench generalise")
    p.add_argument("--rooms", type=int, nargs="+", default=[2, 8, 32], help="distillation room counts N")
    p.add_argument("--test-rooms", type=int, default=8, help="held-out rooms (the same for every N and seed)")
    p.add_argument("--own-map-rooms", type=int, default=8,
                   help="distillation rooms evaluated in the own-map setting (train / held-out gap)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="world seeds (teachers, text, training)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=int, default=None, help="epochs per 3D row (default: the demo's 100)")
    g.add_argument("--steps", type=int, default=None, help="optimiser steps per 3D row for every N "
                                                             "(epochs = ceil(steps / N)): equal compute")
    p.add_argument("--voxel-size", type=float, default=None, help="metres (default: the demo's 0.1)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="OpenScene augmentation while distilling (the paper's setting: on)")
    p.add_argument("--input-color", action="store_true", help="RGB network input instead of all ones (SAS)")
    p.add_argument("--lr", type=float, default=None, help="initial Adam learning rate (default: the demo's)")
    p.add_argument("--lr-schedule", choices=("linear", "onecycle"), default=None,
                   help="linear decay to lr/10 (the paper, the demo) or onecycle (warm-up, cosine to lr/10)")
    p.add_argument("--tesd-alpha", type=float, default=None, help="TESD EMA constant (default: the demo's 0.9)")
    p.add_argument("--tesd-start", type=float, default=None,
                   help="last fraction of the steps with TESD (default: the paper's 0.3)")
    p.add_argument("--tesd-weight", type=float, default=None, help="weight of the TESD cross-entropies (default 1)")
    p.add_argument("--tesd-temperature", type=float, default=None,
                   help="TESD logits cos / temperature (default: the demo's 0.07); 0: the raw dot product f3d . text "
                        "of the authors' public code")
    p.add_argument("--tesd-variant", action="append", default=[], metavar="alpha=A,start=F,weight=W,temperature=T",
                   help="an extra SP+TESD row with these settings (any subset), branched from the SP run at its "
                        "TESD start (stage 1 is not retrained); repeatable")
    rows = p.add_mutually_exclusive_group()
    rows.add_argument("--no-pixel-point", action="store_true",
                      help="leave the pixel-point row out (sweeps of the SP / TESD settings; no goal ordering)")
    rows.add_argument("--only-pixel-point", action="store_true",
                      help="train the pixel-point row only (run the rows of one seed in two processes: this and "
                           "--no-pixel-point, then --merge)")
    p.add_argument("--sensor", choices=("none", "kinect", "realsense"), default="none",
                   help="sensor model of every room's frames (sas_core.data.sensor_model)")
    p.add_argument("--quick", action="store_true", help="the demo's --quick world (small rooms; smoke test)")
    p.add_argument("--frames", type=int, default=None, help="RGB-D frames per room (default: the demo's)")
    p.add_argument("--cache", type=Path, default=None, help="folder caching rooms and fused features (reruns "
                                                              "only distil); default: none")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="merge the --json outputs of runs of one setting with different --seeds (run in parallel "
                        "processes) into one result; distils nothing")
    return p


#: --tesd-variant keys -> DistillConfig fields
VARIANT_FIELDS = {"alpha": "tesd_alpha", "start": "stage2_fraction", "weight": "tesd_weight",
                  "temperature": "tesd_temperature", "balance": "tesd_balance", "guide": "tesd_guide"}


def parse_variant(spec: str) -> tuple:
    """``"alpha=0.5,start=0.3"`` -> (row key ``sp_tesd[alpha=0.5,start=0.3]``, DistillConfig overrides)."""
    over = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        k, sep, v = part.partition("=")
        if not sep or k.strip() not in VARIANT_FIELDS:
            raise ValueError(f"--tesd-variant {spec!r}: expected comma-separated key=value with keys "
                             f"{', '.join(VARIANT_FIELDS)}")
        try:
            over[VARIANT_FIELDS[k.strip()]] = float(v)
        except ValueError:
            raise ValueError(f"--tesd-variant {spec!r}: {k.strip()} needs a number, got {v!r}") from None
    if not over:
        raise ValueError(f"--tesd-variant {spec!r} sets nothing")
    return "sp_tesd[" + ",".join(f"{k}={over[f]:g}" for k, f in VARIANT_FIELDS.items() if f in over) + "]", over


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_npz(path: Path, **arrays) -> None:
    from sas_core.io import atomic_path

    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def _load_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class RoomStore:
    """Points, superpoints and both teachers' fused features of synthetic rooms, on disk when ``root``
    is given. ``get(room_cfg, world_seed)`` generates and fuses only what is not stored yet."""

    def __init__(self, root, cfg, teachers_by_seed: dict):
        self.root = Path(root) if root is not None else None
        self.cfg = cfg
        self.teachers = teachers_by_seed  # world seed -> (teacher A, teacher B)
        self.memory: dict = {}
        self.generated = 0

    def _paths(self, room_cfg, seed: int):
        rk = _key(dataclasses.asdict(room_cfg))
        fk = _key([rk, seed, self.cfg.text_dim])
        if self.root is None:
            return rk, fk, None, None
        return rk, fk, self.root / "rooms" / f"{rk}.npz", self.root / "features" / f"{fk}.npz"

    def get(self, room_cfg, seed: int) -> dict:
        rk, fk, room_path, feat_path = self._paths(room_cfg, seed)
        room = self.memory.get(rk)
        if room is None and room_path is not None and room_path.exists():
            room = _load_npz(room_path)
        feats = self.memory.get(fk)
        if feats is None and feat_path is not None and feat_path.exists():
            feats = _load_npz(feat_path)
        if room is None or feats is None:
            room, feats = self._make(room_cfg, seed, room_path, feat_path)
        self.memory[rk], self.memory[fk] = room, feats
        return {**room, **feats, "name": f"synth_{room_cfg.seed:05d}"}

    def _make(self, room_cfg, seed, room_path, feat_path):
        from sas_app.demo import fuse_teacher
        from sas_core.data.synthetic import generate_scene
        from sas_core.train.datasets import synthetic_scene_data

        scene = generate_scene(room_cfg)
        self.generated += 1
        pc = scene.points
        sp = synthetic_scene_data(scene).superpoints
        room = {"positions": pc.positions, "colors": pc.colors, "labels": pc.labels, "instances": pc.instances,
                "superpoints": sp}
        teacher_a, teacher_b = self.teachers[seed]
        fa, ma = fuse_teacher(scene, teacher_a)
        fb, mb = fuse_teacher(scene, teacher_b)
        feats = {"fa": fa.numpy().astype(np.float16), "ma": ma.numpy().astype(bool),
                 "fb": fb.numpy().astype(np.float16), "mb": mb.numpy().astype(bool)}
        if room_path is not None:
            _save_npz(room_path, **room)
            _save_npz(feat_path, **feats)
        return room, feats


def ensemble_labels(fused, mask, feats3d, text):
    """OpenScene's 2D-3D ensemble: per point the label of the fused 2D feature or of the distilled 3D
    feature, whichever has the higher cosine text score (3D where there is no fused feature).
    Returns (labels (N,) int64, fraction of points that took the 2D feature)."""
    import torch

    from sas_core.text import text_labels

    l2, s2 = text_labels(torch.as_tensor(fused).float(), text, normalize=True)
    l3, s3 = text_labels(torch.as_tensor(feats3d).float(), text, normalize=True)
    m = torch.as_tensor(np.asarray(mask, bool))
    use_2d = m & (s2 > s3)
    return torch.where(use_2d, l2, l3).numpy().astype(np.int64), float(use_2d.float().mean())


def _class_sizes(rooms, names) -> dict:
    """Per class: mean points per instance and mean bounding-box diagonal (m) over ``rooms``."""
    pts, diag = {}, {}
    for r in rooms:
        for inst in np.unique(r["instances"]):
            if inst < 0:
                continue
            sel = r["instances"] == inst
            lab = int(np.bincount(r["labels"][sel]).argmax())
            if lab >= len(names):
                continue
            p = r["positions"][sel]
            pts.setdefault(names[lab], []).append(int(sel.sum()))
            diag.setdefault(names[lab], []).append(float(np.linalg.norm(p.max(0) - p.min(0))))
    return {k: {"instances": len(v), "points_per_instance": statistics.fmean(v),
                "diagonal_m": statistics.fmean(diag[k])} for k, v in pts.items()}


def run_one(cfg, store: RoomStore, world_parts, n_rooms: int, test_rooms: int, own_map_rooms: int, t0: float,
            variants=None, pixel_point: bool = True, superpoint: bool = True):
    """Distil on the first ``n_rooms`` pool rooms of world ``cfg.seed``; evaluate every row.

    Returns (results: setting -> key -> evaluate() dict, extra: timings and the ensemble's share)."""
    import torch

    from sas_app.demo import World, add_rows_2d, distill_rows, evaluate_rows, fusion_rows, label_points, room_config
    from sas_core.eval import evaluate
    from sas_core.train.datasets import scene_from_arrays
    from sas_core.train.distill import scene_point_features

    encoder, text, names, cap = world_parts
    t = time.time()
    pool = [store.get(room_config(cfg, POOL_SEED + i), cfg.seed) for i in range(n_rooms)]
    held = [store.get(room_config(cfg, HELD_OUT_SEED + i), cfg.seed) for i in range(test_rooms)]
    prep_s = time.time() - t

    def rows_of(r):
        return fusion_rows(torch.as_tensor(r["fa"]), torch.as_tensor(r["ma"]), torch.as_tensor(r["fb"]),
                           torch.as_tensor(r["mb"]), text, cap, cfg.tau)

    train_data, rows_2d, fused_held = [], {"own_map": {}, "held_out": {}}, []
    for i, r in enumerate(pool):
        rows = rows_of(r)
        f, m = rows["capability"]
        train_data.append(scene_from_arrays(r["name"], r["positions"], f.to(torch.float16), m, r["superpoints"],
                                            r["labels"], r["colors"]))
        if i < own_map_rooms:
            add_rows_2d(rows_2d["own_map"], rows, text, r["labels"])
    test_data = []
    for r in held:
        rows = rows_of(r)
        add_rows_2d(rows_2d["held_out"], rows, text, r["labels"])
        fused_held.append(rows["capability"])
        test_data.append(scene_from_arrays(r["name"], r["positions"], labels=r["labels"], colors=r["colors"]))
    world = World(cfg, encoder, text, names, [], [], None, train_data, test_data, rows_2d)
    with tempfile.TemporaryDirectory() as work:
        models = distill_rows(world, Path(work), t0, variants, pixel_point, superpoint)
    distill_s = world.timings["distill_s"]
    results = evaluate_rows(dataclasses.replace(world, train_data=train_data[:own_map_rooms]), models)
    preds, gts, shares = [], [], []
    for scene, (f, m) in zip(test_data, fused_held if "sp_tesd" in models else []):
        feats = scene_point_features(models["sp_tesd"], scene, cfg.voxel_size, input_color=cfg.input_color)
        lab, share = ensemble_labels(f, m, feats, text)
        preds.append(lab)
        gts.append(scene.labels)
        shares.append(share)
    if preds:
        results["held_out"]["ensemble"] = evaluate(np.concatenate(preds), np.concatenate(gts), names)
    extra = {"prepare_s": prep_s, "distill_s": distill_s, "ensemble_2d_share": statistics.fmean(shares) if shares else None,
             "training_curves": training_curves(world.histories),
             "steps_per_row": cfg.epochs * math.ceil(n_rooms / cfg.batch_size),
             "held_out_rooms": [r["name"] for r in held]}
    return results, extra, held


#: per-epoch training figures kept in the bench JSON (losses; the TESD diagnostics of the TESD epochs)
CURVE_KEYS = ("point", "superpoint", "tesd_point", "tesd_superpoint", "tesd_fit", "tesd_pseudo_acc", "tesd_net_acc")


def training_curves(histories: dict) -> dict:
    """3D row -> [{epoch, tesd, <CURVE_KEYS present>}] from the trainers' per-epoch records: the last
    epochs before TESD starts and every TESD epoch (with their pseudo-label accuracy and fit)."""
    curves = {}
    for name, history in histories.items():
        records = [h for h in history if h.get("kind", "epoch") == "epoch"]
        first_tesd = next((i for i, h in enumerate(records) if h.get("tesd")), len(records))
        keep = records[max(0, first_tesd - 3):] if first_tesd < len(records) else records[-3:]
        curves[name] = [{"epoch": h["epoch"], "tesd": bool(h.get("tesd")),
                         **{k: round(float(h[k]), 5) for k in CURVE_KEYS if k in h}} for h in keep]
    return curves


def _rows_by(rows) -> dict:
    return {(r["setting"], r["key"], r["n_rooms"]): r["miou"] for r in rows}


#: (row, row it is compared with) for the paired per-seed differences of the goal
GOAL_PAIRS = (("sp_tesd", "capability"), ("sp", "capability"), ("sp", "pixel_point"), ("sp_tesd", "sp"))


def _paired(rows, n_max: int) -> dict:
    """Per-seed differences of the goal's rows on held-out rooms at N = ``n_max``, over the seeds both
    rows ran: ``{"a-b": {seeds, per_seed, mean, sem, wins}}`` (``sem``: the standard error of the mean
    difference; ``wins``: seeds where a > b). The worlds of different seeds differ in difficulty
    (capability fusion 42-59 mIoU), which the pairing takes out of the comparison."""
    per_seed = {r["key"]: dict(zip(r["seeds"], r["miou_per_seed"])) for r in rows
                if r["setting"] == "held_out" and r["n_rooms"] == n_max}
    out = {}
    for a, b in GOAL_PAIRS:
        seeds = sorted(set(per_seed.get(a, {})) & set(per_seed.get(b, {})))
        if not seeds:
            continue
        d = [per_seed[a][s] - per_seed[b][s] for s in seeds]
        out[f"{a}-{b}"] = {"seeds": seeds, "per_seed": d, "mean": statistics.fmean(d),
                           "sem": statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else None,
                           "wins": sum(x > 0 for x in d)}
    return out


def _goal_and_gap(rows, rooms) -> tuple:
    """The issue's goal at the largest N (SP+TESD >= capability fusion on held-out rooms and pixel-point
    < SP < SP+TESD) from the mean mIoUs of ``rows``, with the paired per-seed differences behind it;
    and own map minus held out per N."""
    by = _rows_by(rows)
    n_max = max(rooms)
    pp = by.get(("held_out", "pixel_point", n_max))
    goal = {"n_rooms": n_max,
            "sp_tesd_minus_capability": by[("held_out", "sp_tesd", n_max)] - by[("held_out", "capability", n_max)],
            "sp_minus_capability": by[("held_out", "sp", n_max)] - by[("held_out", "capability", n_max)],
            "ordering_pixel_point_lt_sp_lt_sp_tesd": None if pp is None else
            pp < by[("held_out", "sp", n_max)] < by[("held_out", "sp_tesd", n_max)]}
    goal["reached"] = goal["sp_tesd_minus_capability"] >= 0 and bool(goal["ordering_pixel_point_lt_sp_lt_sp_tesd"])
    goal["paired"] = _paired(rows, n_max)
    gap = {n: {k: by[("own_map", k, n)] - by[("held_out", k, n)] for k in ("capability", "pixel_point", "sp", "sp_tesd")
               if ("own_map", k, n) in by} for n in rooms}
    return goal, gap


#: per-seed figures kept beside the mIoU of every row: the point accuracy and the present classes a row
#: has (almost) lost, which tell a row that trades rare classes for frequent ones (TESD's self-training)
ROW_EXTRAS = {
    "overall_acc": lambda res: 100 * float(res["overall_acc"]),
    "classes_lost": lambda res: sum(1 for v in res["per_class"].values() if v["iou"] < 0.01),
}


#: result fields that must agree for runs to be merged
MERGE_SAME = ("rooms", "test_rooms", "own_map_rooms", "schedule", "sensor", "augment", "input_color", "voxel_size",
              "quick", "lr", "lr_schedule", "tesd_alpha", "tesd_start", "tesd_weight", "tesd_temperature")

#: the value of a setting in a result written before the setting was recorded (the default it ran with)
MERGE_DEFAULTS = {"tesd_temperature": 0.07}


def merge_results(parts: list) -> dict:
    """One result from ``main`` results of one setting run in parallel processes: parts with different
    seeds, or the rows of one seed split over processes (``--only-pixel-point`` and ``--no-pixel-point``).
    Per-seed values are joined (a row of one seed in two parts must have the same value: the 2D rows),
    means / spreads and the goal recomputed; a seed's distillation time is the longest of its parts (they
    ran at the same time); per-class IoU and the config note are those of the first seed."""
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    def setting(part, k):
        return part.get(k, MERGE_DEFAULTS.get(k))

    for other in parts[1:]:
        diff = [k for k in MERGE_SAME if setting(other, k) != setting(first, k)]
        if diff:
            raise ValueError(f"cannot merge runs of different settings: {', '.join(diff)} differ")
    groups: dict = {}
    for p in parts:
        for r in p["rows"]:
            g = groups.setdefault((r["setting"], r["key"], r["n_rooms"]), {"row": r, "values": {}, "extras": {}})
            for k in ROW_EXTRAS:  # a part written before the field existed has none: the others' values stay
                g["extras"].setdefault(k, {}).update(
                    (seed, v) for seed, v in zip(r["seeds"], r.get(f"{k}_per_seed", [])) if v is not None)
            for seed, v in zip(r["seeds"], r["miou_per_seed"]):
                if seed in g["values"] and g["values"][seed] != v:
                    raise ValueError(f"row {r['key']} (N = {r['n_rooms']}, {r['setting']}): seed {seed} in two parts "
                                     f"with different values ({g['values'][seed]} and {v}); seeds repeat")
                g["values"][seed] = v
    rows = []
    for g in groups.values():
        seeds = sorted(g["values"])
        vals = [g["values"][k] for k in seeds]
        rows.append({**g["row"], "seeds": seeds, "miou_per_seed": vals, "miou": statistics.fmean(vals),
                     "miou_std": statistics.pstdev(vals),
                     **{f"{k}_per_seed": [g["extras"][k].get(s) for s in seeds] for k in ROW_EXTRAS}})
    by = _rows_by(rows)
    goal, gap = _goal_and_gap(rows, first["rooms"]) if ("held_out", "sp", max(first["rooms"])) in by else (None, None)
    runs: dict = {}
    for p in parts:
        for r in p["runs"]:
            key = (r["n"], r["seed"])
            if key in runs:
                runs[key] = {**runs[key], "distill_s": max(runs[key]["distill_s"], r["distill_s"]),
                             "distill_s_parts": runs[key].get("distill_s_parts", [runs[key]["distill_s"]])
                             + [r["distill_s"]],
                             "ensemble_2d_share": runs[key].get("ensemble_2d_share") or r.get("ensemble_2d_share"),
                             "training_curves": {**r.get("training_curves", {}),
                                                 **runs[key].get("training_curves", {})}}
            else:
                runs[key] = dict(r)
    seeds = sorted({s for p in parts for s in p["seeds"]})
    per_class: dict = {}
    for p in parts:
        if p["seeds"] and p["seeds"][0] == seeds[0]:
            for c in p.get("per_class_held_out", []):
                per_class.setdefault(c["class"], {}).update({k: v for k, v in c.items() if v is not None})
    def per_part(key, default=None):
        """A per-part field over the parts; an already merged part contributes its own list of parts."""
        out = []
        for p in parts:
            out.extend(p.get(key, default) if "merged_parts" in p else [p.get(key, default)])
        return out

    return {**first, "seeds": seeds, "rows": rows, "goal": goal, "own_map_minus_held_out": gap,
            "runs": [runs[k] for k in sorted(runs)], "per_class_held_out": list(per_class.values()),
            "rows_3d": sorted(set(per_part("rows_3d", "all"))),
            "tesd_variants": {k: v for p in parts for k, v in p.get("tesd_variants", {}).items()},
            "rooms_generated": sum(p["rooms_generated"] for p in parts),
            "seconds": max(p["seconds"] for p in parts),
            "seconds_per_part": [x for p in parts for x in p.get("seconds_per_part", [p["seconds"]])],
            "load_average_start": per_part("load_average_start"), "load_average_end": per_part("load_average_end"),
            "merged_parts": sum(p.get("merged_parts", 1) for p in parts)}


def main(argv: list) -> dict:
    from sas_app.demo import (HELD_OUT_NOTE, ROWS, SETTINGS, SYNTHETIC_NOTE, _log, config_note, demo_config,
                              probe_capability, world_teachers)

    args = _parser().parse_args(argv)
    if args.merge:
        return merge_results([json.loads(Path(f).read_text()) for f in args.merge])
    if min(args.rooms) < 1 or args.test_rooms < 1 or args.own_map_rooms < 0:
        raise ValueError("--rooms must be >= 1 and --test-rooms >= 1")
    if (args.steps is not None and args.steps < 1) or (args.epochs is not None and args.epochs < 1):
        raise ValueError("--epochs / --steps must be >= 1")
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    changes = {k: v for k, v in dict(voxel_size=args.voxel_size, lr=args.lr, frames=args.frames,
                                     lr_schedule=args.lr_schedule, tesd_alpha=args.tesd_alpha,
                                     stage2_fraction=args.tesd_start, tesd_weight=args.tesd_weight,
                                     tesd_temperature=args.tesd_temperature).items()
               if v is not None}
    variants = dict(parse_variant(v) for v in args.tesd_variant)
    load_start = os.getloadavg()
    base = dict(augment=args.augment, input_color=args.input_color, sensor=args.sensor, progress=args.progress,
                ros=False, **changes)
    preset = "quick" if args.quick else None
    worlds, teachers = {}, {}
    for seed in args.seeds:
        cfg = demo_config(preset, seed=seed, **base)
        encoder, text, names, pair = world_teachers(cfg)
        cap_path = None
        if args.cache is not None:
            cap_path = args.cache / "capability" / f"{_key([seed, cfg.text_dim, cfg.probes, cfg.width, cfg.height])}.npz"
        if cap_path is not None and cap_path.exists():
            cap = _load_npz(cap_path)["matrix"]
        else:
            table = probe_capability(list(pair), text, names, cfg.probes, seed, cfg.width, cfg.height, args.progress)
            cap = table.matrix([pair[0].name, pair[1].name], names)
            if cap_path is not None:
                _save_npz(cap_path, matrix=cap)
        worlds[seed] = (encoder, text, names, cap)
        teachers[seed] = pair
    store = RoomStore(args.cache, demo_config(preset, **base), teachers)
    runs = []  # one per (seed, N)
    held_rooms = None
    for n in args.rooms:
        for seed in args.seeds:
            epochs = math.ceil(args.steps / n) if args.steps else (args.epochs or demo_config(preset).epochs)
            cfg = demo_config(preset, seed=seed, train_rooms=n, test_rooms=args.test_rooms, epochs=epochs, **base)
            results, extra, held_rooms = run_one(cfg, store, worlds[seed], n, args.test_rooms, args.own_map_rooms, t0,
                                                 variants, not args.no_pixel_point, not args.only_pixel_point)
            runs.append({"n": n, "seed": seed, "epochs": epochs, "results": results, **extra})
            _log("N=%d seed %d: held-out mIoU %s" % (n, seed, ", ".join(
                f"{k} {100 * float(v['miou']):.1f}" for k, v in results["held_out"].items())), t0)
    names = worlds[args.seeds[0]][2]
    table = []
    variant_rows = tuple((k, "3D", f"SP Dis. + TESD, {k[len('sp_tesd['):-1]}") for k in variants)
    for setting, _ in SETTINGS:
        for key, group, label in ROWS + variant_rows + EXTRA_ROWS:
            for n in args.rooms:
                part = [r for r in runs if r["n"] == n and key in r["results"].get(setting, {})]
                if not part:
                    continue
                res = [r["results"][setting][key] for r in part]
                vals = [100 * float(x["miou"]) for x in res]
                table.append({"setting": setting, "key": key, "group": group, "method": label, "n_rooms": n,
                              "miou": statistics.fmean(vals), "miou_std": statistics.pstdev(vals),
                              "miou_per_seed": vals, "seeds": [r["seed"] for r in part],
                              **{f"{k}_per_seed": [f(x) for x in res] for k, f in ROW_EXTRAS.items()}})
    n_max = max(args.rooms)
    by = _rows_by(table)
    goal, gap = _goal_and_gap(table, args.rooms) if ("held_out", "sp", n_max) in by else (None, None)
    # per-class IoU on the held-out rooms at the largest N (first seed) against the objects' size
    last = next(r for r in runs if r["n"] == n_max)
    sizes = _class_sizes(held_rooms or [], names)
    per_class = []
    for cls, size in sorted(sizes.items(), key=lambda kv: kv[1]["diagonal_m"]):
        row = {"class": cls, **size}
        for key in ("capability", "pixel_point", "sp", "sp_tesd", "ensemble"):
            if key not in last["results"]["held_out"]:
                continue
            pc = last["results"]["held_out"][key].get("per_class", {}).get(cls)
            row[f"iou_{key}"] = None if pc is None else 100 * float(pc["iou"])
        per_class.append(row)
    cfg_last = demo_config(preset, seed=args.seeds[0], train_rooms=n_max, test_rooms=args.test_rooms, **base)
    return {
        "synthetic": True, "note": SYNTHETIC_NOTE, "held_out_note": HELD_OUT_NOTE, "settings": dict(SETTINGS),
        "config": config_note(cfg_last), "rooms": args.rooms, "seeds": args.seeds, "test_rooms": args.test_rooms,
        "own_map_rooms": args.own_map_rooms, "schedule": f"{args.steps} steps per row" if args.steps else
        f"{args.epochs or demo_config(preset).epochs} epochs per row", "sensor": args.sensor,
        "augment": args.augment, "input_color": args.input_color, "voxel_size": cfg_last.voxel_size,
        "lr": cfg_last.lr, "lr_schedule": cfg_last.lr_schedule, "tesd_alpha": cfg_last.tesd_alpha,
        "tesd_start": cfg_last.stage2_fraction, "tesd_weight": cfg_last.tesd_weight,
        "tesd_temperature": cfg_last.tesd_temperature,
        "tesd_variants": {k: v for k, v in variants.items()}, "rows_3d": "pixel_point" if args.only_pixel_point
        else "sp" if args.no_pixel_point else "all",
        "load_average_start": list(load_start), "load_average_end": list(os.getloadavg()),
        "quick": args.quick, "rows": table, "goal": goal, "own_map_minus_held_out": gap,
        "per_class_held_out": per_class,
        "runs": [{k: v for k, v in r.items() if k != "results"} for r in runs],
        "rooms_generated": store.generated, "seconds": time.time() - t0,
    }


def format_markdown(result: dict) -> str:
    """The held-out table (rows x N, mean ± std over seeds, per seed) and the training time per N."""
    ns = result["rooms"]
    lines = [f"| | method | " + " | ".join(f"N = {n}" for n in ns) + " |", "|---|---|" + "---:|" * len(ns)]
    for setting in ("held_out", "own_map"):
        keys = []
        for r in result["rows"]:
            if r["setting"] == setting and r["key"] not in keys:
                keys.append(r["key"])
        for key in keys:
            cells, label = [], key
            for n in ns:
                r = next((x for x in result["rows"] if x["setting"] == setting and x["key"] == key
                          and x["n_rooms"] == n), None)
                if r is None:
                    cells.append("")
                    continue
                label = f"{r['method']}" + (" (own map)" if setting == "own_map" else "")
                seeds = "" if len(r["miou_per_seed"]) < 2 else " (" + ", ".join(f"{v:.1f}" for v in r["miou_per_seed"]) + ")"
                spread = f" ± {r['miou_std']:.1f}" if len(r["miou_per_seed"]) > 1 else ""
                cells.append(f"{r['miou']:.1f}{spread}{seeds}")
            group = next(x["group"] for x in result["rows"] if x["key"] == key)
            lines.append(f"| {group} | {label} | " + " | ".join(cells) + " |")
    times = []
    for n in ns:
        runs = [r for r in result["runs"] if r["n"] == n]
        times.append(f"{statistics.fmean(r['distill_s'] for r in runs):.0f} s ({runs[0]['epochs']} epochs, "
                     f"{runs[0]['steps_per_row']} steps/row)")
    lines.append("| | distillation time (3 rows) | " + " | ".join(times) + " |")
    paired = (result.get("goal") or {}).get("paired", {})
    if paired:
        lines.append("")
        lines.append(f"Paired per seed, held out, N = {result['goal']['n_rooms']} (mean ± standard error; seeds "
                     "where the first row is higher):")
        for name, d in paired.items():
            sem = "" if d["sem"] is None else f" ± {d['sem']:.1f}"
            lines.append(f"- {name.replace('-', ' - ')}: {d['mean']:+.1f}{sem} ({d['wins']} of {len(d['seeds'])})")
    return "\n".join(lines) + "\n"
