"""`sas segment`: label a point cloud with a distilled checkpoint (``--instances``: and split it into objects)."""

from __future__ import annotations

from sas_core.config import Recorded

from sas_app.commands import add_inference_arguments, add_models_argument, apply_model_paths, inference_config

HELP = "label a point cloud with a distilled checkpoint"


def add_arguments(parser):
    parser.add_argument("checkpoint", nargs="?", default=None, action=Recorded,
                        help="distilled checkpoint (.pt) written by `sas distill`, or a name from the models file "
                             "(default: the models file's checkpoint)")
    parser.add_argument("cloud", help="point cloud: .ply, OpenScene .pth, .npy (N,3 or N,6) or .npz "
                                      "(with --gaussians: a 3D Gaussian splat PLY)")
    from sas_app.splat import SEGMENT_HELP

    parser.add_argument("--gaussians", action="store_true", help=SEGMENT_HELP)
    parser.add_argument("--vocabulary", "--vocab", default="scannet20",
                        help="named vocabulary (scannet20, matterport21/40/80/160, nuscenes16), a file with one "
                             "class per line, or comma-separated names \"chair,table,lamp\" (default: scannet20)")
    parser.add_argument("--templates", default=None,
                        help="prompt template with {} or an ensemble name (default: \"a {} in a scene\")")
    parser.add_argument("--scene-labels", default=None, metavar="PATH",
                        help="scene-level labels (3DSS-VLG): the classes present, as a <scene>.labels.txt (one class "
                             "per line), a folder of them or a JSON manifest {scene: [classes]} (scene = the cloud's "
                             "file stem); classes not listed are never chosen")
    parser.add_argument("--out", default="segmented.ply", help="labelled PLY to write; labels also go to <out>.npy")
    parser.add_argument("--fused", default=None,
                        help="optional OpenScene fused 2D feature file (.pt) of this cloud: 2D-3D ensemble")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    add_instance_arguments(parser)
    add_models_argument(parser)
    add_inference_arguments(parser)


SEGMENT_INSTANCES_HELP = ("also split the cloud into labelled object instances (superpoints + region growing on "
                          "the features): instance ids go into the PLY ('instance', -1 = none) and the instances "
                          "into <out>.instances.json")


def add_instance_arguments(parser, help: str = SEGMENT_INSTANCES_HELP):
    """``--instances`` and the :class:`sas_core.instances.InstanceConfig` flags (``--instance-*``);
    returns the argument group."""
    from sas_core.config import add_config_arguments
    from sas_core.instances.clustering import InstanceConfig

    group = parser.add_argument_group("3D instances (InstanceConfig)")
    group.add_argument("--instances", action="store_true", help=help)
    add_config_arguments(group, InstanceConfig, prefix="instance-")
    return group


def instance_config(args):
    from sas_core.config import config_from_args
    from sas_core.instances.clustering import InstanceConfig

    return config_from_args(InstanceConfig, args, prefix="instance-")


def scene_allowed(spec, scene: str, names, labels=None):
    """(K,) bool classes of ``scene``'s label list in ``spec`` (``--scene-labels``), None without one.

    ``labels``: an already loaded {scene: classes} of ``spec``."""
    if not spec:
        return None
    from sas_core.train.scene_labels import class_mask, load_scene_labels, scene_list

    labels = load_scene_labels(spec) if labels is None else labels
    return class_mask(scene_list(labels, scene, str(spec)), names, scene)


def write_instances(out, instances, names, n_points: int, source: str) -> "Path":
    """Write ``<out>.instances.json`` (plain JSON) next to the PLY; returns its path."""
    import json
    from pathlib import Path

    from sas_core.instances import instances_json
    from sas_core.io import atomic_write_text

    path = Path(out).with_suffix(".instances.json")
    atomic_write_text(path, json.dumps(instances_json(instances, names, n_points, source, with_indices=True)) + "\n")
    return path


def run(args) -> int:
    from pathlib import Path

    import numpy as np

    from sas_core.infer import Segmenter, load_point_cloud
    from sas_core.io import atomic_path, write_ply
    from sas_core.text import parse_vocabulary
    from sas_core.viz import label_colors

    apply_model_paths(args, {"checkpoint": "checkpoint"})
    if not args.checkpoint:
        raise ValueError("no checkpoint: give CHECKPOINT or set checkpoint in the models file (--models)")
    if args.gaussians:
        from sas_app.splat import run_segment

        return run_segment(args)
    names = parse_vocabulary(args.vocabulary)
    cloud = load_point_cloud(args.cloud)
    seg = Segmenter.from_checkpoint(args.checkpoint, device=args.device, config=inference_config(args))
    seg.set_vocabulary(names, args.templates)
    feats = seg.features(cloud.positions, cloud.colors, progress=True)
    used_2d = None
    if args.fused:
        from sas_core.data.fused_features import load_fused_features

        feat, mask = load_fused_features(args.fused, dim=seg.dim)
        if mask.shape[0] != len(cloud):
            raise ValueError(f"{args.fused}: mask_full has {mask.shape[0]} points, the cloud has {len(cloud)}")
        import torch

        dense = torch.zeros((len(cloud), seg.dim), dtype=torch.float16)
        dense[mask] = feat
        feats, used_2d = seg.ensemble(feats, dense, mask.numpy())
    allowed = scene_allowed(args.scene_labels, Path(args.cloud).stem, names)
    labels, scores = seg.classify(feats, allowed)
    out = Path(args.out)
    extra, instances = {}, None
    if args.instances:
        from sas_core.instances import cloud_instances, instance_ids

        instances = cloud_instances(cloud.positions, feats, seg.text_embeddings.cpu(), names, normals=cloud.normals,
                                    config=instance_config(args))
        extra["instance"] = instance_ids(len(cloud), instances).astype(np.int32)
    write_ply(out, cloud.positions, colors=label_colors(labels), labels=labels, scores=scores, **extra)
    npy = out.with_suffix(".npy")
    with atomic_path(npy) as tmp:
        np.save(tmp, labels)
    te = (seg.checkpoint_config.get("text_encoder") or {}).get("kind")
    print(f"{len(cloud)} points, {len(names)} classes -> {out} (labels: {npy})")
    if te == "synthetic":
        print("note: synthetic text space (checkpoint trained on the synthetic world)")
    if used_2d is not None:
        print(f"2D-3D ensemble: {used_2d.mean() * 100:.1f}% of points took the 2D feature")
    if instances is not None:
        path = write_instances(out, instances, names, len(cloud), str(args.cloud))
        print(f"{len(instances)} instances -> {path} (PLY property 'instance')")
        for inst in sorted(instances, key=lambda i: -i.n_points)[:10]:
            print(f"  #{inst.id:<3d} {inst.name:<16s} {inst.n_points:>8d} points  score {inst.score:.2f}  "
                  f"centre ({inst.centroid[0]:.2f}, {inst.centroid[1]:.2f}, {inst.centroid[2]:.2f})  "
                  f"size {inst.size[0]:.2f} x {inst.size[1]:.2f} x {inst.size[2]:.2f} m")
    counts = np.bincount(labels, minlength=len(names))
    for k in np.argsort(-counts)[:10]:
        if counts[k]:
            print(f"  {names[k]:<20s} {counts[k]:>9d}  ({counts[k] / len(labels) * 100:5.1f}%)")
    return 0
