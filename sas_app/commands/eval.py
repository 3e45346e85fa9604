"""`sas eval`: evaluate predicted labels (OpenScene protocol mIoU/mAcc) or 3D instances (``--instances``:
ScanNet's instance AP / AP50 / AP25, class-agnostic and per class)."""

from __future__ import annotations

from sas_app.commands import add_checkpoint_argument, add_inference_arguments, add_models_argument, \
    apply_model_paths, inference_config

HELP = "evaluate predicted labels (OpenScene protocol mIoU/mAcc) or instances (--instances: ScanNet AP)"

LONG_TAIL_DIRS = {21: "matterport_3d", 40: "matterport_3d_40", 80: "matterport_3d_80", 160: "matterport_3d_160"}


def add_arguments(parser):
    src = parser.add_argument_group("what to evaluate (labels, or a checkpoint over a dataset)")
    src.add_argument("--pred", help="predicted labels (.npy, or a PLY with a 'label' property)")
    src.add_argument("--gt", help="ground truth: OpenScene .pth, .npy labels, or a PLY with 'label'")
    add_checkpoint_argument(src, "--checkpoint", help="distilled checkpoint (or a name from the models file) "
                                                      "predicting every scene of --data (default: the models "
                                                      "file's checkpoint)")
    src.add_argument("--data", help="folder of OpenScene scenes (<scene>.pth), e.g. data/scannet_3d/val; "
                                    "with --long-tail the folder holding matterport_3d{,_40,_80,_160}/")
    src.add_argument("--split", default="test", help="split folder used with --long-tail (default: test)")
    src.add_argument("--fused", help="folder of OpenScene fused 2D features (<scene>_0.pt) for "
                                     "--feature-type fusion/ensemble")
    src.add_argument("--feature-type", choices=("distill", "fusion", "ensemble"), default="distill",
                     help="3D features, fused 2D features (no-feature points = 256), or OpenScene's ensemble")
    parser.add_argument("--vocabulary", "--vocab", default="scannet20",
                        help="vocabulary the labels index (scannet20, matterport21/40/80/160, nuscenes16, a file, "
                             "or comma-separated names)")
    parser.add_argument("--scene-labels", default=None, metavar="PATH",
                        help="with --checkpoint --data: classify each scene among the classes of its scene-level "
                             "label list only (3DSS-VLG; a folder of <scene>.labels.txt or a JSON manifest); "
                             "scenes without a list are unrestricted")
    parser.add_argument("--long-tail", action="store_true",
                        help="Matterport3D K=21/40/80/160 from one set of features (with --checkpoint)")
    parser.add_argument("--openscene-other", action="store_true",
                        help="prompt the catch-all class as 'other' (OpenScene's evaluation)")
    parser.add_argument("--no-feature", choices=("openscene", "wrong"), default="openscene",
                        help="no-feature points in IoU: left out as OpenScene does, or counted as false negatives")
    parser.add_argument("--json", dest="json_out", help="write all metrics as JSON here")
    parser.add_argument("--markdown", help="write the per-class table as Markdown here")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N scenes")
    add_models_argument(parser)
    add_inference_arguments(parser)
    from sas_app.splat import add_eval_arguments

    add_eval_arguments(parser)
    from sas_app.commands.segment import add_instance_arguments

    g = add_instance_arguments(parser, help=(
        "evaluate 3D instances with ScanNet's protocol (AP over IoU 0.50:0.05:0.90, AP50, AP25; class-agnostic and "
        "per class): --pred PLY (with 'instance' and 'label'; scores from <pred>.instances.json) --gt FILE, or "
        "--checkpoint --data (instances from the features), or --synthetic SEED..."))
    g.add_argument("--synthetic", type=int, nargs="+", metavar="SEED",
                   help="with --instances: evaluate on synthetic rooms of these seeds (simulated teachers, "
                        "capability-fused features; no checkpoint; SYNTHETIC data)")
    g.add_argument("--frames", type=int, default=40, help="--synthetic: RGB-D frames per room (default 40)")
    g.add_argument("--masks", choices=("teacher", "oracle", "none", "sam"), default=None,
                   help="2D masks for the instances: the simulated mask teacher (--synthetic default), the rendered "
                        "instance images (oracle), none (region growing on the features; --data default) or SAM "
                        "automatic masks on the scene's 2D frames (--data, needs --sam-checkpoint)")
    g.add_argument("--sam-checkpoint", default=None, help="SAM weights for --masks sam")
    g.add_argument("--sam-model", default="vit_b", choices=("vit_h", "vit_l", "vit_b"), help="SAM model type")
    g.add_argument("--instance-gt", default=None,
                   help="folder of <scene>.npy per-point ground-truth instance ids (-1 none), for .pth files "
                        "without a 4th element of instance ids")


