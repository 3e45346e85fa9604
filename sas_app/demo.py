"""The end-to-end SAS demo on the synthetic world, and the report writer.

:func:`run_demo` runs the whole pipeline on CPU on freshly generated synthetic rooms:

1. synthetic rooms (``sas_core.data.synthetic``): training rooms and held-out rooms;
2. two simulated 2D teachers good at different classes (``sas_core.teachers.make_simulated_pair``),
   in the synthetic text space (``sas_core.text.SyntheticTextEncoder``);
3. capability tables from synthetic probe renders (``sas_core.capability.sources``);
4. multi-view fusion of each teacher onto the points of every room (``sas_core.geometry.multiview``);
5. fusion of the two teachers: plain add, "linear" and capability-guided (``sas_core.fusion``);
6. superpoints (``sas_core.geometry.superpoints``);
7. distillation of a small MinkUNet: pixel-point, superpoint, superpoint + TESD
   (``sas_core.train.distill``); the last two share their stage 1;
8. evaluation of every row (``sas_core.eval``), the analogue of the paper's Table 3, in two settings:
   on the distillation rooms themselves ("own map, transductive": the robot use case, a robot distils
   on its own recordings and uses that map; no labels are used in training) and on held-out rooms.
   The 2D fusion rows are computed on the same rooms in each setting. The paper's numbers are for
   held-out scenes after training on ~1200 scenes; held-out generalisation from a couple of
   synthetic rooms is not expected to match them.

:func:`write_report` writes the report folder: ``table.md``, ``table.json``, ``ablation.png`` (bar
chart), ``topdown.png`` (labelled held-out room next to its ground truth), ``query_*.png`` (heat
maps of free-text queries), ``instances.png`` (3D instances of a room with their boxes and labels; the
instance rows, ScanNet AP, are in the tables), ``model.pt`` (the distilled SP+TESD network, loadable with
``sas_core.infer.Segmenter.from_checkpoint``) and ``README.md``. Every output says "synthetic".
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from sas_core.config import opt, replace_checked

SYNTHETIC_NOTE = ("SYNTHETIC DATA: procedural rooms and simulated teachers; these numbers measure the "
                  "method on the synthetic world, not on ScanNet / Matterport3D / nuScenes.")

ROWS = (
    ("teacher_a", "2D Fusion", "teacher A"),
    ("teacher_b", "2D Fusion", "teacher B"),
    ("add", "2D Fusion", "Add"),
    ("linear", "2D Fusion", "Linear"),
    ("capability", "2D Fusion", "Capability fusion (SAS)"),
    ("pixel_point", "3D", "Pixel-Point Dis."),
    ("sp", "3D", "SP Dis."),
    ("sp_tesd", "3D", "SP Dis. + TESD (SAS)"),
)

#: evaluation settings: key -> title (every row is evaluated in both)
SETTINGS = (
    ("own_map", "own map, transductive: evaluated on the distillation rooms (no labels used in training)"),
    ("held_out", "held-out rooms: evaluated on rooms never seen in distillation"),
)


@dataclass
class DemoConfig:
    """Settings of `sas demo` (defaults: under 10 minutes on 2 CPU cores; presets in :data:`DEMO_PRESETS`)."""

    out: str = opt("demo_output", "report folder")
    seed: int = opt(0, "seeds the world, the teachers and training")
    train_rooms: int = opt(2, "synthetic rooms used for distillation")
    test_rooms: int = opt(1, "held-out rooms for evaluation")
    frames: int = opt(16, "RGB-D frames per room")
    width: int = opt(160, "frame width (pixels)")
    height: int = opt(120, "frame height (pixels)")
    points_per_m2: float = opt(80.0, "surface sampling density of the rooms")
    room_scale: float = opt(1.0, "room footprint relative to the synthetic world's default (6x5 to 9x7 m)")
    sensor: str = opt("none", "RGB-D sensor model of the rooms' frames (sas_core.data.sensor_model presets)",
                      choices=("none", "kinect", "realsense"))
    text_dim: int = opt(64, "size of the synthetic text space (= 3D output channels)")
    probes: int = opt(3, "probe renders per class for the capability tables")
    tau: float = opt(0.05, "capability fusion temperature (eq. 8)")
    arch: str = opt("MinkUNet14A", "3D backbone")
    voxel_size: float = opt(0.1, "metres (coarse: CPU budget; the paper uses 0.02)")
    epochs: int = opt(100, "distillation epochs per 3D row (the paper's 100; TESD in the last 30)")
    stage2_fraction: float = opt(0.3, "last fraction of epochs with TESD")
    lr: float = opt(1e-2, "initial Adam learning rate (few steps: 100x the paper's 1e-4), decays linearly to lr/10")
    lr_schedule: str = opt("linear", "linear (the paper) | onecycle (warm-up, then cosine to lr/10)",
                           choices=("linear", "onecycle"))
    batch_size: int = opt(1, "scenes per step")
    input_color: bool = opt(False, "network input: RGB (OpenScene's option) instead of all ones (SAS)")
    augment: bool = opt(False, "OpenScene augmentation while distilling (paper: on, over ~1200 scenes; "
                               "off here: few steps, own map)")
    tesd_alpha: float = opt(0.9, "TESD EMA constant per visit of a room (the public code: 0.99 over many more "
                                 "visits; 18 visits here)")
    tesd_temperature: float = opt(0.07, "TESD logits temperature (0: raw dot product, the public code)")
    tesd_weight: float = opt(1.0, "weight of the TESD cross-entropies")
    queries: tuple = opt(("a chair", "a wooden table"), "free-text queries for the heat maps")
    ros: bool = opt(True, "replay a synthetic bag through the live ROS node when rclpy is importable")
    progress: bool = opt(True, "progress bars")
    threads: int = opt(1, "torch CPU threads for training (one is fastest for these small sparse convolutions)")

    def __post_init__(self):
        if self.train_rooms < 1 or self.test_rooms < 0:
            raise ValueError("the demo needs at least one training room")


#: Named presets of :class:`DemoConfig` (``sas demo --quick``): field values applied before the
#: flags the user gives, so ``--quick --epochs 50`` trains 50 epochs on the quick world.
DEMO_PRESETS: Dict[str, dict] = {
    "quick": dict(train_rooms=1, test_rooms=1, frames=8, width=96, height=72, points_per_m2=40.0, probes=2,
                  epochs=3, voxel_size=0.15, room_scale=0.6),  # one small room, few epochs (smoke test)
}


def demo_config(preset: Optional[str] = None, **values) -> DemoConfig:
    """A :class:`DemoConfig` from a named preset of :data:`DEMO_PRESETS` (or none), then ``values``."""
    if preset is not None and preset not in DEMO_PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; known: {', '.join(DEMO_PRESETS)}")
    return replace_checked(DemoConfig(), **{**DEMO_PRESETS.get(preset, {}), **values})


def _log(msg: str, t0: float) -> None:
    """Progress line on stderr (stdout carries the table, or a benchmark's JSON)."""
    import sys

    print(f"[{time.time() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# pipeline pieces


def room_config(cfg: DemoConfig, room_seed: int, absent_classes=()):
    """The SynthConfig of the demo's room with seed ``room_seed`` (frames, size, density, sensor of ``cfg``;
    ``absent_classes`` left out of the room)."""
    from sas_core.data.synthetic import SynthConfig

    base = SynthConfig()
    return SynthConfig(seed=room_seed, n_frames=cfg.frames, width=cfg.width, height=cfg.height, with_lidar=False,
                       points_per_m2=cfg.points_per_m2, sensor=cfg.sensor, absent_classes=tuple(absent_classes),
                       room_min=tuple(v * cfg.room_scale for v in base.room_min),
                       room_max=tuple(v * cfg.room_scale for v in base.room_max))


def make_rooms(cfg: DemoConfig, absent=None):
    """(train scenes, test scenes) of the synthetic world.

    ``absent``: optional ``room index -> class names`` left out of that room (``SynthConfig.absent_classes``;
    rooms 0..train_rooms-1 train, the next ones are held out)."""
    from sas_core.data.synthetic import generate_scene

    def room(i):
        return generate_scene(room_config(cfg, cfg.seed * 1000 + i, absent(i) if absent else ()))

    train = [room(i) for i in range(cfg.train_rooms)]
    test = [room(cfg.train_rooms + i) for i in range(cfg.test_rooms)]
    return train, test


def fuse_teacher(scene, teacher):
    """Multi-view fusion of one teacher's per-pixel features onto the scene's points.

    Returns (features (N, C) float16 torch, mask (N,) bool torch)."""
    from sas_core.geometry.multiview import FeatureAccumulator

    pts = scene.points.positions
    acc = None
    for frame in scene.frames:
        feats, valid = teacher.features(frame)
        if acc is None:
            acc = FeatureAccumulator(len(pts), int(feats.shape[-1]), points=pts)
        acc.add(frame.depth, frame.pose, frame.intrinsics, feats, valid)
    res = acc.result()
    return res.features, res.mask


def label_points(features, mask, text) -> np.ndarray:
    """(N,) labels: argmax of cos(features, text); 256 (no feature) where ``mask`` is False."""
    from sas_core.eval import NO_FEATURE
    from sas_core.train.distill import predict_labels

    pred = predict_labels(features, text)
    if mask is not None:
        m = np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask, dtype=bool)
        pred[~m] = NO_FEATURE
    return pred


def fusion_rows(feats_a, mask_a, feats_b, mask_b, text, capability, tau) -> Dict[str, tuple]:
    """The 2D rows of Table 3 for one scene: name -> (features (N, C), mask (N,))."""
    import torch

    from sas_core.fusion import add_fusion, capability_fusion, fused_mask, linear_fusion

    masks = [mask_a, mask_b]
    both = fused_mask(masks)
    fa, fb = feats_a.float(), feats_b.float()
    return {
        "teacher_a": (fa, mask_a),
        "teacher_b": (fb, mask_b),
        "add": (add_fusion([fa, fb], masks), both),
        "linear": (linear_fusion([fa, fb], text, masks), both),
        "capability": (capability_fusion([fa, fb], text, torch.as_tensor(capability, dtype=torch.float32), tau,
                                         masks), both),
    }


def probe_capability(teachers, text, vocabulary, n_probes: int, seed: int, width: int, height: int,
                     progress: bool = True):
    """Capability table of ``teachers`` from synthetic probe renders with ground-truth masks."""
    from sas_core.capability.sources import SyntheticProbeSource, build_table

    source = SyntheticProbeSource(n_per_class=n_probes, seed=seed, width=width, height=height)
    return build_table(source, teachers, text, vocabulary, progress=progress).table


@dataclass
class World:
    """Everything the 3D rows need, prepared once (the 2D part of the pipeline)."""

    config: DemoConfig
    encoder: object
    text: object  # (K, C) torch
    class_names: list
    train: list  # SyntheticScene
    test: list
    capability: object  # CapabilityTable
    train_data: list  # SceneData with capability-fused targets
    test_data: list  # SceneData (labels, no targets)
    rows_2d: dict  # setting ("own_map" | "held_out") -> name -> (pred (N_total,), gt (N_total,))
    timings: dict = field(default_factory=dict)
    histories: dict = field(default_factory=dict)  # 3D row -> the trainer's per-epoch records (distill_rows)


def world_teachers(cfg: DemoConfig):
    """The synthetic text space and the two simulated teachers of ``cfg.seed``: (encoder, text (K, C),
    class names, (teacher A, teacher B))."""
    from sas_core.teachers import make_simulated_pair
    from sas_core.text import SCANNET_20, SyntheticTextEncoder, class_embeddings

    names = list(SCANNET_20)
    encoder = SyntheticTextEncoder(names, dim=cfg.text_dim, seed=cfg.seed)
    return encoder, class_embeddings(encoder, names), names, make_simulated_pair(encoder, seed=cfg.seed)


def add_rows_2d(acc: dict, rows: Dict[str, tuple], text, gt) -> None:
    """Append one room's 2D-row predictions (``fusion_rows``) and ground truth to ``acc``: key -> (pred, gt)."""
    for key, (f, m) in rows.items():
        pred = label_points(f, m, text)
        p, g = acc.get(key, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        acc[key] = (np.concatenate([p, pred]), np.concatenate([g, gt]))


def prepare_world(cfg: DemoConfig, t0: Optional[float] = None, absent=None) -> World:
    """Steps 1-6: rooms, teachers, capability, multi-view fusion, teacher fusion, superpoints.

    ``absent``: optional classes left out per room (:func:`make_rooms`)."""
    import torch

    from sas_core.train.datasets import synthetic_scene_data, scene_from_arrays

    t0 = t0 or time.time()
    timings = {}
    encoder, text, names, (teacher_a, teacher_b) = world_teachers(cfg)
    t = time.time()
    train, test = make_rooms(cfg, absent)
    timings["rooms_s"] = time.time() - t
    _log(f"synthetic world: {len(train)} training + {len(test)} held-out rooms "
         f"({sum(len(s.points) for s in train + test)} points, {cfg.frames} frames each)", t0)
    t = time.time()
    table = probe_capability([teacher_a, teacher_b], text, names, cfg.probes, cfg.seed, cfg.width, cfg.height,
                             cfg.progress)
    cap = table.matrix([teacher_a.name, teacher_b.name], names)  # classes without probes: teacher's mean
    timings["capability_s"] = time.time() - t
    _log(f"capability tables from probe renders ({cfg.probes} per class)", t0)

    t = time.time()
    train_data, test_data = [], []
    rows_2d = {"own_map": {}, "held_out": {}}
    for split, scenes in (("own_map", train), ("held_out", test)):
        for scene in scenes:
            fa, ma = fuse_teacher(scene, teacher_a)
            fb, mb = fuse_teacher(scene, teacher_b)
            rows = fusion_rows(fa, ma, fb, mb, text, cap, cfg.tau)
            gt = scene.points.labels
            if split == "own_map":
                feats, mask = rows["capability"]
                train_data.append(synthetic_scene_data(scene, feats.to(torch.float16), mask))
            else:
                test_data.append(scene_from_arrays(scene.name, scene.points.positions, labels=gt,
                                                   colors=scene.points.colors))
            add_rows_2d(rows_2d[split], rows, text, gt)  # the 2D rows on the same rooms as the 3D rows
    timings["fusion_superpoints_s"] = time.time() - t
    _log("multi-view fusion of both teachers, add / linear / capability fusion, superpoints", t0)
    return World(cfg, encoder, text, names, train, test, table, train_data, test_data, rows_2d, timings)


def distill_settings(cfg: DemoConfig) -> dict:
    """The :class:`sas_core.train.distill.DistillConfig` fields the demo sets (all but mode and out_dir)."""
    return dict(arch=cfg.arch, epochs=cfg.epochs,
                stage2_fraction=cfg.stage2_fraction, batch_size=cfg.batch_size, lr=cfg.lr, final_lr=cfg.lr / 10,
                lr_schedule=cfg.lr_schedule, tesd_weight=cfg.tesd_weight,
                voxel_size=cfg.voxel_size, tesd_alpha=cfg.tesd_alpha, tesd_temperature=cfg.tesd_temperature,
                seed=cfg.seed, val_every=0, resume=True, progress=cfg.progress, threads=cfg.threads,
                input_color=cfg.input_color, augment=cfg.augment)


def distill_rows(world: World, work_dir: Path, t0: float, tesd_variants: Optional[Dict[str, dict]] = None,
                 pixel_point: bool = True, superpoint: bool = True) -> Dict[str, object]:
    """Step 7: the three 3D rows; returns name -> trained model.

    The SP row is trained once and every SP+TESD row branches from the SP run's checkpoint at its TESD
    start: with the same seed and schedule, stage 1 of SP+TESD *is* the SP run's prefix (same samples,
    same steps, same RNG; ``test_train`` checks the weights bit for bit), so it is not trained twice.
    ``tesd_variants``: optional extra SP+TESD rows, name -> :class:`DistillConfig` overrides (e.g.
    ``tesd_alpha``, ``stage2_fraction``, ``tesd_weight``), each branching from the SP run at its own
    start. ``pixel_point=False`` leaves that row out (sweeps of the SP / TESD settings), ``superpoint=False``
    the SP and SP+TESD rows (the rows can then be trained in separate processes)."""
    from sas_core.train.distill import DistillConfig, Distiller

    cfg = world.config
    common = distill_settings(cfg)
    enc_cfg = world.encoder.config()

    def trainer(mode, sub, **over):
        return Distiller(DistillConfig(mode=mode, out_dir=str(work_dir / sub), **{**common, **over}),
                         world.train_data, world.text, world.class_names, None, enc_cfg)

    models = {}
    t = time.time()

    def keep(name, result):
        world.histories[name] = result.history
        return result.model

    if pixel_point:
        models["pixel_point"] = keep("pixel_point", trainer("pixel_point", "pixel_point").run())
        _log(f"pixel-point distillation: {cfg.epochs} epochs", t0)
    if not superpoint:
        world.timings["distill_s"] = time.time() - t
        return models
    variants = {"sp_tesd": {}, **(tesd_variants or {})}
    starts = {name: DistillConfig(mode="sp_tesd", **{**common, **over}).stage1_epochs
              for name, over in variants.items()}
    sp = trainer("sp", "sp")
    for start in sorted(set(starts.values())):
        if start > sp.epoch:
            sp.run(stop_after_epochs=start - sp.epoch)  # the SP run up to this TESD start
        for name in (n for n, s in starts.items() if s == start and s > 0):
            (work_dir / name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work_dir / "sp" / "last.pt", work_dir / name / "last.pt")
    models["sp"] = keep("sp", sp.run())
    _log(f"superpoint distillation: {cfg.epochs} epochs", t0)
    for name, over in variants.items():
        models[name] = keep(name, trainer("sp_tesd", name, **over).run())
        _log(f"superpoint + TESD distillation ({name}): last {cfg.epochs - starts[name]} of {cfg.epochs} epochs "
             "with TESD", t0)
    world.timings["distill_s"] = time.time() - t
    return models


def evaluate_rows(world: World, models: Dict[str, object]) -> Dict[str, Dict[str, dict]]:
    """Step 8: mIoU / mAcc of every row (OpenScene protocol) in both settings.

    Returns setting -> row key -> result: "own_map" evaluates on the distillation rooms
    (transductive), "held_out" on the held-out rooms (absent when there are none)."""
    from sas_core.eval import evaluate
    from sas_core.train.distill import scene_point_features

    results = {}
    for setting, scenes in (("own_map", world.train_data), ("held_out", world.test_data)):
        if not scenes:
            continue
        res = {}
        for key, (pred, gt) in world.rows_2d[setting].items():
            res[key] = evaluate(pred, gt, world.class_names)
        for key, model in models.items():
            preds, gts = [], []
            for scene in scenes:
                feats = scene_point_features(model, scene, world.config.voxel_size,
                                             input_color=world.config.input_color)
                preds.append(label_points(feats, None, world.text))
                gts.append(scene.labels)
            res[key] = evaluate(np.concatenate(preds), np.concatenate(gts), world.class_names)
        results[setting] = res
    return results


def table_rows(results: Dict[str, Dict[str, dict]]) -> List[dict]:
    """Flat rows (one per setting and method, settings in :data:`SETTINGS` order)."""
    rows = []
    for setting, _ in SETTINGS:
        for key, group, label in ROWS:
            if key in results.get(setting, {}):
                r = results[setting][key]
                rows.append({"setting": setting, "key": key, "group": group, "method": label,
                             "miou": 100 * float(r["miou"]), "macc": 100 * float(r["macc"]),
                             "miou_present": 100 * float(r["miou_present"]),
                             "no_feature_points": int(r["no_feature_points"])})
    return rows


HELD_OUT_NOTE = ("The paper's Table 3 is measured on held-out scenes after distilling on ~1200 ScanNet scenes; "
                 "held-out generalisation of a network distilled on a couple of synthetic rooms is not expected "
                 "to match it. The own-map setting is the robot use case: the map a robot distils on its own "
                 "recordings (no labels are used in training).")


def format_markdown(rows: Sequence[dict], title: str = "Table 3 analogue (synthetic)",
                    config_note: str = "") -> str:
    """Markdown: one table per evaluation setting present in ``rows``."""
    lines = [f"## {title}", "", f"_{SYNTHETIC_NOTE}_", ""]
    if config_note:
        lines += [config_note, ""]
    for setting, heading in SETTINGS:
        part = [r for r in rows if r.get("setting", "held_out") == setting]
        if not part:
            continue
        lines += [f"### {heading}", "", "| | method | mIoU | mAcc | mIoU (present classes) |",
                  "|---|---|---:|---:|---:|"]
        for r in part:
            spread = f" ± {r['miou_std']:.1f}" if "miou_std" in r else ""
            lines.append(f"| {r['group']} | {r['method']} | {r['miou']:.1f}{spread} | {r['macc']:.1f} | "
                         f"{r['miou_present']:.1f} |")
        lines.append("")
    lines.append(f"_{HELD_OUT_NOTE}_")
    return "\n".join(lines) + "\n"


def config_note(cfg: "DemoConfig") -> str:
    """One line naming the distillation settings that differ from the paper's."""
    return (f"3D rows: {cfg.arch}, {cfg.voxel_size * 100:g} cm voxels, {cfg.epochs} epochs (TESD in the last "
            f"{cfg.stage2_fraction:.0%}), Adam lr {cfg.lr:g} -> {cfg.lr / 10:g}"
            + ("" if cfg.lr_schedule == "linear" else f" ({cfg.lr_schedule})") + ", input "
            f"{'RGB colour (OpenScene option)' if cfg.input_color else 'all ones (SAS)'}, augmentation "
            f"{'on (OpenScene)' if cfg.augment else 'off (paper: on)'}, TESD alpha {cfg.tesd_alpha:g}"
            + ("" if cfg.tesd_weight == 1.0 else f" weight {cfg.tesd_weight:g}") + "; "
            f"{cfg.train_rooms} distillation rooms, {cfg.test_rooms} held-out"
            + (f"; sensor model {cfg.sensor}." if cfg.sensor != "none" else "."))


# ------------------------------------------------------------------------------------------------
# report


def _bar_chart(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [(k, t.split(":")[0]) for k, t in SETTINGS if any(r.get("setting", "held_out") == k for r in rows)]
    fig, axes = plt.subplots(1, len(settings), figsize=(7 * len(settings), 4.4), squeeze=False)
    for ax, (setting, title) in zip(axes[0], settings):
        part = [r for r in rows if r.get("setting", "held_out") == setting]
        colors = ["#8da0cb" if r["group"] == "2D Fusion" else "#fc8d62" for r in part]
        x = np.arange(len(part))
        ax.bar(x, [r["miou"] for r in part], yerr=[r.get("miou_std", 0.0) for r in part], color=colors, capsize=3)
        for i, r in enumerate(part):
            ax.text(i, r["miou"] + 0.5, f"{r['miou']:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, [r["method"] for r in part], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("mIoU (%)")
        ax.set_title(title, fontsize=9)
    fig.suptitle("SAS ablation (Table 3 analogue) - SYNTHETIC world", fontsize=10)
    fig.tight_layout()
    from sas_core.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def _figure_png(images, titles, path: Path, suptitle: str, colorbar=None, legend=None) -> None:
    """Panels side by side; ``colorbar`` a ScalarMappable, ``legend`` (labels, class names): a swatch
    per class present, in :func:`sas_core.viz.label_colors`' colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from sas_core import viz
    from sas_core.io import atomic_path

    extra = 1.8 if legend is not None else 0.0
    fig, axes = plt.subplots(1, len(images), figsize=(5 * len(images) + extra, 4.6), squeeze=False)
    for ax, img, title in zip(axes[0], images, titles):
        ax.imshow(img)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    if colorbar is not None:
        fig.colorbar(colorbar, ax=axes[0].tolist(), shrink=0.8, label="cosine similarity")
    if legend is not None:
        labels, names = legend
        present = [int(v) for v in np.unique(labels) if 0 <= int(v) < len(names)]
        colors = viz.label_colors(np.array(present, dtype=np.int64)) / 255.0
        fig.legend(handles=[Patch(facecolor=c, edgecolor="black", label=names[v]) for v, c in zip(present, colors)],
                   loc="center right", fontsize=8, frameon=False)
        fig.subplots_adjust(right=1.0 - extra / (5 * len(images) + extra))
    fig.suptitle(suptitle, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _topdown(positions, pred, gt, path: Path, title: str, class_names, resolution: float = 0.03) -> None:
    """Labelled scene next to its ground truth, seen from above (ceiling points dropped), with a
    legend of the classes either shows."""
    from sas_core import viz
    from sas_core.types import IGNORE_LABEL

    keep = gt != IGNORE_LABEL
    p = positions[keep]
    bounds = np.stack([p[:, :2].min(0), p[:, :2].max(0)])
    imgs = [viz.topdown_image(p, labels=lab[keep], resolution=resolution, bounds=bounds, point_size=2)
            for lab in (pred, gt)]
    _figure_png(imgs, ["prediction (SP + TESD)", "ground truth"], path, title,
                legend=(np.concatenate([pred[keep], gt[keep]]), class_names))


def _heatmap(positions, scores, gt, path: Path, title: str, resolution: float = 0.03) -> None:
    """Relevance of every point to a query (colour map), seen from above."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import cm, colors as mcolors

    from sas_core import viz
    from sas_core.types import IGNORE_LABEL

    keep = gt != IGNORE_LABEL
    p, s = positions[keep], scores[keep]
    norm = mcolors.Normalize(vmin=float(s.min()), vmax=float(s.max()))
    mapper = cm.ScalarMappable(norm=norm, cmap="inferno")
    rgb = (mapper.to_rgba(s)[:, :3] * 255).astype(np.uint8)
    img = viz.topdown_image(p, colors=rgb, resolution=resolution, point_size=2)
    _figure_png([img], ["relevance"], path, title, colorbar=mapper)


#: smallest instance (points) in the demo's instance rows: ScanNet's 100 scaled to the demo's sparse rooms
DEMO_MIN_POINTS = 20


def instance_rows(world: World, model) -> dict:
    """3D instances on the demo's held-out room (the first training room without one): MaskClustering over
    superpoints with the simulated mask teacher's masks, labelled by the distilled SP+TESD features, next to
    the same-label connected-components baseline; ScanNet AP (class-agnostic and per class).

    Returns {"rows": [...], "instances": [Instance], "scene": SyntheticScene, "min_points": int}."""
    from sas_core.eval.instances import SceneInstances, evaluate_instances
    from sas_core.instances import InstanceConfig, label_components
    from sas_core.instances.synthetic import simulated_teachers, synthetic_instances
    from sas_core.train.distill import scene_point_features

    cfg = world.config
    scene, data = (world.test[0], world.test_data[0]) if world.test else (world.train[0], world.train_data[0])
    feats = scene_point_features(model, data, cfg.voxel_size, input_color=cfg.input_color)
    text = world.text.float().numpy()
    icfg = InstanceConfig(min_points=DEMO_MIN_POINTS)
    t = time.time()
    found, _, _ = synthetic_instances(scene, world.encoder, world.class_names, text, masks="teacher",
                                      features=feats, config=icfg, teachers=simulated_teachers(world.encoder, cfg.seed))
    seconds = time.time() - t
    pc = scene.points
    labels = label_points(feats, None, world.text)
    groups, glab = label_components(pc.positions, labels, min_points=DEMO_MIN_POINTS)
    from sas_core.text import text_labels

    _, point_score = text_labels(feats, text, normalize=True)
    base_scores = [float(point_score[g].mean()) for g in groups]
    rows = []
    for key, method, masks, labs, scores in (
            ("mask_clustering", "Mask clustering over superpoints (MaskClustering / MOSS)",
             [i.indices for i in found], [i.label for i in found], [i.score for i in found]),
            ("label_components", "Same-label connected components (baseline)", groups, glab, base_scores)):
        scene_i = SceneInstances(pc.labels, pc.instances, masks, labs, scores)
        agn = evaluate_instances([scene_i], world.class_names, class_agnostic=True, min_region_size=DEMO_MIN_POINTS)
        ov = evaluate_instances([scene_i], world.class_names, min_region_size=DEMO_MIN_POINTS)
        rows.append({"key": key, "method": method, "instances": len(masks),
                     **{f"agnostic_{k}": 100 * agn[k] for k in ("ap", "ap50", "ap25")},
                     **{f"open_vocab_{k}": 100 * ov[k] for k in ("ap", "ap50", "ap25")}})
    rows[0]["seconds"] = seconds
    return {"rows": rows, "instances": found, "scene": scene, "min_points": DEMO_MIN_POINTS}


def format_instance_markdown(inst: dict) -> str:
    """The instance rows as Markdown (percent; ScanNet's protocol with the demo's min region)."""
    scene = inst["scene"]
    lines = [f"## 3D instances on {scene.name} (synthetic)", "",
             f"_{SYNTHETIC_NOTE}_", "",
             f"ScanNet's instance protocol (18 classes; AP over IoU 0.50:0.05:0.90), min region "
             f"{inst['min_points']} points (ScanNet: 100; the demo's rooms are sparse). Labels from the distilled "
             "SP+TESD features; masks from the simulated mask teacher.", "",
             "| method | instances | AP | AP50 | AP25 | AP (open vocab.) | AP50 (open vocab.) | AP25 (open vocab.) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v):
        return "nan" if v != v else f"{v:.1f}"

    for r in inst["rows"]:
        lines.append(f"| {r['method']} | {r['instances']} | {f(r['agnostic_ap'])} | {f(r['agnostic_ap50'])} | "
                     f"{f(r['agnostic_ap25'])} | {f(r['open_vocab_ap'])} | {f(r['open_vocab_ap50'])} | "
                     f"{f(r['open_vocab_ap25'])} |")
    return "\n".join(lines) + "\n"


def instances_png(positions, instances, path: Path, title: str, mask=None, resolution: float = 0.03) -> None:
    """Top-down picture of instances: points coloured by instance, each object's oriented box and label
    (walls and floors coloured only), and a legend (id, label, points). ``mask``: optional (N,) bool of the points to draw (e.g. no ceiling)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon

    from sas_core import viz
    from sas_core.eval.instances import NO_INSTANCE_CLASSES
    from sas_core.instances import instance_ids
    from sas_core.io import atomic_path

    pos = np.asarray(positions, np.float32)
    keep = np.ones(len(pos), bool) if mask is None else np.asarray(mask, bool)
    ids = instance_ids(len(pos), instances)
    palette = viz.label_palette(seed=3)[:255]  # no grey: grey is "no instance"
    rgb = np.full((len(pos), 3), 215, np.uint8)
    rgb[ids >= 0] = palette[ids[ids >= 0] % len(palette)]
    p = pos[keep]
    if len(p) == 0:
        raise ValueError("instances_png: no points to draw")
    lo, hi = p[:, :2].min(0), p[:, :2].max(0)
    img = viz.topdown_image(p, colors=rgb[keep], resolution=resolution, bounds=np.stack([lo, hi]), point_size=2)
    width = max(6.0, 6.0 * (hi[0] - lo[0]) / max(hi[1] - lo[1], 1e-6))
    fig, ax = plt.subplots(figsize=(min(width, 12.0) + 3.2, 6.0))
    ax.imshow(img, extent=(lo[0], lo[0] + img.shape[1] * resolution, lo[1], lo[1] + img.shape[0] * resolution))
    handles = []
    structure = [i for i in instances if i.name in NO_INSTANCE_CLASSES]
    for inst in instances:
        if inst.name in NO_INSTANCE_CLASSES:
            continue  # walls and floors: coloured, not boxed (not instance classes)
        color = palette[inst.id % len(palette)] / 255.0
        xy = inst.obb_corners()[:4, :2]
        ax.add_patch(Polygon(xy, closed=True, fill=False, edgecolor=color, linewidth=1.5))
        ax.text(float(inst.obb_center[0]), float(inst.obb_center[1]), f"{inst.id} {inst.name}", fontsize=6,
                ha="center", va="center", color="black",
                bbox=dict(boxstyle="round,pad=0.1", facecolor="white", alpha=0.6, linewidth=0))
        handles.append(plt.Line2D([], [], color=color, linewidth=4,
                                  label=f"{inst.id}: {inst.name or 'object'} ({inst.n_points} pts)"))
    if structure:
        handles.append(plt.Line2D([], [], color="none", label=f"+ {len(structure)} wall/floor pieces (no box)"))
    ax.set_xlim(lo[0], lo[0] + img.shape[1] * resolution)
    ax.set_ylim(lo[1], lo[1] + img.shape[0] * resolution)
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.set_title(title, fontsize=9)
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=6, ncol=1 + len(handles) // 28,
                  title="instances (oriented boxes)", title_fontsize=7, frameon=False)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def write_report(out: Path, rows: Sequence[dict], results: Dict[str, Dict[str, dict]], world: Optional[World] = None,
                 model=None, extra: Optional[dict] = None) -> dict:
    """Write the report folder; returns {name: path} of the files written."""
    from sas_core.eval import to_json
    from sas_core.io import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    md = format_markdown(rows, config_note=config_note(world.config) if world is not None else "")
    atomic_write_text(out / "table.md", md)
    files["table_md"] = out / "table.md"
    payload = {"synthetic": True, "note": SYNTHETIC_NOTE, "held_out_note": HELD_OUT_NOTE,
               "settings": {k: t for k, t in SETTINGS if k in results}, "rows": list(rows),
               "per_class": {s: {k: to_json(v).get("per_class", {}) for k, v in res.items()}
                             for s, res in results.items()},
               **(extra or {})}
    atomic_write_text(out / "table.json", json.dumps(payload, indent=2, sort_keys=True, default=_jsonable))
    files["table_json"] = out / "table.json"
    _bar_chart(rows, out / "ablation.png")
    files["bar_chart"] = out / "ablation.png"
    if world is not None and model is not None and world.test_data:
        from sas_core.train.distill import scene_point_features

        scene = world.test_data[0]
        feats = scene_point_features(model, scene, world.config.voxel_size, input_color=world.config.input_color)
        pred = label_points(feats, None, world.text)
        _topdown(scene.positions, pred, scene.labels, out / "topdown.png",
                 f"{scene.name} (held out): SAS (SP+TESD) labels vs ground truth - SYNTHETIC", world.class_names)
        files["topdown"] = out / "topdown.png"
        import torch

        for i, query in enumerate(world.config.queries):
            q = world.encoder.encode([query]).float()
            scores = torch.nn.functional.normalize(feats, dim=1) @ torch.nn.functional.normalize(q, dim=1).t()
            path = out / f"query_{i + 1}.png"
            _heatmap(scene.positions, scores[:, 0].numpy(), scene.labels, path,
                     f"{scene.name}: query {query!r} - SYNTHETIC")
            files[f"query_{i + 1}"] = path
    if world is not None and model is not None:
        inst = instance_rows(world, model)
        inst_md = format_instance_markdown(inst)
        md = md + "\n" + inst_md
        atomic_write_text(out / "table.md", md)
        payload["instances"] = inst["rows"]
        atomic_write_text(out / "table.json", json.dumps(payload, indent=2, sort_keys=True, default=_jsonable))
        scene = inst["scene"]
        instances_png(scene.points.positions, inst["instances"], out / "instances.png",
                      f"{scene.name}: 3D instances (mask clustering over superpoints) - SYNTHETIC",
                      mask=scene.points.labels != 255)
        files["instances"] = out / "instances.png"
    lines = ["# SAS demo report (synthetic world)", "", SYNTHETIC_NOTE, "", md]
    for name, path in files.items():
        lines.append(f"- `{Path(path).name}`: {name}")
    atomic_write_text(out / "README.md", "\n".join(lines) + "\n")
    files["readme"] = out / "README.md"
    return {k: str(v) for k, v in files.items()}


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v)}")


def ros_replay(checkpoint: Path, scene, queries: Sequence[str]) -> Optional[dict]:
    """Replay the frames of a synthetic room through the live ROS mapping node running the distilled
    model and query it (``sas_ros.live_demo.replay_and_query``); None when rclpy is not importable."""
    try:
        import rclpy  # noqa: F401
    except ImportError:
        return None
    from sas_ros.live_demo import replay_and_query  # the application layer may import both sides

    return replay_and_query(scene.frames, list(queries), checkpoint=str(checkpoint))


def _export_model(src: Path, dst: Path) -> None:
    """Copy a training checkpoint without its optimizer / TESD state (for inference and ROS)."""
    from sas_core.nn import load_checkpoint, save_checkpoint

    model, config, extra = load_checkpoint(src)
    save_checkpoint(dst, model, config, {"epoch": extra.get("epoch"), "history": extra.get("history", [])})


def run_world(cfg: DemoConfig, work_dir: Path, t0: Optional[float] = None):
    """Prepare the world, train the three 3D rows and evaluate: (world, models, results, rows)."""
    t0 = t0 or time.time()
    world = prepare_world(cfg, t0)
    models = distill_rows(world, Path(work_dir), t0)
    results = evaluate_rows(world, models)
    return world, models, results, table_rows(results)


def run_demo(cfg: DemoConfig) -> dict:
    """The whole demo; prints the table and writes the report folder. Returns a summary dict."""
    t0 = time.time()
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    work = out / "training"
    if work.exists():
        shutil.rmtree(work)  # a fresh world each run: never resume a previous demo's checkpoints
    _log(f"SAS demo on the SYNTHETIC world -> {out}", t0)
    world, models, results, rows = run_world(cfg, work, t0)
    print(format_markdown(rows, config_note=config_note(cfg)), flush=True)
    ckpt = out / "model.pt"
    _export_model(work / "sp_tesd" / "last.pt", ckpt)
    world.capability.save(out / "capability.json")
    summary = {"seconds": None, "checkpoint": str(ckpt), "config": asdict(cfg), "timings": world.timings}
    files = write_report(out, rows, results, world, models["sp_tesd"], {"config": asdict(cfg)})
    summary["files"] = files
    if cfg.ros:
        try:
            ros = ros_replay(ckpt, world.test[0] if world.test else world.train[0], cfg.queries)
        except Exception as exc:  # the ROS step is an add-on: report it, keep the demo's result
            ros = {"error": f"{type(exc).__name__}: {exc}"}
        summary["ros"] = ros
        if ros is not None:
            _log(f"ROS replay: {ros.get('message', ros)}", t0)
            from sas_core.io import atomic_write_text

            readme = (out / "README.md").read_text()
            atomic_write_text(out / "README.md", readme + "\n## ROS replay (synthetic frames through the live mapping "
                              "node running model.pt)\n\n```\n" + json.dumps(ros, indent=2, default=_jsonable)
                              + "\n```\n")
    summary["seconds"] = time.time() - t0
    summary["rows"] = rows
    from sas_core.io import atomic_write_text

    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=_jsonable))
    _log(f"done: report in {out} ({summary['seconds']:.0f} s)", t0)
    return summary
