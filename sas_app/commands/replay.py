"""`sas replay BAG`: run the mapping pipeline over a ROS 2 bag without a ROS runtime.

Reads the bag with rosbags (sqlite3 or mcap; topics of ``sas_core.data.rosbag_io``), integrates
every RGB-D frame (and LiDAR sweep) into the same :class:`VoxelMap` the live node uses, labels the
map with a distilled checkpoint when given, and writes ``<out>/<name>.ply`` + ``.npz``. With
``--export DIR`` it also writes the recording in the OpenScene layout (``DIR/<split>/<name>.pth``
and ``DIR/2d/<name>/{color,depth,pose}``), so ``sas distill`` can train on a robot's own bags.
"""

from __future__ import annotations

HELP = "run the mapping pipeline over a ROS 2 bag without a ROS runtime (and export it for training)"


def add_arguments(parser):
    parser.add_argument("bag", help="bag folder or file (sqlite3 or mcap)")
    parser.add_argument("--out", default="replay_output", help="folder for the labelled map (PLY + NPZ)")
    parser.add_argument("--name", default=None, help="scene / map name (default: the bag's name)")
    parser.add_argument("--checkpoint", default=None, help="distilled checkpoint to label the map with")
    parser.add_argument("--device", default="cpu", help="torch device of the network")
    parser.add_argument("--vocabulary", default="scannet20", help="vocabulary name or comma-separated classes")
    parser.add_argument("--export", default=None, metavar="DIR", help="also write the OpenScene layout here")
    parser.add_argument("--split", default="train", help="OpenScene split of the export")
    parser.add_argument("--voxel-size", type=float, default=0.05, help="map voxel size (m)")
    parser.add_argument("--max-points", type=int, default=2_000_000, help="map capacity in voxels")
    parser.add_argument("--stride", type=int, default=2, help="integrate every n-th pixel")
    parser.add_argument("--frame-step", type=int, default=1, help="use every n-th frame")
    parser.add_argument("--max-depth", type=float, default=8.0, help="ignore depth beyond this (m)")
    parser.add_argument("--no-lidar", action="store_true", help="ignore LiDAR sweeps")


def replay_bag(bag, voxel_size=0.05, max_points=2_000_000, stride=2, frame_step=1, max_depth=8.0,
               lidar=True, keep_frames=False, progress=True):
    """Integrate a bag into a VoxelMap. Returns (map, frames kept (if keep_frames), counts dict)."""
    from tqdm import tqdm

    from sas_core.data.rosbag_io import iter_bag_frames
    from sas_core.geometry.voxel_map import VoxelMap, VoxelMapConfig, rgbd_points
    from sas_core.types import Frame

    vmap = VoxelMap(VoxelMapConfig(voxel_size=voxel_size, max_points=max_points))
    frames, n_frames, n_sweeps, i = [], 0, 0, 0
    for item in tqdm(iter_bag_frames(bag, with_lidar=lidar), desc="replay", unit="msg", disable=not progress):
        if isinstance(item, Frame):
            i += 1
            if (i - 1) % max(1, frame_step):
                continue
            pts, cols, _ = rgbd_points(item.depth, item.color, item.intrinsics, item.pose, stride, 0.0, max_depth)
            vmap.integrate(pts, cols, sensor_origin=item.pose[:3, 3])
            n_frames += 1
            if keep_frames:
                frames.append(item)
        else:
            import numpy as np

            pts = item.points[np.isfinite(item.points).all(1)].astype(np.float64)
            world = (pts @ item.pose[:3, :3].T + item.pose[:3, 3]).astype(np.float32)
            vmap.integrate(world, None, sensor_origin=item.pose[:3, 3])
            n_sweeps += 1
    if n_frames == 0 and n_sweeps == 0:
        raise ValueError(f"bag {bag} has no usable RGB-D frame or LiDAR sweep (poses and camera info present?)")
    return vmap, frames, dict(frames=n_frames, sweeps=n_sweeps)


def label_map(vmap, checkpoint, device="cpu", vocabulary="scannet20"):
    """Run a distilled checkpoint on the whole map and classify it. Returns the class names."""
    from sas_core.infer import Segmenter
    from sas_core.text import class_embeddings, get_vocabulary

    seg = Segmenter.from_checkpoint(checkpoint, device=device)
    names = list(get_vocabulary(vocabulary)) if "," not in vocabulary else [v.strip() for v in vocabulary.split(",")]
    slots = vmap.slots()
    feats = seg.features(vmap.positions[slots], colors=vmap.colors[slots], progress=True)
    vmap.set_features(slots, feats)
    vmap.classify(class_embeddings(seg.text_encoder, names).numpy(), slots)
    return names


def run(args) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from sas_core.types import PointCloud

    bag = Path(args.bag)
    if not bag.exists():
        raise FileNotFoundError(f"bag {bag} does not exist")
    if args.checkpoint and not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist (train one with `sas distill`)")
    name = args.name or bag.name.split(".")[0]
    vmap, frames, counts = replay_bag(bag, args.voxel_size, args.max_points, args.stride, args.frame_step,
                                      args.max_depth, lidar=not args.no_lidar, keep_frames=bool(args.export))
    names = None
    if args.checkpoint:
        names = label_map(vmap, args.checkpoint, args.device, args.vocabulary)
    out = Path(args.out)
    ply, npz = vmap.save(out / name, class_names=names)
    summary = dict(bag=str(bag), points=len(vmap), ply=str(ply), npz=str(npz), labelled=bool(names), **counts)
    if args.export:
        from types import SimpleNamespace

        from sas_core.data.openscene import write_openscene_scene

        if not frames:
            raise ValueError("--export needs RGB-D frames; the bag has only LiDAR")
        data = vmap.export()
        scene = SimpleNamespace(
            name=name, frames=frames, intrinsics=frames[0].intrinsics,
            points=PointCloud(positions=data["positions"], colors=data["colors"].astype(np.float32) / 255.0,
                              labels=np.full(len(data["positions"]), 255, np.int64)))
        written = write_openscene_scene(scene, args.export, split=args.split, progress=True)
        summary["export"] = {k: str(v) for k, v in written.items()}
    if not names:
        summary["note"] = "no --checkpoint: geometry and colour only (labels 255)"
    print(json.dumps(summary, indent=2))
    return 0
