"""`sas distill`: distil fused 2D features into a sparse 3D network.

Data in the OpenScene layout (``--data ROOT`` with ``ROOT/<split>/<scene>.pth``) and fused 2D
feature files from `sas fuse` (``--features DIR``). Multi-process: launch with
``torchrun --nproc_per_node N -m sas_app.cli distill ...`` (gloo on CPU, NCCL on CUDA).
Interrupted runs continue from ``<out>/last.pt`` (``--no-resume`` starts over). Options of related
systems: ``--scene-labels PATH`` (3DSS-VLG scene-level labels) and ``--loss point,superpoint,mask``
(the mask-level loss of MaskField / XMask3D, masks in ``<features>/<scene>.masks.npz``). Every
:class:`sas_core.train.distill.DistillConfig` field is a flag with the dataclass default; the CLIP
text encoder's weights default to the models file's (``--models``, see docs/models.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

from sas_app.commands import add_models_argument, apply_model_paths

HELP = "distil fused 2D features into a sparse 3D network"

#: DistillConfig fields that get no flag (set by the caller, not by a user)
_SKIP = ("model_kwargs",)


def add_arguments(parser):
    from sas_core.config import add_config_arguments, field_choices
    from sas_core.geometry.superpoints import SuperpointConfig
    from sas_core.teachers.dense_clip import DenseClipConfig
    from sas_core.train.distill import DistillConfig

    parser.add_argument("--data", required=True, help="dataset root in the OpenScene layout (<root>/<split>/*.pth)")
    parser.add_argument("--features", required=True, help="folder of fused 2D feature files (sas fuse)")
    parser.add_argument("--split", default="train", help="training split (default: train)")
    parser.add_argument("--val-split", default=None,
                        help="validation split with labels ('' for none; default: val when DATA has one)")
    parser.add_argument("--superpoints", default=SuperpointConfig.method,
                        choices=field_choices(SuperpointConfig, "method"),
                        help="graph: ScanNet segmentator (indoor); points: every point its own (nuScenes) "
                             f"(default: {SuperpointConfig.method})")
    parser.add_argument("--vocabulary", "--vocab", default="scannet20",
                        help="class vocabulary for TESD and validation (default: scannet20)")
    parser.add_argument("--scene-labels", default=None, metavar="PATH",
                        help="scene-level labels (3DSS-VLG): a folder of <scene>.labels.txt (one class per line) or "
                             "a JSON manifest {scene: [classes]}; TESD pseudo-labels keep to each scene's list and, "
                             "with --scene-adapter (default), the embeddings-specialisation adapter refines the "
                             "targets first")
    t = parser.add_argument_group("text space of the fused features")
    t.add_argument("--text-encoder", default=None, choices=("open_clip", "synthetic"),
                   help="open_clip or the synthetic text space (default: the one `sas fuse` recorded in the "
                        "features folder's text_space.json, else open_clip)")
    add_config_arguments(t, DenseClipConfig, prefix="clip-", only=("model", "checkpoint"))
    t.add_argument("--text-dim", type=int, default=512, help="synthetic text space size (default: 512)")
    add_models_argument(t)
    add_config_arguments(parser, DistillConfig, skip=_SKIP, aliases={"out_dir": "--out"},
                         off_aliases={"progress": "--quiet"})


def run(args) -> int:
    import json

    from sas_core.config import config_from_args
    from sas_core.data.fused_features import read_text_space
    from sas_core.text import SyntheticTextEncoder, class_embeddings, parse_vocabulary, text_encoder_from_config
    from sas_core.train.datasets import OpenSceneScenes
    from sas_core.train.distill import DistillConfig, distill, init_distributed

    cfg = config_from_args(DistillConfig, args)
    rank, world = init_distributed(cfg.device)
    if world > 1 and cfg.device.startswith("cuda"):
        import torch

        cfg.device = f"cuda:{rank % max(1, torch.cuda.device_count())}"
    names = parse_vocabulary(args.vocabulary)
    recorded = read_text_space(args.features) if args.features else None
    rec = recorded["text_encoder"] if recorded else None
    kind = args.text_encoder or (rec["kind"] if rec else "open_clip")
    if rec and kind != rec["kind"]:
        raise ValueError(f"--text-encoder {args.text_encoder}, but {args.features} was fused in the "
                         f"{rec['kind']} text space (text_space.json): drop the flag")
    if kind == "synthetic":  # the recorded space exactly (its vocabulary, size and seed), else the flags'
        encoder = text_encoder_from_config(rec) if rec else SyntheticTextEncoder(names, dim=args.text_dim)
    else:
        from sas_core.text import OpenClipTextEncoder

        if rec:  # the CLIP model the features were fused with; its weights file when it is on this machine
            args.clip_model = rec.get("model") or args.clip_model
            if not args.clip_checkpoint and rec.get("checkpoint") and Path(rec["checkpoint"]).is_file():
                args.clip_checkpoint = rec["checkpoint"]
        apply_model_paths(args, {"clip_model": "clip_model", "clip_checkpoint": "clip_checkpoint"})
        encoder = OpenClipTextEncoder(args.clip_model, args.clip_checkpoint)
    text = class_embeddings(encoder, names)
    scene_labels = None
    if args.scene_labels:
        from sas_core.train.scene_labels import load_scene_labels

        scene_labels = load_scene_labels(args.scene_labels)
    train = OpenSceneScenes(args.data, args.split, args.features, superpoints=args.superpoints,
                            scene_labels=scene_labels, masks="mask" in cfg.loss_terms)
    train_scenes = [train[i] for i in range(len(train))]
    if scene_labels is not None:
        from sas_core.train.scene_labels import attach_scene_labels

        missing = attach_scene_labels(train_scenes, scene_labels, names)
        if missing and rank == 0:
            print(f"note: {len(missing)} of {len(train_scenes)} training scenes have no scene label list "
                  f"(unrestricted): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}", file=sys.stderr)
    val_scenes = None
    if args.val_split is None:
        args.val_split = "val" if (Path(args.data) / "val").is_dir() else ""
        if not args.val_split and rank == 0:
            print(f"no val split in {args.data}: training without validation", file=sys.stderr)
    if args.val_split:
        val = OpenSceneScenes(args.data, args.val_split, None, superpoints="points")
        val_scenes = [val[i] for i in range(len(val))]
    result = distill(cfg, train_scenes, text, names, val_scenes, encoder.config())
    if rank == 0:
        print(json.dumps({"checkpoint": result.checkpoint, "epochs": cfg.epochs,
                          "last": result.history[-1] if result.history else None}, indent=2, default=float))
    return 0
