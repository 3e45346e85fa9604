"""`sas replay BAG`: run the mapping pipeline over a ROS 2 bag without a ROS runtime.

Reads any robot bag with rosbags (a bag folder or its ``.db3`` / ``.mcap`` file; streams and
poses chosen by :mod:`sas_core.data.bag_streams`: colour / depth / camera_info / LiDAR by type
and name, poses from ``/tf`` + ``/tf_static`` or a pose topic, compressed transports, depth
registered into the colour camera when it comes in its own frame; see ``sas bag-info BAG`` for
what it would choose and why) and drives the very same :class:`sas_core.mapping.Mapper` as the
live node (the pipeline flags are generated from :class:`~sas_core.mapping.MapperConfig`): every
RGB-D frame (and LiDAR sweep) with a pose is integrated, then one labelling pass over the whole
map runs (a distilled checkpoint: ``--checkpoint``), and the map folder ``<out>/<name>/`` is
written (``map.npz``, ``map.ply``, ``manifest.json``: the node's ``~/save_map`` format, read back by
``~/load_map``, ``map_file`` and ``sas segment``; an existing one is replaced atomically). The JSON summary says how many frames and sweeps were used and why the others were not
(counts by reason, and the first problems with topic, index and message). With ``--export DIR``
it also writes the recording in the OpenScene layout (``DIR/<split>/<name>.pth`` and, for RGB-D,
``DIR/2d/<name>/{color,depth,pose}``), so ``sas distill`` can train on a robot's own bags.
"""

from __future__ import annotations

#: MapperConfig fields without a flag here (their defaults apply).
OFFLINE_SKIP = ("query_threshold", "query_max_points", "full_update_every", "region_margin", "teacher",
                "teacher_stride", "text_dim", "fusion_depth_ratio", "fusion_border")

HELP = "run the mapping pipeline over a ROS 2 bag without a ROS runtime (and export it for training)"


def add_stream_arguments(parser) -> None:
    """The stream choice flags (--color-topic, --depth-topic, ..., --map-frame), shared with bag-info."""
    from sas_core.config import add_config_arguments
    from sas_core.data.bag_streams import StreamOptions

    group = parser.add_argument_group("streams (default: discovered; `sas bag-info BAG` shows the choice)")
    add_config_arguments(group, StreamOptions)
    parser.add_argument("--no-lidar", action="store_true", help="ignore LiDAR clouds")


def stream_options(args):
    from sas_core.config import config_from_args
    from sas_core.data.bag_streams import StreamOptions

    return config_from_args(StreamOptions, args, use_lidar=not args.no_lidar)


def add_arguments(parser):
    from sas_core.config import add_config_arguments
    from sas_core.mapping import MapperConfig

    parser.add_argument("bag", help="bag folder, or its .db3 / .mcap file")
    parser.add_argument("--out", default="replay_output", help="folder for the labelled map (the map folder "
                                                               "<out>/<name>/: map.npz, map.ply, manifest.json)")
    parser.add_argument("--name", default=None, help="scene / map name (default: the bag's name)")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="also write the OpenScene layout here (a new or empty folder; see --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace this scene's files in the --export folder (other scenes there are kept)")
    parser.add_argument("--split", default="train", help="OpenScene split of the export")
    parser.add_argument("--frame-step", type=int, default=1, help="use every n-th frame that has a pose")
    add_stream_arguments(parser)
    pipeline = parser.add_argument_group("mapping pipeline (the node's parameters; default --mode: segmenter "
                                         "with --checkpoint, else none)")
    # offline there are no queries, one full labelling pass, and no live teacher images
    add_config_arguments(pipeline, MapperConfig, skip=OFFLINE_SKIP, aliases={"vocabulary": "--vocab"})


def _mapper_config(args):
    from sas_core.config import config_from_args, explicit_args
    from sas_core.mapping import MapperConfig

    mode = args.mode if "mode" in explicit_args(args) else ("segmenter" if args.checkpoint else "none")
    return config_from_args(MapperConfig, args, mode=mode)


def _scene_name(args, bag) -> str:
    import re

    name = args.name or (bag.parent.name if bag.is_file() and (bag.parent / "metadata.yaml").is_file()
                         else bag.name.split(".")[0])
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"scene name {name!r} must be a plain file name (give --name)")
    return name


def _fresh_export(root, name: str, overwrite: bool) -> None:
    """An export folder holds many recordings (one scene each); a rerun of one scene name replaces
    exactly that scene's files with --overwrite, and is refused without it (never mixed)."""
    import shutil

    if root.exists() and not root.is_dir():
        raise ValueError(f"--export {root} is a file; give a folder")
    pths = sorted(root.glob(f"*/{name}.pth")) if root.is_dir() else []
    frames = root / "2d" / name
    if not pths and not frames.exists():
        return
    if not overwrite:
        raise ValueError(f"--export {root} already holds scene {name!r} ({', '.join(str(p) for p in pths + [frames] if p.exists())}): "
                         "give another --name, or --overwrite to replace that scene")
    for p in pths:
        p.unlink()
    if frames.is_dir() and not frames.is_symlink():
        shutil.rmtree(frames)


