"""Where the local model files are: the models file, and checks that each one loads.

No weights are ever downloaded. The user says once where CLIP, SAM, Stable Diffusion, the
distilled 3D checkpoints and the precomputed LSeg / OpenSeg features live, in a small YAML file
(template: ``config/models.yaml``, documentation: ``docs/models.md``); every command that loads a
model takes its defaults from it (explicit flags still win), and the ROS node reads it through its
``models_file`` parameter with :func:`load_model_paths`.

Where the file comes from, first match wins:

1. an explicit path (``sas ... --models FILE``, the node's ``models_file``);
2. ``$SAS_MODELS``: a models file;
3. ``$SAS_MODELS_DIR``: a folder; its ``models.yaml`` if there is one, else the conventional file
   names of :data:`CONVENTIONAL_NAMES` found in it;
4. nothing: every entry unset (commands keep their own defaults).

Relative paths in a file are resolved against the file's folder (``~`` is expanded); an unknown
key is an error that names it. :func:`check_model_paths` says for every entry whether the file
exists, whether it loads into the architecture it claims (keys and shapes against a randomly
initialised model of that architecture, strict), and what to download where when it is missing.

This module is ROS-free and imports no heavy dependency at import time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from sas_core.config import opt

__all__ = ["ModelPaths", "ModelStatus", "load_model_paths", "model_paths_from_dir", "check_model_paths",
           "CONVENTIONAL_NAMES", "DEFAULT_CLIP_MODEL", "ENV_FILE", "ENV_DIR"]

ENV_FILE = "SAS_MODELS"
ENV_DIR = "SAS_MODELS_DIR"

#: Architecture assumed for ``clip_checkpoint`` when ``clip_model`` is not set (the teachers' default).
DEFAULT_CLIP_MODEL = "ViT-B-16"

#: File names looked up in ``$SAS_MODELS_DIR`` when it holds no ``models.yaml``.
CONVENTIONAL_NAMES = {
    "clip_checkpoint": "open_clip_<MODEL>.bin (or .safetensors / .pt); MODEL = open_clip architecture, e.g. "
                       "open_clip_ViT-B-16.bin; ViT-B-16 (else the only one) becomes clip_model, the others "
                       "go to clip_checkpoints",
    "sam_checkpoint": "sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth or sam_vit_b_01ec64.pth (the release names; "
                      "the first found in that order, its type becomes sam_model_type)",
    "stable_diffusion": "stable-diffusion-v1-5/ (a diffusers folder)",
    "checkpoint": "sas.pt (the default distilled checkpoint)",
    "checkpoints": "checkpoints/<name>.pt (named distilled checkpoints)",
    "lseg_features": "lseg_features/ (OpenScene fused LSeg features)",
    "openseg_features": "openseg_features/ (OpenScene fused OpenSeg features)",
}

_SAM_FILE = re.compile(r"sam_(vit_[hlb])_[0-9a-f]+\.pth$")
_CLIP_FILE = re.compile(r"open_clip_(.+)\.(bin|safetensors|pt|pth)$")


@dataclass
class ModelPaths:
    """Local model files (None / empty: not configured). Paths are absolute once loaded."""

    clip_model: Optional[str] = opt(None, "open_clip architecture of clip_checkpoint (default: ViT-B-16)")
    clip_checkpoint: Optional[str] = opt(None, "open_clip weights of the CLIP teachers and text encoder")
    clip_preset: Optional[str] = opt(None, "dense CLIP inference preset for these weights (sclip, sclip_outdoor, "
                                           "clearclip, naclip, naclip_slide; default: sclip's settings)")
    clip_checkpoints: Dict[str, str] = opt(factory=dict, help="more open_clip weights by architecture, e.g. "
                                                              "ViT-B-32 (LSeg's text space), ViT-L-14-336 (OpenSeg's)")
    sam_model_type: Optional[str] = opt(None, "segment-anything type of sam_checkpoint: vit_h | vit_l | vit_b")
    sam_checkpoint: Optional[str] = opt(None, "segment-anything weights (e.g. sam_vit_h_4b8939.pth)")
    stable_diffusion: Optional[str] = opt(None, "Stable Diffusion v1.5 folder in the diffusers layout")
    checkpoint: Optional[str] = opt(None, "default distilled SAS-ROS checkpoint (sas segment / query / eval)")
    checkpoints: Dict[str, str] = opt(factory=dict, help="named distilled checkpoints (--checkpoint NAME)")
    lseg_features: Optional[str] = opt(None, "folder of OpenScene fused LSeg features (<scene>_<k>.pt)")
    openseg_features: Optional[str] = opt(None, "folder of OpenScene fused OpenSeg features (<scene>_<k>.pt)")
    source: Optional[str] = opt(None, "where these paths were read from (not a file key)", cli=False, ros=False)

    def clip_weights(self, model: Optional[str] = None) -> Optional[str]:
        """The weights file of open_clip architecture ``model`` (None: :attr:`clip_model`), or None."""
        from sas_core.clip import split_clip_name

        own = self.clip_model or DEFAULT_CLIP_MODEL
        if model is None or split_clip_name(model)[0] == split_clip_name(own)[0]:
            return self.clip_checkpoint or self.clip_checkpoints.get(own)
        if model in self.clip_checkpoints:
            return self.clip_checkpoints[model]
        # keys may declare the activation (ViT-B-32-quickgelu) where the caller names the architecture
        base = split_clip_name(model)[0]
        return next((path for key, path in self.clip_checkpoints.items() if split_clip_name(key)[0] == base), None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Keys a models file may hold (every field but ``source``).
FILE_KEYS = tuple(f.name for f in dataclasses.fields(ModelPaths) if f.name != "source")
_NAME_KEYS = ("clip_model", "clip_preset", "sam_model_type")  # names, not paths
_TABLE_KEYS = ("clip_checkpoints", "checkpoints")


def _resolve(value: str, base: Path) -> str:
    p = Path(os.path.expandvars(str(value))).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _sam_type_of(path: Optional[str]) -> Optional[str]:
    m = _SAM_FILE.search(Path(path).name) if path else None
    return m.group(1) if m else None


def parse_model_paths(data, base: Path, source: str) -> ModelPaths:
    """:class:`ModelPaths` of the mapping ``data`` read from a file in folder ``base``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a models file is a mapping of keys to paths, got {type(data).__name__}")
    unknown = [k for k in data if k not in FILE_KEYS]
    if unknown:
        raise ValueError(f"{source}: unknown key {str(unknown[0])!r} in the models file"
                         f"{' (and ' + ', '.join(map(repr, map(str, unknown[1:]))) + ')' if unknown[1:] else ''}; "
                         f"known keys: {', '.join(FILE_KEYS)}")
    values = {}
    for key, value in data.items():
        if value is None or value == "" or value == {}:
            continue
        if key in _TABLE_KEYS:
            if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in value.items()):
                raise ValueError(f"{source}: {key} must map names to paths (name: path), got {value!r}")
            values[key] = {k: _resolve(v, base) for k, v in value.items() if v}
        elif not isinstance(value, str):
            raise ValueError(f"{source}: {key} must be a string, got {type(value).__name__} {value!r}")
        else:
            values[key] = value.strip() if key in _NAME_KEYS else _resolve(value, base)
    paths = ModelPaths(**values, source=source)
    if paths.clip_preset is not None:
        from sas_core.teachers.dense_clip import DENSE_CLIP_PRESETS

        if paths.clip_preset not in DENSE_CLIP_PRESETS:
            raise ValueError(f"{source}: clip_preset {paths.clip_preset!r} is not a dense CLIP preset; choose one of "
                             f"{', '.join(DENSE_CLIP_PRESETS)}")
    if paths.sam_model_type is None:
        paths.sam_model_type = _sam_type_of(paths.sam_checkpoint)
    return paths


