"""Mask-level distillation (MaskField, Gao et al. 2024; XMask3D, Wang et al. 2024): masks and their loss.

Per-point cosine distillation blurs object boundaries: near a boundary the fused 2D feature of a point
mixes both sides (views disagree, teacher features are blurred). Both papers align the 3D network with
the 2D-text space at the level of *masks* instead: each 2D mask (SAM's, or a mask teacher's) is
back-projected onto the 3D points it covers, the network's outputs are pooled over those points, and
the pooled feature is pulled to the mask's feature. The mask shapes come from the 2D segmenter, whose
boundaries are sharp, so the loss rewards 3D features that are constant inside a mask and change at
its border.

Masks of a scene (:class:`SceneMasks`): M masks, each a set of point indices (CSR ``offsets`` /
``indices``), the frame it comes from and optionally its own 2D feature (``features`` (M, C): the
mean of the teacher's pixel features inside the mask; for a mask teacher this is its caption's text
embedding, for SAM + CLIP the crop's CLIP embedding). A point belongs to a mask when it is visible in
the mask's frame with the multi-view fusion rule (:func:`sas_core.geometry.multiview.visible_points`:
in front, ``border`` px from the edges, ``|d - z| <= depth_ratio * d``) and its pixel is inside the
mask. Stored per scene next to the fused features: ``<feature_root>/<scene>.masks.npz`` (plain
NumPy arrays, loaded with ``allow_pickle=False``).

Loss (:func:`mask_loss`)::

    L_mask = mean_m 1 - cos(mean_{i in m} f3d_i, t_m)

with ``t_m`` the mean fused 2D target over the mask's points (``mask_target="fused"``: the
capability-fused feature, restricted to the mask's shape) or the mask's own feature
(``mask_target="teacher"``). It is added to stage 1 and stage 2 with ``--loss point,superpoint,mask``.

MaskField also trains mask membership with focal + Dice terms after Hungarian matching of predicted to
SAM masks; :func:`membership_loss` gives that option on our network (a mask's membership logit for a
point is the scaled cosine of the point's 3D feature with the pooled mask feature, matched to the
back-projected masks by :func:`scipy.optimize.linear_sum_assignment` on the Dice cost).
XMask3D's mask generator (a diffusion denoising UNet conditioned on 3D global features) is out of
scope: it needs a pretrained Stable Diffusion UNet fine-tuned jointly with the 3D network; our masks
come from the mask teacher / SAM the pipeline already has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from sas_core.config import opt

MASKS_SUFFIX = ".masks.npz"
MASK_TARGETS = ("fused", "teacher")


@dataclass
class MaskConfig:
    """How 2D masks become 3D point masks (visibility: the fusion rule's defaults)."""

    min_points: int = opt(10, "masks covering fewer visible 3D points are dropped")
    depth_ratio: float = opt(0.25, "visible when |depth - z| <= depth_ratio * depth (fusion's rule)")
    border: int = opt(10, "pixels ignored along every image edge (fusion's rule)")


@dataclass
class SceneMasks:
    """M 2D masks of one scene back-projected onto its N points.

    Attributes:
        offsets: (M + 1,) int64; mask m covers ``indices[offsets[m]:offsets[m + 1]]``.
        indices: (P,) int64 point indices (ascending within a mask).
        frame: (M,) int64 frame index of each mask.
        n_points: N, the scene's point count.
        features: optional (M, C) float16 feature of each mask (the teacher's, see the module docstring).
    """

    offsets: np.ndarray
    indices: np.ndarray
    frame: np.ndarray
    n_points: int
    features: Optional[np.ndarray] = None

    def __post_init__(self):
        self.offsets = np.asarray(self.offsets, np.int64).reshape(-1)
        self.indices = np.asarray(self.indices, np.int64).reshape(-1)
        self.frame = np.asarray(self.frame, np.int64).reshape(-1)
        self.n_points = int(self.n_points)
        m = len(self.offsets) - 1
        if m < 0 or self.offsets[0] != 0 or self.offsets[-1] != len(self.indices) or np.any(np.diff(self.offsets) < 0):
            raise ValueError("mask offsets must start at 0, be non-decreasing and end at the number of indices")
        if len(self.frame) != m:
            raise ValueError(f"{len(self.frame)} frame ids for {m} masks")
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= self.n_points):
            raise ValueError(f"mask point indices outside [0, {self.n_points})")
        if self.features is not None:
            self.features = np.asarray(self.features)
            if self.features.ndim != 2 or len(self.features) != m:
                raise ValueError(f"mask features {self.features.shape} for {m} masks")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def points(self, m: int) -> np.ndarray:
        return self.indices[self.offsets[m]:self.offsets[m + 1]]

    def mask_ids(self) -> np.ndarray:
        """(P,) int64 mask of every entry of ``indices``."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.sizes)

    # -- storage -----------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write an ``.npz`` of plain arrays (atomically)."""
        from sas_core.io import atomic_path

        arrays = dict(offsets=self.offsets, indices=self.indices, frame=self.frame,
                      n_points=np.asarray(self.n_points, np.int64))
        if self.features is not None:
            arrays["features"] = self.features.astype(np.float16)
        path = Path(path)
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez_compressed(tmp, **arrays)
        return path

    @classmethod
    def load(cls, path) -> "SceneMasks":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"mask file {path} not found")
        with np.load(path, allow_pickle=False) as z:
            missing = {"offsets", "indices", "frame", "n_points"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: not a scene mask file (missing {sorted(missing)})")
            return cls(z["offsets"], z["indices"], z["frame"], int(z["n_points"]),
                       z["features"] if "features" in z.files else None)


def mask_file(feature_root, scene: str) -> Path:
    """``<feature_root>/<scene>.masks.npz``: the masks stored next to a scene's fused features."""
    return Path(feature_root) / f"{scene}{MASKS_SUFFIX}"


def scene_masks_from_views(points, views: Iterable, config: Optional[MaskConfig] = None) -> SceneMasks:
    """Back-project every frame's mask-id image onto the points (see the module docstring).

    Args:
        points: (N, 3) world coordinates.
        views: iterable of ``(depth, pose, intrinsics, mask_ids)`` or ``(..., mask_ids, features)``:
            mask_ids (H, W) int64 (-1: none, masks do not overlap), optional features (H, W, C) of
            the same teacher (each mask's feature is their mean over its pixels).
    Returns:
        :class:`SceneMasks` (``features`` set when every view gave features).
    """
    import torch

    from sas_core.geometry.multiview import MultiViewFusionConfig, visible_points

    cfg = config or MaskConfig()
    pts = np.ascontiguousarray(np.asarray(points, np.float32).reshape(-1, 3))
    fusion = MultiViewFusionConfig(depth_ratio=cfg.depth_ratio, border=cfg.border)
    idx_parts, sizes, frames, feats = [], [], [], []
    with_features = True
    for f, view in enumerate(views):
        depth, pose, intr, ids = view[:4]
        fmap = view[4] if len(view) > 4 else None
        with_features = with_features and fmap is not None
        ids = np.asarray(ids, np.int64)
        if ids.ndim != 2:
            raise ValueError(f"frame {f}: mask ids must be (H, W), got {ids.shape}")
        idx, pix = visible_points(pts, depth, pose, intr, fusion, feature_size=ids.shape)
        if len(idx) == 0:
            continue
        mid = ids.reshape(-1)[pix]
        sel = mid >= 0
        if not sel.any():
            continue
        order = np.lexsort((idx[sel], mid[sel]))
        m_sorted, i_sorted = mid[sel][order], idx[sel][order]
        uniq, start, count = np.unique(m_sorted, return_index=True, return_counts=True)
        keep = count >= cfg.min_points
        if fmap is not None and keep.any():
            fm = torch.as_tensor(fmap).reshape(-1, torch.as_tensor(fmap).shape[-1]).float()
            flat = torch.from_numpy(ids.reshape(-1))
            for u in uniq[keep].tolist():  # mean pixel feature of each kept mask
                feats.append(fm[flat == u].mean(0).numpy())
        for u, s, c in zip(uniq[keep], start[keep], count[keep]):
            idx_parts.append(i_sorted[s:s + c])
            sizes.append(int(c))
            frames.append(f)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64) if sizes else np.zeros(1, np.int64)
    indices = np.concatenate(idx_parts).astype(np.int64) if idx_parts else np.zeros(0, np.int64)
    features = np.stack(feats).astype(np.float16) if (with_features and feats) else None
    return SceneMasks(offsets, indices, np.asarray(frames, np.int64), len(pts), features)


