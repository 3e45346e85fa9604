"""`sas capability`: annotation-free capability tables for the 2D teachers (SAS section 3.2).

Examples::

    # the paper's construction: Stable Diffusion images + SAM pseudo-masks, dense CLIP teacher
    sas capability --source diffusion --sd-model ~/models/stable-diffusion-v1-5 \\
        --sam-checkpoint ~/models/sam_vit_h_4b8939.pth --teachers dense_clip \\
        --clip-model ViT-B-16 --clip-checkpoint ~/models/ViT-B-16.bin --output cap.json

    # the same with the paths from a models file (docs/models.md)
    sas capability --source diffusion --teachers dense_clip --models ~/models/models.yaml --output cap.json

    # synthetic world: probe renders with ground-truth masks, simulated teachers
    sas capability --source synthetic --teachers simulated --output cap_synth.json

    # a robot's few labelled frames: <root>/<class>/images/*.png + <root>/<class>/masks/*.png
    sas capability --source folder --folder ./labelled --teachers dense_clip ...

Each teacher "segments" an image for class k as the pixels whose argmax against the vocabulary's
text embeddings ("a {} in a scene") is k; ``S[t][k] = sum I / sum U`` over the class's images.
Images, masks and per-image counts are cached (``--cache``), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sas_app.commands import add_dense_preset_argument, add_models_argument, apply_model_paths, dense_options

HELP = "annotation-free capability tables for the 2D teachers"

TEACHERS = ("simulated", "sim_dense", "sim_mask", "dense_clip")


def add_arguments(parser):
    from sas_core.capability.diffusion import DiffusionConfig  # NumPy only at import
    from sas_core.capability.pseudo_masks import PseudoMaskConfig
    from sas_core.config import add_config_arguments
    from sas_core.teachers.dense_clip import DenseClipConfig

    parser.add_argument("--source", choices=("diffusion", "synthetic", "folder"), default="diffusion",
                        help="reference images + masks: Stable Diffusion + SAM (paper), synthetic probe renders, "
                             "or a folder of labelled images (default: diffusion)")
    parser.add_argument("--output", "-o", required=True, help="capability table JSON to write")
    parser.add_argument("--cache", default=None,
                        help="cache folder for images, masks and per-image counts (default: <output>.cache)")
    parser.add_argument("--vocabulary", "--vocab", default="scannet20",
                        help="vocabulary: a name (scannet20, matterport160, ...), a file with one class per line, or comma-separated names (default: scannet20)")
    parser.add_argument("--classes", nargs="+", default=None, help="only these classes (others stay empty)")
    parser.add_argument("--teachers", nargs="+", default=["simulated"], choices=TEACHERS,
                        help="teachers to rate: simulated (= sim_dense + sim_mask, synthetic text space) or "
                             "dense_clip (open_clip, needs --clip-checkpoint)")
    parser.add_argument("--teacher-seed", type=int, default=0, help="seed of the simulated teachers")
    t = parser.add_argument_group("dense CLIP teacher (DenseClipConfig)")
    add_config_arguments(t, DenseClipConfig, prefix="clip-", only=("model", "checkpoint", "recipe"))
    add_dense_preset_argument(t)
    add_models_argument(t)
    parser.add_argument("--reduce", choices=("sum", "mean"), default="sum",
                        help="sum I / sum U over images (public code) or mean per-image IoU (eq. 3)")
    parser.add_argument("--device", default="cpu", help="torch device for diffusion, SAM and CLIP (default: cpu)")
    g = parser.add_argument_group("diffusion source (DiffusionConfig)")
    add_config_arguments(g, DiffusionConfig, skip=("device",), aliases={"model_path": "--sd-model",
                                                                        "seed_offset": "--seed"})
    g.add_argument("--fp16", dest="dtype", action="store_const", const="float16", default=argparse.SUPPRESS,
                   help="same as --dtype float16")
    g = parser.add_argument_group("SAM pseudo-masks (PseudoMaskConfig)")
    add_config_arguments(g, PseudoMaskConfig, skip=("device",))
    g = parser.add_argument_group("synthetic / folder sources")
    g.add_argument("--probes", type=int, default=20, help="synthetic probe renders per class")
    g.add_argument("--probe-seed", type=int, default=1000, help="seed of the probe renders")
    g.add_argument("--probe-size", type=int, nargs=2, default=[320, 240], metavar=("W", "H"), help="probe size")
    g.add_argument("--folder", default=None, help="folder source root: <root>/<class>/images|masks")
    parser.add_argument("--no-progress", "--quiet", action="store_true", help="no progress bar")


def _teachers(args, vocab):
    """(teachers, text encoder, provenance of the models), built by sas_core.teachers.registry."""
    from sas_core.teachers.registry import SIMULATED, build_teachers, expand_names

    names = expand_names(args.teachers)
    if set(names) & set(SIMULATED) and set(names) - set(SIMULATED):
        raise ValueError("simulated teachers live in the synthetic text space and cannot be rated together "
                         "with CLIP teachers; run them separately")
    pairs = build_teachers(names, vocab, seed=args.teacher_seed, clip_model=args.clip_model,
                           clip_checkpoint=args.clip_checkpoint, device=args.device, **dense_options(args))
    teachers = [t for t, _ in pairs]
    if set(names) <= set(SIMULATED):
        models = {t.name: t.config.to_dict() for t in teachers}
    else:
        models = {t.name: {"model": args.clip_model, "checkpoint": args.clip_checkpoint, "recipe": t.config.recipe,
                           "preset": args.clip_preset} if hasattr(t, "config") else {"model": args.clip_model}
                  for t in teachers}
    return teachers, pairs[0][1], models


def _source(args, cache: Path):
    from sas_core.capability.sources import FolderSource, SyntheticProbeSource

    if args.source == "synthetic":
        return SyntheticProbeSource(args.probes, seed=args.probe_seed, width=args.probe_size[0],
                                    height=args.probe_size[1])
    if args.source == "folder":
        if not args.folder:
            raise ValueError("--source folder needs --folder ROOT")
        return FolderSource(args.folder)
    from sas_core.capability.diffusion import DiffusionConfig, DiffusionSynthesizer
    from sas_core.capability.pseudo_masks import PseudoMaskConfig, PseudoMasker
    from sas_core.capability.sources import DiffusionSource
    from sas_core.config import config_from_args

    dcfg = config_from_args(DiffusionConfig, args)
    if "{}" not in dcfg.prompt:
        raise ValueError(f"--prompt must contain {{}} for the class name, got {dcfg.prompt!r}")
    pcfg = config_from_args(PseudoMaskConfig, args)
    masker = PseudoMasker(None, pcfg)  # checks the SAM file first (cheap) before loading diffusion
    return DiffusionSource(DiffusionSynthesizer(dcfg), masker, dcfg.images_per_class, cache)


def run(args) -> int:
    from sas_core.capability.sources import build_table
    from sas_core.text import class_embeddings, parse_vocabulary

    vocab = list(parse_vocabulary(args.vocabulary))
    if args.source == "diffusion" or "dense_clip" in args.teachers:
        apply_model_paths(args, {"clip_model": "clip_model", "clip_checkpoint": "clip_checkpoint",
                                 "clip_preset": "clip_preset", "sam_model_type": "sam_model", "sam_checkpoint": "sam_checkpoint",
                                 "stable_diffusion": "model_path"})
    out = Path(args.output)
    cache = Path(args.cache) if args.cache else out.with_name(out.name + ".cache")
    teachers, encoder, models = _teachers(args, vocab)
    source = _source(args, cache)
    text = class_embeddings(encoder, vocab)
    prov = {"vocabulary_name": args.vocabulary, "teacher_models": models,
            "text_encoder": encoder.config() if hasattr(encoder, "config") else type(encoder).__name__,
            "text_template": "a {} in a scene"}
    res = build_table(source, teachers, text, vocab, cache_dir=cache, output=out, provenance=prov,
                      reduce=args.reduce, classes=args.classes, progress=not args.no_progress)
    t = res.table
    width = max(len(n) for n in t.vocabulary)
    print(f"capability table ({args.source}, {len(t.teachers)} teachers x {len(t.vocabulary)} classes) -> {res.path}")
    print(" " * width + "  " + "  ".join(f"{n:>10s}" for n in t.teachers))
    for k, name in enumerate(t.vocabulary):
        cells = ["       n/a" if v != v else f"{v:10.3f}" for v in t.scores[:, k]]
        print(f"{name:>{width}s}  " + "  ".join(cells))
    if res.reused:
        print(f"(resumed: {res.reused} teacher-image results reused from {cache})")
    return 0
