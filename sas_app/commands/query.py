"""`sas query`: relevance of free text over a point cloud (or a live node with --ros)."""

from __future__ import annotations

from sas_app.commands import add_checkpoint_argument, add_inference_arguments, add_models_argument, \
    apply_model_paths, inference_config

HELP = "relevance of free text over a point cloud (or a live node with --ros)"


def add_arguments(parser):
    parser.add_argument("text", help="free text, e.g. \"a chair\" (any text with a CLIP text space, e.g. \"a soft "
                                     "place to sit\"; the demo's synthetic text space knows its class names)")
    add_checkpoint_argument(parser, "--checkpoint", help="distilled checkpoint or a name from the models file "
                                                         "(offline mode; default: the models file's checkpoint)")
    parser.add_argument("--cloud", help="point cloud: .ply, OpenScene .pth, .npy or .npz (offline mode)")
    parser.add_argument("--out", default="relevance.ply", help="relevance-coloured PLY to write (offline mode)")
    parser.add_argument("--top", type=int, default=10, help="print the K most relevant points")
    parser.add_argument("--cmap", default="turbo", help="matplotlib colormap of the relevance colours")
    parser.add_argument("--device", default="cpu", help="torch device")
    add_models_argument(parser)
    add_inference_arguments(parser)
    ros = parser.add_argument_group("live node (--ros)")
    ros.add_argument("--ros", action="store_true", help="ask a running sas mapping node instead (TextQuery service)")
    ros.add_argument("--service", default=None, help="TextQuery service name (default: the node's)")
    ros.add_argument("--threshold", type=float, default=0.0, help="min relevance (0 = node default)")
    ros.add_argument("--max-points", type=int, default=0, help="max returned points (0 = node default)")
    ros.add_argument("--max-objects", type=int, default=0, help="max objects per text (0 = node default)")
    ros.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the service")
    ros.add_argument("--json", action="store_true", help="print the node's answer as JSON")


def run(args) -> int:
    if args.ros:
        from sas_ros.query_client import run_cli  # the application layer may import both sides

        args.texts = [args.text]
        return run_cli(args)
    apply_model_paths(args, {"checkpoint": "checkpoint"})
    if not args.checkpoint or not args.cloud:
        raise ValueError("offline queries need --checkpoint and --cloud (or use --ros for a live node)")
    from pathlib import Path

    if Path(args.out).suffix.lower() != ".ply":
        raise ValueError(f"--out {args.out}: the relevance cloud is written as PLY; give a .ply name")
    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder; give a .ply file name")
    import numpy as np

    from sas_core.infer import Segmenter, load_point_cloud
    from sas_core.io import write_ply
    from sas_core.viz import relevance_colors

    cloud = load_point_cloud(args.cloud)
    seg = Segmenter.from_checkpoint(args.checkpoint, device=args.device, config=inference_config(args))
    feats = seg.features(cloud.positions, cloud.colors, progress=True)
    rel = seg.relevance(feats, args.text)
    write_ply(args.out, cloud.positions, colors=relevance_colors(rel, args.cmap), scores=rel)
    print(f"{args.text!r}: relevance over {len(rel)} points in [{rel.min():.3f}, {rel.max():.3f}], "
          f"mean {rel.mean():.3f} -> {args.out}")
    k = max(0, min(int(args.top), len(rel)))
    if k:
        top = np.argsort(-rel, kind="stable")[:k]
        print(f"top {k} points (index, x, y, z, relevance):")
        for r, i in enumerate(top, 1):
            x, y, z = cloud.positions[i]
            print(f"  {r}. #{i}  ({x:.2f}, {y:.2f}, {z:.2f})  {rel[i]:.4f}")
    return 0
