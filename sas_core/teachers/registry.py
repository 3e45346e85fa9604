"""The teacher registry: every 2D teacher built by name, in one place (`sas fuse`, `sas capability`).

Names (:data:`TEACHERS`):

* ``sim_dense``, ``sim_mask``: the simulated pair of the synthetic world
  (:func:`~sas_core.teachers.simulated.make_simulated_pair`), in the synthetic text space;
  ``simulated`` means both.
* ``dense_clip``: dense CLIP (MaskCLIP / SCLIP / ClearCLIP / NACLIP recipe), the LSeg stand-in.
* ``mask_clip``: SAM masks labelled by CLIP crops, aligned via text, the SEEM stand-in.
* ``precomputed``: OpenScene's fused LSeg/OpenSeg point features (a per-point teacher).

Teachers that share a text space share one encoder (and the CLIP teachers one open_clip model),
so every teacher built together lands in the same embedding space (SAS section 3.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

TEACHERS = ("sim_dense", "sim_mask", "simulated", "dense_clip", "mask_clip", "precomputed")
"""Names :func:`build_teachers` accepts (``simulated`` = ``sim_dense`` + ``sim_mask``)."""

SIMULATED = ("sim_dense", "sim_mask")


@dataclass
class TeacherOptions:
    """What the teachers are built from (the union of every teacher's settings)."""

    seed: int = 0                           # seed of the simulated teachers (sim_dense: seed, sim_mask: seed + 1)
    clip_model: str = "ViT-B-16"            # open_clip architecture (dense_clip, mask_clip, text space of precomputed)
    clip_checkpoint: Optional[str] = None   # local open_clip weights
    recipe: Optional[str] = None            # dense CLIP recipe: maskclip | sclip | clearclip | naclip (None: the
                                            # preset's, else sclip)
    dense_preset: Optional[str] = None      # dense CLIP inference preset (DENSE_CLIP_PRESETS: sclip, clearclip, ...)
    sam_model: str = "vit_b"                # segment-anything model (mask_clip)
    sam_checkpoint: Optional[str] = None    # local SAM weights (mask_clip)
    precomputed_root: Optional[str] = None  # folder of OpenScene fused features (precomputed)
    precomputed_name: str = "lseg"          # name of the precomputed teacher
    device: str = "cpu"                     # torch device


def expand_names(names: Sequence[str]) -> List[str]:
    """Teacher names in order, ``simulated`` expanded, duplicates dropped; unknown names are errors."""
    out: List[str] = []
    for name in names:
        if name not in TEACHERS:
            raise ValueError(f"unknown teacher {name!r}; known: {', '.join(TEACHERS)}")
        for n in (SIMULATED if name == "simulated" else (name,)):
            if n not in out:
                out.append(n)
    if not out:
        raise ValueError("no teachers requested")
    return out


def build_teachers(names: Sequence[str], vocabulary: Sequence[str], options: Optional[TeacherOptions] = None,
                   **kwargs) -> List[Tuple[object, object]]:
    """Build teachers by name -> ``[(teacher, text_encoder)]`` in the order asked.

    Args:
        names: names from :data:`TEACHERS`.
        vocabulary: class names (labels of the simulated teachers, the mask teacher's label set).
        options: a :class:`TeacherOptions`; ``kwargs`` override its fields.

    The simulated teachers share one :class:`~sas_core.text.SyntheticTextEncoder`; the CLIP teachers
    share one open_clip model and its :class:`~sas_core.text.OpenClipTextEncoder`. The precomputed
    teacher's encoder is that CLIP encoder when ``clip_checkpoint`` is set, else None.
    """
    opts = TeacherOptions(**{**(vars(options) if options else {}), **kwargs})
    vocabulary = tuple(vocabulary)
    wanted = expand_names(names)
    out = []
    sim = clip = None
    for name in wanted:
        if name in SIMULATED:
            if sim is None:
                from sas_core.teachers.simulated import make_simulated_pair
                from sas_core.text import SyntheticTextEncoder

                encoder = SyntheticTextEncoder(vocabulary=vocabulary)
                sim = (dict((t.name, t) for t in make_simulated_pair(encoder, seed=opts.seed, vocabulary=vocabulary)),
                       encoder)
            out.append((sim[0][name], sim[1]))
            continue
        if name == "precomputed":
            from sas_core.teachers.precomputed import PrecomputedConfig, PrecomputedTeacher

            if not opts.precomputed_root:
                raise ValueError("the precomputed teacher needs the folder of OpenScene fused features "
                                 "(precomputed_root)")
            teacher = PrecomputedTeacher(PrecomputedConfig(root=opts.precomputed_root, name=opts.precomputed_name))
            if opts.clip_checkpoint:
                clip = _clip(opts, clip)
            out.append((teacher, clip[1] if clip is not None else None))
            continue
        clip = _clip(opts, clip)
        model, encoder = clip
        if name == "dense_clip":
            from sas_core.teachers.dense_clip import DenseClipTeacher, dense_clip_config

            teacher = DenseClipTeacher(dense_clip_config(opts.dense_preset, model=opts.clip_model,
                                                         checkpoint=opts.clip_checkpoint, recipe=opts.recipe,
                                                         device=opts.device), model=model)
        else:  # mask_clip
            from sas_core.teachers.mask_teacher import MaskClipTeacher, MaskTeacherConfig

            teacher = MaskClipTeacher(MaskTeacherConfig(clip_model=opts.clip_model, clip_checkpoint=opts.clip_checkpoint,
                                                        sam_model=opts.sam_model, sam_checkpoint=opts.sam_checkpoint,
                                                        vocabulary=vocabulary, device=opts.device),
                                      text_encoder=encoder, clip_model=model)
        out.append((teacher, encoder))
    return out


def _clip(opts: TeacherOptions, cached):
    """(open_clip model, its text encoder), loaded once."""
    if cached is not None:
        return cached
    from sas_core.clip import load_open_clip
    from sas_core.text import OpenClipTextEncoder

    model = load_open_clip(opts.clip_model, opts.clip_checkpoint, opts.device)
    return model, OpenClipTextEncoder(opts.clip_model, opts.clip_checkpoint, device=opts.device, model=model)


def build_teacher(name: str, vocabulary: Sequence[str], options: Optional[TeacherOptions] = None, **kwargs):
    """One teacher by name -> ``(teacher, text_encoder)`` (see :func:`build_teachers`)."""
    if name == "simulated":
        raise ValueError("'simulated' names two teachers (sim_dense, sim_mask): use build_teachers")
    return build_teachers([name], vocabulary, options, **kwargs)[0]