def _labels(path, what: str):
    from pathlib import Path

    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} not found")
    if path.suffix == ".npy":
        a = np.load(path, allow_pickle=False)
        if a.ndim != 1:
            raise ValueError(f"{path}: labels must be 1-D, got {a.shape}")
        return a.astype(np.int64)
    from sas_core.infer import load_point_cloud

    pc = load_point_cloud(path)
    if pc.labels is None:
        raise ValueError(f"{path}: has no labels")
    return pc.labels


def _scenes(folder, limit=None):
    from pathlib import Path

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} not found")
    paths = sorted(folder.glob("*.pth"))
    if not paths:
        raise FileNotFoundError(f"no <scene>.pth files in {folder}")
    return paths[:limit] if limit else paths


def _scene_features(seg, path, cloud, args):
    """(features (N, C) torch f16, mask (N,) bool or None) for one scene by --feature-type."""
    import numpy as np

    if args.feature_type == "distill":
        return seg.features(cloud.positions, cloud.colors), None
    if not args.fused:
        raise ValueError(f"--feature-type {args.feature_type} needs --fused")
    from sas_core.data.fused_features import load_scene_features

    fused = load_scene_features(args.fused, path.stem, n_points=len(cloud), dim=seg.dim)
    mask = np.asarray(fused.mask.cpu().numpy(), dtype=bool)
    if args.feature_type == "fusion":
        return fused.features, mask
    feats, _ = seg.ensemble(seg.features(cloud.positions, cloud.colors), fused.features, mask)
    return feats, None


def _report(result, names, title, args):
    from sas_core.eval import format_table

    print(format_table(result, markdown=False, title=title))
    print(f"mIoU {result['miou'] * 100:.2f}  mAcc {result['macc'] * 100:.2f}  "
          f"(over present classes: mIoU {result['miou_present'] * 100:.2f}, mAcc {result['macc_present'] * 100:.2f})")


def _write(args, payload, markdown):
    import json

    from sas_core.io import atomic_write_text

    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(payload, indent=2, sort_keys=True) + "\n")
        print(f"metrics -> {args.json_out}")
    if args.markdown:
        atomic_write_text(args.markdown, markdown + "\n")
        print(f"table -> {args.markdown}")


def _gt_instances(path, instance_dir=None):
    """(labels (N,), instance ids (N,)) of a ground-truth file: a PLY with 'label' and 'instance', an
    .npz with 'labels' and 'instances', or an OpenScene .pth whose 4th element (or dict key
    'instances') holds per-point instance ids (or with <instance_dir>/<scene>.npy next to it)."""
    from pathlib import Path

    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file {path} not found")
    inst = None
    if instance_dir is not None:
        side = Path(instance_dir) / f"{path.stem}.npy"
        if not side.is_file():
            raise FileNotFoundError(f"{side} not found (--instance-gt)")
        inst = np.load(side, allow_pickle=False)
    suffix = path.suffix.lower()
    if suffix == ".ply":
        from sas_core.io import read_ply

        d = read_ply(path)
        if "label" not in d or (inst is None and "instance" not in d):
            raise ValueError(f"{path}: a ground-truth PLY needs 'label' and 'instance' properties")
        labels = d["label"]
        inst = d["instance"] if inst is None else inst
    elif suffix == ".npz":
        z = np.load(path, allow_pickle=False)
        if "labels" not in z.files or (inst is None and "instances" not in z.files):
            raise ValueError(f"{path}: a ground-truth .npz needs 'labels' and 'instances', has {sorted(z.files)}")
        labels = z["labels"]
        inst = z["instances"] if inst is None else inst
    elif suffix == ".pth":
        from sas_core.data.openscene import read_pth
        from sas_core.io import load_torch_file

        _, _, labels = read_pth(path)
        if inst is None:
            data = load_torch_file(path, what="OpenScene point file")
            if isinstance(data, dict):
                inst = data.get("instances", data.get("instance_labels"))
            elif isinstance(data, (tuple, list)) and len(data) >= 4:
                inst = data[3]
            if inst is None:
                raise ValueError(f"{path}: no instance ids (a 4th element or 'instances'); give --instance-gt DIR")
            inst = inst.numpy() if hasattr(inst, "numpy") else np.asarray(inst)
    else:
        raise ValueError(f"{path}: ground truth for instances must be .ply, .npz or .pth")
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    inst = np.asarray(inst).astype(np.int64).reshape(-1)
    if labels.shape != inst.shape:
        raise ValueError(f"{path}: {len(labels)} labels but {len(inst)} instance ids")
    inst[inst < 0] = -1  # -100 and other negatives: no instance
    return labels, inst


