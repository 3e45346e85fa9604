"""`sas distill`: distil fused 2D features into a sparse 3D network.

Data in the OpenScene layout (``--data ROOT`` with ``ROOT/<split>/<scene>.pth``) and fused 2D
feature files from `sas fuse` (``--features DIR``). Multi-process: launch with
``torchrun --nproc_per_node N -m sas_app.cli distill ...`` (gloo on CPU, NCCL on CUDA).
Interrupted runs continue from ``<out>/last.pt`` (``--no-resume`` starts over).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re

HELP = "distil fused 2D features into a sparse 3D network"

_SKIP = {"model_kwargs", "out_dir", "resume", "progress"}


def field_help(cls) -> dict:
    """One-line help of each dataclass field, from the ``# comment`` after its definition."""
    helps = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+)\s*:[^=]+=.*#\s*(.+)$", line)
        if m:
            helps[m.group(1)] = m.group(2).strip()
    return helps


def add_config_arguments(parser, cls, skip=()) -> None:
    """``--field-name`` options for the fields of dataclass ``cls`` (defaults and help from it)."""
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        text = f"{helps.get(f.name, '')} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction, help=text)
        elif isinstance(default, (tuple, list)):
            kind = type(default[0]) if default else str
            parser.add_argument(flag, dest=f.name, nargs="+", type=kind, default=default, help=text)
        elif isinstance(default, dict) or default is None:
            continue
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=default, help=text)


def add_arguments(parser):
    from sas_core.train.distill import DistillConfig

    parser.add_argument("--data", required=True, help="dataset root in the OpenScene layout (<root>/<split>/*.pth)")
    parser.add_argument("--features", required=True, help="folder of fused 2D feature files (sas fuse)")
    parser.add_argument("--split", default="train", help="training split (default: train)")
    parser.add_argument("--val-split", default="val", help="validation split with labels ('' for none; default: val)")
    parser.add_argument("--superpoints", default="graph", choices=("graph", "points"),
                        help="graph: ScanNet segmentator (indoor); points: every point its own (nuScenes)")
    parser.add_argument("--vocabulary", default="scannet_20", help="class vocabulary for TESD and validation")
    parser.add_argument("--text-encoder", default="open_clip", choices=("open_clip", "synthetic"),
                        help="text space of the fused features")
    parser.add_argument("--clip-model", default="ViT-B-16", help="open_clip model name")
    parser.add_argument("--clip-checkpoint", default=None, help="local open_clip weights file")
    parser.add_argument("--text-dim", type=int, default=512, help="synthetic text space size")
    parser.add_argument("--out", default="distill_output", help="checkpoints and logs (default: distill_output)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if <out>/last.pt exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_arguments(parser, DistillConfig, skip=_SKIP)


def run(args) -> int:
    import json

    from sas_core.text import SyntheticTextEncoder, class_embeddings, parse_vocabulary
    from sas_core.train.datasets import OpenSceneScenes
    from sas_core.train.distill import DistillConfig, distill, init_distributed

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig) if f.name not in _SKIP}
    cfg = DistillConfig(**values, out_dir=args.out, resume=not args.no_resume, progress=not args.quiet)
    rank, world = init_distributed(cfg.device)
    if world > 1 and cfg.device.startswith("cuda"):
        import torch

        cfg.device = f"cuda:{rank % max(1, torch.cuda.device_count())}"
    names = parse_vocabulary(args.vocabulary)
    if args.text_encoder == "synthetic":
        encoder = SyntheticTextEncoder(names, dim=args.text_dim)
    else:
        from sas_core.text import OpenClipTextEncoder

        encoder = OpenClipTextEncoder(args.clip_model, args.clip_checkpoint)
    text = class_embeddings(encoder, names)
    train = OpenSceneScenes(args.data, args.split, args.features, superpoints=args.superpoints)
    train_scenes = [train[i] for i in range(len(train))]
    val_scenes = None
    if args.val_split:
        val = OpenSceneScenes(args.data, args.val_split, None, superpoints="points")
        val_scenes = [val[i] for i in range(len(val))]
    result = distill(cfg, train_scenes, text, names, val_scenes, encoder.config())
    if rank == 0:
        print(json.dumps({"checkpoint": result.checkpoint, "epochs": cfg.epochs,
                          "last": result.history[-1] if result.history else None}, indent=2, default=float))
    return 0
