"""Subcommands of the ``sas`` CLI (see ``sas_app/cli.py``).

Flags that set a field of a library config dataclass are generated from it
(:func:`sas_core.config.add_config_arguments`) and the config is built with
:func:`sas_core.config.config_from_args`, so each default exists once. The helpers below are the
flags shared by several commands.
"""

from sas_core.config import Recorded, add_config_arguments, explicit_args

#: InferenceConfig fields that come from the checkpoint, not from flags.
_FROM_CHECKPOINT = ("voxel_size", "input_color")


def not_built(name: str, issue: str):
    """A ``run`` for a subcommand that is not implemented yet: says so and exits non-zero."""

    def run(args) -> int:
        import sys

        print(f"sas {name}: not built yet ({issue}).", file=sys.stderr)
        return 3

    return run


def add_precision_argument(parser) -> None:
    """``--precision`` of the commands that run the distilled network (InferenceConfig.precision)."""
    from sas_core.infer import InferenceConfig  # NumPy only: building the parser stays light

    add_config_arguments(parser, InferenceConfig, only=("precision",))


def add_inference_arguments(parser) -> None:
    """The :class:`sas_core.infer.InferenceConfig` flags (voxel size and input mode come from the checkpoint)."""
    from sas_core.infer import InferenceConfig

    group = parser.add_argument_group("inference (InferenceConfig)")
    add_config_arguments(group, InferenceConfig, skip=_FROM_CHECKPOINT)


def inference_config(args):
    """The :class:`sas_core.infer.InferenceConfig` of parsed ``args``."""
    from sas_core.config import config_from_args
    from sas_core.infer import InferenceConfig

    return config_from_args(InferenceConfig, args)


def add_models_argument(parser) -> None:
    """``--models FILE``: the models file giving the default model paths (see docs/models.md)."""
    parser.add_argument("--models", metavar="FILE", default=None,
                        help="models file (YAML) with the local model paths used as defaults; explicit flags win "
                             "(default: $SAS_MODELS, else $SAS_MODELS_DIR/models.yaml or its conventional file "
                             "names, else none)")


def add_checkpoint_argument(parser, *names, **kwargs) -> None:
    """A distilled-checkpoint option whose default comes from the models file (``checkpoint``)."""
    kwargs.setdefault("help", "distilled checkpoint (.pt) or a name from the models file's checkpoints "
                              "(default: the models file's checkpoint)")
    parser.add_argument(*names, default=None, action=Recorded, **kwargs)


def apply_model_paths(args, mapping: dict):
    """Fill flags the user did not give from the models file (``args.models``, $SAS_MODELS, ...).

    ``mapping``: ``{ModelPaths field: args dest}``. A flag given explicitly always wins; a flag
    left at its default (or None) takes the models file's value when the file sets one. The
    ``checkpoint`` dest also accepts a name of the models file's ``checkpoints`` table. Returns
    the :class:`sas_core.models.ModelPaths`.
    """
    from sas_core.models import load_model_paths

    paths = load_model_paths(getattr(args, "models", None))
    given = explicit_args(args)
    for field, dest in mapping.items():  # clip_model before clip_checkpoint, sam_model_type before sam_checkpoint
        value = getattr(paths, field)
        if field == "clip_checkpoint" and "clip_model" in mapping:
            value = paths.clip_weights(getattr(args, mapping["clip_model"], None))
        if field == "sam_checkpoint" and "sam_model_type" in mapping and paths.sam_model_type is not None \
                and getattr(args, mapping["sam_model_type"], None) != paths.sam_model_type:
            value = None  # the file's SAM weights are of another type than the one asked for
        current = getattr(args, dest, None)
        if value is not None and (dest not in given or current in (None, "")):
            setattr(args, dest, value)
    if "checkpoint" in mapping.values():
        name = getattr(args, "checkpoint", None)
        if name in paths.checkpoints:
            args.checkpoint = paths.checkpoints[name]
    return paths


def add_dense_preset_argument(group):
    """``--clip-preset``: a dense CLIP teacher preset (each recipe's paper settings)."""
    from sas_core.teachers.dense_clip import DENSE_CLIP_PRESETS

    from sas_core.config import Recorded

    group.add_argument("--clip-preset", default=None, choices=tuple(DENSE_CLIP_PRESETS), action=Recorded,
                       help="dense CLIP inference settings of a recipe's paper (recipe, short side, windows, PAMR): "
                            + "; ".join(f"{k}: {v['recipe']} {v['short_side']}/{v['crop_size'] or 'whole'}/"
                                        f"{v['stride']}{' PAMR ' + str(v['pamr_steps']) if v['pamr_steps'] else ''}"
                                        for k, v in DENSE_CLIP_PRESETS.items())
                            + " (default: sclip's, our robot default)")


def dense_options(args) -> dict:
    """``recipe`` / ``dense_preset`` for TeacherOptions: an explicit --clip-recipe wins over the preset's."""
    recipe = args.clip_recipe if (not args.clip_preset or "clip_recipe" in explicit_args(args)) else None
    return {"recipe": recipe, "dense_preset": args.clip_preset}


#: file in an output folder listing what the command wrote there (so a rerun can replace exactly that)
OUTPUT_MANIFEST = ".sas-output.json"


def fresh_output_dir(path, overwrite: bool, command: str, flag: str = "--out"):
    """Make ``path`` ready for a new run of ``command``; never mix two runs in one folder.

    An absent or empty folder is created. A non-empty one is refused unless ``overwrite``; then
    only the files a previous run of the same command listed in its :data:`OUTPUT_MANIFEST` are
    removed (a folder without one, or written by another command, is never emptied). Returns the
    folder as a Path.
    """
    import json
    from pathlib import Path

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is a file; give a folder")
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return out
    if not overwrite:
        raise ValueError(f"{flag} {out} is not empty (an earlier run?): give a new folder, or add --overwrite to "
                         f"replace what `sas {command}` wrote there")
    manifest = out / OUTPUT_MANIFEST
    try:
        listed = json.loads(manifest.read_text())
    except (OSError, ValueError):
        listed = None
    if not isinstance(listed, dict) or listed.get("command") != command:
        raise ValueError(f"{flag} {out} was not written by `sas {command}` (no {OUTPUT_MANIFEST} of it): "
                         "not deleting anything there; give a new folder")
    root = out.resolve()
    for rel in listed.get("files", []):
        target = (out / rel).resolve()
        if root in target.parents and target.is_file() and not target.is_symlink():
            target.unlink()
    for d in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    manifest.unlink(missing_ok=True)
    return out


def record_outputs(path, command: str) -> int:
    """Write :data:`OUTPUT_MANIFEST` listing every file now under ``path``; returns the count."""
    import json
    from pathlib import Path

    from sas_core.io import atomic_write_text

    out = Path(path)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != OUTPUT_MANIFEST)
    atomic_write_text(out / OUTPUT_MANIFEST, json.dumps({"command": command, "files": files}, indent=1) + "\n")
    return len(files)
