"""The Gaussian-splat options of the CLI: `sas segment --gaussians`, `sas eval --gaussians`,
`sas synth --gaussians` (SAS section 4.4, 3D Gaussian segmentation).

The workflow on the synthetic world, every step the same commands as for point clouds::

    sas synth --out world --gaussians              # world/gaussians/<scene>.ply + <scene>_views.npz,
                                                   # and the centres in world/openscene_gaussians/
    sas fuse --data world/openscene_gaussians ...  # fused features onto the Gaussian centres
    sas distill --data world/openscene_gaussians --mode pixel_point ...   # the paper: no SP / TESD
    sas segment model.pt world/gaussians/<scene>.ply --gaussians --out seg.ply
    sas eval --gaussians --pred seg.ply --gt world/gaussians/<scene>_views.npz

On real data, any INRIA-layout splat PLY goes into `sas segment --gaussians`, and `sas eval
--gaussians` needs the views as an .npz (:func:`sas_core.data.gaussians.save_views`).
"""

from __future__ import annotations

from pathlib import Path

SEGMENT_HELP = ("CLOUD is a 3D Gaussian splat PLY (INRIA layout): every Gaussian is labelled from its centre and "
                "--out gets a segmented splat PLY (label colours in the SH DC terms, higher SH terms zeroed, "
                "'label' and 'score' properties) that splat viewers show")
EVAL_HELP = ("2D evaluation of labelled Gaussians (SAS Table 5): --pred is a labelled splat PLY (`sas segment "
             "--gaussians`), --gt a views .npz (poses (V,4,4) camera-to-world, intrinsics fx fy cx cy W H, label "
             "images (V,H,W); `sas synth --gaussians` writes <scene>_views.npz); the labels are rendered into "
             "every view with the CPU splatting renderer and scored against the label images")


def add_eval_arguments(parser) -> None:
    """The ``sas eval --gaussians`` flags."""
    g = parser.add_argument_group("3D Gaussian segmentation (2D evaluation of rendered labels)")
    g.add_argument("--gaussians", action="store_true", help=EVAL_HELP)
    g.add_argument("--render-dir", metavar="DIR", default=None,
                   help="with --gaussians: also write the rendered label images (PNG, next to the ground truth)")
    from sas_core.config import add_config_arguments
    from sas_core.geometry.splatting import SplatConfig

    add_config_arguments(g, SplatConfig, skip=("background",), prefix="splat-")


def run_segment(args) -> int:
    """`sas segment CHECKPOINT IN.ply --gaussians --out OUT.ply`."""
    import numpy as np

    from sas_core.data.gaussians import read_gaussians, segmented_gaussians, write_gaussians
    from sas_core.infer import Segmenter
    from sas_core.io import atomic_path
    from sas_core.text import parse_vocabulary

    from sas_app.commands import inference_config

    if args.fused or getattr(args, "instances", False):
        raise ValueError("--fused and --instances are for point clouds, not with --gaussians")
    names = parse_vocabulary(args.vocabulary)
    gaussians = read_gaussians(args.cloud)
    seg = Segmenter.from_checkpoint(args.checkpoint, device=args.device, config=inference_config(args))
    seg.set_vocabulary(names, args.templates)
    feats = seg.features(gaussians.positions, gaussians.base_colors(), progress=True)
    labels, scores = seg.classify(feats)
    out = Path(args.out)
    write_gaussians(out, segmented_gaussians(gaussians, labels, scores))
    npy = out.with_suffix(".npy")
    with atomic_path(npy) as tmp:
        np.save(tmp, labels)
    print(f"{len(gaussians)} Gaussians, {len(names)} classes -> {out} (segmented splat PLY; labels: {npy})")
    counts = np.bincount(labels, minlength=len(names))
    for k in np.argsort(-counts)[:10]:
        if counts[k]:
            print(f"  {names[k]:<20s} {counts[k]:>9d}  ({counts[k] / len(labels) * 100:5.1f}%)")
    return 0


