"""Mask teacher: segment-anything masks, labelled by CLIP, aligned via text (SAS section 3.1).

Stand-in for SEEM. For one image:

1. **Masks**: segment-anything's ``SamAutomaticMaskGenerator`` (a grid of point prompts,
   quality filtering, NMS); any callable returning SAM-style records can replace it.
2. **Mask embedding** with the CLIP image tower, by one of two crop recipes:

   * ``"masked"`` (OVSeg): the mask's bounding box is cropped, pixels outside the mask are set
     to CLIP's pixel mean (zero after normalisation), the crop is padded to a square with the
     mean and resized to the CLIP input size.
   * ``"multilevel"`` (OpenMask3D): ``levels`` crops of the bounding box expanded by
     ``level * expansion`` of its width/height on each side (clipped to the image), each padded
     to a square with the mean and resized; the L2-normalised embeddings are averaged.

3. **Labels**: cosine similarity to the vocabulary's CLIP text embeddings (this CLIP's own
   text tower, prompts from ``templates``); the best class is the mask's label.
4. **Model alignment via text**: label -> caption (``caption_template.format(label)``, default
   ``"a {}"``, or a ``captioner(rgb, mask, label) -> str`` hook, e.g. a real captioner whose
   noun is replaced by the label as SAS does with TAP) -> the **shared** text encoder. The mask
   feature is exactly the text embedding of its caption, so this teacher lives in the same space
   as every other teacher whatever CLIP labelled the masks.
5. **Pixels** take the feature of the smallest mask covering them; uncovered pixels are
   ``valid == False`` with zero features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np

from sas_core.config import opt
from sas_core.text import CAPTION_TEMPLATE, PROMPT_TEMPLATE, SCANNET_20, class_embeddings
from sas_core.types import Frame

CROP_RECIPES = ("masked", "multilevel")

SAM_DOWNLOADS = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}


@dataclass
class MaskTeacherConfig:
    """Configuration of :class:`MaskClipTeacher`."""

    name: str = opt("mask_clip", "teacher name (capability tables)")
    clip_model: str = opt("ViT-B-16", "open_clip architecture that embeds and labels the masks")
    clip_checkpoint: Optional[str] = opt(None, "local open_clip weights file")
    sam_model: str = opt("vit_b", "segment-anything registry key: vit_h | vit_l | vit_b",
                         choices=tuple(SAM_DOWNLOADS))
    sam_checkpoint: Optional[str] = opt(None, "local SAM weights file (e.g. sam_vit_b_01ec64.pth)")
    points_per_side: int = opt(32, "SAM automatic generator: point grid per side")
    points_per_batch: int = opt(64, "SAM automatic generator: prompts per forward pass")
    pred_iou_thresh: float = opt(0.88, "SAM: keep masks with predicted IoU above this")
    stability_score_thresh: float = opt(0.95, "SAM: keep masks with stability above this")
    box_nms_thresh: float = opt(0.7, "SAM: box NMS IoU threshold")
    min_mask_region_area: int = opt(0, "SAM: remove small holes/islands (needs OpenCV when > 0)")
    min_area: int = opt(16, "drop masks with fewer pixels")
    crop_recipe: str = opt("masked", "'masked' (OVSeg) | 'multilevel' (OpenMask3D)", choices=CROP_RECIPES)
    levels: int = opt(3, "multilevel: number of box levels")
    expansion: float = opt(0.1, "multilevel: box expansion per level (fraction of box size)")
    crop_size: Optional[int] = opt(None, "CLIP input size (None: the model's image size)")
    vocabulary: Sequence[str] = opt(SCANNET_20, "class names masks are labelled with")
    templates: Optional[Sequence[str]] = opt((PROMPT_TEMPLATE,), "prompts for labelling")
    caption_template: str = opt(CAPTION_TEMPLATE, "caption of a mask labelled x")
    batch_size: int = opt(32, "crops per CLIP forward pass")
    device: str = opt("cpu", "torch device")
    out_dtype: str = opt("float16", "float16 | float32 features", choices=("float16", "float32"))

    def __post_init__(self):
        if self.crop_recipe not in CROP_RECIPES:
            raise ValueError(f"unknown crop recipe {self.crop_recipe!r}; choose one of {', '.join(CROP_RECIPES)}")
        if self.levels < 1 or self.expansion < 0:
            raise ValueError("levels must be >= 1 and expansion >= 0")
        if self.out_dtype not in ("float16", "float32"):
            raise ValueError("out_dtype must be 'float16' or 'float32'")
        if "{}" not in self.caption_template:
            raise ValueError("caption_template must contain '{}'")


@dataclass
class MaskPrediction:
    """Masks of one image with labels and aligned features.

    Attributes:
        masks: (M, H, W) bool.
        labels: (M,) int64 index into the vocabulary.
        scores: (M,) float32 cosine similarity of the mask embedding to its label's text.
        captions: M captions.
        features: (M, C) float32, the shared text encoder's embedding of each caption.
    """

    masks: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    captions: List[str]
    features: "object"


def load_sam(model_type: str, checkpoint: Optional[str], device: str = "cpu"):
    """A segment-anything model from a local checkpoint (clear error when it is missing)."""
    from pathlib import Path

    from segment_anything import sam_model_registry

    if model_type not in sam_model_registry:
        raise ValueError(f"unknown SAM model {model_type!r}; choose one of {', '.join(sam_model_registry)}")
    fname = SAM_DOWNLOADS.get(model_type, "the SAM checkpoint")
    hint = (f"download {fname} from the segment-anything release (github.com/facebookresearch/segment-anything, "
            f"'Model Checkpoints') on a machine with internet access and set the SAM checkpoint path to it")
    if checkpoint is None or str(checkpoint) == "":
        raise ValueError(f"no SAM checkpoint configured for {model_type}: {hint}")
    if not Path(checkpoint).expanduser().is_file():
        raise FileNotFoundError(f"SAM checkpoint for {model_type} not found at {str(checkpoint)!r}: {hint}")
    from sas_core.io import load_torch_file

    # the weights are read as data (segment-anything's own loader would unpickle the file)
    state_dict = load_torch_file(Path(checkpoint).expanduser(), what=f"SAM checkpoint ({model_type})")
    if isinstance(state_dict, dict) and isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]
    sam = sam_model_registry[model_type](checkpoint=None)
    try:
        sam.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ValueError(f"{checkpoint}: not a SAM {model_type} checkpoint ({str(e).splitlines()[0][:300]})") from e
    return sam.to(device).eval()


def build_tiny_sam(seed: int = 0, img_size: int = 64):
    """A randomly initialised small ``Sam`` of the real segment-anything classes (tests)."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        dim, patch = 32, 16
        sam = Sam(
            image_encoder=ImageEncoderViT(img_size=img_size, patch_size=patch, embed_dim=dim, depth=1, num_heads=2,
                                          out_chans=dim),
            prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(img_size // patch, img_size // patch),
                                         input_image_size=(img_size, img_size), mask_in_chans=4),
            mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                     transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
                                     transformer_dim=dim, iou_head_depth=1, iou_head_hidden_dim=16),
        )
    finally:
        torch.random.set_rng_state(state)
    return sam.eval()