def _pred_instances(path):
    """(masks, labels, scores) of a predicted instance PLY ('instance', 'label'), scores from
    <pred>.instances.json when it exists (the label score), else 1."""
    import json
    from pathlib import Path

    import numpy as np

    from sas_core.io import read_ply

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prediction file {path} not found")
    d = read_ply(path)
    if "instance" not in d:
        raise ValueError(f"{path}: no 'instance' property (write it with `sas segment --instances`)")
    ids = np.asarray(d["instance"]).astype(np.int64)
    labels = np.asarray(d["label"]).astype(np.int64) if "label" in d else None
    scores = {}
    side = path.with_suffix(".instances.json")
    if side.is_file():
        for rec in json.loads(side.read_text()).get("instances", []):
            scores[int(rec["id"])] = rec.get("score") if rec.get("score") is not None else 1.0
    masks, plabels, pscores = [], [], []
    for i in np.unique(ids[ids >= 0]).tolist():
        idx = np.flatnonzero(ids == i)
        masks.append(idx)
        if labels is not None:  # the instance's majority point label
            plabels.append(int(np.bincount(np.clip(labels[idx], 0, None)).argmax()))
        pscores.append(float(scores.get(i, 1.0)))
    return masks, (np.asarray(plabels, np.int64) if labels is not None else None), np.asarray(pscores)


def _instance_report(scenes, names, args, title: str, extra: dict) -> int:
    from sas_core.eval import to_json
    from sas_core.eval.instances import evaluate_instances, format_instance_table

    agnostic = evaluate_instances(scenes, names, class_agnostic=True)
    per_class = None
    if all(s.pred_labels is not None for s in scenes):
        per_class = evaluate_instances(scenes, names)
    tables = [format_instance_table(agnostic, title=f"### {title}: class-agnostic")]
    print(format_instance_table(agnostic, markdown=False, title=f"{title} (class-agnostic)"))
    pct = (lambda v: "nan" if v != v else f"{v * 100:.1f}")
    print(f"class-agnostic: AP {pct(agnostic['ap'])}  AP50 {pct(agnostic['ap50'])}  AP25 {pct(agnostic['ap25'])}")
    payload = {"class_agnostic": to_json({k: v for k, v in agnostic.items()}), **extra}
    if per_class is not None:
        print(format_instance_table(per_class, markdown=False, title=f"{title} (per class)"))
        print(f"per class: AP {pct(per_class['ap'])}  AP50 {pct(per_class['ap50'])}  AP25 {pct(per_class['ap25'])}")
        payload["per_class"] = to_json({k: v for k, v in per_class.items()})
        tables.append(format_instance_table(per_class, title=f"### {title}: per class"))
    _write(args, payload, "\n\n".join(tables))
    return 0


