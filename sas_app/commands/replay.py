"""`sas replay BAG`: run the mapping pipeline over a ROS 2 bag without a ROS runtime.

Reads the bag with rosbags (sqlite3 or mcap; topics of ``sas_core.data.rosbag_io``) and drives
the very same :class:`sas_core.mapping.Mapper` as the live node (same defaults: the pipeline
flags are generated from :class:`~sas_core.mapping.MapperConfig`): every RGB-D frame (and LiDAR
sweep) is integrated, then one labelling pass over the whole map runs (a distilled checkpoint:
``--checkpoint``), and the map folder ``<out>/<name>/`` is written (``map.npz``, ``map.ply``,
``manifest.json``: the node's ``~/save_map`` format, read back by ``~/load_map``, ``map_file`` and
``sas segment``; an existing one is replaced atomically). With ``--export DIR`` it
also writes the recording in the OpenScene layout (``DIR/<split>/<name>.pth`` and
``DIR/2d/<name>/{color,depth,pose}``), so ``sas distill`` can train on a robot's own bags.
"""

from __future__ import annotations

#: MapperConfig fields without a flag here (their defaults apply).
OFFLINE_SKIP = ("query_threshold", "query_max_points", "full_update_every", "region_margin", "teacher",
                "teacher_stride", "text_dim", "fusion_depth_ratio", "fusion_border")

HELP = "run the mapping pipeline over a ROS 2 bag without a ROS runtime (and export it for training)"


def add_arguments(parser):
    from sas_core.config import add_config_arguments
    from sas_core.mapping import MapperConfig

    parser.add_argument("bag", help="bag folder or file (sqlite3 or mcap)")
    parser.add_argument("--out", default="replay_output", help="folder for the labelled map (the map folder "
                                                               "<out>/<name>/: map.npz, map.ply, manifest.json)")
    parser.add_argument("--name", default=None, help="scene / map name (default: the bag's name)")
    parser.add_argument("--export", default=None, metavar="DIR", help="also write the OpenScene layout here")
    parser.add_argument("--split", default="train", help="OpenScene split of the export")
    parser.add_argument("--frame-step", type=int, default=1, help="use every n-th frame")
    parser.add_argument("--no-lidar", action="store_true", help="ignore LiDAR sweeps")
    pipeline = parser.add_argument_group("mapping pipeline (the node's parameters; default --mode: segmenter "
                                         "with --checkpoint, else none)")
    # offline there are no queries, one full labelling pass, and no live teacher images
    add_config_arguments(pipeline, MapperConfig, skip=OFFLINE_SKIP)


def _mapper_config(args):
    from sas_core.config import config_from_args, explicit_args
    from sas_core.mapping import MapperConfig

    mode = args.mode if "mode" in explicit_args(args) else ("segmenter" if args.checkpoint else "none")
    return config_from_args(MapperConfig, args, mode=mode)


def run(args) -> int:
    import json
    from pathlib import Path

    import numpy as np
    from tqdm import tqdm

    from sas_core.data.rosbag_io import iter_bag_frames
    from sas_core.mapping import Mapper, Rejected
    from sas_core.types import Frame, PointCloud

    bag = Path(args.bag)
    if not bag.exists():
        raise FileNotFoundError(f"bag {bag} does not exist")
    if args.checkpoint and not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist (train one with `sas distill`)")
    if args.frame_step < 1:
        raise ValueError(f"--frame-step must be >= 1, got {args.frame_step}")
    config = _mapper_config(args)
    if config.mode == "fusion":
        raise ValueError("--mode fusion needs live teacher images, which bags of rosbag_io do not carry; "
                         "use --checkpoint (mode segmenter) or --mode none")
    mapper = Mapper(config)
    name = args.name or bag.name.split(".")[0]
    frames, skipped, i = [], {}, 0
    for item in tqdm(iter_bag_frames(bag, with_lidar=not args.no_lidar), desc="replay", unit="msg"):
        try:
            if isinstance(item, Frame):
                i += 1
                if (i - 1) % args.frame_step:
                    continue
                mapper.integrate_rgbd(item)
                if args.export:
                    frames.append(item)
            else:
                mapper.integrate_sweep(item.points, item.pose, intensity=item.intensity, stamp=item.stamp)
        except Rejected as exc:  # the node drops these too; count them by reason
            skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
    if mapper.n_frames == 0 and mapper.n_sweeps == 0:
        raise ValueError(f"bag {bag} has no usable RGB-D frame or LiDAR sweep (poses and camera info present?)")
    labelled = mapper.label_pass(full=True)
    from sas_core.geometry.voxel_map import MAP_NPZ, MAP_PLY

    folder = mapper.save(Path(args.out) / name, overwrite=True)
    summary = dict(bag=str(bag), points=len(mapper), map=str(folder), ply=str(folder / MAP_PLY),
                   npz=str(folder / MAP_NPZ), labelled=bool(labelled),
                   mode=config.mode, frames=mapper.n_frames, sweeps=mapper.n_sweeps, skipped=skipped)
    if args.export:
        from types import SimpleNamespace

        from sas_core.data.openscene import write_openscene_scene

        if not frames:
            raise ValueError("--export needs RGB-D frames; the bag has only LiDAR")
        data = mapper.export()
        scene = SimpleNamespace(
            name=name, frames=frames, intrinsics=frames[0].intrinsics,
            points=PointCloud(positions=data["positions"], colors=data["colors"].astype(np.float32) / 255.0,
                              labels=np.full(len(data["positions"]), 255, np.int64)))
        written = write_openscene_scene(scene, args.export, split=args.split, progress=True)
        summary["export"] = {k: str(v) for k, v in written.items()}
    if not labelled:
        summary["note"] = "no --checkpoint: geometry and colour only (labels 255)"
    print(json.dumps(summary, indent=2))
    return 0
