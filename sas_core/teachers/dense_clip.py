"""Dense CLIP teacher: per-pixel CLIP features from an open_clip ViT without training.

CLIP's image tower pools one global vector; its patch tokens are poorly localised because of the
last block. Training-free dense-prediction methods replace that last block:

=========  ===========================================================  ==========  =====
recipe     last-block attention                                         residual    FFN
=========  ===========================================================  ==========  =====
maskclip   none: value projection only (``out_proj(v)``), MaskCLIP       yes         yes
sclip      correlative: ``softmax(q q^T s) + softmax(k k^T s)``, SCLIP   yes         yes
clearclip  self-self ``softmax(q q^T s)``, ClearCLIP                     no          no
naclip     ``softmax(k k^T s + G)`` with a Gaussian neighbourhood        no          no
           bias ``G_ij = exp(-|p_i - p_j|^2 / (2 std^2))`` over patch
           positions (std 5 patches), NACLIP
vanilla    the unmodified CLIP block (reference only; poorly localised)  yes         yes
=========  ===========================================================  ==========  =====

(``s = head_dim^-0.5``; the class token takes part in attention but is dropped from the output.)
The tokens then go through ``ln_post`` and the image projection into the joint image-text space.

Inference: the image is resized so its short side is ``short_side``; square windows of
``crop_size`` slide with ``stride`` (the last window is shifted to end at the border); each
window runs the ViT with its positional embedding bicubically interpolated to the window's patch
grid (any size works; windows are zero-padded, i.e. mean-filled, to a multiple of the patch);
per-window token features are L2-normalised, bilinearly upsampled to pixels, averaged where
windows overlap, optionally refined with PAMR (NACLIP), resized to the input resolution and
L2-normalised again. :data:`DENSE_CLIP_PRESETS` holds each paper's inference settings.

Known deviations from the papers' code (features agree to cosine >= 0.9999 on the same
weights): non-224 windows interpolate the positional embedding to the target grid (MaskCLIP's
way; SCLIP / ClearCLIP / NACLIP use ``scale_factor=(g + 0.1) / 14``, up to 0.03 apart per
value); downscaling is antialiased bilinear (the papers: OpenCV bilinear); overlapping windows
average unit features per pixel (the papers average logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from sas_core.config import opt
from sas_core.types import Frame

RECIPES = ("maskclip", "sclip", "clearclip", "naclip", "vanilla")


@dataclass
class DenseClipConfig:
    """Configuration of :class:`DenseClipTeacher`."""

    model: str = opt("ViT-B-16", "open_clip architecture name")
    checkpoint: Optional[str] = opt(None, "local open_clip weights file (required unless a model is passed)")
    recipe: str = opt("sclip", "last-block recipe: maskclip | sclip | clearclip | naclip | vanilla", choices=RECIPES)
    short_side: Optional[int] = opt(336, "resize the image so its short side is this (None: keep size)")
    crop_size: Optional[int] = opt(224, "sliding-window size in pixels (None: the whole image at once)")
    stride: int = opt(112, "sliding-window stride in pixels")
    naclip_std: float = opt(5.0, "NACLIP Gaussian neighbourhood std, in patches")
    batch_size: int = opt(8, "windows per forward pass")
    device: str = opt("cpu", "torch device")
    out_dtype: str = opt("float16", "float16 | float32 features", choices=("float16", "float32"))
    name: str = opt("dense_clip", "teacher name (capability tables)")
    pamr_steps: int = opt(0, "PAMR refinement iterations on the dense features (NACLIP: 10); 0 = off")

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown dense CLIP recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if self.stride <= 0 or (self.crop_size is not None and self.crop_size <= 0):
            raise ValueError("stride and crop_size must be positive")
        if self.short_side is not None and self.short_side <= 0:
            raise ValueError("short_side must be positive")
        if self.out_dtype not in ("float16", "float32"):
            raise ValueError("out_dtype must be 'float16' or 'float32'")
        if not 0 <= self.pamr_steps <= 100:
            raise ValueError(f"pamr_steps must be in 0..100, got {self.pamr_steps}")


#: Inference settings of each recipe's paper (``--clip-preset``). Values are DenseClipConfig fields.
DENSE_CLIP_PRESETS: Dict[str, dict] = {
    # SCLIP (Wang et al. 2024) on most of its benchmarks; our default: a 336 short side keeps a
    # 640x480 robot frame at 448x336, six windows
    "sclip": dict(recipe="sclip", short_side=336, crop_size=224, stride=112, pamr_steps=0),
    # SCLIP on Cityscapes-like outdoor images
    "sclip_outdoor": dict(recipe="sclip", short_side=560, crop_size=224, stride=112, pamr_steps=0),
    # ClearCLIP (Lan et al. 2024): short side 448, 448 windows at stride 224
    "clearclip": dict(recipe="clearclip", short_side=448, crop_size=448, stride=224, pamr_steps=0),
    # NACLIP (Hajimiri et al. 2025) on VOC: whole image at short side 336, PAMR with 10 steps
    "naclip": dict(recipe="naclip", short_side=336, crop_size=None, stride=112, pamr_steps=10),
    # NACLIP's sliding-window setting (224 windows, stride 112), PAMR with 10 steps
    "naclip_slide": dict(recipe="naclip", short_side=336, crop_size=224, stride=112, pamr_steps=10),
}


def dense_clip_config(preset: Optional[str] = None, **values) -> "DenseClipConfig":
    """A :class:`DenseClipConfig` from a named preset (:data:`DENSE_CLIP_PRESETS`), then ``values``
    (None values are ignored, so unset CLI flags keep the preset's)."""
    if preset is not None and preset not in DENSE_CLIP_PRESETS:
        raise ValueError(f"unknown dense CLIP preset {preset!r}; choose one of {', '.join(DENSE_CLIP_PRESETS)}")
    merged = dict(DENSE_CLIP_PRESETS.get(preset, {}))
    merged.update({k: v for k, v in values.items() if v is not None})
    return DenseClipConfig(**merged)


#: PAMR's neighbourhood dilations (NACLIP's ``pamr_stride``)
PAMR_DILATIONS = (8, 16)


def pamr(image, features, steps: int, dilations=PAMR_DILATIONS):
    """Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, CVPR 2020), as NACLIP applies it.

    Each pixel's 8 neighbours at each dilation get an affinity from the image,
    ``-|I_n - I_p| / (1e-8 + 0.1 std_p)`` averaged over colour channels and soft-maxed over all
    neighbours (``std_p``: the standard deviation of the pixel's 3x3 neighbourhood at that
    dilation, centre included); the map is then replaced ``steps`` times by the affinity-weighted
    mean of its neighbours. NACLIP refines class logits; here the maps are the dense features
    (renormalised after), so the refinement is the same for every class text.

    Args:
        image: (1, 3, H, W) float image (any normalisation).
        features: (C, H, W) float maps.
    Returns:
        (C, H, W) refined maps (not normalised).
    """
    import torch
    import torch.nn.functional as F

    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    h, w = features.shape[1:]

    def neighbours(x, d):  # (C, H, W) -> list of 8 (C, H, W) views, replicate padding
        padded = F.pad(x[None], (d, d, d, d), mode="replicate")[0]
        return [padded[:, d + dy * d:d + dy * d + h, d + dx * d:d + dx * d + w] for dy, dx in offsets]

    img = image[0].float()
    logits = []
    for d in dilations:
        nb = neighbours(img, d)
        stack = torch.stack(nb + [img])  # (9, 3, H, W)
        std = stack.std(dim=0, unbiased=True)  # (3, H, W)
        for n in nb:
            logits.append((-(n - img).abs() / (1e-8 + 0.1 * std)).mean(0))  # (H, W)
    aff = torch.softmax(torch.stack(logits), dim=0)  # (8 * len(dilations), H, W)
    x = features.float()
    for _ in range(int(steps)):
        out = torch.zeros_like(x)
        k = 0
        for d in dilations:
            for n in neighbours(x, d):
                out += aff[k] * n
                k += 1
        x = out
    return x


class DenseClipTeacher:
    """Dense CLIP features (MaskCLIP / SCLIP / ClearCLIP / NACLIP) as a :class:`Teacher`.

    Args:
        config: :class:`DenseClipConfig`.
        model: an open_clip CLIP model to use instead of loading ``config.checkpoint``.
    """

    def __init__(self, config: Optional[DenseClipConfig] = None, model=None):
        import torch

        from sas_core.clip import image_mean_std, load_open_clip

        self.config = config or DenseClipConfig()
        self.model = model if model is not None else load_open_clip(self.config.model, self.config.checkpoint,
                                                                    self.config.device)
        visual = self.model.visual
        for attr in ("conv1", "class_embedding", "positional_embedding", "transformer", "ln_post", "proj"):
            if not hasattr(visual, attr):
                raise ValueError(f"dense CLIP needs an open_clip VisionTransformer image tower; "
                                 f"{type(visual).__name__} has no {attr!r}")
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("dense CLIP does not support image towers with attentional pooling")
        if not isinstance(visual.transformer.resblocks[-1].attn, torch.nn.MultiheadAttention):
            raise ValueError("dense CLIP supports open_clip's standard attention blocks only")
        self.name = self.config.name
        self.device = next(self.model.parameters()).device
        mean, std = image_mean_std(self.model)
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        ps = visual.patch_size if hasattr(visual, "patch_size") else visual.conv1.kernel_size
        self.patch = (int(ps[0]), int(ps[1])) if isinstance(ps, (tuple, list)) else (int(ps), int(ps))
        self.dim = int(visual.proj.shape[1])
        gs = visual.grid_size
        self._grid0 = (int(gs[0]), int(gs[1])) if isinstance(gs, (tuple, list)) else (int(gs), int(gs))
        self._pos_cache: Dict[Tuple[int, int], "torch.Tensor"] = {}
        self._bias_cache: Dict[Tuple[int, int], "torch.Tensor"] = {}

    # ------------------------------------------------------------------ public API
    def features(self, frame: Frame):
        """(features (H, W, C) L2-normalised, valid (H, W) bool all True) for ``frame.color``."""
        import torch

        if frame.color is None:
            raise ValueError("the dense CLIP teacher needs frame.color")
        feats = self.image_features(frame.color)
        return feats, torch.ones(feats.shape[:2], dtype=torch.bool)

    def image_features(self, rgb: np.ndarray):
        """Dense features of an (H, W, 3) uint8 RGB image -> (H, W, C) CPU tensor (``out_dtype``)."""
        import torch
        import torch.nn.functional as F

        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
        h, w = rgb.shape[:2]
        cfg = self.config
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device).permute(2, 0, 1)[None].float() / 255.0
            if cfg.short_side is not None and min(h, w) != cfg.short_side:
                scale = cfg.short_side / min(h, w)
                size = (max(1, round(h * scale)), max(1, round(w * scale)))
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
            x = (x - self._mean) / self._std
            dense = self._slide(x)  # (C, Hr, Wr) float32
            if cfg.pamr_steps:
                dense = pamr(x, dense, cfg.pamr_steps)
            dense = F.interpolate(dense[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            dense = F.normalize(dense, dim=0)
            out = dense.permute(1, 2, 0).to(getattr(torch, cfg.out_dtype)).contiguous()
        return out.cpu()

    # ----------------------------------------------------------------- internals
    def _windows(self, height: int, width: int):
        cfg = self.config
        ch = height if cfg.crop_size is None else min(cfg.crop_size, height)
        cw = width if cfg.crop_size is None else min(cfg.crop_size, width)
        ny = max(math.ceil((height - ch) / cfg.stride), 0) + 1
        nx = max(math.ceil((width - cw) / cfg.stride), 0) + 1
        boxes = []
        for iy in range(ny):
            for ix in range(nx):
                y0 = min(iy * cfg.stride, height - ch)
                x0 = min(ix * cfg.stride, width - cw)
                boxes.append((y0, x0))
        return ch, cw, sorted(set(boxes))

    def _slide(self, x):
        """Sliding-window dense features of a normalised (1, 3, H, W) image -> (C, H, W) float32."""
        import torch
        import torch.nn.functional as F

        _, _, height, width = x.shape
        ch, cw, boxes = self._windows(height, width)
        total = torch.zeros(self.dim, height, width, device=x.device)
        count = torch.zeros(1, height, width, device=x.device)
        ph, pw = self.patch
        hp, wp = math.ceil(ch / ph) * ph, math.ceil(cw / pw) * pw
        for start in range(0, len(boxes), self.config.batch_size):
            batch = boxes[start:start + self.config.batch_size]
            crops = torch.stack([x[0, :, y0:y0 + ch, x0:x0 + cw] for y0, x0 in batch])
            crops = F.pad(crops, (0, wp - cw, 0, hp - ch))  # zeros == the CLIP mean after normalisation
            tokens = self.token_features(crops)  # (B, gh, gw, C)
            tokens = F.normalize(tokens, dim=-1).permute(0, 3, 1, 2)
            pix = F.interpolate(tokens, size=(hp, wp), mode="bilinear", align_corners=False)[:, :, :ch, :cw]
            for (y0, x0), feat in zip(batch, pix):
                total[:, y0:y0 + ch, x0:x0 + cw] += feat
                count[:, y0:y0 + ch, x0:x0 + cw] += 1
        return total / count

    def _pos_embed(self, gh: int, gw: int):
        """(1 + gh*gw, width) positional embedding, patch part bicubically resized to (gh, gw)."""
        import torch
        import torch.nn.functional as F

        key = (gh, gw)
        if key not in self._pos_cache:
            pe = self.model.visual.positional_embedding
            if (gh, gw) == self._grid0:
                self._pos_cache[key] = pe
            else:
                g0h, g0w = self._grid0
                patch = pe[1:].reshape(1, g0h, g0w, -1).permute(0, 3, 1, 2).float()
                patch = F.interpolate(patch, size=(gh, gw), mode="bicubic", align_corners=False)
                patch = patch.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(pe.dtype)
                self._pos_cache[key] = torch.cat([pe[:1], patch])
        return self._pos_cache[key]

    def _naclip_bias(self, gh: int, gw: int):
        """(1 + gh*gw, 1 + gh*gw) Gaussian neighbourhood bias; zero row/column for the class token."""
        import torch

        key = (gh, gw)
        if key not in self._bias_cache:
            yy, xx = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32),
                                    indexing="ij")
            pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], 1)
            d2 = torch.cdist(pos, pos).square()
            bias = torch.zeros(gh * gw + 1, gh * gw + 1)
            bias[1:, 1:] = torch.exp(-d2 / (2.0 * self.config.naclip_std ** 2))
            self._bias_cache[key] = bias.to(self.device)
        return self._bias_cache[key]

    def token_features(self, x):
        """Patch-token features of normalised images (B, 3, h, w) (h, w multiples of the patch)
        -> (B, h/p, w/p, C) in the joint space (not normalised)."""
        import torch

        visual = self.model.visual
        b, _, h, w = x.shape
        gh, gw = h // self.patch[0], w // self.patch[1]
        dtype = visual.conv1.weight.dtype
        t = visual.conv1(x.to(dtype)).reshape(b, -1, gh * gw).permute(0, 2, 1)
        cls = visual.class_embedding.to(t.dtype).view(1, 1, -1).expand(b, -1, -1)
        t = torch.cat([cls, t], dim=1) + self._pos_embed(gh, gw).to(t.dtype)
        t = visual.ln_pre(t)
        transformer = visual.transformer
        batch_first = getattr(transformer, "batch_first", True)
        if not batch_first:
            t = t.transpose(0, 1)
        for blk in transformer.resblocks[:-1]:
            t = blk(t)
        if not batch_first:
            t = t.transpose(0, 1)
        t = self._last_block(transformer.resblocks[-1], t, gh, gw, batch_first)
        t = visual.ln_post(t[:, 1:]) @ visual.proj
        return t.reshape(b, gh, gw, -1).float()

    def _last_block(self, blk, t, gh: int, gw: int, batch_first: bool):
        """The recipe's replacement of the last residual block; ``t`` is (B, L, D) batch-first."""
        import torch.nn.functional as F

        recipe = self.config.recipe
        if recipe == "vanilla":
            return blk(t) if batch_first else blk(t.transpose(0, 1)).transpose(0, 1)
        attn = blk.attn
        b, n, d = t.shape
        heads = attn.num_heads
        hd = d // heads
        y = blk.ln_1(t)
        q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, n, heads, hd).transpose(1, 2) for z in (q, k, v))  # (B, heads, L, hd)
        scale = hd ** -0.5
        if recipe == "maskclip":
            out = v
        elif recipe == "sclip":
            a = (q @ q.transpose(-1, -2) * scale).softmax(-1) + (k @ k.transpose(-1, -2) * scale).softmax(-1)
            out = a @ v
        elif recipe == "clearclip":
            out = (q @ q.transpose(-1, -2) * scale).softmax(-1) @ v
        elif recipe == "naclip":
            logits = k @ k.transpose(-1, -2) * scale + self._naclip_bias(gh, gw).to(k.dtype)
            out = logits.softmax(-1) @ v
        else:  # pragma: no cover - guarded by the config
            raise ValueError(recipe)
        out = attn.out_proj(out.transpose(1, 2).reshape(b, n, d))
        if recipe in ("maskclip", "sclip"):
            ls_1 = getattr(blk, "ls_1", None) or (lambda z: z)
            ls_2 = getattr(blk, "ls_2", None) or (lambda z: z)
            t = t + ls_1(out)
            return t + ls_2(blk.mlp(blk.ln_2(t)))
        return out