def _run_instances(args) -> int:
    import numpy as np

    from sas_app.commands.segment import instance_config
    from sas_core.eval.instances import SceneInstances
    from sas_core.text import SCANNET_20, parse_vocabulary

    cfg = instance_config(args)
    if args.pred or args.gt:
        if not (args.pred and args.gt):
            raise ValueError("--pred and --gt go together")
        names = parse_vocabulary(args.vocabulary)
        labels, inst = _gt_instances(args.gt, args.instance_gt)
        masks, plabels, scores = _pred_instances(args.pred)
        if any(len(m) and m[-1] >= len(labels) for m in masks):
            raise ValueError(f"{args.pred} has more points than {args.gt} ({len(labels)})")
        scene = SceneInstances(labels, inst, masks, plabels, scores)
        return _instance_report([scene], names, args, f"{args.pred} vs {args.gt}", {"scenes": 1})
    if args.synthetic:
        from sas_core.data.synthetic import SynthConfig, generate_scene
        from sas_core.instances.synthetic import fused_teacher_features, simulated_teachers, synthetic_instances
        from sas_core.text import SyntheticTextEncoder, class_embeddings

        names = list(SCANNET_20)
        masks = args.masks or "teacher"
        if masks == "sam":
            raise ValueError("--masks sam needs real frames (--data); the synthetic world has teacher|oracle|none")
        enc = SyntheticTextEncoder(names, dim=128, seed=0)
        text = class_embeddings(enc, names).float().numpy()
        scenes = []
        for seed in args.synthetic:
            room = generate_scene(SynthConfig(seed=seed, n_frames=args.frames, with_lidar=False))
            teachers = simulated_teachers(enc, seed)
            feats = fused_teacher_features(room, teachers, text, "capability")
            found, _, _ = synthetic_instances(room, enc, names, text, masks=masks, features=feats, config=cfg,
                                              teachers=teachers)
            pc = room.points
            scenes.append(SceneInstances(pc.labels, pc.instances, [i.indices for i in found],
                                         [i.label for i in found], [i.score for i in found]))
            print(f"{room.name}: {len(found)} instances ({len(pc)} points, {args.frames} frames)")
        return _instance_report(scenes, names, args, f"SYNTHETIC rooms {args.synthetic} (masks: {masks})",
                                {"scenes": len(scenes), "synthetic": True, "masks": masks})
    if args.data:
        apply_model_paths(args, {"checkpoint": "checkpoint"})
    if not (args.checkpoint and args.data):
        raise ValueError("--instances: give --pred and --gt, --checkpoint and --data, or --synthetic SEED...")
    from pathlib import Path

    from tqdm import tqdm

    from sas_core.infer import Segmenter, load_point_cloud
    from sas_core.instances import cloud_instances

    names = parse_vocabulary(args.vocabulary)
    seg = Segmenter.from_checkpoint(args.checkpoint, device=args.device, config=inference_config(args))
    seg.set_vocabulary(names, openscene_other=args.openscene_other)
    masks = args.masks or "none"
    source = None
    if masks == "sam":
        from sas_core.instances import SamMaskSource
        from sas_core.teachers.mask_teacher import MaskTeacherConfig

        source = SamMaskSource(MaskTeacherConfig(sam_model=args.sam_model, sam_checkpoint=args.sam_checkpoint,
                                                 device=args.device))
    elif masks != "none":
        raise ValueError(f"--masks {masks} is for --synthetic; with --data use none or sam")
    scenes = []
    for path in tqdm(_scenes(args.data, args.limit), desc="scenes"):
        cloud = load_point_cloud(path)
        labels, inst = _gt_instances(path, args.instance_gt)
        feats, _ = _scene_features(seg, path, cloud, args)
        frames = None
        if source is not None:
            from sas_core.data.openscene import load_openscene_scene

            _, frames = load_openscene_scene(Path(args.data).parent, path.stem, split=Path(args.data).name)
        found = cloud_instances(cloud.positions, feats, seg.text_embeddings.cpu(), names, normals=cloud.normals,
                                frames=frames, mask_source=source, config=cfg)
        scenes.append(SceneInstances(labels, inst, [i.indices for i in found], [i.label for i in found],
                                     [i.score for i in found]))
    return _instance_report(scenes, names, args, f"{args.checkpoint} on {args.data} (masks: {masks})",
                            {"scenes": len(scenes), "checkpoint": str(args.checkpoint), "masks": masks})