def has_masks(teacher) -> bool:
    """Whether :func:`teacher_mask_views` can read masks from ``teacher``."""
    if hasattr(teacher, "mask_ids"):
        return getattr(teacher, "kind", "mask") == "mask"  # a simulated dense teacher has no masks
    return hasattr(teacher, "predict") or (callable(teacher) and not hasattr(teacher, "features"))


def teacher_mask_views(frames: Iterable, teacher, with_features: bool = True):
    """``(depth, pose, intrinsics, mask_ids[, features])`` per frame from a mask source:

    * a teacher with ``mask_ids(frame)`` and ``features(frame)`` (the simulated mask teacher);
    * SAM + CLIP (:class:`sas_core.teachers.mask_teacher.MaskClipTeacher`, ``predict``): its masks
      (smallest covering mask wins) and its caption features;
    * a plain callable ``frame -> mask_ids`` (e.g. :class:`sas_core.instances.masks.SamMaskSource`;
      no features then).
    """
    if not has_masks(teacher):
        raise ValueError(f"{teacher!r} gives no masks (needs mask_ids(frame), predict(rgb) or frame -> mask ids)")
    for frame in frames:
        if hasattr(teacher, "mask_ids"):
            ids = teacher.mask_ids(frame)
            feats = teacher.features(frame)[0] if with_features and hasattr(teacher, "features") else None
        elif hasattr(teacher, "predict"):
            from sas_core.teachers.mask_teacher import smallest_mask_index

            if frame.color is None:
                raise ValueError("the mask teacher needs frame.color")
            pred = teacher.predict(frame.color)
            shape = frame.color.shape[:2]
            ids = smallest_mask_index(pred.masks) if len(pred.masks) else np.full(shape, -1, np.int64)
            feats = teacher.pixel_features(pred, shape)[0] if with_features else None
        else:
            ids, feats = teacher(frame), None
        if feats is None:
            yield frame.depth, frame.pose, frame.intrinsics, ids
        else:
            yield frame.depth, frame.pose, frame.intrinsics, ids, feats


