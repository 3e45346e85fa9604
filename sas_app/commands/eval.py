"""`sas eval`: evaluate predicted labels (OpenScene protocol mIoU/mAcc)."""

from __future__ import annotations

from sas_app.commands import add_checkpoint_argument, add_inference_arguments, add_models_argument, \
    apply_model_paths, inference_config

HELP = "evaluate predicted labels (OpenScene protocol mIoU/mAcc)"

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


def run(args) -> int:
    import numpy as np

    from sas_core.eval import evaluate, format_table, group_means, long_tail_groups, to_json
    from sas_core.text import parse_vocabulary

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
    preds, gts = [], []
    for path in tqdm(_scenes(args.data, args.limit), desc="scenes"):
        cloud = load_point_cloud(path)
        if cloud.labels is None:
            raise ValueError(f"{path}: no ground-truth labels")
        feats, mask = _scene_features(seg, path, cloud, args)
        p, _ = seg.classify(feats)
        if mask is not None:
            p[~mask] = 256
        preds.append(p)
        gts.append(cloud.labels)
    result = evaluate(np.concatenate(preds), np.concatenate(gts), names, no_feature=args.no_feature)
    _report(result, names, f"{args.checkpoint} on {args.data} ({args.feature_type})", args)
    payload = {**to_json(result), "scenes": len(preds), "feature_type": args.feature_type,
               "checkpoint": str(args.checkpoint)}
    _write(args, payload, format_table(result))
    return 0
