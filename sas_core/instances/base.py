"""The :class:`Instance` container, its boxes, and instance semantics (labels from mean features).

Instance semantics (SAS section 4.4, MOSS): an instance's feature is the mean of the distilled (or
fused) features of its points, L2-normalised; its label is the argmax of the cosine against the
class text embeddings (:func:`sas_core.text.text_labels`, the one argmax of the library), its
score that cosine. Any text can be scored the same way (:func:`score_instances`).

Boxes. Axis-aligned: min / max of the points. Oriented (gravity-aligned): PCA of the points' xy
coordinates gives the yaw of the major axis; the extents along the two principal axes and along z
give the box (a rotated box about +z, as indoor detection benchmarks use; not a full 3D OBB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np


@dataclass
class Instance:
    """One 3D object instance.

    Attributes:
        id: instance id (0..I-1 in the list it came in).
        indices: (P,) int64 indices of its points (or voxels) in the cloud it was found in.
        label: class index into the vocabulary (-1: not labelled).
        name: class name ("" when not labelled).
        score: cosine of the mean feature with the label's text (NaN without features).
        confidence: in [0, 1], how consistently the evidence supports the instance (mask
            clustering: the mean fraction of its points' views in which a mask of the instance
            covered them; region growing / query grouping: the mean feature cosine to the text or
            to the instance's mean).
        centroid: (3,) float32 mean of the points.
        aabb_min, aabb_max: (3,) float32 axis-aligned box corners.
        obb_center: (3,) float32 centre of the gravity-aligned oriented box.
        obb_size: (3,) float32 its extents along its major xy axis, minor xy axis and z.
        obb_yaw: rotation of the major axis about +z (radians, in (-pi/2, pi/2]).
        n_masks: number of 2D masks merged into it (0 when not from masks).
    """

    id: int
    indices: np.ndarray
    label: int = -1
    name: str = ""
    score: float = float("nan")
    confidence: float = 1.0
    centroid: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))
    aabb_min: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))
    aabb_max: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))
    obb_center: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))
    obb_size: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))
    obb_yaw: float = 0.0
    n_masks: int = 0

    @property
    def n_points(self) -> int:
        return int(len(self.indices))

    @property
    def size(self) -> np.ndarray:
        """(3,) float32 axis-aligned extent (aabb_max - aabb_min)."""
        return (self.aabb_max - self.aabb_min).astype(np.float32)

    def obb_corners(self) -> np.ndarray:
        """(8, 3) float64 corners of the oriented box (bottom four counter-clockwise, then the top)."""
        c, s = math.cos(self.obb_yaw), math.sin(self.obb_yaw)
        hx, hy, hz = (np.asarray(self.obb_size, np.float64) / 2).tolist()
        local = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]])
        xy = local @ np.array([[c, s], [-s, c]]) + np.asarray(self.obb_center[:2], np.float64)
        z0, z1 = float(self.obb_center[2]) - hz, float(self.obb_center[2]) + hz
        return np.concatenate([np.c_[xy, np.full(4, z0)], np.c_[xy, np.full(4, z1)]])

    def to_json(self, with_indices: bool = False) -> dict:
        """A JSON-serialisable dict (NaN score -> None); ``with_indices`` adds the point indices."""
        out = {
            "id": int(self.id), "label": int(self.label), "name": self.name,
            "score": None if not np.isfinite(self.score) else round(float(self.score), 6),
            "confidence": round(float(self.confidence), 6), "points": self.n_points,
            "centroid": [round(float(v), 4) for v in self.centroid],
            "aabb_min": [round(float(v), 4) for v in self.aabb_min],
            "aabb_max": [round(float(v), 4) for v in self.aabb_max],
            "size": [round(float(v), 4) for v in self.size],
            "obb": {"center": [round(float(v), 4) for v in self.obb_center],
                    "size": [round(float(v), 4) for v in self.obb_size], "yaw": round(float(self.obb_yaw), 6)},
            "n_masks": int(self.n_masks),
        }
        if with_indices:
            out["indices"] = [int(i) for i in self.indices]
        return out


def group_boxes(positions, groups: Sequence[np.ndarray]) -> dict:
    """Centroid, axis-aligned and gravity-aligned oriented boxes of many point groups at once.

    The yaw of each group is that of the major principal axis of its xy covariance (closed form
    for 2x2: ``0.5 * atan2(2 c_xy, c_xx - c_yy)``, in (-pi/2, pi/2]); the oriented box spans the
    points' extents along that axis, the perpendicular one and z. Vectorised over groups (reduceat).

    Returns:
        dict of (G, 3) float32 ``centroid``, ``aabb_min``, ``aabb_max``, ``obb_center``, ``obb_size``
        and (G,) float64 ``obb_yaw``. Every group must be non-empty.
    """
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    sizes = np.array([len(g) for g in groups], np.int64)
    if len(groups) == 0:
        z = np.zeros((0, 3), np.float32)
        return {"centroid": z, "aabb_min": z, "aabb_max": z, "obb_center": z, "obb_size": z, "obb_yaw": np.zeros(0)}
    if np.any(sizes == 0):
        raise ValueError("group_boxes: empty group")
    p = pos[np.concatenate([np.asarray(g, np.int64) for g in groups])]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    owner = np.repeat(np.arange(len(groups)), sizes)
    mean = np.add.reduceat(p, starts, axis=0) / sizes[:, None]
    lo, hi = np.minimum.reduceat(p, starts, axis=0), np.maximum.reduceat(p, starts, axis=0)
    d = p[:, :2] - mean[owner, :2]
    cxx = np.add.reduceat(d[:, 0] * d[:, 0], starts)
    cyy = np.add.reduceat(d[:, 1] * d[:, 1], starts)
    cxy = np.add.reduceat(d[:, 0] * d[:, 1], starts)
    yaw = 0.5 * np.arctan2(2.0 * cxy, cxx - cyy)
    yaw = np.where(yaw <= -np.pi / 2, yaw + np.pi, yaw)
    c, s_ = np.cos(yaw), np.sin(yaw)
    u = d[:, 0] * c[owner] + d[:, 1] * s_[owner]
    w = -d[:, 0] * s_[owner] + d[:, 1] * c[owner]
    ulo, uhi = np.minimum.reduceat(u, starts), np.maximum.reduceat(u, starts)
    wlo, whi = np.minimum.reduceat(w, starts), np.maximum.reduceat(w, starts)
    um, wm = (ulo + uhi) / 2, (wlo + whi) / 2
    center = np.stack([mean[:, 0] + um * c - wm * s_, mean[:, 1] + um * s_ + wm * c, (lo[:, 2] + hi[:, 2]) / 2], 1)
    size = np.stack([uhi - ulo, whi - wlo, hi[:, 2] - lo[:, 2]], 1)
    f32 = (lambda a: a.astype(np.float32))
    return {"centroid": f32(mean), "aabb_min": f32(lo), "aabb_max": f32(hi), "obb_center": f32(center),
            "obb_size": f32(size), "obb_yaw": yaw}


def oriented_box(points) -> tuple:
    """Gravity-aligned oriented box of (P, 3) points: (center (3,), size (3,), yaw) (:func:`group_boxes`)."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(p) == 0:
        raise ValueError("oriented_box of no points")
    b = group_boxes(p, [np.arange(len(p))])
    return b["obb_center"][0], b["obb_size"][0], float(b["obb_yaw"][0])


def mean_features(features, groups: Sequence[np.ndarray]) -> "np.ndarray":
    """(I, C) float32 L2-normalised mean feature of each group of rows of ``features`` (torch/NumPy)."""
    import torch

    f = torch.as_tensor(features)
    out = np.zeros((len(groups), int(f.shape[1])), np.float32)
    for i, idx in enumerate(groups):
        if len(idx):
            m = f[torch.as_tensor(np.asarray(idx, np.int64))].float()
            m = torch.nn.functional.normalize(m, dim=1).mean(0)
            out[i] = torch.nn.functional.normalize(m, dim=0).cpu().numpy()
    return out


def score_instances(instances: Sequence[Instance], features, text) -> np.ndarray:
    """(I, T) cosine of each instance's mean feature with each row of ``text`` (T, C)."""
    import torch

    if not len(instances):
        return np.zeros((0, len(text)), np.float32)
    mean = mean_features(features, [inst.indices for inst in instances])
    t = torch.nn.functional.normalize(torch.as_tensor(np.asarray(text, np.float32)).reshape(-1, mean.shape[1]), dim=1)
    return (torch.from_numpy(mean) @ t.T).numpy()


def describe_instances(positions, groups: Sequence[np.ndarray], features=None, text=None,
                       class_names: Optional[Sequence[str]] = None, confidence=None, n_masks=None,
                       min_points: int = 1) -> List[Instance]:
    """Build :class:`Instance` records from groups of point indices.

    Args:
        positions: (N, 3) point / voxel positions.
        groups: index arrays, one per instance (groups with fewer than ``min_points`` are dropped).
        features: optional (N, C) features (torch or NumPy); with ``text`` each instance is labelled.
        text: optional (K, C) class text embeddings; ``class_names`` their K names.
        confidence: optional (len(groups),) confidence per group; ``n_masks`` masks per group.

    Returns:
        instances with ids 0..I-1 in the order of ``groups``.
    """
    from sas_core.text import text_labels

    pos = np.asarray(positions, dtype=np.float32).reshape(-1, 3)
    keep = [i for i, g in enumerate(groups) if len(g) >= max(1, min_points)]
    labels = scores = None
    if features is not None and text is not None and keep:
        mean = mean_features(features, [groups[i] for i in keep])
        lab, sc = text_labels(mean, np.asarray(text, np.float32), normalize=True)
        labels, scores = lab.numpy(), sc.numpy()
    box = group_boxes(pos, [groups[i] for i in keep])
    out = []
    for j, i in enumerate(keep):
        label = int(labels[j]) if labels is not None else -1
        out.append(Instance(
            id=len(out), indices=np.asarray(groups[i], np.int64), label=label,
            name=(class_names[label] if class_names is not None and label >= 0 else ""),
            score=float(scores[j]) if scores is not None else float("nan"),
            confidence=float(confidence[i]) if confidence is not None else 1.0,
            centroid=box["centroid"][j], aabb_min=box["aabb_min"][j], aabb_max=box["aabb_max"][j],
            obb_center=box["obb_center"][j], obb_size=box["obb_size"][j], obb_yaw=float(box["obb_yaw"][j]),
            n_masks=int(n_masks[i]) if n_masks is not None else 0))
    return out


def instance_ids(n_points: int, instances: Sequence[Instance]) -> np.ndarray:
    """(N,) int64 instance id per point (-1: none); later instances win where they overlap."""
    ids = np.full(int(n_points), -1, np.int64)
    for inst in instances:
        ids[inst.indices] = inst.id
    return ids
