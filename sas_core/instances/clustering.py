"""Instance proposals without 3D-trained weights: view-consensus mask clustering over superpoints.

The recipe is MaskClustering (Yan et al., "MaskClustering: View Consensus based Mask Graph
Clustering for Open-Vocabulary 3D Instance Segmentation", CVPR 2024), run on superpoints as MOSS
does (superpoint-level masks from back-projected 2D masks, :mod:`sas_core.instances.masks`):

1. **Nodes** are the back-projected 2D masks (a set of member superpoints each).
2. **Visibility.** A node is *visible* in frame f when at least ``visible_ratio`` (30 %) of its
   points are visible in f (the fusion visibility rule).
3. **Containment.** A frame mask c *contains* a node visible in c's frame when at least
   ``contain_ratio`` (80 %) of the node's points visible there belong to c's member superpoints
   (counted at superpoint level, as MOSS's superpoint masks: robust to ragged mask borders).
4. **View consensus.** For two nodes, *observers* = frames where both are visible, *supporters* =
   frame masks that contain both. An edge joins them when supporters / observers >=
   ``support_ratio`` (0.9) and observers >= the current observer threshold. One deviation: a
   frame whose masks cover less than ``detected_ratio`` (50 %) of a node's visible points (the 2D
   segmenter missed it there) is no observer of it, so missed detections neither support nor
   veto a merge (``detected_ratio=0`` restores the recipe).
5. **Iterative clustering.** Observer thresholds fall from the 95th percentile of the positive
   pairwise observer counts down to the 0th in steps of 5 (never below 1): at each threshold the
   graph's connected components become the new nodes (member sets united, visibility and
   containment recomputed), so pairs seen together in many frames are decided first.
6. **Post-processing.** A superpoint stays in an object when a mask of the object covered it in
   at least ``point_ratio`` (50 %) of the frames that see it (30 % of its points visible);
   objects overlapping by more than ``merge_overlap`` (80 % of the smaller) are merged; each
   superpoint goes to the object that detects it most consistently; disconnected parts (on the
   superpoints' kNN adjacency) become separate objects; objects under ``min_points`` are dropped.

Everything is sparse-matrix products (SciPy) and connected components
(``scipy.sparse.csgraph.connected_components``); no per-pair Python.

Geometry-only fallback (:func:`region_growing`, for LiDAR-only maps or frames without masks):
adjacent superpoints whose mean distilled features have cosine >= ``feature_cosine`` are joined.
Baseline (:func:`label_components`): connected components of same-label points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from sas_core.config import opt


@dataclass
class InstanceConfig:
    """Mask clustering (MaskClustering's thresholds), post-processing and the fallback."""

    visible_ratio: float = opt(0.3, "a mask is visible in a frame when this fraction of its points is seen")
    contain_ratio: float = opt(0.8, "a frame mask contains a mask when this fraction of its visible points is inside")
    support_ratio: float = opt(0.9, "edge when supporters / observers >= this")
    detected_ratio: float = opt(0.5, "a frame observes a mask only where its masks cover this fraction of the "
                                     "mask's visible points (0: every frame that sees it, as MaskClustering)")
    percentile_step: int = opt(5, "observer thresholds: percentiles 95, 95-step, ..., 0 of the observer counts")
    point_ratio: float = opt(0.5, "drop superpoints covered by the object's masks in fewer of their views")
    merge_overlap: float = opt(0.8, "merge objects sharing more than this fraction of the smaller one")
    min_points: int = opt(100, "smallest instance kept (points; ScanNet's min_region_size)")
    knn: int = opt(8, "neighbours per point of the adjacency graph (splitting disconnected parts)")
    max_edge: Optional[float] = opt(None, "longest adjacency edge (m); None: 4 x the median spacing")
    feature_cosine: float = opt(0.9, "fallback region growing: join adjacent superpoints above this cosine")
    fill_unclaimed: bool = opt(True, "with masks and features: group what no mask instance claims by region growing")

    def __post_init__(self):
        for name in ("visible_ratio", "contain_ratio", "support_ratio", "point_ratio", "merge_overlap",
                     "detected_ratio"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if not 1 <= self.percentile_step <= 100:
            raise ValueError(f"percentile_step must be in [1, 100], got {self.percentile_step}")
        if self.min_points < 1 or self.knn < 1:
            raise ValueError("min_points and knn must be >= 1")
        if not -1.0 <= self.feature_cosine <= 1.0:
            raise ValueError(f"feature_cosine must be in [-1, 1], got {self.feature_cosine}")


def superpoint_adjacency(points, superpoints, knn: int = 8, max_edge: Optional[float] = None):
    """Pairs of adjacent superpoints: (E, 2) int64 unique (a < b), from the points' kNN graph."""
    from sas_core.geometry.superpoints import knn_edges

    sp = np.asarray(superpoints, np.int64)
    a, b = knn_edges(np.asarray(points, np.float64), knn, max_edge)
    sa, sb = sp[a], sp[b]
    keep = sa != sb
    pairs = np.stack([np.minimum(sa[keep], sb[keep]), np.maximum(sa[keep], sb[keep])], 1)
    return np.unique(pairs, axis=0) if len(pairs) else np.zeros((0, 2), np.int64)


def _components(n: int, a, b) -> np.ndarray:
    """(n,) component label of each node of the undirected graph with edges a-b."""
    import scipy.sparse as sp_
    from scipy.sparse.csgraph import connected_components

    g = sp_.csr_matrix((np.ones(len(a), np.int8), (np.asarray(a, np.int64), np.asarray(b, np.int64))), shape=(n, n))
    return connected_components(g, directed=False)[1].astype(np.int64)


def _node_stats(node_sp, bp, cfg: InstanceConfig):
    """(visible_frame (K, F) bool, contained (K, M) bool) of nodes given as (K, S) 0/1 CSR."""
    total = node_sp @ bp.sp_size.astype(np.float64)                        # (K,)
    vis_pts = (node_sp @ bp.visible).toarray()                              # (K, F)
    vf = vis_pts >= cfg.visible_ratio * np.maximum(total, 1)[:, None]
    vf &= vis_pts > 0
    inter = (node_sp @ bp.member_visible.T).toarray()                       # (K, M) covered visible points
    denom = vis_pts[:, bp.frame]
    contained = vf[:, bp.frame] & (inter >= cfg.contain_ratio * np.maximum(denom, 1e-9))
    if cfg.detected_ratio > 0:  # frames whose masks missed the node observe nothing
        covered = np.zeros_like(vis_pts)
        np.add.at(covered.T, bp.frame, inter.T)
        vf &= covered >= cfg.detected_ratio * vis_pts
    return vf, contained


def _observer_thresholds(vf: np.ndarray, step: int) -> List[float]:
    obs = vf.astype(np.float32) @ vf.T.astype(np.float32)
    np.fill_diagonal(obs, 0)
    pos = obs[obs > 0]
    if pos.size == 0:
        return [1.0]
    out = []
    for q in range(95, -1, -step):
        t = max(1.0, float(np.percentile(pos, q)))
        if not out or t < out[-1]:
            out.append(t)
    if out[-1] > 1.0:
        out.append(1.0)
    return out


def cluster_masks(bp, points, config: Optional[InstanceConfig] = None, adjacency=None):
    """MaskClustering over back-projected masks (see the module docstring).

    Args:
        bp: :class:`sas_core.instances.masks.BackProjection`.
        points: (N, 3) positions (for the adjacency that splits disconnected parts).
        config: :class:`InstanceConfig`.
        adjacency: optional precomputed :func:`superpoint_adjacency` pairs.

    Returns:
        (groups, confidence, n_masks): a list of (P_i,) int64 point-index arrays (disjoint), their
        (I,) float confidence (mean fraction of views in which the object's masks covered its
        points) and (I,) int masks merged into each.
    """
    import scipy.sparse as sp_

    cfg = config or InstanceConfig()
    S, M = len(bp.sp_size), bp.n_masks
    if M == 0 or S == 0:
        return [], np.zeros(0), np.zeros(0, np.int64)
    member = bp.member.astype(np.float64).tocsr()
    assign = np.arange(M)                                                   # mask -> node
    vf, _ = _node_stats(member, bp, cfg)
    for thr in _observer_thresholds(vf, cfg.percentile_step):
        K = int(assign.max()) + 1
        A = sp_.csr_matrix((np.ones(M), (assign, np.arange(M))), shape=(K, M))
        node_sp = (A @ member).tocsr()
        node_sp.data[:] = 1.0
        vf, contained = _node_stats(node_sp, bp, cfg)
        vff = vf.astype(np.float32)
        observers = vff @ vff.T
        cf = contained.astype(np.float32)
        supporters = cf @ cf.T
        ok = (observers >= thr) & (supporters >= cfg.support_ratio * observers) & (observers > 0)
        np.fill_diagonal(ok, False)
        a, b = np.nonzero(np.triu(ok))
        if len(a) == 0:
            continue
        comp = _components(K, a, b)
        assign = comp[assign]
    assign = np.unique(assign, return_inverse=True)[1].reshape(-1)
    K = int(assign.max()) + 1
    A = sp_.csr_matrix((np.ones(M), (assign, np.arange(M))), shape=(K, M))
    n_masks = np.bincount(assign, minlength=K)
    node_sp = (A @ member).tocsr()                                          # (K, S) masks covering s
    vis = bp.visible.tocoo()
    ok = vis.data >= cfg.visible_ratio * bp.sp_size[vis.row]
    seen = np.bincount(vis.row[ok], minlength=S).astype(np.float64)          # (S,) views of each superpoint
    det = node_sp.toarray()                                                  # (K, S) covering masks
    ratio = np.where(det > 0, np.minimum(det / np.maximum(seen, 1.0)[None, :], 1.0), 0.0)
    keep = ratio >= cfg.point_ratio
    # merge objects overlapping by more than merge_overlap of the smaller one
    w = keep.astype(np.float64) * bp.sp_size[None, :]
    size = w.sum(1)
    inter = w @ keep.T.astype(np.float64)
    small = np.minimum(size[:, None], size[None, :])
    ov = (inter > cfg.merge_overlap * np.maximum(small, 1e-9)) & (small > 0)
    np.fill_diagonal(ov, False)
    a, b = np.nonzero(np.triu(ov))
    if len(a):
        comp = _components(K, a, b)
        K2 = int(comp.max()) + 1
        merged_keep = np.zeros((K2, S), bool)
        merged_ratio = np.zeros((K2, S))
        np.logical_or.at(merged_keep, comp, keep)
        np.maximum.at(merged_ratio, comp, np.where(keep, ratio, 0.0))
        n_masks = np.bincount(comp, weights=n_masks, minlength=K2).astype(np.int64)
        keep, ratio, K = merged_keep, merged_ratio, K2
    # exclusive assignment: each superpoint to the object detecting it most consistently
    score = np.where(keep, ratio, -1.0)
    owner = np.argmax(score, axis=0)
    owner[score[owner, np.arange(S)] < 0] = -1
    # split disconnected parts over the superpoint adjacency
    adj = superpoint_adjacency(points, bp.superpoints, cfg.knn, cfg.max_edge) if adjacency is None else adjacency
    same = (owner[adj[:, 0]] == owner[adj[:, 1]]) & (owner[adj[:, 0]] >= 0) if len(adj) else np.zeros(0, bool)
    part = _components(S, adj[same, 0], adj[same, 1]) if len(adj) else np.arange(S)
    groups, conf, nm = [], [], []
    order = np.argsort(bp.superpoints, kind="stable")
    bounds = np.searchsorted(bp.superpoints[order], np.arange(S + 1))
    part_ids = np.unique(part[owner >= 0])
    for p in part_ids.tolist():
        sps = np.flatnonzero((part == p) & (owner >= 0))
        n_pts = int(bp.sp_size[sps].sum())
        if n_pts < cfg.min_points:
            continue
        k = int(owner[sps[0]])
        idx = np.concatenate([order[bounds[s]:bounds[s + 1]] for s in sps.tolist()])
        groups.append(np.sort(idx))
        conf.append(float(np.average(ratio[k, sps], weights=bp.sp_size[sps])))
        nm.append(int(n_masks[k]))
    return groups, np.asarray(conf, np.float64), np.asarray(nm, np.int64)


def region_growing(points, superpoints, features, config: Optional[InstanceConfig] = None, adjacency=None,
                   exclude=None):
    """Geometry + feature fallback: join adjacent superpoints whose mean features agree.

    Args:
        points: (N, 3); superpoints: (N,) ids; features: (N, C) distilled features (torch/NumPy).
        config: uses ``feature_cosine``, ``min_points``, ``knn``, ``max_edge``.
        exclude: optional (N,) bool, points that take no part (e.g. already in a mask instance);
            a superpoint takes part when most of its points are not excluded.

    Returns:
        (groups, confidence): point-index arrays and the mean cosine of each group's superpoints
        to the group's mean feature.
    """
    from sas_core.instances.base import mean_features

    cfg = config or InstanceConfig()
    sp = np.unique(np.asarray(superpoints, np.int64), return_inverse=True)[1].reshape(-1)
    S = int(sp.max()) + 1 if len(sp) else 0
    if S == 0:
        return [], np.zeros(0)
    order = np.argsort(sp, kind="stable")
    bounds = np.searchsorted(sp[order], np.arange(S + 1))
    members = [order[bounds[s]:bounds[s + 1]] for s in range(S)]
    f = mean_features(features, members)                                    # (S, C) unit
    adj = superpoint_adjacency(points, sp, cfg.knn, cfg.max_edge) if adjacency is None else adjacency
    size = np.bincount(sp, minlength=S)
    active = np.ones(S, bool)
    if exclude is not None:
        ex = np.asarray(exclude, bool).reshape(-1)
        if ex.shape != sp.shape:
            raise ValueError(f"exclude has {len(ex)} entries for {len(sp)} points")
        active = np.bincount(sp, weights=ex.astype(np.float64), minlength=S) < 0.5 * size
    if len(adj):
        cos = np.einsum("ij,ij->i", f[adj[:, 0]], f[adj[:, 1]])
        ok = (cos >= cfg.feature_cosine) & active[adj[:, 0]] & active[adj[:, 1]]
        comp = _components(S, adj[ok, 0], adj[ok, 1])
    else:
        comp = np.arange(S)
    groups, conf = [], []
    for c in np.unique(comp[active]).tolist():
        sps = np.flatnonzero((comp == c) & active)
        if size[sps].sum() < cfg.min_points:
            continue
        g = np.sort(np.concatenate([members[s] for s in sps.tolist()]))
        m = f[sps].T @ size[sps].astype(np.float32)
        m /= max(float(np.linalg.norm(m)), 1e-12)
        groups.append(g)
        conf.append(float(np.average(f[sps] @ m, weights=size[sps])))
    return groups, np.asarray(conf, np.float64)


def label_components(points, labels, knn: int = 8, max_edge: Optional[float] = None, min_points: int = 100,
                     ignore: int = 255):
    """Baseline instances: connected components of same-label points on the points' kNN graph.

    Returns:
        (groups, labels): point-index arrays and the label of each group.
    """
    from sas_core.geometry.superpoints import knn_edges

    lab = np.asarray(labels, np.int64)
    a, b = knn_edges(np.asarray(points, np.float64), knn, max_edge)
    ok = (lab[a] == lab[b]) & (lab[a] != ignore)
    comp = _components(len(lab), a[ok], b[ok])
    order = np.argsort(comp, kind="stable")
    bounds = np.searchsorted(comp[order], np.arange(int(comp.max()) + 2)) if len(comp) else np.zeros(1, int)
    groups, glabels = [], []
    for c in range(len(bounds) - 1):
        idx = order[bounds[c]:bounds[c + 1]]
        if len(idx) >= min_points and lab[idx[0]] != ignore:
            groups.append(np.sort(idx))
            glabels.append(int(lab[idx[0]]))
    return groups, np.asarray(glabels, np.int64)