def run_eval(args, write) -> int:
    """`sas eval --gaussians --pred SEG.ply --gt VIEWS.npz`; ``write(args, payload, markdown)`` saves
    --json / --markdown as the other evaluations do."""
    import numpy as np

    from sas_core.config import config_from_args
    from sas_core.data.gaussians import load_views, read_gaussians
    from sas_core.eval import format_table, to_json
    from sas_core.eval.gaussians import evaluate_gaussians, render_view_labels
    from sas_core.geometry.splatting import SplatConfig
    from sas_core.text import parse_vocabulary

    if not (args.pred and args.gt):
        raise ValueError("--gaussians needs --pred SEG.ply (a labelled splat) and --gt VIEWS.npz (the cameras and "
                         "their ground-truth label images)")
    names = parse_vocabulary(args.vocabulary)
    gaussians = read_gaussians(args.pred)
    if gaussians.labels is None:
        raise ValueError(f"{args.pred}: no 'label' property (write it with `sas segment --gaussians`)")
    views = load_views(args.gt)
    bad = views.labels[(views.labels != 255) & ((views.labels < 0) | (views.labels >= len(names)))]
    if bad.size:
        raise ValueError(f"{args.gt}: label images hold classes outside the {len(names)}-class vocabulary "
                         f"({np.unique(bad)[:5].tolist()})")
    cfg = config_from_args(SplatConfig, args, prefix="splat-")
    result = evaluate_gaussians([(gaussians, gaussians.labels, views)], names, cfg, no_feature=args.no_feature)
    title = f"{args.pred} rendered into {len(views)} views of {args.gt}"
    print(format_table(result, markdown=False, title=title))
    print(f"2D mIoU {result['miou'] * 100:.2f}  mAcc {result['macc'] * 100:.2f}  (over present classes: mIoU "
          f"{result['miou_present'] * 100:.2f}, mAcc {result['macc_present'] * 100:.2f}); "
          f"{result['covered'] * 100:.1f}% of the evaluated pixels covered")
    if args.render_dir:
        from sas_core.viz import label_colors, save_png

        rendered = render_view_labels(gaussians, gaussians.labels, views, len(names), cfg)
        out = Path(args.render_dir)
        for i, (pred, gt) in enumerate(zip(rendered, views.labels)):
            gap = np.full((pred.shape[0], 4, 3), 255, np.uint8)
            save_png(out / f"view_{i:03d}.png", np.concatenate([label_colors(pred), gap, label_colors(gt)], axis=1))
        print(f"rendered labels (left) and ground truth (right) -> {out}/view_*.png")
    payload = {**to_json({k: v for k, v in result.items()}), "gaussians": str(args.pred),
               "views_file": str(args.gt)}
    write(args, payload, format_table(result))
    return 0


def export_synthetic(scene, out: Path, split: str, config=None) -> dict:
    """`sas synth --gaussians`: write ``out/gaussians/<scene>.ply`` (the splat scene),
    ``out/gaussians/<scene>_views.npz`` (novel views with label images) and the centres as an
    OpenScene scene ``out/openscene_gaussians/<split>/<scene>.pth`` (with the room's 2D frames), so
    `sas fuse` / `sas distill` run on the Gaussians unchanged. ``config``: a
    :class:`sas_core.data.gaussians.SyntheticGaussianConfig`. Returns the paths."""
    from dataclasses import replace

    from sas_core.data.gaussians import SyntheticGaussianConfig, save_views, synthetic_gaussians, synthetic_views, \
        write_gaussians
    from sas_core.data.openscene import write_openscene_scene
    from sas_core.types import PointCloud

    g, gt = synthetic_gaussians(scene, config or SyntheticGaussianConfig(seed=scene.config.seed))
    ply = out / "gaussians" / f"{scene.name}.ply"
    write_gaussians(ply, g)
    views = out / "gaussians" / f"{scene.name}_views.npz"
    save_views(views, synthetic_views(scene, max(1, min(8, len(scene.frames)))))
    centres = replace(scene, points=PointCloud(positions=g.positions, colors=g.base_colors(), labels=gt))
    written = write_openscene_scene(centres, out / "openscene_gaussians", split=split)
    return {"gaussians_ply": str(ply), "gaussians_views": str(views), "gaussians_pth": str(written["pth"]),
            "n_gaussians": len(g)}