def run(args) -> int:
    import json
    import sys
    from pathlib import Path

    import numpy as np
    from tqdm import tqdm

    from sas_core.data.bag_streams import ReplayStats, bag_root, check_options, index_bag, iter_frames
    from sas_core.mapping import Mapper, Rejected
    from sas_core.types import Frame, PointCloud

    # every argument is checked before the bag's messages are read
    bag = Path(args.bag)
    bag_root(bag)  # exists, is a bag folder or a .db3 / .mcap file
    if args.checkpoint and not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist (train one with `sas distill`)")
    if args.frame_step < 1:
        raise ValueError(f"--frame-step must be >= 1, got {args.frame_step}")
    config = _mapper_config(args)
    if config.mode == "fusion":
        raise ValueError("--mode fusion needs live teacher images, which a bag does not carry; "
                         "use --checkpoint (mode segmenter) or --mode none")
    name = _scene_name(args, bag)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; give the folder for the map")
    options = stream_options(args)
    index = index_bag(bag, rates=False)
    check_options(index, options)
    if args.export:
        _fresh_export(Path(args.export), name, args.overwrite)
    mapper = Mapper(config)

    stats, choice = ReplayStats(), {}
    frames, used, stepped = [], 0, 0
    items = iter_frames(bag, options, stats=stats, index=index, choice_out=choice)
    for item in tqdm(items, desc="replay", unit="frame", file=sys.stderr):
        topic, index_in_topic = stats.where(item)
        try:
            if isinstance(item, Frame):
                used += 1
                if (used - 1) % args.frame_step:
                    stepped += 1
                    continue
                mapper.integrate_rgbd(item)
                stats.frames_used += 1
                if args.export:
                    frames.append(item)
            else:
                mapper.integrate_sweep(item.points, item.pose, intensity=item.intensity, stamp=item.stamp)
                stats.sweeps_used += 1
        except Rejected as exc:  # the node drops these too; count them by reason
            stats.problem(topic, index_in_topic, exc.reason, str(exc))
    if mapper.n_frames == 0 and mapper.n_sweeps == 0:
        raise ValueError(f"bag {bag} has no usable RGB-D frame or LiDAR sweep: {stats.why_nothing()}")
    labelled = mapper.label_pass(full=True)
    if config.instance_update_every > 0:  # the saved map carries per-voxel instance ids
        mapper.update_instances()
    from sas_core.geometry.voxel_map import MAP_NPZ, MAP_PLY

    folder = mapper.save(Path(args.out) / name, overwrite=True)
    counts = stats.as_dict()
    summary = dict(bag=str(bag), points=len(mapper), map=str(folder), ply=str(folder / MAP_PLY),
                   npz=str(folder / MAP_NPZ), labelled=bool(labelled),
                   mode=config.mode, frames=mapper.n_frames, sweeps=mapper.n_sweeps,
                   frames_seen=counts["frames_seen"], sweeps_seen=counts["sweeps_seen"],
                   frames_skipped_by_step=stepped, skipped=counts["skipped"], other=counts["other"],
                   streams=choice["choice"].as_dict(), problems=counts["problems"])
    if args.export:
        from sas_core.data.openscene import write_openscene_scene, write_pth

        data = mapper.export()
        colors = data["colors"].astype(np.float32) / 255.0
        labels = np.full(len(data["positions"]), 255, np.int64)
        if frames:
            from types import SimpleNamespace

            scene = SimpleNamespace(name=name, frames=frames, intrinsics=frames[0].intrinsics,
                                    points=PointCloud(positions=data["positions"], colors=colors, labels=labels))
            written = write_openscene_scene(scene, args.export, split=args.split, progress=True)
        else:  # LiDAR only: a 3D scene without 2D frames (as nuScenes in OpenScene's layout)
            pth = Path(args.export) / args.split / f"{name}.pth"
            write_pth(pth, data["positions"], colors, labels)
            written = {"pth": pth, "n_frames": 0}
        summary["export"] = {k: (v if isinstance(v, int) else str(v)) for k, v in written.items()}
    if not labelled:
        summary["note"] = "no --checkpoint: geometry and colour only (labels 255)"
    skipped = ", ".join(f"{r} {n}" for r, n in counts["skipped"].items()) or "none"
    print(f"replay: {mapper.n_frames} of {counts['frames_seen']} frames and {mapper.n_sweeps} of "
          f"{counts['sweeps_seen']} sweeps used; skipped: {skipped}", file=sys.stderr)
    print(json.dumps(summary, indent=2))
    return 0
