"""Checkpoint I/O for the 3D backbone.

* OpenScene / SAS ``.pth.tar`` files: a dict with ``state_dict`` (or a bare state_dict) whose keys
  may carry ``module.`` (DataParallel/DDP) and ``net3d.`` (OpenScene's DisNet wrapper) prefixes.
  They load *strictly* into our MinkUNets; any missing, unexpected or wrong-shaped key is listed
  in one :class:`CheckpointError`.
* Our own checkpoints are self-describing: ``{"format": "sas-ros/backbone", "format_version",
  "model_json" (arch, in/out channels), "config_json" (the caller's config), "extra",
  "state_dict_sha256" (content hash of the weights), "state_dict"}``, written atomically (temp
  file + fsync + rename), so :func:`load_checkpoint` rebuilds the model without being told the
  architecture, after validating the description and checking the hash.

Files are read as data only (:func:`sas_core.io.load_torch_file`: ``weights_only=True`` with one
allow-list); a file that names anything else is refused with :class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from ..io import UnsafeFileError, atomic_path, load_torch_file
from .minkunet import ARCHITECTURES, MinkUNetBase, build_model

__all__ = ["CheckpointError", "UnsafeCheckpointError", "strip_prefixes", "load_state_dict_strict", "save_checkpoint",
           "load_checkpoint", "load_openscene_checkpoint", "openscene_model_from_object", "state_dict_sha256", "validate_model_description",
           "FORMAT"]

FORMAT = "sas-ros/backbone"
FORMAT_VERSION = 2  # 2: the state dict's content hash is stored (``state_dict_sha256``)
MAX_CHANNELS = 4096  # widest head/input a checkpoint may ask for (OpenSeg: 768)
_PREFIXES = ("module.", "net3d.")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError, UnsafeFileError):
    """A checkpoint names Python objects outside the allow-list (see :func:`sas_core.io.load_torch_file`)."""


def strip_prefixes(state_dict: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """Drop leading ``module.`` / ``net3d.`` (in any order, repeated) from every key."""
    out: "OrderedDict[str, Any]" = OrderedDict()
    for key, value in state_dict.items():
        k = key
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k = k[len(p):]
                    changed = True
        if k in out:
            raise CheckpointError(f"key {key!r} collides with another key after stripping prefixes")
        out[k] = value
    return out


def _list(items, limit=20) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Load ``state_dict`` (prefixes stripped) into ``model``; raise :class:`CheckpointError`
    naming every missing, unexpected and wrong-shaped key (with both shapes)."""
    sd = strip_prefixes(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = []
    for k, v in sd.items():
        if k in own:
            if not isinstance(v, torch.Tensor):
                wrong.append(f"{k}: checkpoint has {type(v).__name__}, model expects tensor {tuple(own[k].shape)}")
            elif tuple(v.shape) != tuple(own[k].shape):
                wrong.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
    if missing or unexpected or wrong:
        parts = [f"{source} does not fit {type(model).__name__} "
                 f"({len(sd)} keys in the file, {len(own)} in the model)"]
        if wrong:
            parts.append(f"wrong shape ({len(wrong)}): " + "; ".join(wrong[:20]))
        if missing:
            parts.append(f"missing ({len(missing)}): " + _list(missing))
        if unexpected:
            parts.append(f"unexpected ({len(unexpected)}): " + _list(unexpected))
        raise CheckpointError("\n  ".join(parts))
    model.load_state_dict(sd, strict=True)


def _torch_load(path, map_location) -> Any:
    """:func:`sas_core.io.load_torch_file` (data only), its errors as :class:`CheckpointError`."""
    try:
        return load_torch_file(path, map_location=map_location, what="checkpoint")
    except UnsafeFileError as e:
        raise UnsafeCheckpointError(e.path, e.refused) from None
    except FileNotFoundError:
        raise
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def state_dict_sha256(state_dict: Mapping[str, Any]) -> str:
    """Content hash of a state dict: sha256 over its tensors in sorted key order.

    Each entry contributes its key, dtype, shape and raw bytes (CPU, contiguous), so any changed
    value, shape, dtype or key changes the hash; the file's container format does not.
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _state_dict_of(obj: Any, path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        return obj["state_dict"]
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) for k in obj) and \
            any(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError(f"{path}: no state_dict found (top-level keys: "
                          f"{_list(map(str, obj.keys())) if isinstance(obj, Mapping) else type(obj).__name__})")


def load_openscene_checkpoint(path, arch: str = "MinkUNet18A", out_channels: Optional[int] = None,
                              in_channels: int = 3, map_location="cpu") -> MinkUNetBase:
    """Build ``arch`` and load an OpenScene/SAS 3D checkpoint into it strictly.

    Args:
        path: ``.pth.tar`` with ``state_dict`` (or a bare state_dict); keys with or without
            ``module.`` / ``net3d.``. Read as data (a file naming other Python objects raises
            :class:`UnsafeCheckpointError`: convert it with ``sas import-checkpoint --trust``).
        arch: "MinkUNet14A" | "MinkUNet18A" | "MinkUNet34C".
        out_channels: feature dim of the head (512 LSeg, 768 OpenSeg); None = read it from
            ``final.kernel``.
    Returns:
        the model (train mode; call ``.eval()`` for inference).
    """
    return openscene_model_from_object(_torch_load(path, map_location), arch, out_channels, in_channels, path)


def openscene_model_from_object(obj: Any, arch: str = "MinkUNet18A", out_channels: Optional[int] = None,
                                in_channels: int = 3, source="checkpoint") -> MinkUNetBase:
    """:func:`load_openscene_checkpoint` for an already loaded file object (``obj``)."""
    path = source
    sd = strip_prefixes(_state_dict_of(obj, path))
    if out_channels is None:
        kernel = sd.get("final.kernel")
        if not isinstance(kernel, torch.Tensor) or kernel.dim() < 1:
            raise CheckpointError(f"{path}: no 'final.kernel' tensor to infer out_channels from; "
                                  f"is this a MinkUNet checkpoint? keys: {_list(sd)}")
        out_channels = int(kernel.shape[-1])
    validate_model_description({"arch": arch, "in_channels": in_channels, "out_channels": out_channels}, path)
    model = build_model(arch, in_channels=in_channels, out_channels=out_channels)
    load_state_dict_strict(model, sd, source=f"{path} (as {arch}, out_channels={out_channels})")
    return model


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_model_description(desc: Any, path="checkpoint") -> None:
    """Check a model description ``{"arch", "in_channels", "out_channels"}`` before building it.

    ``arch`` must be a known architecture and the channel counts integers in [1, MAX_CHANNELS],
    so a hostile or broken file cannot make us allocate an arbitrary model.
    """
    if not isinstance(desc, Mapping):
        raise CheckpointError(f"{path}: model description must be a JSON object, got {type(desc).__name__}")
    arch = desc.get("arch")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    for key in ("in_channels", "out_channels"):
        v = desc.get(key)
        if not _is_int(v) or not 1 <= v <= MAX_CHANNELS:
            raise CheckpointError(f"{path}: model {key} must be an integer in [1, {MAX_CHANNELS}], got {v!r}")


def validate_checkpoint_config(config: Any, desc: Mapping, path="checkpoint") -> None:
    """Check the keys of a checkpoint's config JSON that the loaders use (types and ranges).

    ``voxel_size`` (also under ``data``/``model``/``inference``) a number in (0, 10] metres,
    ``input_color`` a bool, ``in_channels``/``out_channels`` integers in [1, MAX_CHANNELS],
    ``text_encoder`` an object with a string ``kind`` (or empty: none recorded). Other keys are the caller's.
    """
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{path}: checkpoint config must be a JSON object, got {type(config).__name__}")
    scopes = [("", config)] + [(f"{k}.", config[k]) for k in ("data", "model", "inference")
                               if isinstance(config.get(k), Mapping)]
    for prefix, scope in scopes:
        if "voxel_size" in scope:
            v = scope["voxel_size"]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= 10:
                raise CheckpointError(f"{path}: config {prefix}voxel_size must be a number in (0, 10] metres, "
                                      f"got {v!r}")
        if "input_color" in scope and not isinstance(scope["input_color"], bool):
            raise CheckpointError(f"{path}: config {prefix}input_color must be true or false, "
                                  f"got {scope['input_color']!r}")
        for key in ("in_channels", "out_channels"):
            if key in scope and not (_is_int(scope[key]) and 1 <= scope[key] <= MAX_CHANNELS):
                raise CheckpointError(f"{path}: config {prefix}{key} must be an integer in [1, {MAX_CHANNELS}], "
                                      f"got {scope[key]!r}")
    te = config.get("text_encoder")
    if te is not None and not (isinstance(te, Mapping) and (not te or isinstance(te.get("kind"), str))):
        raise CheckpointError(f"{path}: config text_encoder must be an object with a 'kind', got {te!r}")


def _model_description(model: nn.Module) -> Dict[str, Any]:
    for name, cls in ARCHITECTURES.items():
        if type(model) is cls:
            return {"arch": name, "in_channels": model.in_channels, "out_channels": model.out_channels}
    raise ValueError(f"save_checkpoint supports {', '.join(ARCHITECTURES)}; got {type(model).__name__}")


def save_checkpoint(path, model: nn.Module, config: Optional[Dict[str, Any]] = None,
                    extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write a self-describing backbone checkpoint atomically.

    Args:
        path: destination file (parent folders are created).
        model: a MinkUNet from :func:`build_model` (DataParallel/DDP wrappers are unwrapped).
        config: plain JSON-serialisable dict (e.g. training/voxel config) stored as JSON.
        extra: anything else to keep (epoch, optimizer state, tensors), stored with ``torch.save``.
    """
    model = getattr(model, "module", model)
    desc = _model_description(model)
    try:
        config_json = json.dumps(config or {}, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"checkpoint config must be plain JSON data: {e}") from e
    state_dict = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_json": json.dumps(desc),
               "config_json": config_json, "extra": extra or {}, "state_dict_sha256": state_dict_sha256(state_dict),
               "state_dict": state_dict}
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def describe_foreign_file(obj) -> str:
    """One sentence saying what a loaded file that is not our checkpoint looks like, and what to do.

    People pass the wrong ``.pth`` more often than a corrupt one: a ``sas fuse`` output (OpenScene's
    fused-feature layout, ``feat`` + ``mask_full``), an OpenScene/SAS release checkpoint (weights
    under ``state_dict``, or a bare state dict), or an OpenScene scene file (a tuple of arrays).
    """
    if isinstance(obj, Mapping) and {"feat", "mask_full"} <= set(obj):
        return ("It holds fused 2D features (feat + mask_full, what `sas fuse` writes), not network weights: "
                "train a network from them with `sas distill`, or pass its checkpoint (e.g. "
                "<distill --out>/last.pt) instead.")
    if isinstance(obj, Mapping):
        sd = obj.get("state_dict", obj)
        if isinstance(sd, Mapping) and sd and all(isinstance(k, str) for k in sd):
            return ("It looks like an OpenScene/SAS release checkpoint (network weights only): convert it once "
                    "with `sas import-checkpoint SOURCE OUTPUT --arch MinkUNet18A --clip-model ViT-B-32`.")
        return f"It is a dictionary with keys {sorted(map(str, obj))[:6]}; expected a file written by `sas distill`."
    if isinstance(obj, (tuple, list)):
        return ("It holds a sequence of arrays (an OpenScene scene file?); pass it as data, and a checkpoint "
                "written by `sas distill` or `sas import-checkpoint` as the model.")
    return f"It holds a {type(obj).__name__}; expected a file written by `sas distill` or `sas import-checkpoint`."