def read_models_file(path) -> ModelPaths:
    """:class:`ModelPaths` of a YAML models file (relative paths resolved against its folder)."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"models file {str(path)!r} not found (template: config/models.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    return parse_model_paths(data, path.resolve().parent, str(path))


def model_paths_from_dir(folder) -> ModelPaths:
    """:class:`ModelPaths` of a models folder: its ``models.yaml``, else :data:`CONVENTIONAL_NAMES`."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"models folder {str(folder)!r} not found (${ENV_DIR})")
    if (folder / "models.yaml").is_file():
        return read_models_file(folder / "models.yaml")
    folder = folder.resolve()
    values: dict = {}
    clips = {}
    for p in sorted(folder.iterdir()):
        m = _CLIP_FILE.match(p.name)
        if m and p.is_file():
            clips.setdefault(m.group(1), str(p))
    if clips:
        own = DEFAULT_CLIP_MODEL if DEFAULT_CLIP_MODEL in clips else (next(iter(clips)) if len(clips) == 1 else None)
        if own is not None:
            values["clip_model"], values["clip_checkpoint"] = own, clips.pop(own)
        if clips:
            values["clip_checkpoints"] = clips
    for kind in ("vit_h", "vit_l", "vit_b"):
        found = [p for p in folder.glob(f"sam_{kind}_*.pth") if _SAM_FILE.search(p.name)]
        if found:
            values["sam_model_type"], values["sam_checkpoint"] = kind, str(sorted(found)[0])
            break
    for key, name in (("stable_diffusion", "stable-diffusion-v1-5"), ("lseg_features", "lseg_features"),
                      ("openseg_features", "openseg_features")):
        if (folder / name).is_dir():
            values[key] = str(folder / name)
    if (folder / "sas.pt").is_file():
        values["checkpoint"] = str(folder / "sas.pt")
    if (folder / "checkpoints").is_dir():
        named = {p.stem: str(p) for p in sorted((folder / "checkpoints").glob("*.pt"))}
        if named:
            values["checkpoints"] = named
    return ModelPaths(**values, source=f"{folder} (${ENV_DIR}, conventional names)")


