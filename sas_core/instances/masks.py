"""2D masks back-projected onto superpoints, through the visibility rule of multi-view fusion.

A frame's masks come as one (H, W) int64 *mask-id image* (-1: no mask; masks do not overlap, the
smallest covering mask wins as in :func:`sas_core.teachers.mask_teacher.smallest_mask_index`).
Each 3D point is tested against the frame with :func:`sas_core.geometry.multiview.visible_points`
(the SAME rule as fusion: in front, ``border`` px from the edges, ``|d - z| <= depth_ratio * d``),
and reads the mask id of its pixel. Per frame this gives, per superpoint, how many of its points
are visible and how many of those fall into each mask. A superpoint is a *member* of a mask when
at least ``member_ratio`` of its visible points fall into that mask (MOSS: superpoint-level masks).

Mask sources:

* :func:`frame_instance_masks`: the frame's ground-truth instance image (an oracle, for tests);
* ``SimulatedTeacher.mask_ids`` (``kind="mask"``): the simulated mask teacher on the synthetic
  world (wobbly borders, gaps, missed objects);
* :class:`SamMaskSource`: segment-anything's automatic masks, when SAM weights are configured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple, Optional

import numpy as np

from sas_core.config import opt


class MaskView(NamedTuple):
    """One frame's masks: depth (H, W) metres (or None), pose (4, 4) camera-to-world, the camera,
    and the (Hm, Wm) int64 mask-id image (-1 = none; other sizes are sampled like fusion does)."""

    depth: object
    pose: object
    intrinsics: object
    mask_ids: np.ndarray


@dataclass
class BackProjectionConfig:
    """How masks land on superpoints (visibility: :class:`MultiViewFusionConfig`'s defaults)."""

    member_ratio: float = opt(0.5, "a superpoint joins a mask when this fraction of its visible points is inside")
    min_mask_points: int = opt(25, "masks covering fewer visible 3D points are dropped")
    depth_ratio: float = opt(0.25, "visible when |depth - z| <= depth_ratio * depth (fusion's rule)")
    border: int = opt(10, "pixels ignored along every image edge (fusion's rule)")


@dataclass
class BackProjection:
    """Masks of F frames over S superpoints of N points (M masks in all).

    Attributes:
        superpoints: (N,) int64 superpoint id per point (0..S-1).
        sp_size: (S,) int64 points per superpoint.
        visible: (S, F) scipy CSR int64: points of superpoint s visible in frame f.
        inside: (M, S) scipy CSR int64: visible points of superpoint s inside mask m.
        member: (M, S) scipy CSR bool: superpoint s is a member of mask m.
        member_visible: (M, S) scipy CSR int64: for member superpoints, their points visible in
            the mask's frame (what a mask covers, counted at superpoint level).
        frame: (M,) int64 frame index of each mask.
        n_frames: F.
    """

    superpoints: np.ndarray
    sp_size: np.ndarray
    visible: object
    inside: object
    member: object
    member_visible: object
    frame: np.ndarray
    n_frames: int

    @property
    def n_masks(self) -> int:
        return int(len(self.frame))

    def mask_points(self, m: int) -> np.ndarray:
        """(P,) int64 indices of the points of mask ``m``'s member superpoints."""
        sps = self.member[m].indices
        return np.flatnonzero(np.isin(self.superpoints, sps))


def backproject_masks(points, superpoints, views: Iterable, config: Optional[BackProjectionConfig] = None
                      ) -> BackProjection:
    """Back-project each frame's mask-id image onto superpoints (see the module docstring).

    Args:
        points: (N, 3) world coordinates.
        superpoints: (N,) int superpoint ids (any ints; made contiguous).
        views: iterable of :class:`MaskView` or ``(depth, pose, intrinsics, mask_ids)`` tuples.
        config: :class:`BackProjectionConfig`.

    Returns:
        :class:`BackProjection`.
    """
    import scipy.sparse as sp_

    from sas_core.geometry.multiview import MultiViewFusionConfig, visible_points

    cfg = config or BackProjectionConfig()
    pts = np.ascontiguousarray(np.asarray(points, np.float32).reshape(-1, 3))
    spid = np.unique(np.asarray(superpoints, np.int64).reshape(-1), return_inverse=True)[1].reshape(-1)
    if len(spid) != len(pts):
        raise ValueError(f"{len(spid)} superpoint ids for {len(pts)} points")
    n_sp = int(spid.max()) + 1 if len(spid) else 0
    fusion = MultiViewFusionConfig(depth_ratio=cfg.depth_ratio, border=cfg.border)
    vis_rows, vis_cols, vis_vals = [], [], []
    in_rows, in_cols, in_vals = [], [], []
    frame_of = []
    n_frames = 0
    for f, v in enumerate(views):
        v = MaskView(*v)
        ids = np.asarray(v.mask_ids)
        if ids.ndim != 2:
            raise ValueError(f"frame {f}: mask ids must be (H, W), got {ids.shape}")
        n_frames += 1
        idx, pix = visible_points(pts, v.depth, v.pose, v.intrinsics, fusion, feature_size=ids.shape)
        if len(idx) == 0:
            continue
        s = spid[idx]
        cnt = np.bincount(s, minlength=n_sp)
        nz = np.flatnonzero(cnt)
        vis_rows.append(nz)
        vis_cols.append(np.full(len(nz), f, np.int64))
        vis_vals.append(cnt[nz])
        mid = ids.reshape(-1)[pix].astype(np.int64)
        sel = mid >= 0
        if not sel.any():
            continue
        local, inv = np.unique(mid[sel], return_inverse=True)
        pair = inv.astype(np.int64) * n_sp + s[sel]
        up, upc = np.unique(pair, return_counts=True)
        m_loc, m_sp = up // n_sp, up % n_sp
        pts_per_mask = np.bincount(m_loc, weights=upc, minlength=len(local))
        keep_mask = pts_per_mask >= cfg.min_mask_points
        remap = np.full(len(local), -1, np.int64)
        remap[keep_mask] = np.arange(int(keep_mask.sum())) + len(frame_of)
        ok = keep_mask[m_loc]
        in_rows.append(remap[m_loc[ok]])
        in_cols.append(m_sp[ok])
        in_vals.append(upc[ok])
        frame_of += [f] * int(keep_mask.sum())
    cat = (lambda parts, dt=np.int64: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt))
    visible = sp_.csr_matrix((cat(vis_vals), (cat(vis_rows), cat(vis_cols))), shape=(n_sp, n_frames))
    m = len(frame_of)
    inside = sp_.csr_matrix((cat(in_vals), (cat(in_rows), cat(in_cols))), shape=(m, n_sp))
    frame = np.asarray(frame_of, np.int64)
    # membership: inside(m, s) >= member_ratio * visible(s, frame(m))
    coo = inside.tocoo()
    vis_at = np.asarray(visible[coo.col, frame[coo.row]]).reshape(-1)
    ok = coo.data >= cfg.member_ratio * np.maximum(vis_at, 1)
    member = sp_.csr_matrix((np.ones(int(ok.sum()), bool), (coo.row[ok], coo.col[ok])), shape=(m, n_sp))
    member_visible = sp_.csr_matrix((vis_at[ok].astype(np.int64), (coo.row[ok], coo.col[ok])), shape=(m, n_sp))
    return BackProjection(spid, np.bincount(spid, minlength=n_sp).astype(np.int64), visible, inside, member,
                          member_visible, frame, n_frames)


