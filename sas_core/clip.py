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

    return open_clip.get_tokenizer(split_clip_name(model_name)[0])


#: model-name suffixes that declare the activation of the weights: open_clip's own ``-quickgelu``
#: (OpenAI's CLIP weights were trained with QuickGELU, as DFN's and MetaCLIP's) and ours, ``-gelu``
#: (LAION, DataComp weights: plain GELU).
ACTIVATION_SUFFIXES = {"-quickgelu": True, "-gelu": False}

#: keys that OpenAI's CLIP releases (TorchScript archives) carry in their state dict
OPENAI_JIT_KEYS = ("input_resolution", "context_length", "vocab_size")

#: metadata key of open_clip weights converted by ``sas import-checkpoint --trust --clip``
CONVERTED_KEY = "sas_clip"


def split_clip_name(model_name: str) -> Tuple[str, Optional[bool]]:
    """``"ViT-B-16-quickgelu"`` -> ``("ViT-B-16", True)``; ``"ViT-B-16-gelu"`` -> ``("ViT-B-16", False)``;
    ``"ViT-B-16"`` -> ``("ViT-B-16", None)`` (activation not declared)."""
    name = str(model_name)
    for suffix, quick in ACTIVATION_SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], quick
    return name, None


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def _config_quick_gelu(config_file: Path) -> Optional[bool]:
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_file}: not a readable open_clip config ({e})") from None
    cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else {}
    return bool(cfg.get("quick_gelu", False))


def weights_activation(path) -> Tuple[Optional[bool], str]:
    """What a weights file (or open_clip ``local-dir`` folder) says about its activation.

    Returns ``(quick_gelu or None when the file does not tell, why)``. Evidence, in order: an
    ``open_clip_config.json`` in the folder or beside the file (the Hugging Face layout); the
    metadata of a file converted by ``sas import-checkpoint --trust --clip``; the buffers that
    OpenAI's releases carry (``input_resolution``, ``context_length``, ``vocab_size``).

    Raises:
        ValueError: an OpenAI TorchScript archive (it can only be read by unpickling code: convert
            it once with ``sas import-checkpoint --trust --clip``).
    """
    import zipfile

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = folder / "open_clip_config.json"
    if config.is_file():
        quick = _config_quick_gelu(config)
        return quick, f"{config} says quick_gelu={quick}"
    if path.is_dir():
        return None, f"{path} has no open_clip_config.json"
    if _is_torchscript(path):
        raise ValueError(f"{path} is an OpenAI TorchScript release of CLIP (QuickGELU); reading it would run "
                         f"its pickled code, so convert it once: sas import-checkpoint --trust --clip {path} "
                         f"{path.with_suffix('')}-openai.pt")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            meta = f.metadata() or {}
        if meta.get(CONVERTED_KEY):
            quick = meta[CONVERTED_KEY] == "quick_gelu"
            return quick, f"{path} was converted with activation {meta[CONVERTED_KEY]}"
    else:
        from sas_core.io import load_torch_file

        data = load_torch_file(path, what="open_clip weights", mmap=zipfile.is_zipfile(path))
        if isinstance(data, dict) and isinstance(data.get(CONVERTED_KEY), dict):
            activation = data[CONVERTED_KEY].get("activation")
            return activation == "quick_gelu", f"{path} was converted with activation {activation}"
        state = data.get("state_dict", data) if isinstance(data, dict) else {}
        keys = {k[7:] if str(k).startswith("module.") else str(k) for k in state}
    if keys & set(OPENAI_JIT_KEYS):
        return True, f"{path} holds OpenAI's release buffers ({', '.join(sorted(keys & set(OPENAI_JIT_KEYS)))})"
    return None, f"{path} does not say which activation its weights were trained with"


def published_activations(arch: str) -> dict:
    """``{pretrained tag: quick_gelu}`` of open_clip's registry for architecture ``arch``."""
    import open_clip
    from open_clip import pretrained

    out = {}
    for tag in open_clip.list_pretrained_tags_by_model(arch):
        cfg = pretrained.get_pretrained_cfg(arch, tag) or {}
        out[tag] = bool(cfg.get("quick_gelu", False))
    return out