def load_model_paths(path=None) -> ModelPaths:
    """The configured :class:`ModelPaths`: ``path``, else ``$SAS_MODELS``, else ``$SAS_MODELS_DIR``, else none.

    Raises FileNotFoundError for a path (or variable) that names nothing, ValueError for a bad file
    (an unknown key is named)."""
    if path not in (None, ""):
        return read_models_file(path)
    env = os.environ.get(ENV_FILE, "")
    if env:
        paths = read_models_file(env)
        paths.source = f"{paths.source} (${ENV_FILE})"
        return paths
    folder = os.environ.get(ENV_DIR, "")
    if folder:
        return model_paths_from_dir(folder)
    return ModelPaths()


# -------------------------------------------------------------------------------------------------
# checks: does each configured file exist, and does it load into the architecture it claims?


@dataclass
class ModelStatus:
    """What ``sas models`` reports for one entry."""

    key: str  # models-file key (``checkpoints.<name>`` for table entries)
    kind: str  # what it is, e.g. "open_clip ViT-B-16"
    path: Optional[str]  # None: not configured
    exists: bool = False
    loads: Optional[bool] = None  # None: not checked (missing, not configured, or checks skipped)
    detail: str = ""  # architecture and sizes, or why it does not load
    hint: str = ""  # what to download and where, when missing or broken

    @property
    def ok(self) -> bool:
        """Configured, present and (if checked) loading."""
        return self.path is not None and self.exists and self.loads is not False

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok}


