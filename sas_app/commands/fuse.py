"""`sas fuse`: 2D-to-3D fusion of teacher features onto points (OpenScene rule).

Two sources:

* ``--data ROOT``: scenes in the OpenScene layout (``ROOT/<split>/<scene>.pth`` and
  ``ROOT/2d/<scene>/{color,depth,pose}``, see :mod:`sas_core.data.openscene`); each scene's
  frames are run through one teacher, fused with :func:`sas_core.geometry.multiview.fuse_views`
  and written as OpenScene fused-feature files (``OUT/<scene>_<k>.pt``, see
  :mod:`sas_core.data.fused_features`).
* ``--synthetic``: a generated room (:mod:`sas_core.data.synthetic`) and the two simulated
  teachers (:func:`sas_core.teachers.simulated.make_simulated_pair`); with ``--report`` every
  teacher's fused features are classified against the class text embeddings and its 3D mIoU and
  per-class IoU table are printed (synthetic data: says so).

Examples::

    sas fuse --synthetic --report
    sas fuse --data data/synth_openscene --split train --teacher sim_dense --out data/fused_sim_dense
    sas fuse --data data/scannet --teacher dense_clip --clip-checkpoint ~/models/ViT-B-16.bin \\
        --frame-step 20 --n-files 5 --split-points 20000 --out data/scannet_multiview_sclip
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

from sas_app.commands import add_dense_preset_argument, add_models_argument, apply_model_paths, dense_options

HELP = "2D-to-3D fusion of teacher features onto points (OpenScene rule)"

TEACHERS = ("sim_dense", "sim_mask", "dense_clip", "mask_clip")


def add_arguments(parser):
    from sas_core.config import add_config_arguments
    from sas_core.data.synthetic import SynthConfig
    from sas_core.geometry.multiview import MultiViewFusionConfig
    from sas_core.teachers.dense_clip import DenseClipConfig
    from sas_core.teachers.mask_teacher import MaskTeacherConfig

    src = parser.add_argument_group("source (one of)")
    src.add_argument("--data", metavar="ROOT", help="OpenScene-layout dataset root")
    src.add_argument("--synthetic", action="store_true", help="generate a synthetic room and fuse its frames")
    d = parser.add_argument_group("dataset")
    d.add_argument("--split", default="train", help="split folder under ROOT (default: train)")
    d.add_argument("--scene", nargs="+", metavar="NAME", help="scenes to fuse (default: every scene of the split)")
    d.add_argument("--out", metavar="DIR", help="output folder for fused feature files (<scene>_<k>.pt)")
    d.add_argument("--n-files", type=int, default=1,
                   help="files per scene, <scene>_0.pt ... (OpenScene: 5 for training scenes, 1 otherwise)")
    d.add_argument("--split-points", type=int, default=None,
                   help="each file keeps a random subset of this many points (OpenScene training: 20000)")
    d.add_argument("--single-file", action="store_true", help="write <scene>.pt (nuScenes naming)")
    d.add_argument("--frame-step", type=int, default=1, help="use every k-th frame of a scene")
    d.add_argument("--overwrite", action="store_true", help="redo scenes whose files exist (default: skip)")
    d.add_argument("--save-masks", action="store_true",
                   help="also write the mask teacher's 2D masks back-projected onto the points, <out>/<scene>.masks.npz "
                        "(teachers sim_mask, mask_clip), for `sas distill --loss point,superpoint,mask`")
    t = parser.add_argument_group("teacher")
    t.add_argument("--teacher", nargs="+", choices=TEACHERS, default=None,
                   help="teacher(s) (default: sim_dense sim_mask with --synthetic, else sim_dense)")
    t.add_argument("--vocabulary", "--vocab", default="scannet20",
                   help="class names (labels and simulated teachers; default: scannet20)")
    add_config_arguments(t, MaskTeacherConfig, only=("clip_model", "clip_checkpoint", "sam_model", "sam_checkpoint"))
    add_config_arguments(t, DenseClipConfig, prefix="clip-", only=("recipe",), aliases={"recipe": "--recipe"})
    add_dense_preset_argument(t)
    t.add_argument("--teacher-seed", type=int, default=0, help="seed of the simulated teachers (default: 0)")
    add_models_argument(t)
    f = parser.add_argument_group("fusion rule (MultiViewFusionConfig; defaults: OpenScene)")
    add_config_arguments(f, MultiViewFusionConfig)
    f.add_argument("--device", default="cpu", help="torch device for fusion and the teachers (default: cpu)")
    s = parser.add_argument_group("synthetic world (SynthConfig)")
    add_config_arguments(s, SynthConfig, only=("seed", "n_frames", "points_per_m2"), aliases={"n_frames": "--frames"})
    o = parser.add_argument_group("output")
    o.add_argument("--report", action="store_true",
                   help="classify the fused points against the class text embeddings; print 3D mIoU and per-class IoU")
    o.add_argument("--json", action="store_true", help="print the report as one JSON object")
    o.add_argument("--quiet", "--no-progress", action="store_true", help="no progress bars")


def _fusion_config(args):
    from sas_core.config import config_from_args
    from sas_core.geometry.multiview import MultiViewFusionConfig

    return config_from_args(MultiViewFusionConfig, args)


def _check_args(args):
    if bool(args.data) == bool(args.synthetic):
        raise ValueError("give exactly one source: --data ROOT or --synthetic")
    if args.frame_step < 1:
        raise ValueError(f"--frame-step must be >= 1, got {args.frame_step}")
    if args.n_files < 1:
        raise ValueError(f"--n-files must be >= 1, got {args.n_files}")
    if args.data and not args.out and not args.report:
        raise ValueError("--data needs --out DIR (where to write fused features) or --report")
    if args.json and not args.report:
        raise ValueError("--json prints the report: add --report")


def _make_teachers(names, vocabulary, args):
    """[(teacher, text_encoder)] for the requested teacher names (sas_core.teachers.registry)."""
    from sas_core.teachers.registry import build_teachers

    return build_teachers(names, vocabulary, seed=args.teacher_seed, clip_model=args.clip_model,
                          clip_checkpoint=args.clip_checkpoint, sam_model=args.sam_model,
                          sam_checkpoint=args.sam_checkpoint, device=args.device, **dense_options(args))


def classify(fused, text, chunk: int = 65536):
    """(N,) int64 argmax over the (K, C) class text embeddings; NO_FEATURE where no feature."""
    import numpy as np

    from sas_core.eval.metrics import NO_FEATURE
    from sas_core.text import text_labels

    labels = text_labels(fused.features, text, chunk=chunk)[0].cpu().numpy()
    return np.where(fused.mask.cpu().numpy(), labels, NO_FEATURE).astype(np.int64)


def _report(name, fused, labels, encoder, vocabulary):
    from sas_core.eval.metrics import evaluate
    from sas_core.text import class_embeddings

    text = class_embeddings(encoder, vocabulary)
    pred = classify(fused, text)
    result = evaluate(pred, labels, list(vocabulary))
    result["teacher"] = name
    result["coverage"] = float(fused.mask.float().mean()) if len(fused) else 0.0
    return result


def _print_reports(reports, header, as_json):
    from sas_core.eval.metrics import format_table, to_json

    if as_json:
        out = {"source": header, "teachers": {}}
        for r in reports:
            j = to_json({k: v for k, v in r.items() if k not in ("confusion",)})
            out["teachers"][r["teacher"]] = {
                "miou": j["miou"], "macc": j["macc"], "miou_present": j["miou_present"],
                "coverage": r["coverage"], "points": j["points"], "no_feature_points": j["no_feature_points"],
                "per_class": j["per_class"]}
        print(json.dumps(out, indent=2, sort_keys=True))
        return
    print(header)
    for r in reports:
        print()
        print(format_table(r, markdown=False,
                           title=f"teacher {r['teacher']}: fused 3D mIoU {100 * r['miou']:.1f} "
                                 f"(mAcc {100 * r['macc']:.1f}; {100 * r['coverage']:.1f}% of points got a feature)"))
    print()
    print("summary: " + ", ".join(f"{r['teacher']} mIoU {100 * r['miou']:.1f}" for r in reports))


def _run_synthetic(args, config) -> int:
    from sas_core.config import config_from_args
    from sas_core.data.fused_features import save_scene_features, write_text_space
    from sas_core.data.synthetic import SynthConfig, generate_scene
    from sas_core.geometry.multiview import fuse_frames

    t0 = time.perf_counter()
    scene = generate_scene(config_from_args(SynthConfig, args, with_lidar=False), progress=not args.quiet)
    vocabulary = tuple(scene.class_names)
    names = args.teacher or ["sim_dense", "sim_mask"]
    frames = scene.frames[::args.frame_step]
    reports = []
    for teacher, encoder in _make_teachers(names, vocabulary, args):
        fused = fuse_frames(scene.points.positions, frames, teacher, config, args.device,
                            progress=not args.quiet, total=len(frames))
        if args.out:
            write_text_space(args.out, encoder.config(), teacher.name)
            paths = save_scene_features(args.out, f"{scene.name}_{teacher.name}", fused.features, fused.mask,
                                        n_files=args.n_files, n_split_points=args.split_points,
                                        single_file=args.single_file)
            if not args.json:
                print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
        if args.report:
            reports.append(_report(teacher.name, fused, scene.points.labels, encoder, vocabulary))
    header = (f"SYNTHETIC world (not real data): scene {scene.name}, {len(scene.points)} points, "
              f"{len(frames)} frames {scene.intrinsics.width}x{scene.intrinsics.height}, simulated teachers; "
              f"{time.perf_counter() - t0:.1f} s")
    if args.report:
        _print_reports(reports, header, args.json)
    else:
        print(header)
    return 0


def _run_dataset(args, config) -> int:
    import numpy as np

    if args.save_masks:
        from sas_core.train.masks import has_masks

        if not args.out:
            raise ValueError("--save-masks writes next to the fused features: give --out")

    from sas_core.data.fused_features import fused_feature_paths, save_scene_features, scene_name, write_text_space
    from sas_core.data.openscene import list_scenes, load_openscene_scene
    from sas_core.geometry.multiview import fuse_frames
    from sas_core.text import parse_vocabulary

    root = Path(args.data)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    vocabulary = parse_vocabulary(args.vocabulary)
    names = args.teacher or ["sim_dense"]
    if args.out and len(names) > 1:
        raise ValueError("--out writes one teacher's features: pass a single --teacher")
    scenes = args.scene or list_scenes(root, args.split)
    if not scenes:
        raise ValueError(f"no scenes in {root / args.split}")
    teachers = _make_teachers(names, vocabulary, args)
    if args.save_masks and not all(has_masks(t) for t, _ in teachers):
        raise ValueError(f"--save-masks needs a mask teacher (sim_mask, mask_clip), got {', '.join(names)}")
    reports = {t.name: [] for t, _ in teachers}
    for name in scenes:
        sid = scene_name(name)
        if args.out and not args.overwrite and not args.report:
            have = fused_feature_paths(args.out, sid)
            if len(have) >= (1 if args.single_file else args.n_files):
                print(f"{sid}: fused features exist in {args.out}, skipped (--overwrite redoes them)", file=sys.stderr)
                continue
        for teacher, encoder in teachers:
            cloud, frames = load_openscene_scene(root, sid, split=args.split)
            frames = itertools.islice(frames, 0, None, args.frame_step)
            fused = fuse_frames(cloud.positions, frames, teacher, config, args.device, progress=not args.quiet)
            if args.out:
                write_text_space(args.out, encoder.config(), teacher.name)
                paths = save_scene_features(args.out, sid, fused.features, fused.mask, n_files=args.n_files,
                                            n_split_points=args.split_points, single_file=args.single_file)
                print(f"{sid}: {int(fused.mask.sum())}/{len(fused)} points got a {teacher.name} feature; "
                      f"wrote {len(paths)} file(s) to {args.out}", file=sys.stderr)
            if args.out and args.save_masks:
                from sas_core.train.masks import mask_file, scene_masks_from_views, teacher_mask_views

                _, frames = load_openscene_scene(root, sid, split=args.split)
                frames = itertools.islice(frames, 0, None, args.frame_step)
                masks = scene_masks_from_views(cloud.positions, teacher_mask_views(frames, teacher))
                path = masks.save(mask_file(args.out, sid))
                print(f"{sid}: {len(masks)} masks back-projected onto the points -> {path}", file=sys.stderr)
            if args.report:
                if np.all(cloud.labels == 255):
                    raise ValueError(f"{sid}: no point labels, cannot --report")
                reports[teacher.name].append((fused, cloud.labels, encoder))
    if args.report:
        from sas_core.eval.metrics import confusion_matrix, miou_macc
        from sas_core.text import class_embeddings

        out = []
        for tname, items in reports.items():
            if not items:
                continue
            conf = 0
            for fused, labels, encoder in items:
                pred = classify(fused, class_embeddings(encoder, vocabulary))
                conf = conf + confusion_matrix(pred, labels, len(vocabulary))
            result = miou_macc(conf, list(vocabulary))
            result["teacher"] = tname
            masks = [f.mask for f, _, _ in items]
            result["coverage"] = float(sum(int(m.sum()) for m in masks) / max(1, sum(len(m) for m in masks)))
            out.append(result)
        _print_reports(out, f"{root} ({args.split}): {len(scenes)} scene(s)", args.json)
    return 0


def run(args) -> int:
    _check_args(args)
    if any(t in ("dense_clip", "mask_clip") for t in args.teacher or ()):
        apply_model_paths(args, {"clip_model": "clip_model", "clip_checkpoint": "clip_checkpoint",
                                 "clip_preset": "clip_preset", "sam_model_type": "sam_model", "sam_checkpoint": "sam_checkpoint"})
    config = _fusion_config(args)
    if args.synthetic:
        return _run_synthetic(args, config)
    return _run_dataset(args, config)