def resolve_activation(model_name: str, checkpoint_path) -> Tuple[str, bool, str]:
    """Which activation to build ``model_name`` with for the weights at ``checkpoint_path``.

    OpenAI's CLIP weights (and DFN's, MetaCLIP's) need QuickGELU; LAION / DataComp weights need GELU.
    Loading either into the other builds a model that runs but whose features are wrong. The
    choice, in order: what the weights say (:func:`weights_activation`), the name's suffix
    (``-quickgelu`` / ``-gelu``; a contradiction with the weights is an error), then open_clip's
    registry when every published weight of the architecture agrees (e.g. ``ViT-L-14-336``: OpenAI
    only; a model with none: its config). Anything else is ambiguous and refused.

    Returns:
        (architecture name for open_clip, quick_gelu, why) -- ``why`` is one line for logs.
    Raises:
        ValueError: contradiction or ambiguity (the message names both options).
    """
    arch, declared = split_clip_name(model_name)
    evidence, why = weights_activation(checkpoint_path)
    act = {True: "QuickGELU", False: "GELU"}
    if evidence is not None:
        if declared is not None and declared != evidence:
            raise ValueError(f"model {model_name!r} declares {act[declared]} but {why}: use "
                             f"{arch}{'-quickgelu' if evidence else '-gelu'} (or other weights)")
        return arch, evidence, why
    if declared is not None:
        return arch, declared, f"the model name {model_name!r} declares {act[declared]}"
    import open_clip

    if open_clip.get_model_config(arch) is not None and open_clip.get_model_config(arch).get("quick_gelu"):
        return arch, True, f"open_clip's config {arch!r} is QuickGELU"
    published = published_activations(arch)
    kinds = set(published.values())
    if len(kinds) <= 1:
        quick = kinds == {True}
        source = (f"every published weight of {arch} ({', '.join(published)}) is {act[quick]}" if published
                  else f"{arch} has no published weights in open_clip's registry: its config's {act[quick]}")
        return arch, quick, source
    quick_tags = [t for t, q in published.items() if q]
    gelu_tags = [t for t, q in published.items() if not q]
    raise ValueError(
        f"cannot tell whether {checkpoint_path} needs QuickGELU or GELU: {arch} is published with both "
        f"(QuickGELU: {', '.join(quick_tags[:4])}; GELU: {', '.join(gelu_tags[:3])}{', ...' if len(gelu_tags) > 3 else ''})"
        f" and the file does not say. Name the model {arch}-quickgelu (OpenAI, DFN, MetaCLIP weights) or "
        f"{arch}-gelu (LAION, DataComp weights), or keep the weights' open_clip_config.json beside the file")


def load_open_clip(model_name: str, checkpoint_path: Optional[str], device: str = "cpu"):
    """An open_clip model in eval mode with weights from a local file (cached).

    Args:
        model_name: open_clip architecture (``"ViT-B-16"``, or a name registered with
            :func:`register_tiny_clip`), optionally with the activation declared by a suffix:
            ``-quickgelu`` (OpenAI's weights) or ``-gelu`` (LAION, DataComp, ...); see
            :func:`resolve_activation`.
        checkpoint_path: weights file, or an open_clip ``local-dir`` folder (with
            ``open_clip_config.json``).
        device: torch device string.
    Raises:
        FileNotFoundError: the checkpoint is missing (message names the file and what to get).
        ValueError: unknown architecture, no checkpoint configured, or an activation that cannot be
            told or contradicts the weights.
    """
    if checkpoint_path is None or str(checkpoint_path) == "":
        raise ValueError(f"no checkpoint configured for open_clip model {model_name!r}: "
                         + _clip_hint(split_clip_name(model_name)[0]))
    path = Path(checkpoint_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(missing_weights_message(f"open_clip checkpoint for {model_name}", path,
                                                        _clip_hint(split_clip_name(model_name)[0])))
    stat = path.stat()
    return _load_cached(str(model_name), str(path.resolve()), str(device), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _load_cached(model_name: str, path: str, device: str, _mtime: int, _size: int):
    import logging

    import open_clip

    arch, quick, why = resolve_activation(model_name, path)
    if Path(path).is_dir():
        model = open_clip.create_model(f"local-dir:{path}", device=device, force_quick_gelu=quick)
    else:
        if open_clip.get_model_config(arch) is None:
            raise ValueError(f"unknown open_clip architecture {arch!r}; known: "
                             f"{', '.join(open_clip.list_models()[:12])}, ...")
        model = open_clip.create_model(arch, pretrained=path, device=device, force_quick_gelu=quick)
    logging.getLogger("sas_core.clip").info("open_clip %s from %s with %s: %s", arch, path,
                                            "QuickGELU" if quick else "GELU", why)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def uses_quick_gelu(model) -> bool:
    """Whether an open_clip model's transformer blocks use QuickGELU."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


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
