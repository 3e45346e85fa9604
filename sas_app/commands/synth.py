"""`sas synth`: generate synthetic rooms in the OpenScene layout and as ROS 2 bags."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HELP = "generate synthetic rooms (OpenScene layout and ROS 2 bags)"


def add_arguments(parser):
    from sas_core.config import add_config_arguments
    from sas_core.data.synthetic import SynthConfig

    parser.add_argument("--scenes", type=int, default=1, help="number of rooms (default 1)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (new or empty; see --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what an earlier `sas synth` wrote into --out (never mix two runs)")
    g = parser.add_argument_group("each room (SynthConfig; room i uses seed + i)")
    add_config_arguments(g, SynthConfig,
                         only=("seed", "n_frames", "width", "height", "points_per_m2", "with_lidar", "sensor"),
                         aliases={"n_frames": "--frames", "with_lidar": "--lidar"})
    parser.add_argument("--storage", choices=("sqlite3", "mcap", "both"), default="both",
                        help="bag storage format (default both)")
    parser.add_argument("--no-bag", action="store_true", help="write the OpenScene layout only")
    parser.add_argument("--gaussians", action="store_true",
                        help="also write each room as a 3D Gaussian splat PLY (<out>/gaussians/<scene>.ply), novel "
                             "views with label images (<scene>_views.npz, for `sas eval --gaussians`) and the "
                             "Gaussian centres in the OpenScene layout (<out>/openscene_gaussians/, for `sas fuse` "
                             "and `sas distill`)")
    from sas_core.data.gaussians import SyntheticGaussianConfig

    add_config_arguments(parser.add_argument_group("with --gaussians (SyntheticGaussianConfig)"),
                         SyntheticGaussianConfig, skip=("seed",), prefix="gaussian-")
    parser.add_argument("--split", choices=("auto", "train", "val"), default="auto",
                        help="OpenScene split; auto: last ~20%% of rooms (at least one if >1 room) go to val")


def scene_splits(n: int, mode: str = "auto") -> list[str]:
    """Split of each of ``n`` rooms."""
    if mode != "auto":
        return [mode] * n
    n_val = 0 if n < 2 else max(1, int(round(0.2 * n)))
    return ["train"] * (n - n_val) + ["val"] * n_val


def run(args) -> int:
    from tqdm import tqdm

    from sas_core.config import config_from_args
    from sas_core.data.gaussians import SyntheticGaussianConfig
    from sas_core.data.openscene import write_openscene_scene
    from sas_core.data.synthetic import SynthConfig, generate_scene, write_overview

    if args.scenes < 1:
        raise ValueError(f"--scenes must be >= 1, got {args.scenes}")
    if args.n_frames < 1:
        raise ValueError(f"--n-frames must be >= 1, got {args.n_frames}")
    if args.width < 16 or args.height < 16:
        raise ValueError(f"image size {args.width}x{args.height} is too small (min 16x16)")
    storages = [] if args.no_bag else (["sqlite3", "mcap"] if args.storage == "both" else [args.storage])
    from sas_app.commands import fresh_output_dir, record_outputs

    out = fresh_output_dir(args.out, args.overwrite, "synth")
    root = out / "openscene"
    splits = scene_splits(args.scenes, args.split)
    t0 = time.perf_counter()
    manifest = {"synthetic": True, "note": "procedurally generated rooms, not real data",
                "seed": args.seed, "frames": args.n_frames,
                "sensor": args.sensor, "scenes": []}
    bar = tqdm(range(args.scenes), desc="sas synth", unit="room", file=sys.stderr)
    for i in bar:
        cfg = config_from_args(SynthConfig, args, seed=args.seed + i)
        bar.set_postfix_str(f"generate seed {cfg.seed}")
        scene = generate_scene(cfg, progress=True)
        bar.set_postfix_str(f"write {scene.name}")
        written = write_openscene_scene(scene, root, split=splits[i], progress=True)
        from sas_core.train.scene_labels import write_scene_labels

        labels_txt = write_scene_labels(Path(written["pth"]).parent, scene.name, scene.present_classes())
        bags = {}
        if storages:
            from sas_core.data.rosbag_io import write_bag

            for storage in storages:
                bags[storage] = str(write_bag(scene, out / "bags" / f"{scene.name}_{storage}", storage=storage))
        overview = write_overview(scene, out / "overview")
        splat = {}
        if args.gaussians:
            from sas_app.splat import export_synthetic

            bar.set_postfix_str(f"Gaussians of {scene.name}")
            splat = export_synthetic(scene, out, splits[i],
                                     config_from_args(SyntheticGaussianConfig, args, prefix="gaussian-",
                                                      seed=cfg.seed))
        manifest["scenes"].append({
            "name": scene.name, "seed": cfg.seed, "split": splits[i],
            "room_size_m": [round(float(x), 3) for x in scene.room_size], "n_points": len(scene.points),
            "n_frames": len(scene.frames), "n_lidar_sweeps": len(scene.lidar),
            "classes": scene.present_classes(), "pth": str(written["pth"]), "scene_labels": str(labels_txt),
            "frames_2d": str(written["dir_2d"]), "bags": bags, **{k: str(v) for k, v in overview.items()}, **splat})
    bar.close()
    seconds = time.perf_counter() - t0
    manifest["seconds"] = round(seconds, 2)
    from sas_core.io import atomic_write_text

    atomic_write_text(out / "synth.json", json.dumps(manifest, indent=2) + "\n")
    record_outputs(out, "synth")

    print(f"sas synth: wrote {args.scenes} SYNTHETIC room(s) (procedurally generated, not real data) "
          f"in {seconds:.1f} s")
    print(f"  OpenScene layout: {root}/{{{','.join(sorted(set(splits)))}}}/<scene>.pth and {root}/2d/<scene>/")
    for s in manifest["scenes"]:
        print(f"  {s['name']} [{s['split']}] {s['n_points']} points, {s['n_frames']} frames, "
              f"{s['n_lidar_sweeps']} LiDAR sweeps, {len(s['classes'])} classes")
        for storage, path in s["bags"].items():
            print(f"    bag ({storage}): {path}")
        print(f"    overview: {s['topdown_png']}  labelled PLY: {s['ply']}")
        if "gaussians_ply" in s:
            print(f"    Gaussian splat: {s['gaussians_ply']} ({s['n_gaussians']} Gaussians), views: "
                  f"{s['gaussians_views']}, centres (OpenScene): {s['gaussians_pth']}")
    print(f"  manifest: {out / 'synth.json'}")
    if not math.isfinite(seconds):  # pragma: no cover
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(run(p.parse_args()))