def fused_mask_targets(masks: SceneMasks, features: np.ndarray, feature_mask: np.ndarray):
    """(M, C) float32 mean fused 2D feature over each mask's points that have one, and (M,) bool
    valid (at least one such point). ``features`` (F, C) compact rows of the points where
    ``feature_mask`` (N,) is True (the :class:`~sas_core.train.datasets.SceneData` convention)."""
    rows = np.full(masks.n_points, -1, np.int64)
    rows[np.asarray(feature_mask, bool)] = np.arange(int(np.asarray(feature_mask, bool).sum()))
    r = rows[masks.indices]
    ok = r >= 0
    mid = masks.mask_ids()[ok]
    c = features.shape[1]
    sums = np.zeros((len(masks), c), np.float64)
    np.add.at(sums, mid, np.asarray(features, np.float32)[r[ok]])
    counts = np.bincount(mid, minlength=len(masks)).astype(np.float64)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32), counts > 0


def mask_loss(f3d, mask_ids, rows, targets, reduction: str = "mean"):
    """Mask-level distillation ``mean_m 1 - cos(mean_{i in m} f3d_i, t_m)``.

    Args:
        f3d: (V, C) network outputs (voxels).
        mask_ids: (P,) int64 mask of each (mask, point) entry, in 0..M-1.
        rows: (P,) int64 row of ``f3d`` of each entry (the voxel of the point).
        targets: (M, C) target feature of each mask.
    Returns the mean over masks, or (sum, M) with ``reduction="sum"``.
    """
    from sas_core.train.losses import _reduce, cosine_distance, segment_mean

    m = int(targets.shape[0])
    if mask_ids.shape != rows.shape:
        raise ValueError(f"{mask_ids.shape[0]} mask ids for {rows.shape[0]} rows")
    pooled, counts = segment_mean(f3d[rows], mask_ids, m)
    keep = counts > 0
    return _reduce(cosine_distance(pooled[keep], targets[keep].to(f3d.dtype)), reduction)


