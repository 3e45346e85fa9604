"""Loading open_clip models from local files, and tiny random models for tests (a neutral module:
:mod:`sas_core.text` and :mod:`sas_core.teachers` both use it, neither imports the other for it).

Nothing here downloads anything: a model is built from open_clip's architecture config and its
weights are read from a file (or an open_clip ``local-dir:`` folder) that the user configured.
Loaded models are cached per (name, path, device), so the dense teacher, the mask teacher and
the text encoder share one copy.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Tuple

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def missing_weights_message(what: str, path, hint: str) -> str:
    """One-line error text for a missing weights file: what, where expected, what to download."""
    return f"{what} not found at {str(path)!r}: {hint}"


def _clip_hint(model_name: str) -> str:
    try:
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(model_name)
    except Exception:  # pragma: no cover - only affects the hint text
        tags = []
    tag_text = f" (published weights for {model_name}: {', '.join(tags)})" if tags else ""
    return (f"download the open_clip weights of {model_name}{tag_text}, e.g. the "
            "open_clip_pytorch_model.bin / .safetensors file from the model's Hugging Face page, "
            "on a machine with internet access and point the checkpoint setting at it")


def open_clip_tokenizer(model_name: str):
    """open_clip's tokenizer for ``model_name`` (the bundled BPE vocabulary; no download for CLIP models)."""
    import open_clip

    return open_clip.get_tokenizer(model_name)


def load_open_clip(model_name: str, checkpoint_path: Optional[str], device: str = "cpu"):
    """An open_clip model in eval mode with weights from a local file (cached).

    Args:
        model_name: open_clip architecture (``"ViT-B-16"``, or a name registered with
            :func:`register_tiny_clip`).
        checkpoint_path: weights file, or an open_clip ``local-dir`` folder (with
            ``open_clip_config.json``).
        device: torch device string.
    Raises:
        FileNotFoundError: the checkpoint is missing (message names the file and what to get).
        ValueError: unknown architecture or no checkpoint configured.
    """
    if checkpoint_path is None or str(checkpoint_path) == "":
        raise ValueError(f"no checkpoint configured for open_clip model {model_name!r}: "
                         + _clip_hint(model_name))
    path = Path(checkpoint_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(missing_weights_message(f"open_clip checkpoint for {model_name}", path,
                                                        _clip_hint(model_name)))
    stat = path.stat()
    return _load_cached(str(model_name), str(path.resolve()), str(device), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _load_cached(model_name: str, path: str, device: str, _mtime: int, _size: int):
    import open_clip

    if Path(path).is_dir():
        model = open_clip.create_model(f"local-dir:{path}", device=device)
    else:
        if open_clip.get_model_config(model_name) is None:
            raise ValueError(f"unknown open_clip architecture {model_name!r}; known: "
                             f"{', '.join(open_clip.list_models()[:12])}, ...")
        model = open_clip.create_model(model_name, pretrained=path, device=device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def image_mean_std(model) -> Tuple[Tuple[float, float, float], Tuple[float, float, float]]:
    """(mean, std) RGB normalisation of an open_clip model's image tower (0-1 pixel scale)."""
    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean", OPENAI_CLIP_MEAN))
    std = tuple(float(v) for v in cfg.get("std", OPENAI_CLIP_STD))
    return mean, std


def image_size(model) -> Tuple[int, int]:
    """(height, width) the image tower was trained at."""
    size = getattr(model.visual, "image_size", 224)
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


# ------------------------------------------------------------------------- tiny test models

TINY_CLIP_NAME = "sas-tiny-vit"

TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
"""A CLIP ViT of the real open_clip classes, small enough for CPU tests (about 1.7 M parameters,
mostly the token embedding that the real BPE tokenizer needs)."""


def register_tiny_clip(name: str = TINY_CLIP_NAME, config: Optional[dict] = None) -> str:
    """Register an open_clip architecture config under ``name`` (default: :data:`TINY_CLIP_CONFIG`).

    Uses open_clip's public ``add_model_config`` with a JSON file in a temporary folder (removed
    again), so
    ``open_clip.create_model(name, ...)`` and :func:`load_open_clip` work with it.
    """
    import open_clip

    config = TINY_CLIP_CONFIG if config is None else config
    existing = open_clip.get_model_config(name)
    if existing is not None and existing == config:
        return name
    # open_clip reads the file at once and keeps the config when the file is gone later
    with tempfile.TemporaryDirectory(prefix="sas-open-clip-configs-") as folder:
        path = Path(folder) / f"{name}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)
    return name


def build_tiny_clip(seed: int = 0, name: str = TINY_CLIP_NAME, config: Optional[dict] = None):
    """A randomly initialised tiny open_clip model (eval mode), deterministic by ``seed``."""
    import open_clip
    import torch

    register_tiny_clip(name, config)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def save_tiny_clip(path, seed: int = 0, name: str = TINY_CLIP_NAME, config: Optional[dict] = None) -> str:
    """Write a tiny random open_clip checkpoint (a plain state dict) to ``path``; returns ``path``."""
    import torch

    from sas_core.io import atomic_path

    model = build_tiny_clip(seed, name, config)
    with atomic_path(path, suffix=".tmp") as tmp:
        torch.save(model.state_dict(), tmp)
    return os.fspath(path)
