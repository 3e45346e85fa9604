"""Pseudo-masks: coarse attention mask -> three point prompts -> SAM mask (SAS section 3.2).

Follows the paper's public code (MCC/sam_util/generate_mask.py, select_prompt_dis.py):

1. A border of 70 px (at 512 px; scaled with the image size) of the coarse mask is cleared, since
   attention maps often light up image corners; if fewer than 10 px remain, four 2x2 squares near
   the centre are set so that SAM still gets prompts.
2. Three prompt points from the distance transform (distance to the nearest background pixel):
   one component -> its deepest point, then the deepest point after clearing that one, and again;
   two components -> two such points in the largest, one in the second; three or more -> the
   deepest point of each of the three largest.
3. SAM (segment_anything ``SamPredictor``; the image is given as RGB) segments from the three
   positive points; one mask comes out (``multimask_output=False``; with ``multimask=True`` the
   best-scoring of three). (The public code reads the image with OpenCV and so hands SAM a BGR
   image; we give it RGB, as ``SamPredictor`` expects.)

Points are (x, y) pixel coordinates, as SAM expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sas_core.config import opt

SAM_HINT = (
    "download a Segment Anything checkpoint (e.g. sam_vit_h_4b8939.pth from "
    "https://dl.fbaipublicfiles.com/segment_anything/) and pass its path"
)


@dataclass
class PseudoMaskConfig:
    """Prompt selection and SAM settings (defaults: the paper's public code)."""

    border: int = opt(70, "pixels cleared at each image side, at reference_size (scaled for other sizes)")
    reference_size: int = opt(512, "image size the border refers to")
    min_pixels: int = opt(10, "fewer coarse-mask pixels than this -> centre seeds are used")
    sam_model: str = opt("vit_h", "segment_anything model type (vit_h | vit_l | vit_b)",
                         choices=("vit_h", "vit_l", "vit_b"))
    sam_checkpoint: str = opt("", "local SAM checkpoint file")
    multimask: bool = opt(False, "False: SAM's single mask; True: best-scoring of its three masks")
    device: str = opt("cpu", "torch device for SAM")


def clear_border(mask: np.ndarray, config: PseudoMaskConfig = PseudoMaskConfig()) -> np.ndarray:
    """Copy of ``mask`` with the scaled border cleared and centre seeds added if nearly empty."""
    m = np.asarray(mask, dtype=bool).copy()
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {m.shape}")
    H, W = m.shape
    by = int(round(config.border * H / config.reference_size))
    bx = int(round(config.border * W / config.reference_size))
    if by > 0:
        m[:by] = False
        m[H - by:] = False
    if bx > 0:
        m[:, :bx] = False
        m[:, W - bx:] = False
    if m.sum() < config.min_pixels:
        # the public code's seeds at 240/270 of 512, i.e. just around the centre; 2x2 px each
        sy = max(1, int(round(2 * H / config.reference_size)))
        sx = max(1, int(round(2 * W / config.reference_size)))
        for fy in (240, 270):
            for fx in (240, 270):
                y, x = int(fy * H / config.reference_size), int(fx * W / config.reference_size)
                m[y:y + sy, x:x + sx] = True
    return m


def _deepest(mask: np.ndarray) -> tuple:
    """(row, col) of the maximum of the Euclidean distance transform (first in raster order)."""
    from scipy import ndimage

    d = ndimage.distance_transform_edt(mask)
    i = int(np.argmax(d))
    return divmod(i, mask.shape[1])


def _deepest_k(mask: np.ndarray, k: int) -> list:
    m = mask.copy()
    pts = []
    for _ in range(k):
        r, c = _deepest(m)
        pts.append((r, c))
        m[r, c] = False  # as the public code: clear the point, recompute
    return pts


def prompt_points(mask: np.ndarray) -> np.ndarray:
    """Three prompt points (3, 2) float32 as (x, y) from a non-empty bool mask (see module doc)."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        raise ValueError("cannot pick prompt points in an empty mask")
    from scipy import ndimage

    labels, n = ndimage.label(m, structure=np.ones((3, 3), dtype=bool))  # 8-connectivity, like cv2
    if n == 1:
        pts = _deepest_k(m, 3)
    else:
        areas = np.bincount(labels.ravel())[1:]
        order = np.argsort(-areas, kind="stable") + 1
        if n == 2:
            pts = _deepest_k(labels == order[0], 2) + [_deepest(labels == order[1])]
        else:
            pts = [_deepest(labels == order[j]) for j in range(3)]
    return np.array([[c, r] for r, c in pts], dtype=np.float32)


def load_sam(config: PseudoMaskConfig):
    """SAM model from ``config.sam_checkpoint`` (:func:`sas_core.teachers.mask_teacher.load_sam`)."""
    from sas_core.teachers.mask_teacher import load_sam as _load_sam

    if not config.sam_checkpoint:
        raise FileNotFoundError(f"SAM checkpoint (not set) not found: {SAM_HINT}")
    return _load_sam(config.sam_model, config.sam_checkpoint, config.device)


class PseudoMasker:
    """``PseudoMasker(sam_model, config)(rgb (H,W,3) uint8, coarse (H,W) bool)`` ->
    (mask (H,W) bool, points (3,2) (x,y), score float)."""

    def __init__(self, sam=None, config: PseudoMaskConfig = PseudoMaskConfig()):
        from segment_anything import SamPredictor

        self.config = config
        self.sam = sam if sam is not None else load_sam(config)
        self.predictor = SamPredictor(self.sam)

    def __call__(self, rgb: np.ndarray, coarse: np.ndarray):
        import torch

        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
        if coarse.shape != rgb.shape[:2]:
            raise ValueError(f"coarse mask {coarse.shape} does not match image {rgb.shape[:2]}")
        pts = prompt_points(clear_border(coarse, self.config))
        with torch.no_grad():
            self.predictor.set_image(rgb, image_format="RGB")
            masks, scores, _ = self.predictor.predict(
                point_coords=pts, point_labels=np.ones(len(pts), dtype=np.int64),
                multimask_output=self.config.multimask,
            )
        best = int(np.argmax(scores))
        return masks[best].astype(bool), pts, float(scores[best])