def dice_cost(pred, target) -> "np.ndarray":
    """(A, B) 1 - Dice between soft predictions (A, P) in [0, 1] and binary targets (B, P)."""
    num = 2.0 * pred @ target.t()
    den = pred.sum(1, keepdim=True) + target.sum(1)[None]
    return 1.0 - (num + 1.0) / (den + 1.0)


def membership_loss(f3d, mask_ids, rows, n_masks: int, temperature: float = 0.1, gamma: float = 2.0,
                    alpha: float = 0.25, reduction: str = "mean"):
    """MaskField's focal + Dice terms on mask membership, with Hungarian matching (optional term).

    Each mask's query is the pooled 3D feature of its points; a point's membership logit for query q is
    ``cos(f3d_i, q) / temperature`` over the voxels that any mask covers. Queries are matched one-to-one
    to the back-projected masks by :func:`scipy.optimize.linear_sum_assignment` on the Dice cost (the
    pooled query of a mask usually matches that mask; matching lets a query explain a better-fitting
    mask of the same object from another view). Returns (focal, dice), each a mean over matched pairs,
    or (sum, count) pairs with ``reduction="sum"``.
    """
    import torch
    import torch.nn.functional as F
    from scipy.optimize import linear_sum_assignment

    from sas_core.train.losses import _reduce, segment_mean

    if n_masks == 0:
        z = f3d.sum() * 0.0
        return ((z, 0), (z, 0)) if reduction == "sum" else (z, z)
    used, local = torch.unique(rows, return_inverse=True)
    queries, _ = segment_mean(f3d[rows], mask_ids, n_masks)
    logits = F.normalize(f3d[used], dim=1) @ F.normalize(queries, dim=1).t() / temperature  # (U, M)
    target = torch.zeros(n_masks, len(used), dtype=f3d.dtype, device=f3d.device)
    target[mask_ids, local] = 1.0
    prob = logits.sigmoid().t()  # (M, U)
    with torch.no_grad():
        cost = dice_cost(prob.detach().float(), target.float()).cpu().numpy()
    qi, ti = linear_sum_assignment(cost)
    qi, ti = torch.as_tensor(qi, device=f3d.device), torch.as_tensor(ti, device=f3d.device)
    lg, tg, pr = logits.t()[qi], target[ti], prob[qi]
    ce = F.binary_cross_entropy_with_logits(lg, tg, reduction="none")
    p_t = pr * tg + (1 - pr) * (1 - tg)
    focal = (ce * (1 - p_t) ** gamma * (alpha * tg + (1 - alpha) * (1 - tg))).mean(1)
    dice = 1.0 - (2 * (pr * tg).sum(1) + 1.0) / (pr.sum(1) + tg.sum(1) + 1.0)
    return _reduce(focal, reduction), _reduce(dice, reduction)
