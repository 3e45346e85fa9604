"""Checkpoint I/O for the 3D backbone.

* OpenScene / SAS ``.pth.tar`` files: a dict with ``state_dict`` (or a bare state_dict) whose keys
  may carry ``module.`` (DataParallel/DDP) and ``net3d.`` (OpenScene's DisNet wrapper) prefixes.
  They load *strictly* into our MinkUNets; any missing, unexpected or wrong-shaped key is listed
  in one :class:`CheckpointError`.
* Our own checkpoints are self-describing: ``{"format": "sas-ros/backbone", "format_version",
  "model_json" (arch, in/out channels), "config_json" (the caller's config), "extra",
  "state_dict"}``, written atomically (temp file + fsync + rename), so
  :func:`load_checkpoint` rebuilds the model without being told the architecture.
"""

from __future__ import annotations

import json
import pickle
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from ..io import atomic_path
from .minkunet import ARCHITECTURES, MinkUNetBase, build_model

__all__ = ["CheckpointError", "strip_prefixes", "load_state_dict_strict", "save_checkpoint", "load_checkpoint",
           "load_openscene_checkpoint", "FORMAT"]

FORMAT = "sas-ros/backbone"
FORMAT_VERSION = 1
_PREFIXES = ("module.", "net3d.")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty checkpoint file")
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights only" not in str(e).lower() and "weights_only" not in str(e).lower():
                raise
            # OpenScene files may hold numpy scalars (best_iou) that the safe loader refuses.
            obj = torch.load(path, map_location=map_location, weights_only=False)
            warnings.warn(f"{path}: holds Python objects beyond tensors; loaded with full unpickling "
                          "(only load checkpoints you trust)", stacklevel=3)
            return obj
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError,
            AttributeError, ImportError, KeyError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e


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
            ``module.`` / ``net3d.``.
        arch: "MinkUNet14A" | "MinkUNet18A" | "MinkUNet34C".
        out_channels: feature dim of the head (512 LSeg, 768 OpenSeg); None = read it from
            ``final.kernel``.
    Returns:
        the model (train mode; call ``.eval()`` for inference).
    """
    sd = strip_prefixes(_state_dict_of(_torch_load(path, map_location), path))
    if out_channels is None:
        if "final.kernel" not in sd:
            raise CheckpointError(f"{path}: no 'final.kernel' key to infer out_channels from; "
                                  f"is this a MinkUNet checkpoint? keys: {_list(sd)}")
        out_channels = int(sd["final.kernel"].shape[-1])
    model = build_model(arch, in_channels=in_channels, out_channels=out_channels)
    load_state_dict_strict(model, sd, source=f"{path} (as {arch}, out_channels={out_channels})")
    return model


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
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_json": json.dumps(desc),
               "config_json": config_json, "extra": extra or {},
               "state_dict": OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())}
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path, map_location="cpu") -> Tuple[MinkUNetBase, Dict[str, Any], Dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Returns:
        (model, config dict, extra dict); the model is on ``map_location`` in eval mode.
    """
    obj = _torch_load(path, map_location)
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        hint = (" It looks like an OpenScene checkpoint: use load_openscene_checkpoint(path, arch)."
                if isinstance(obj, Mapping) else "")
        raise CheckpointError(f"{path}: not a SAS-ROS backbone checkpoint (no format={FORMAT!r}).{hint}")
    if int(obj.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer version (format_version {obj['format_version']})")
    try:
        desc = json.loads(obj["model_json"])
        config = json.loads(obj.get("config_json", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: malformed model/config description ({e})") from e
    model = build_model(desc["arch"], desc["in_channels"], desc["out_channels"])
    load_state_dict_strict(model, obj["state_dict"], source=str(path))
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model = model.to(map_location)
    model.eval()
    return model, config, dict(obj.get("extra") or {})