def frame_instance_masks(frame) -> np.ndarray:
    """The frame's ground-truth instance image as mask ids (-1 = none): an oracle mask source."""
    if frame.instance is None:
        raise ValueError("the frame has no instance image")
    return np.asarray(frame.instance, np.int64)


class SamMaskSource:
    """segment-anything automatic masks as mask-id images (smallest covering mask wins).

    Args:
        config: a :class:`sas_core.teachers.mask_teacher.MaskTeacherConfig` (SAM model type,
            checkpoint and generator settings); ``sam``: an already built SAM model (tests).
    """

    def __init__(self, config=None, sam=None):
        from sas_core.teachers.mask_teacher import MaskTeacherConfig, load_sam, sam_mask_generator

        self.config = config or MaskTeacherConfig()
        if sam is None:
            sam = load_sam(self.config.sam_model, self.config.sam_checkpoint, self.config.device)
        self.generate = sam_mask_generator(sam, self.config)

    def __call__(self, frame) -> np.ndarray:
        from sas_core.teachers.mask_teacher import smallest_mask_index

        if frame.color is None:
            raise ValueError("SAM masks need frame.color")
        h, w = frame.color.shape[:2]
        masks = [np.asarray(r["segmentation"], bool) for r in self.generate(frame.color)]
        masks = [m for m in masks if m.shape == (h, w) and m.sum() >= max(1, self.config.min_area)]
        if not masks:
            return np.full((h, w), -1, np.int64)
        return smallest_mask_index(np.stack(masks))