def load_checkpoint(path, map_location="cpu") -> Tuple[MinkUNetBase, Dict[str, Any], Dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    The file is read as data (:func:`sas_core.io.load_torch_file`); the model description and the
    config JSON are validated (types, ranges) before any model is built; the state dict's content
    hash is checked (checkpoints of format_version 1 have none: they load with a warning).

    Returns:
        (model, config dict, extra dict); the model is on ``map_location`` in eval mode.
    Raises:
        FileNotFoundError; CheckpointError (UnsafeCheckpointError for a file naming code).
    """
    obj = _torch_load(path, map_location)
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a SAS-ROS backbone checkpoint (no format={FORMAT!r}). "
                              f"{describe_foreign_file(obj)}")
    if int(obj.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer version (format_version {obj['format_version']})")
    try:
        desc = json.loads(obj["model_json"])
        config = json.loads(obj.get("config_json", "{}"))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: malformed model/config description ({e})") from e
    validate_model_description(desc, path)
    validate_checkpoint_config(config, desc, path)
    state_dict = obj.get("state_dict")
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{path}: no state_dict in the checkpoint")
    stored = obj.get("state_dict_sha256")
    if stored is None:
        warnings.warn(f"{path}: checkpoint has no content hash (written before format_version 2); "
                      "loading it unchecked (re-save it to add one)", stacklevel=2)
    elif stored != state_dict_sha256(state_dict):
        raise CheckpointError(f"{path}: the weights do not match the checkpoint's content hash "
                              "(the file was modified or corrupted after it was written); refusing to load it")
    model = build_model(desc["arch"], desc["in_channels"], desc["out_channels"])
    load_state_dict_strict(model, state_dict, source=str(path))
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model = model.to(map_location)
    model.eval()
    return model, config, dict(obj.get("extra") or {})
