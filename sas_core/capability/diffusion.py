"""Stable Diffusion synthesis with cross-attention capture -> coarse class masks (SAS section 3.2).

For every class of a vocabulary, Stable Diffusion draws images from the prompt
``"a good photo of a {class} in a room"`` (50 DDIM/PNDM steps, guidance 7, seed = image index, as
the paper's public code ``MCC/Stable_Diffusion/generate_any_class.py``). While it denoises, an
attention processor on every cross-attention layer of the UNet's down and up blocks records the
attention probabilities ``softmax(QK^T / sqrt(d))`` (eq. 1) of the conditional branch only (under
classifier-free guidance the UNet sees ``[uncond, cond]``; the unconditional half is dropped). The
maps are kept as running sums per attention resolution, so memory stays flat over steps and layers.

Aggregation (eq. 2 and the public code): the running sums give, per resolution (16/32/64 at 512 px),
the map averaged over heads, layers and steps; for each word piece of the class name, each of those
maps is upsampled (bicubic) to the image size and divided by its maximum, the resolutions are
averaged, then the word pieces are averaged; the result is min-max normalised and thresholded at
0.7 -> the coarse mask. (The public code, inherited from DiffuMask, uses the 8x8 maps alone for
"sofa", "train" and "tvmonitor" and the 16x16 maps alone for "diningtable"; those per-class
exceptions are not reproduced: every class uses ``attention_factors``.)

Real weights are loaded from a local diffusers folder (``StableDiffusionPipeline.from_pretrained``
layout: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/); nothing is
downloaded. Tests pass a pipeline built from tiny randomly initialised components.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from sas_core.config import opt

DOWNLOAD_HINT = (
    "download Stable Diffusion v1.5 in diffusers format (e.g. the Hugging Face repository "
    "'stable-diffusion-v1-5/stable-diffusion-v1-5', formerly 'runwayml/stable-diffusion-v1-5': "
    "model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) and pass its folder"
)


@dataclass
class DiffusionConfig:
    """Synthesis and attention-map settings (defaults: the paper's public code)."""

    model_path: str = opt("", "local diffusers folder of Stable Diffusion v1.5")
    prompt: str = opt("a good photo of a {} in a room", "{} is replaced by the class name")
    steps: int = opt(50, "denoising steps")
    guidance: float = opt(7.0, "classifier-free guidance scale (<= 1 disables the unconditional branch)")
    images_per_class: int = opt(50, "images drawn per class; image i uses seed seed_offset + i")
    seed_offset: int = opt(0, "first seed")
    height: int = opt(512, "image height in pixels")
    width: int = opt(512, "image width in pixels")
    attention_factors: tuple = opt((1, 2, 4), "attention-map sizes kept, as latent-size ratios (64/32/16 at 512 px)")
    threshold: float = opt(0.7, "coarse-mask threshold on the min-max normalised map")
    device: str = opt("cpu", "torch device of the pipeline")
    dtype: str = opt("float32", "float32 | float16 (CUDA)", choices=("float32", "float16"))


# --------------------------------------------------------------------------------------------
# attention capture


class AttentionStore:
    """Running sums of conditional cross-attention probabilities, per attention-map size.

    ``sums[(h, w)]`` is a (B, h*w, L) float32 tensor: the sum over recorded layers, heads and steps
    of the attention probabilities (B conditional prompts, L text tokens); ``counts[(h, w)]`` the
    number of (layer, head, step) maps added. ``mean((h, w))`` is the average map; every pixel of
    it sums to 1 over the L tokens (an average of softmax distributions).
    """

    def __init__(self, latent_hw: tuple = (64, 64), cfg: bool = True, factors: Optional[Sequence[int]] = None):
        self.latent_hw = tuple(latent_hw)
        self.cfg = bool(cfg)
        self.factors = None if factors is None else tuple(int(f) for f in factors)
        self.reset()

    def reset(self):
        self.sums = {}
        self.counts = {}
        self.calls = 0

    def map_size(self, n_queries: int) -> tuple:
        """(h, w) of an attention layer with ``n_queries`` pixels, from the latent size."""
        lh, lw = self.latent_hw
        f = math.sqrt(lh * lw / n_queries)
        h, w = int(round(lh / f)), int(round(lw / f))
        if h * w != n_queries:
            raise ValueError(f"cannot infer the map size of {n_queries} queries for latents {self.latent_hw}")
        return h, w

    def wants(self, hw: tuple) -> bool:
        if self.factors is None:
            return True
        return any(hw == (self.latent_hw[0] // f, self.latent_hw[1] // f) for f in self.factors)

    def add(self, probs, batch: int, heads: int) -> None:
        """Record one layer call. probs: (batch*heads, Q, L) attention probabilities."""
        import torch

        bh, q, L = probs.shape
        if bh != batch * heads:
            raise ValueError(f"attention probs batch {bh} != batch {batch} x heads {heads}")
        hw = self.map_size(q)
        self.calls += 1
        if not self.wants(hw):
            return
        p = probs.detach().reshape(batch, heads, q, L)
        if self.cfg:
            if batch % 2:
                raise ValueError("classifier-free guidance expects an even batch [uncond, cond]")
            p = p[batch // 2:]  # conditional half only
        s = p.float().sum(dim=1)  # (B, Q, L) sum over heads
        if hw in self.sums:
            self.sums[hw] += s
        else:
            self.sums[hw] = s.clone()
            self.counts[hw] = 0
        self.counts[hw] += heads

    def mean(self, hw: tuple):
        """(B, h, w, L) average attention map at size hw."""
        if hw not in self.sums:
            raise KeyError(f"no attention recorded at size {hw}; recorded: {sorted(self.sums)}")
        s = self.sums[hw] / max(self.counts[hw], 1)
        return s.reshape(s.shape[0], hw[0], hw[1], s.shape[-1])


class CrossAttentionRecorder:
    """A diffusers attention processor that computes cross-attention explicitly, records its
    probabilities into an ``AttentionStore``, and returns the same output as ``AttnProcessor``."""

    def __init__(self, store: AttentionStore, record: bool = True):
        self.store = store
        self.record = record

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        import torch

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, Q, L), eq. 1
        if self.record and is_cross:
            self.store.add(probs, batch=hidden_states.shape[0], heads=attn.heads)
        out = torch.bmm(probs, value)
        out = attn.batch_to_head_dim(out)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_recorder(unet, store: AttentionStore, places: Sequence[str] = ("down", "up")) -> int:
    """Put a ``CrossAttentionRecorder`` on every cross-attention layer (``attn2``) of the UNet's
    ``places`` blocks (the paper's code records "down" and "up", not "mid"). Other layers keep
    their processors. Returns the number of recording layers."""
    procs = {}
    n = 0
    for name, proc in unet.attn_processors.items():
        block = name.split("_blocks")[0] if "_blocks" in name else name.split("_block")[0]
        if name.endswith("attn2.processor") and block in places:
            procs[name] = CrossAttentionRecorder(store)
            n += 1
        else:
            procs[name] = proc
    unet.set_attn_processor(procs)
    if n == 0:
        raise ValueError("the UNet has no cross-attention layers in its down/up blocks")
    return n


# --------------------------------------------------------------------------------------------
# token selection and aggregation


def class_token_indices(tokenizer, prompt: str, class_name: str) -> list:
    """Positions of all word pieces of ``class_name`` in the tokenised ``prompt``.

    Tokenises the class name alone (without start/end tokens) and finds that piece sequence in the
    prompt's token ids; raises ValueError if the class does not appear.
    """
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True).input_ids
    pieces = tokenizer(class_name).input_ids
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    pieces = [p for p in pieces if p not in special]
    if not pieces:
        raise ValueError(f"class name {class_name!r} tokenises to nothing")
    n = len(pieces)
    for start in range(len(ids) - n + 1):
        if ids[start:start + n] == pieces:
            return list(range(start, start + n))
    raise ValueError(f"class {class_name!r} not found in the tokenised prompt {prompt!r}")


def aggregate_maps(store: AttentionStore, token_indices: Sequence[int], image_hw: tuple,
                   factors: Sequence[int] = (1, 2, 4)):
    """Class-token attention -> (B, H, W) float32 map in [0, 1] (before thresholding).

    For each word piece and each kept size: the average map (heads, layers, steps), bicubic-upsampled
    to ``image_hw`` and divided by its maximum; sizes averaged, then pieces averaged, then
    min-max normalised.
    """
    import torch
    import torch.nn.functional as F

    lh, lw = store.latent_hw
    sizes = [(lh // f, lw // f) for f in factors if (lh // f, lw // f) in store.sums]
    if not sizes:
        raise ValueError(f"no cross-attention recorded at the requested sizes; recorded {sorted(store.sums)}")
    idx = list(token_indices)
    total = None
    for hw in sizes:
        m = store.mean(hw)[..., idx].permute(0, 3, 1, 2)  # (B, P, h, w)
        up = F.interpolate(m, size=tuple(image_hw), mode="bicubic", align_corners=False)
        mx = up.amax(dim=(2, 3), keepdim=True)
        up = up / mx.clamp(min=1e-12)
        total = up if total is None else total + up
    per_piece = total / len(sizes)
    m = per_piece.mean(dim=1)  # (B, H, W)
    lo = m.amin(dim=(1, 2), keepdim=True)
    hi = m.amax(dim=(1, 2), keepdim=True)
    return ((m - lo) / (hi - lo).clamp(min=1e-12)).float()


def coarse_mask(attention_map, threshold: float = 0.7) -> np.ndarray:
    """(H, W) map in [0, 1] -> bool mask ``map > threshold``."""
    a = attention_map.cpu().numpy() if hasattr(attention_map, "cpu") else np.asarray(attention_map)
    return a > threshold


# --------------------------------------------------------------------------------------------
# pipeline


def load_pipeline(config: DiffusionConfig):
    """StableDiffusionPipeline from the local folder ``config.model_path`` (no download)."""
    path = Path(config.model_path) if config.model_path else None
    if path is None or not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"Stable Diffusion model folder {str(path) if path else '(not set)'!r} has no model_index.json: "
            + DOWNLOAD_HINT
        )
    import torch
    from diffusers import StableDiffusionPipeline

    dtype = torch.float16 if config.dtype == "float16" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        str(path), torch_dtype=dtype, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    return pipe.to(config.device)


class DiffusionSynthesizer:
    """Draws class images and their coarse attention masks.

    ``synthesize(class_name, index) -> (rgb (H,W,3) uint8, attention (H,W) float32 in [0,1],
    coarse (H,W) bool)``.
    """

    def __init__(self, config: DiffusionConfig, pipeline=None):
        self.config = config
        self.pipe = pipeline if pipeline is not None else load_pipeline(config)
        if hasattr(self.pipe, "set_progress_bar_config"):
            self.pipe.set_progress_bar_config(disable=True)
        self.vae_scale = getattr(self.pipe, "vae_scale_factor", 8)
        latent_hw = (config.height // self.vae_scale, config.width // self.vae_scale)
        self.store = AttentionStore(latent_hw, cfg=config.guidance > 1.0, factors=config.attention_factors)
        self.n_layers = install_recorder(self.pipe.unet, self.store)

    def models(self) -> dict:
        """Provenance of the diffusion model."""
        return {"diffusion": str(self.config.model_path or type(self.pipe.unet).__name__)}

    def prompt(self, class_name: str) -> str:
        return self.config.prompt.format(class_name)

    def synthesize(self, class_name: str, index: int):
        import torch

        cfg = self.config
        prompt = self.prompt(class_name)
        tokens = class_token_indices(self.pipe.tokenizer, prompt, class_name)
        self.store.reset()
        self.store.cfg = cfg.guidance > 1.0
        generator = torch.Generator(device="cpu").manual_seed(int(cfg.seed_offset + index))
        with torch.no_grad():
            out = self.pipe(prompt, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                            height=cfg.height, width=cfg.width, generator=generator, output_type="np")
        img = np.asarray(out.images[0])
        rgb = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
        att = aggregate_maps(self.store, tokens, (cfg.height, cfg.width), cfg.attention_factors)[0]
        att_np = att.cpu().numpy().astype(np.float32)
        return rgb, att_np, coarse_mask(att_np, cfg.threshold)