def _state_dict_file(path: Path):
    """Tensors of a weights file (.safetensors, or a torch file loaded weights-only: never unpickles)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from sas_core.io import load_torch_file

    obj = load_torch_file(path, what="weights file")
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def _params(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters"


def _error_text(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    lines = text.splitlines()
    return lines[0] + (" " + " ".join(ln.strip() for ln in lines[1:3]) if len(lines) > 1 else "")


def _check_open_clip(model_name: str, path: Path) -> str:
    import open_clip

    from sas_core.clip import resolve_activation
    from sas_core.nn.checkpoint import load_state_dict_strict

    arch, quick, why = resolve_activation(model_name, path)  # refuses what it cannot tell
    activation = f"{'QuickGELU' if quick else 'GELU'} ({why})"
    if path.is_dir():  # an open_clip local-dir folder: open_clip reads its config and weights
        model = open_clip.create_model(f"local-dir:{path}")
        return f"open_clip local-dir model, {_params(model)}, {activation}"
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}")
    logging.disable(logging.WARNING)  # open_clip warns that the random model has no pretrained weights
    try:
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick)
    finally:
        logging.disable(logging.NOTSET)
    load_state_dict_strict(model, _state_dict_file(path), source=str(path))
    return f"open_clip {arch}: {_params(model)}, {config.get('embed_dim')}-d embeddings, {activation}"


def _check_sam(model_type: str, path: Path) -> str:
    from segment_anything import sam_model_registry

    from sas_core.nn.checkpoint import load_state_dict_strict

    if model_type not in sam_model_registry:
        raise ValueError(f"unknown SAM type {model_type!r}; one of {', '.join(sam_model_registry)}")
    sam = sam_model_registry[model_type](checkpoint=None)
    load_state_dict_strict(sam, _state_dict_file(path), source=str(path))
    enc = sam.image_encoder
    return f"SAM {model_type}: {_params(sam)}, image encoder {len(enc.blocks)} blocks, {enc.img_size} px input"


def _check_diffusion(path: Path) -> str:
    if not path.is_dir():
        raise ValueError("not a folder (a diffusers folder is expected)")
    missing = [n for n in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
               if not (path / n).exists()]
    if missing:
        raise ValueError(f"not a complete diffusers folder: missing {', '.join(missing)}")
    unet = json.loads((path / "unet" / "config.json").read_text()) if (path / "unet" / "config.json").is_file() \
        else {}
    weights = [p.name for p in (path / "unet").iterdir() if p.suffix in (".safetensors", ".bin")]
    if not weights:
        raise ValueError("unet/ holds no weights (.safetensors or .bin)")
    return (f"diffusers pipeline, UNet cross-attention {unet.get('cross_attention_dim', '?')}-d, sample size "
            f"{unet.get('sample_size', '?')} (layout and configs checked; weights load when the pipeline runs)")


def _check_distilled(path: Path) -> str:
    from sas_core.nn import load_checkpoint

    model, config, _ = load_checkpoint(path, map_location="cpu")
    text = (config or {}).get("text_encoder") or {}
    space = text.get("kind", "?") + (f" {text['model']}" if text.get("model") else "")
    return (f"{config.get('arch', type(model).__name__)}: {model.out_channels}-d features, voxel "
            f"{config.get('voxel_size', '?')} m, text space {space}, {_params(model)}")


def _check_features(path: Path) -> str:
    if not path.is_dir():
        raise ValueError("not a folder")
    n = len(list(path.glob("*.pt")))
    if not n:
        raise ValueError("no <scene>_<k>.pt / <scene>.pt files in it")
    return f"{n} fused-feature files"


def _hints() -> dict:
    from sas_core.capability.diffusion import DOWNLOAD_HINT as SD_HINT
    from sas_core.teachers.mask_teacher import SAM_DOWNLOADS
    from sas_core.teachers.precomputed import DOWNLOAD_HINT as FEATURE_HINT

    def clip(model):
        return (f"download the open_clip weights of {model} (open_clip_pytorch_model.bin / .safetensors from the "
                f"model's Hugging Face page, or the OpenAI release) and set clip_checkpoint (or save it as "
                f"$SAS_MODELS_DIR/open_clip_{model}.bin)")

    def sam(kind):
        name = SAM_DOWNLOADS.get(kind or "vit_h", "the SAM checkpoint")
        return (f"download {name} from https://dl.fbaipublicfiles.com/segment_anything/{name} (segment-anything "
                f"README, 'Model Checkpoints') and set sam_checkpoint (or put it in $SAS_MODELS_DIR/)")

    return {
        "clip": clip, "sam": sam,
        "stable_diffusion": SD_HINT + " as stable_diffusion (or put it at $SAS_MODELS_DIR/stable-diffusion-v1-5/)",
        "checkpoint": "train one with `sas distill`, or convert an OpenScene / SAS release checkpoint with "
                      "`sas import-checkpoint`; set checkpoint (or save it as $SAS_MODELS_DIR/sas.pt)",
        "features": lambda key: FEATURE_HINT + f" as {key} (or put it at $SAS_MODELS_DIR/{key}/)",
    }


def check_model_paths(paths: ModelPaths, load: bool = True) -> List[ModelStatus]:
    """One :class:`ModelStatus` per entry of ``paths`` (unset entries too, with what to get).

    ``load``: also load every present file into a randomly initialised model of the architecture it
    claims (open_clip ``create_model(name, pretrained=None)``, SAM ``sam_model_registry[type]
    (checkpoint=None)``, SAS-ROS checkpoints through :func:`sas_core.nn.load_checkpoint`), strictly:
    a missing, unexpected or wrong-shaped key fails with its name and both shapes. Stable
    Diffusion folders are checked for their layout and configs only (loading takes minutes).
    """
    hints = _hints()
    own_clip = paths.clip_model or DEFAULT_CLIP_MODEL
    entries = [("clip_checkpoint", f"open_clip {own_clip}", paths.clip_checkpoint,
                lambda p: _check_open_clip(own_clip, p), hints["clip"](own_clip))]
    for model, path in paths.clip_checkpoints.items():
        entries.append((f"clip_checkpoints.{model}", f"open_clip {model}", path,
                        lambda p, m=model: _check_open_clip(m, p), hints["clip"](model)))
    sam_type = paths.sam_model_type or "vit_h"
    entries.append(("sam_checkpoint", f"segment-anything {sam_type}", paths.sam_checkpoint,
                    lambda p: _check_sam(sam_type, p), hints["sam"](sam_type)))
    entries.append(("stable_diffusion", "Stable Diffusion v1.5", paths.stable_diffusion, _check_diffusion,
                    hints["stable_diffusion"]))
    entries.append(("checkpoint", "distilled 3D checkpoint", paths.checkpoint, _check_distilled,
                    hints["checkpoint"]))
    for name, path in paths.checkpoints.items():
        entries.append((f"checkpoints.{name}", "distilled 3D checkpoint", path, _check_distilled,
                        hints["checkpoint"]))
    for key, what in (("lseg_features", "fused LSeg features"), ("openseg_features", "fused OpenSeg features")):
        entries.append((key, what, getattr(paths, key), _check_features, hints["features"](key)))

    out = []
    for key, kind, path, check, hint in entries:
        status = ModelStatus(key, kind, path, hint=hint)
        if path is not None:
            p = Path(path)
            status.exists = p.exists()
            if not status.exists:
                status.detail = "missing"
            elif load:
                try:
                    status.detail = check(p)
                    status.loads = True
                except Exception as e:  # any failure to load is reported, not raised
                    status.loads = False
                    status.detail = _error_text(e)
        if status.ok:
            status.hint = ""
        out.append(status)
    return out
