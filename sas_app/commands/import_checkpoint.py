"""`sas import-checkpoint`: turn an OpenScene / SAS release 3D checkpoint into a SAS-ROS one.

Release checkpoints (``.pth.tar``) hold only network weights. A SAS-ROS checkpoint also says which
architecture, voxel size and CLIP text space the features live in, so `sas segment`, `sas query`,
`sas eval`, `sas replay` and the ROS node can use it without extra flags. The weights are loaded
strictly (a wrong architecture or head width fails with the offending key and both shapes).

Files are data, never code: everywhere else SAS-ROS reads ``.pt``/``.pth`` files with
:func:`sas_core.io.load_torch_file` (weights only, one allow-list). ``--trust`` is the ONE place
that unpickles a file with full Python (a legacy file that holds e.g. ``argparse.Namespace``),
for files the user trusts; what it writes is plain data that the safe loader reads.
"""

from __future__ import annotations

from sas_app.commands import add_models_argument

HELP = "convert an OpenScene/SAS release 3D checkpoint (.pth.tar) into a self-describing SAS-ROS one"


def add_arguments(parser):
    parser.add_argument("source", help="OpenScene/SAS checkpoint (.pth.tar; keys with or without module./net3d.)")
    parser.add_argument("output", help="SAS-ROS checkpoint to write (e.g. sas_scannet_lseg.pt)")
    parser.add_argument("--arch", default="MinkUNet18A", choices=("MinkUNet14A", "MinkUNet18A", "MinkUNet34C"),
                        help="3D backbone of the checkpoint (OpenScene and SAS release MinkUNet18A)")
    parser.add_argument("--voxel-size", type=float, default=0.02,
                        help="voxel size in metres it was trained with (0.02 indoor, 0.05 nuScenes)")
    parser.add_argument("--clip-model", default=None,
                        help="open_clip model of the text space: ViT-B-32 for LSeg (512-d) features, "
                             "ViT-L-14-336 for OpenSeg (768-d)")
    parser.add_argument("--clip-checkpoint", default=None,
                        help="local open_clip weights of that model (e.g. ViT-B-32 'openai' weights; default: the "
                             "models file's weights of that architecture)")
    add_models_argument(parser)
    parser.add_argument("--synthetic-text", action="store_true",
                        help="use the synthetic text space instead of CLIP (tests and the synthetic world only)")
    parser.add_argument("--trust", action="store_true",
                        help="UNPICKLE the source with full Python: it can run arbitrary code, so only for files "
                             "you trust (e.g. an official release that the safe loader refuses). This is the only "
                             "place SAS-ROS ever unpickles; the output is plain data read by the safe loader")
    parser.add_argument("--clip", action="store_true",
                        help="with --trust: the source is OpenAI's TorchScript release of CLIP (e.g. ViT-B-16.pt); "
                             "write its weights as a plain open_clip state dict marked QuickGELU, for "
                             "--clip-checkpoint / the models file")
    parser.add_argument("--data", action="store_true",
                        help="with --trust: the source is a data file (OpenScene .pth points, .pt fused features); "
                             "rewrite it as plain data (tensors, arrays, dicts) instead of converting a model")