def sam_mask_generator(sam, config: MaskTeacherConfig) -> Callable[[np.ndarray], list]:
    """``SamAutomaticMaskGenerator(...).generate`` with the config's settings."""
    from segment_anything import SamAutomaticMaskGenerator

    gen = SamAutomaticMaskGenerator(
        sam, points_per_side=config.points_per_side, points_per_batch=config.points_per_batch,
        pred_iou_thresh=config.pred_iou_thresh, stability_score_thresh=config.stability_score_thresh,
        box_nms_thresh=config.box_nms_thresh, min_mask_region_area=config.min_mask_region_area,
    )
    return gen.generate


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(M, 4) int64 boxes ``x0, y0, x1, y1`` (exclusive ends) of (M, H, W) bool masks."""
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    h, w = masks.shape[1:]
    y0 = rows.argmax(1)
    y1 = h - rows[:, ::-1].argmax(1)
    x0 = cols.argmax(1)
    x1 = w - cols[:, ::-1].argmax(1)
    return np.stack([x0, y0, x1, y1], 1).astype(np.int64)


def smallest_mask_index(masks: np.ndarray) -> np.ndarray:
    """(H, W) int64 index of the smallest mask covering each pixel, -1 where none does."""
    if len(masks) == 0:
        return np.full(masks.shape[1:], -1, np.int64)
    area = masks.reshape(len(masks), -1).sum(1)
    big = np.iinfo(np.int64).max
    cost = np.where(masks, area[:, None, None], big)
    idx = cost.argmin(0)
    return np.where(masks.any(0), idx, -1).astype(np.int64)


class MaskClipTeacher:
    """SAM masks + CLIP crop labels + text alignment, as a :class:`Teacher`.

    Args:
        config: :class:`MaskTeacherConfig`.
        text_encoder: the shared text encoder that captions are encoded with (default: the text
            tower of the labelling CLIP model).
        clip_model: open_clip model for mask embeddings and labels (default: load
            ``config.clip_checkpoint``).
        mask_generator: ``rgb (H, W, 3) uint8 -> list of {"segmentation": (H, W) bool, ...}``
            (default: SAM automatic masks from ``config.sam_checkpoint``).
        captioner: optional ``(rgb, mask (H, W) bool, label str) -> caption``.
    """

    def __init__(self, config: Optional[MaskTeacherConfig] = None, text_encoder=None, clip_model=None,
                 mask_generator: Optional[Callable] = None, captioner: Optional[Callable] = None):
        import torch

        from sas_core.clip import image_mean_std, image_size, load_open_clip
        from sas_core.text import OpenClipTextEncoder

        self.config = config or MaskTeacherConfig()
        cfg = self.config
        self.clip = clip_model if clip_model is not None else load_open_clip(cfg.clip_model, cfg.clip_checkpoint,
                                                                             cfg.device)
        self.device = next(self.clip.parameters()).device
        self._clip_text = OpenClipTextEncoder(cfg.clip_model, cfg.clip_checkpoint, model=self.clip)
        self.text_encoder = text_encoder if text_encoder is not None else self._clip_text
        self.name = cfg.name
        self.dim = int(self.text_encoder.encode([cfg.caption_template.format(cfg.vocabulary[0])]).shape[1])
        if mask_generator is None:
            mask_generator = sam_mask_generator(load_sam(cfg.sam_model, cfg.sam_checkpoint, cfg.device), cfg)
        self.mask_generator = mask_generator
        self.captioner = captioner
        mean, std = image_mean_std(self.clip)
        self._mean = torch.tensor(mean).view(3, 1, 1)
        self._std = torch.tensor(std).view(3, 1, 1)
        self._mean_rgb = np.clip(np.round(np.array(mean) * 255.0), 0, 255).astype(np.uint8)
        self.crop_size = int(cfg.crop_size or image_size(self.clip)[0])
        self.set_vocabulary(cfg.vocabulary, cfg.templates)

    def set_vocabulary(self, names: Sequence[str], templates=None) -> None:
        """Label masks with ``names`` from now on (prompts from ``templates``)."""
        names = tuple(names)
        if not names:
            raise ValueError("the vocabulary must not be empty")
        self.vocabulary = names
        self._label_text = class_embeddings(self._clip_text, names, templates).to(self.device)

    # ---------------------------------------------------------------- crops
    def _square(self, crop: np.ndarray):
        """Pad an (h, w, 3) uint8 crop to a square with the CLIP mean, resize, normalise -> (3, S, S)."""
        import torch
        import torch.nn.functional as F

        h, w = crop.shape[:2]
        side = max(h, w)
        canvas = np.empty((side, side, 3), np.uint8)
        canvas[:] = self._mean_rgb
        y0, x0 = (side - h) // 2, (side - w) // 2
        canvas[y0:y0 + h, x0:x0 + w] = crop
        t = torch.from_numpy(canvas).permute(2, 0, 1)[None].float() / 255.0
        t = F.interpolate(t, size=(self.crop_size, self.crop_size), mode="bicubic", align_corners=False,
                          antialias=side > self.crop_size)[0].clamp_(0, 1)
        return (t - self._mean) / self._std

    def crops(self, rgb: np.ndarray, masks: np.ndarray):
        """CLIP inputs for each mask -> (M * n_levels, 3, S, S) tensor and n_levels."""
        import torch

        cfg = self.config
        boxes = mask_boxes(masks)
        h, w = rgb.shape[:2]
        out = []
        levels = 1 if cfg.crop_recipe == "masked" else cfg.levels
        for mask, (x0, y0, x1, y1) in zip(masks, boxes):  # loop over masks; pixels are vectorised
            if cfg.crop_recipe == "masked":
                crop = np.where(mask[y0:y1, x0:x1, None], rgb[y0:y1, x0:x1], self._mean_rgb)
                out.append(self._square(crop))
            else:
                bw, bh = x1 - x0, y1 - y0
                for level in range(levels):
                    ex, ey = int(bw * cfg.expansion) * level, int(bh * cfg.expansion) * level
                    xa, ya, xb, yb = max(0, x0 - ex), max(0, y0 - ey), min(w, x1 + ex), min(h, y1 + ey)
                    out.append(self._square(rgb[ya:yb, xa:xb]))
        return torch.stack(out), levels

    def embed_masks(self, rgb: np.ndarray, masks: np.ndarray):
        """(M, D) L2-normalised CLIP image embeddings of the masks (crop recipe of the config)."""
        import torch
        import torch.nn.functional as F

        if len(masks) == 0:
            return torch.zeros(0, self._label_text.shape[1])
        crops, levels = self.crops(rgb, masks)
        embs = []
        with torch.inference_mode():
            for start in range(0, len(crops), self.config.batch_size):
                batch = crops[start:start + self.config.batch_size].to(self.device)
                embs.append(F.normalize(self.clip.encode_image(batch).float(), dim=-1))
        emb = torch.cat(embs).reshape(len(masks), levels, -1).mean(1)
        return F.normalize(emb, dim=-1)

    # -------------------------------------------------------------- predict
    def masks(self, rgb: np.ndarray) -> np.ndarray:
        """(M, H, W) bool masks of the generator, empty and tiny ones removed."""
        h, w = rgb.shape[:2]
        records = self.mask_generator(rgb)
        masks = [np.asarray(r["segmentation"], bool) for r in records]
        masks = [m for m in masks if m.shape == (h, w) and m.sum() >= max(1, self.config.min_area)]
        return np.stack(masks) if masks else np.zeros((0, h, w), bool)

    def caption(self, rgb: np.ndarray, mask: np.ndarray, label: str) -> str:
        """Caption of a mask labelled ``label`` (captioner hook, else ``caption_template``)."""
        if self.captioner is not None:
            return str(self.captioner(rgb, mask, label))
        return self.config.caption_template.format(label)

    def predict(self, rgb: np.ndarray) -> MaskPrediction:
        """Masks, labels, captions and text-aligned features of an (H, W, 3) uint8 image."""
        import torch

        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
        masks = self.masks(rgb)
        if len(masks) == 0:
            return MaskPrediction(masks, np.zeros(0, np.int64), np.zeros(0, np.float32), [],
                                  torch.zeros(0, self.dim))
        emb = self.embed_masks(rgb, masks)
        sim = emb @ self._label_text.T.float().to(emb.device)
        scores, labels = sim.max(1)
        labels = labels.cpu().numpy().astype(np.int64)
        captions = [self.caption(rgb, m, self.vocabulary[l]) for m, l in zip(masks, labels)]
        features = self.text_encoder.encode(captions).float()
        return MaskPrediction(masks, labels, scores.cpu().numpy().astype(np.float32), captions, features)

    def features(self, frame: Frame):
        """(features (H, W, C) L2-normalised, valid (H, W) bool); smallest covering mask wins."""
        if frame.color is None:
            raise ValueError("the mask teacher needs frame.color")
        pred = self.predict(frame.color)
        return self.pixel_features(pred, frame.color.shape[:2])

    def pixel_features(self, pred: MaskPrediction, shape):
        """Paint mask features onto an (H, W) image (smallest covering mask wins)."""
        import torch

        h, w = shape
        dtype = getattr(torch, self.config.out_dtype)
        index = smallest_mask_index(pred.masks) if len(pred.masks) else np.full((h, w), -1, np.int64)
        valid = torch.from_numpy(index >= 0)
        out = torch.zeros(h, w, self.dim, dtype=dtype)
        if valid.any():
            out[valid] = pred.features[torch.from_numpy(index[index >= 0])].to(dtype)
        return out, valid
