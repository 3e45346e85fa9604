"""One entry point for instance proposals: masks -> back-projection -> clustering -> semantics.

:func:`propose_instances` takes a point cloud, its superpoints, optional frames with a mask source
and optional per-point features with class text embeddings, and returns labelled
:class:`~sas_core.instances.base.Instance` records:

* with frames and a mask source: :func:`~sas_core.instances.masks.backproject_masks` then
  :func:`~sas_core.instances.clustering.cluster_masks` (MaskClustering over superpoints);
* without masks (LiDAR-only maps, no frames) but with features:
  :func:`~sas_core.instances.clustering.region_growing`; with both, regions that no mask
  instance claims are grouped by region growing too (``InstanceConfig.fill_unclaimed``);
* then instance semantics (:func:`~sas_core.instances.base.describe_instances`): mean feature
  against the vocabulary.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np

from sas_core.instances.base import Instance, describe_instances
from sas_core.instances.clustering import InstanceConfig, cluster_masks, region_growing, superpoint_adjacency
from sas_core.instances.masks import BackProjectionConfig, MaskView, backproject_masks


def mask_views(frames: Iterable, mask_source: Callable) -> Iterable[MaskView]:
    """Lazily pair frames with their masks: ``mask_source(frame) -> (H, W) int64 mask ids``."""
    for frame in frames:
        yield MaskView(frame.depth, frame.pose, frame.intrinsics, mask_source(frame))


def propose_instances(points, superpoints, frames: Optional[Iterable] = None, mask_source: Optional[Callable] = None,
                      features=None, text=None, class_names: Optional[Sequence[str]] = None,
                      config: Optional[InstanceConfig] = None,
                      backprojection: Optional[BackProjectionConfig] = None) -> List[Instance]:
    """Instance proposals of one scene (see the module docstring).

    Args:
        points: (N, 3) positions; superpoints: (N,) superpoint ids.
        frames: optional iterable of :class:`sas_core.types.Frame` (depth, pose, intrinsics, and
            what ``mask_source`` reads); consumed once, lazily.
        mask_source: ``frame -> (H, W) int64`` mask ids (-1 none), e.g. ``SimulatedTeacher.mask_ids``,
            :class:`~sas_core.instances.masks.SamMaskSource`, :func:`~sas_core.instances.masks.frame_instance_masks`.
        features: optional (N, C) per-point features (distilled or fused; torch or NumPy).
        text: optional (K, C) class text embeddings, ``class_names`` their names: labels instances.
        config: :class:`InstanceConfig`; backprojection: :class:`BackProjectionConfig`.

    Returns:
        disjoint instances, ids 0..I-1 (``indices`` into ``points``).

    Raises:
        ValueError: neither masks (frames + mask_source) nor features are given.
    """
    cfg = config or InstanceConfig()
    pts = np.asarray(points, np.float32).reshape(-1, 3)
    sp = np.unique(np.asarray(superpoints, np.int64).reshape(-1), return_inverse=True)[1].reshape(-1)
    if len(sp) != len(pts):
        raise ValueError(f"{len(sp)} superpoint ids for {len(pts)} points")
    adjacency = superpoint_adjacency(pts, sp, cfg.knn, cfg.max_edge)
    groups, conf, n_masks = [], None, None
    used_masks = False
    if frames is not None and mask_source is not None:
        bp = backproject_masks(pts, sp, mask_views(frames, mask_source), backprojection)
        if bp.n_masks:
            groups, conf, n_masks = cluster_masks(bp, pts, cfg, adjacency=adjacency)
            used_masks = True
    if not used_masks:
        if features is None:
            raise ValueError("instance proposals need masks (frames + mask_source) or per-point features")
        groups, conf = region_growing(pts, sp, features, cfg, adjacency=adjacency)
    elif features is not None and cfg.fill_unclaimed:
        # regions no mask instance claims (objects whose masks never reached consensus, parts no
        # frame segmented) are grouped by the region-growing fallback
        claimed = np.zeros(len(pts), bool)
        for g in groups:
            claimed[g] = True
        extra, extra_conf = region_growing(pts, sp, features, cfg, adjacency=adjacency, exclude=claimed)
        extra = [g[~claimed[g]] for g in extra]
        groups = list(groups) + extra
        conf = np.concatenate([conf, 0.5 * np.asarray(extra_conf)])  # no mask support: ranked below
        n_masks = np.concatenate([n_masks, np.zeros(len(extra), np.int64)])
    labelled = features is not None and text is not None
    return describe_instances(pts, groups, features if labelled else None, text if labelled else None,
                              class_names, confidence=conf, n_masks=n_masks, min_points=cfg.min_points)


def cloud_instances(positions, features, text, class_names: Sequence[str], normals=None, superpoints=None,
                    frames: Optional[Iterable] = None, mask_source: Optional[Callable] = None,
                    config: Optional[InstanceConfig] = None, superpoint_config=None) -> List[Instance]:
    """:func:`propose_instances` on a plain point cloud: graph superpoints computed when not given.

    Args:
        positions: (N, 3); features: (N, C) per-point features; text: (K, C) class embeddings of
            ``class_names``; normals: optional (N, 3) (estimated otherwise);
        superpoints: optional (N,) ids; superpoint_config: a
            :class:`~sas_core.geometry.superpoints.SuperpointConfig` (default ScanNet's).
        frames, mask_source, config: as :func:`propose_instances`.
    """
    if superpoints is None:
        from sas_core.geometry.superpoints import SuperpointConfig, superpoints_from_config

        superpoints = superpoints_from_config(np.asarray(positions, np.float32),
                                              superpoint_config or SuperpointConfig(), normals=normals)
    return propose_instances(positions, superpoints, frames, mask_source, features=features, text=text,
                             class_names=class_names, config=config)


def instances_json(instances: Sequence[Instance], class_names: Sequence[str], n_points: int, source: str = "",
                   with_indices: bool = False) -> dict:
    """The instances file written by ``sas segment --instances``: plain JSON data."""
    return {"format": "sas-instances/1", "points": int(n_points), "classes": list(class_names), "source": source,
            "instances": [i.to_json(with_indices) for i in instances]}
