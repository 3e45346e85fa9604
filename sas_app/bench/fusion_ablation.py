"""Table 3 (upper half) of the SAS paper on the synthetic world: teacher A, teacher B, add, linear,
capability-guided fusion -- 3D mIoU of the fused 2D features, over several scene seeds.

Per seed: a synthetic room (``sas_core.data.synthetic``), the simulated dense/mask teacher pair
(``make_simulated_pair``, in the ``SyntheticTextEncoder`` space), each teacher's features fused
onto the room's points with OpenScene's multi-view rule (``fuse_views``), a capability table from
the synthetic probe source (single-object renders with ground-truth masks, fresh objects, not the
scene's), then every fusion method; each point is labelled by its argmax against the class texts
("a {} in a scene") and scored with OpenScene's protocol (``sas_core.eval.metrics``). Also reported,
as diagnostics (not rows of the paper): capability fusion with the teachers' *true* per-class
accuracies as the table ("capability_oracle"), and the public-code weight normalisation variant.

Run: ``sas bench fusion-ablation --json`` (defaults: 3 seeds, 60 frames, 20 probes per class);
``--quick`` for a smoke run. Synthetic world: these figures are not real-data results.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

ROWS = ("teacher_a", "teacher_b", "add", "linear", "capability")


def _parser():
    p = argparse.ArgumentParser(prog="sas bench fusion-ablation", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="scene seeds (>= 3 for the goal)")
    p.add_argument("--frames", type=int, default=60, help="RGB-D frames per scene")
    p.add_argument("--probes", type=int, default=20, help="probe renders per class for the capability table")
    p.add_argument("--probe-seed", type=int, default=1000, help="seed of the probe renders")
    p.add_argument("--probe-size", type=int, nargs=2, default=[160, 120], metavar=("W", "H"),
                   help="probe render size (capability is a pixel ratio; small renders suffice)")
    p.add_argument("--tau", type=float, default=0.05, help="capability softmax temperature")
    p.add_argument("--points-per-m2", type=float, default=None, help="surface sampling density (default: SynthConfig's)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 seeds, 12 frames, 4 probes, sparse points")
    return p


def _labels(features, mask, text):
    """Argmax labels (N,) int64; NO_FEATURE where mask is False."""
    from sas_core.eval.metrics import NO_FEATURE
    from sas_core.text import text_labels

    pred = text_labels(features, text)[0].cpu().numpy()
    return np.where(np.asarray(mask, bool), pred, NO_FEATURE)


def run_seed(seed: int, args, probe_cache: dict) -> dict:
    import torch

    from sas_core.capability.sources import SyntheticProbeSource, build_table
    from sas_core.data.synthetic import SynthConfig, generate_scene
    from sas_core.eval.metrics import evaluate
    from sas_core.fusion import add_fusion, capability_fusion, linear_fusion
    from sas_core.geometry.multiview import fuse_views
    from sas_core.teachers.simulated import make_simulated_pair
    from sas_core.text import SyntheticTextEncoder, class_embeddings

    t0 = time.perf_counter()
    cfg_kw = dict(seed=seed, n_frames=args.frames, with_lidar=False)
    if args.points_per_m2:
        cfg_kw["points_per_m2"] = args.points_per_m2
    scene = generate_scene(SynthConfig(**cfg_kw))
    names = list(scene.class_names)
    encoder = SyntheticTextEncoder(names)
    text = class_embeddings(encoder, names)  # (K, C), "a {} in a scene"
    teachers = make_simulated_pair(encoder, seed=seed)
    points = scene.points.positions
    gt = scene.points.labels
    t_scene = time.perf_counter() - t0

    fused = []
    t1 = time.perf_counter()
    for t in teachers:
        views = ((f.depth, f.pose, f.intrinsics, *t.features(f)) for f in scene.frames)
        fused.append(fuse_views(points, views))
    t_fuse = time.perf_counter() - t1

    t2 = time.perf_counter()
    source = SyntheticProbeSource(args.probes, seed=args.probe_seed, width=args.probe_size[0],
                                  height=args.probe_size[1], probes=probe_cache)
    table = build_table(source, teachers, text, names, progress=False).table
    cap = table.tensor([t.name for t in teachers], names)
    t_cap = time.perf_counter() - t2

    feats = [f.features for f in fused]
    masks = [f.mask for f in fused]
    union = masks[0] | masks[1]
    methods = {
        "teacher_a": (feats[0], masks[0]),
        "teacher_b": (feats[1], masks[1]),
        "add": (add_fusion(feats, masks), union),
        "linear": (linear_fusion(feats, text, masks), union),
        "capability": (capability_fusion(feats, text, cap, args.tau, masks), union),
    }
    oracle = torch.tensor(np.stack([t.expected_accuracy() for t in teachers]), dtype=torch.float32)
    methods["capability_oracle"] = (capability_fusion(feats, text, oracle, args.tau, masks), union)
    methods["capability_sumnorm"] = (capability_fusion(feats, text, cap, args.tau, masks, weight_norm="sum"), union)
    both = (masks[0] & masks[1]).numpy()
    out = {"seed": seed, "points": int(len(points)), "frames": len(scene.frames),
           "coverage": {"teacher_a": float(masks[0].float().mean()), "teacher_b": float(masks[1].float().mean()),
                        "union": float(union.float().mean())},
           "seconds": {"scene": round(t_scene, 2), "fuse_views": round(t_fuse, 2), "capability": round(t_cap, 2)}}
    miou, miou_wrong, miou_both, per_class = {}, {}, {}, {}
    for name, (f, m) in methods.items():
        pred = _labels(f, m, text)
        r = evaluate(pred, gt, names)
        miou[name] = 100 * r["miou"]
        miou_wrong[name] = 100 * evaluate(pred, gt, names, no_feature="wrong")["miou"]
        gt_both = np.where(both, gt, 255)
        miou_both[name] = 100 * evaluate(pred, gt_both, names)["miou"]
        per_class[name] = {k: round(100 * v["iou"], 1) for k, v in r["per_class"].items()}
    out.update(miou=miou, miou_no_feature_wrong=miou_wrong, miou_points_seen_by_both=miou_both,
               per_class_iou=per_class,
               capability_table={t: {n: round(float(v), 3) for n, v in zip(names, row)}
                                 for t, row in zip(table.teachers, table.scores)},
               true_accuracy={t.name: {n: round(float(v), 3) for n, v in zip(names, t.expected_accuracy())}
                              for t in teachers})
    return out


def _summary(values):
    a = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(a.mean()), 2), "std": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 2),
            "min": round(float(a.min()), 2), "max": round(float(a.max()), 2), "per_seed": [round(float(x), 2) for x in a]}


def main(argv: list[str]) -> dict:
    # `sas bench fusion-ablation --json` hands "--json" through to us (argparse REMAINDER); ignore it
    args = _parser().parse_args([a for a in argv if a != "--json"])
    if args.quick:
        args.frames, args.probes = min(args.frames, 12), min(args.probes, 4)
        args.points_per_m2 = args.points_per_m2 or 150.0
    t0 = time.perf_counter()
    probe_cache: dict = {}
    per_seed = [run_seed(s, args, probe_cache) for s in args.seeds]
    names = list(per_seed[0]["miou"])
    table = {n: _summary([r["miou"][n] for r in per_seed]) for n in names}
    best_single = [max(r["miou"]["teacher_a"], r["miou"]["teacher_b"]) for r in per_seed]
    gain = [r["miou"]["capability"] - b for r, b in zip(per_seed, best_single)]
    result = {
        "benchmark": "fusion-ablation",
        "data": "synthetic world with simulated teachers (not real data)",
        "settings": {"seeds": args.seeds, "frames": args.frames, "probes_per_class": args.probes,
                     "probe_seed": args.probe_seed,
                     "probe_size": list(args.probe_size), "tau": args.tau, "quick": bool(args.quick),
                     "protocol": "OpenScene: no-feature points left out of IoU; mean over the 20 classes"},
        "rows": {n: table[n] for n in ROWS},
        "diagnostics": {n: table[n] for n in names if n not in ROWS},
        "miou_no_feature_wrong": {n: _summary([r["miou_no_feature_wrong"][n] for r in per_seed]) for n in names},
        "miou_points_seen_by_both": {n: _summary([r["miou_points_seen_by_both"][n] for r in per_seed]) for n in names},
        "capability_minus_best_single": _summary(gain),
        "capability_minus_add": _summary([r["miou"]["capability"] - r["miou"]["add"] for r in per_seed]),
        "capability_minus_linear": _summary([r["miou"]["capability"] - r["miou"]["linear"] for r in per_seed]),
        "per_seed": per_seed,
        "seconds_total": round(time.perf_counter() - t0, 1),
    }
    g = result["capability_minus_best_single"]["mean"]
    result["goal_met"] = bool(g >= 3.0 and result["capability_minus_add"]["mean"] > 0
                              and result["capability_minus_linear"]["mean"] > 0)
    return result
