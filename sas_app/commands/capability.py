"""`sas capability`: annotation-free capability tables for the 2D teachers (SAS section 3.2).

Examples::

    # the paper's construction: Stable Diffusion images + SAM pseudo-masks, dense CLIP teacher
    sas capability --source diffusion --sd-model ~/models/stable-diffusion-v1-5 \\
        --sam-checkpoint ~/models/sam_vit_h_4b8939.pth --teachers dense_clip \\
        --clip-model ViT-B-16 --clip-checkpoint ~/models/ViT-B-16.bin --output cap.json

    # synthetic world: probe renders with ground-truth masks, simulated teachers
    sas capability --source synthetic --teachers simulated --output cap_synth.json

    # a robot's few labelled frames: <root>/<class>/images/*.png + <root>/<class>/masks/*.png
    sas capability --source folder --folder ./labelled --teachers dense_clip ...

Each teacher "segments" an image for class k as the pixels whose argmax against the vocabulary's
text embeddings ("a {} in a scene") is k; ``S[t][k] = sum I / sum U`` over the class's images.
Images, masks and per-image counts are cached (``--cache``), so an interrupted run resumes.
"""

from __future__ import annotations

from pathlib import Path

HELP = "annotation-free capability tables for the 2D teachers"

TEACHERS = ("simulated", "sim_dense", "sim_mask", "dense_clip")


def add_arguments(parser):
    from sas_core.capability.diffusion import DiffusionConfig  # NumPy only at import

    d = DiffusionConfig()
    parser.add_argument("--source", choices=("diffusion", "synthetic", "folder"), default="diffusion",
                        help="reference images + masks: Stable Diffusion + SAM (paper), synthetic probe renders, "
                             "or a folder of labelled images (default: diffusion)")
    parser.add_argument("--output", "-o", required=True, help="capability table JSON to write")
    parser.add_argument("--cache", default=None,
                        help="cache folder for images, masks and per-image counts (default: <output>.cache)")
    parser.add_argument("--vocabulary", default="scannet20", help="vocabulary name (sas_core.text.get_vocabulary)")
    parser.add_argument("--classes", nargs="+", default=None, help="only these classes (others stay empty)")
    parser.add_argument("--teachers", nargs="+", default=["simulated"], choices=TEACHERS,
                        help="teachers to rate: simulated (= sim_dense + sim_mask, synthetic text space) or "
                             "dense_clip (open_clip, needs --clip-checkpoint)")
    parser.add_argument("--teacher-seed", type=int, default=0, help="seed of the simulated teachers")
    parser.add_argument("--clip-model", default="ViT-B-16", help="open_clip architecture (dense_clip)")
    parser.add_argument("--clip-checkpoint", default=None, help="local open_clip weights (dense_clip)")
    parser.add_argument("--clip-recipe", default="sclip", help="dense CLIP recipe: maskclip|sclip|clearclip|naclip")
    parser.add_argument("--reduce", choices=("sum", "mean"), default="sum",
                        help="sum I / sum U over images (public code) or mean per-image IoU (eq. 3)")
    parser.add_argument("--device", default="cpu", help="torch device for diffusion, SAM and CLIP")
    g = parser.add_argument_group("diffusion source")
    g.add_argument("--sd-model", default="", help="local Stable Diffusion v1.5 folder (diffusers format)")
    g.add_argument("--images-per-class", type=int, default=d.images_per_class, help="images per class")
    g.add_argument("--steps", type=int, default=d.steps, help="denoising steps")
    g.add_argument("--guidance", type=float, default=d.guidance, help="classifier-free guidance scale")
    g.add_argument("--prompt", default=d.prompt, help="prompt template with {} for the class")
    g.add_argument("--seed", type=int, default=d.seed_offset, help="seed of image 0 (image i uses seed + i)")
    g.add_argument("--size", type=int, nargs=2, default=[d.width, d.height], metavar=("W", "H"), help="image size")
    g.add_argument("--threshold", type=float, default=d.threshold, help="coarse-mask threshold")
    g.add_argument("--fp16", action="store_true", help="run diffusion in float16 (CUDA)")
    g.add_argument("--sam-checkpoint", default="", help="local SAM checkpoint (e.g. sam_vit_h_4b8939.pth)")
    g.add_argument("--sam-model", default="vit_h", help="SAM model type (vit_h | vit_l | vit_b)")
    g = parser.add_argument_group("synthetic / folder sources")
    g.add_argument("--probes", type=int, default=20, help="synthetic probe renders per class")
    g.add_argument("--probe-seed", type=int, default=1000, help="seed of the probe renders")
    g.add_argument("--probe-size", type=int, nargs=2, default=[320, 240], metavar=("W", "H"), help="probe size")
    g.add_argument("--folder", default=None, help="folder source root: <root>/<class>/images|masks")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _teachers(args, vocab):
    """(teachers, text encoder, provenance of the models), built by sas_core.teachers.registry."""
    from sas_core.teachers.registry import SIMULATED, build_teachers, expand_names

    names = expand_names(args.teachers)
    if set(names) & set(SIMULATED) and set(names) - set(SIMULATED):
        raise ValueError("simulated teachers live in the synthetic text space and cannot be rated together "
                         "with CLIP teachers; run them separately")
    pairs = build_teachers(names, vocab, seed=args.teacher_seed, clip_model=args.clip_model,
                           clip_checkpoint=args.clip_checkpoint, recipe=args.clip_recipe, device=args.device)
    teachers = [t for t, _ in pairs]
    if set(names) <= set(SIMULATED):
        models = {t.name: t.config.to_dict() for t in teachers}
    else:
        models = {t.name: {"model": args.clip_model, "checkpoint": args.clip_checkpoint, "recipe": args.clip_recipe}
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

    dcfg = DiffusionConfig(model_path=args.sd_model, prompt=args.prompt, steps=args.steps, guidance=args.guidance,
                           images_per_class=args.images_per_class, seed_offset=args.seed, width=args.size[0],
                           height=args.size[1], threshold=args.threshold, device=args.device,
                           dtype="float16" if args.fp16 else "float32")
    if "{}" not in dcfg.prompt:
        raise ValueError(f"--prompt must contain {{}} for the class name, got {dcfg.prompt!r}")
    pcfg = PseudoMaskConfig(sam_model=args.sam_model, sam_checkpoint=args.sam_checkpoint, device=args.device)
    masker = PseudoMasker(None, pcfg)  # checks the SAM file first (cheap) before loading diffusion
    return DiffusionSource(DiffusionSynthesizer(dcfg), masker, dcfg.images_per_class, cache)


def run(args) -> int:
    from sas_core.capability.sources import build_table
    from sas_core.text import class_embeddings, parse_vocabulary

    vocab = list(parse_vocabulary(args.vocabulary))
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