def unpickle_trusted(path):
    """Full ``torch.load`` of a file the user trusts (``--trust``): the ONE unpickling call of SAS-ROS."""
    from pathlib import Path

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # trusted by the user (--trust)
    except Exception as e:  # noqa: BLE001 - any failure: one clear line
        raise ValueError(f"{path}: cannot read even with --trust ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e


def convert_data_file(source, output) -> None:
    """Rewrite a trusted data file as plain data (atomic), then check the safe loader reads it."""
    import torch

    from sas_core.io import atomic_path, load_torch_file, plain_data

    data = plain_data(unpickle_trusted(source), where=str(source))
    with atomic_path(output) as tmp:
        torch.save(data, tmp)
    load_torch_file(output, what="converted file")


def convert_openai_clip(source, output) -> int:
    """OpenAI's TorchScript CLIP release -> ``{"state_dict": ..., "sas_clip": {...}}`` (atomic); returns
    the number of tensors. The JIT archive is read with ``torch.jit.load`` (``--trust``: it runs the
    archive's code); the output is plain tensors that open_clip and the safe loader read."""
    from pathlib import Path

    import torch

    from sas_core.clip import CONVERTED_KEY, OPENAI_JIT_KEYS
    from sas_core.io import atomic_path, load_torch_file

    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"not found: {source}")
    try:
        state = torch.jit.load(str(source), map_location="cpu").state_dict()
    except Exception as e:  # noqa: BLE001 - any failure: one clear line
        raise ValueError(f"{source}: not a TorchScript archive ({type(e).__name__}); --clip converts OpenAI's "
                         "CLIP releases (open_clip .bin / .safetensors files need no conversion)") from e
    # the release's own buffers, and the causal mask (derived from the context length; a
    # non-persistent buffer in open_clip that a scripted model still lists) are not weights
    state = {k: v.detach().clone() for k, v in state.items() if k not in OPENAI_JIT_KEYS + ("attn_mask",)}
    meta = {"activation": "quick_gelu", "origin": "OpenAI TorchScript release", "source": source.name}
    with atomic_path(output) as tmp:
        torch.save({"state_dict": state, CONVERTED_KEY: meta}, tmp)
    load_torch_file(output, what="converted CLIP weights")
    return len(state)


def run(args) -> int:
    from sas_core.nn import load_openscene_checkpoint, save_checkpoint
    from sas_core.nn.checkpoint import openscene_model_from_object

    if args.clip:
        if not args.trust:
            raise ValueError("--clip reads a TorchScript archive, which runs code: it needs --trust")
        n = convert_openai_clip(args.source, args.output)
        print(f"wrote {args.output}: {n} tensors of OpenAI CLIP weights (QuickGELU) from {args.source}; use it as "
              "clip_checkpoint with the architecture name (e.g. ViT-B-16)")
        return 0
    if args.data:
        if not args.trust:
            raise ValueError("--data rewrites a file that the safe loader refuses: it needs --trust "
                             "(files the safe loader reads need no conversion)")
        convert_data_file(args.source, args.output)
        print(f"wrote {args.output}: plain data from {args.source} (unpickled with --trust)")
        return 0
    if args.synthetic_text == bool(args.clip_model):
        raise ValueError("give --clip-model (with --clip-checkpoint) for the CLIP text space of the "
                         "features, or --synthetic-text")
    if args.clip_model and not args.clip_checkpoint:
        from sas_core.models import load_model_paths

        args.clip_checkpoint = load_model_paths(args.models).clip_weights(args.clip_model)
    if args.trust:  # only the weights are kept: they go into a fresh model, saved as plain data
        model = openscene_model_from_object(unpickle_trusted(args.source), arch=args.arch, source=args.source)
    else:
        model = load_openscene_checkpoint(args.source, arch=args.arch)
    if args.synthetic_text:
        from sas_core.text import SCANNET_20, SyntheticTextEncoder

        text = SyntheticTextEncoder(SCANNET_20, dim=model.out_channels).config()
    else:
        from sas_core.clip import resolve_activation

        if not args.clip_checkpoint:
            raise ValueError(f"no open_clip weights for {args.clip_model}: give --clip-checkpoint or list them in the "
                             "models file (clip_checkpoints)")
        # record the activation in the name, so the text encoder is rebuilt the same way later
        arch, quick, _ = resolve_activation(args.clip_model, args.clip_checkpoint)
        text = {"kind": "open_clip", "model": arch + ("-quickgelu" if quick else "-gelu"),
                "checkpoint": args.clip_checkpoint}
    config = {"arch": args.arch, "in_channels": model.in_channels, "out_channels": model.out_channels,
              "voxel_size": args.voxel_size, "input_color": False, "text_encoder": text,
              "imported_from": str(args.source)}
    save_checkpoint(args.output, model.eval(), config=config)
    print(f"wrote {args.output}: {args.arch}, {model.out_channels}-d features, voxel {args.voxel_size} m, "
          f"text space {text['kind']}{' ' + text['model'] if text['kind'] == 'open_clip' else ''}")
    return 0