def run(args) -> int:
    import numpy as np

    from sas_core.eval import evaluate, format_table, group_means, long_tail_groups, to_json
    from sas_core.text import parse_vocabulary

    if args.instances:
        return _run_instances(args)
    if args.gaussians:
        from sas_app.splat import run_eval

        return run_eval(args, _write)

    if args.pred or args.gt:
        if not (args.pred and args.gt):
            raise ValueError("--pred and --gt go together")
        names = parse_vocabulary(args.vocabulary)
        pred, gt = _labels(args.pred, "prediction"), _labels(args.gt, "ground-truth")
        result = evaluate(pred, gt, names, no_feature=args.no_feature)
        _report(result, names, f"{args.pred} vs {args.gt}", args)
        _write(args, to_json({k: v for k, v in result.items()}), format_table(result))
        return 0
    if args.data:
        apply_model_paths(args, {"checkpoint": "checkpoint"})
    if not (args.checkpoint and args.data):
        raise ValueError("give --pred and --gt, or --checkpoint and --data")

    from tqdm import tqdm

    from sas_core.infer import Segmenter, load_point_cloud
    from sas_core.text import get_vocabulary

    seg = Segmenter.from_checkpoint(args.checkpoint, device=args.device, config=inference_config(args))
    if args.long_tail:
        from pathlib import Path

        if args.scene_labels:
            raise ValueError("--scene-labels is not supported with --long-tail")

        root = Path(args.data)
        ks = [k for k, d in LONG_TAIL_DIRS.items() if (root / d / args.split).is_dir()]
        if 21 not in ks:
            raise FileNotFoundError(f"{root / LONG_TAIL_DIRS[21] / args.split} not found (OpenScene layout)")
        vocabs = {k: get_vocabulary(f"matterport{k}") for k in ks}
        embeddings = {}
        for k in ks:
            seg.set_vocabulary(vocabs[k], openscene_other=args.openscene_other)
            embeddings[k] = seg.text_embeddings
        preds = {k: [] for k in ks}
        gts = {k: [] for k in ks}
        for path in tqdm(_scenes(root / LONG_TAIL_DIRS[21] / args.split, args.limit), desc="scenes"):
            cloud = load_point_cloud(path)
            feats, mask = _scene_features(seg, path, cloud, args)
            for k in ks:
                other = root / LONG_TAIL_DIRS[k] / args.split / path.name
                if not other.is_file():
                    raise FileNotFoundError(f"{other} missing (every K needs the same scenes)")
                gt_k = load_point_cloud(other).labels
                if gt_k is None or len(gt_k) != len(cloud):
                    raise ValueError(f"{other}: labels missing or a different point count")
                seg.text_embeddings = embeddings[k]
                p, _ = seg.classify(feats)
                if mask is not None:
                    p[~mask] = 256
                preds[k].append(p)
                gts[k].append(gt_k)
        payload, tables = {"long_tail": {}}, []
        for k in ks:
            r = evaluate(np.concatenate(preds[k]), np.concatenate(gts[k]), vocabs[k], no_feature=args.no_feature)
            groups = group_means(r, long_tail_groups(k))
            _report(r, vocabs[k], f"Matterport3D K={k}", args)
            payload["long_tail"][str(k)] = {**to_json(r), "groups": groups}
            tables.append(format_table(r, title=f"### K = {k}"))
        summary = ["| K | mIoU | mAcc |", "|---:|---:|---:|"] + [
            f"| {k} | {payload['long_tail'][str(k)]['miou'] * 100:.1f} | {payload['long_tail'][str(k)]['macc'] * 100:.1f} |"
            for k in ks]
        print("\n".join(summary))
        _write(args, payload, "\n\n".join(["\n".join(summary)] + tables))
        return 0

    names = parse_vocabulary(args.vocabulary)
    seg.set_vocabulary(names, openscene_other=args.openscene_other)
    scene_labels, restricted = None, 0
    if args.scene_labels:
        from sas_core.train.scene_labels import load_scene_labels

        scene_labels = load_scene_labels(args.scene_labels)
    preds, gts = [], []
    for path in tqdm(_scenes(args.data, args.limit), desc="scenes"):
        cloud = load_point_cloud(path)
        if cloud.labels is None:
            raise ValueError(f"{path}: no ground-truth labels")
        feats, mask = _scene_features(seg, path, cloud, args)
        allowed = None
        if scene_labels is not None and path.stem in scene_labels:
            from sas_app.commands.segment import scene_allowed

            allowed = scene_allowed(args.scene_labels, path.stem, names, scene_labels)
            restricted += 1
        p, _ = seg.classify(feats, allowed)
        if mask is not None:
            p[~mask] = 256
        preds.append(p)
        gts.append(cloud.labels)
    result = evaluate(np.concatenate(preds), np.concatenate(gts), names, no_feature=args.no_feature)
    _report(result, names, f"{args.checkpoint} on {args.data} ({args.feature_type})", args)
    payload = {**to_json(result), "scenes": len(preds), "feature_type": args.feature_type,
               "checkpoint": str(args.checkpoint)}
    if scene_labels is not None:
        print(f"scene labels: {restricted} of {len(preds)} scenes classified among their listed classes")
        payload["scene_labels"] = {"path": str(args.scene_labels), "restricted_scenes": restricted}
    _write(args, payload, format_table(result))
    return 0
