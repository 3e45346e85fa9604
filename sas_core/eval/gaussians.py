"""2D evaluation of labelled 3D Gaussians (SAS section 4.4, Table 5; Semantic Gaussians' protocol).

The labelled Gaussians are rendered into every view with the splatting renderer
(:mod:`sas_core.geometry.splatting`: label = argmax of the composited class one-hot) and the
rendered label images are scored against the ground-truth label images with the OpenScene
metrics of :mod:`sas_core.eval.metrics`, all pixels of all views pooled: ground truth 255 is not
evaluated; a pixel no labelled Gaussian covers enough gets 256 (no feature: wrong for accuracy,
left out of IoU, or a false negative with ``no_feature="wrong"``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def render_view_labels(gaussians, labels, views, n_classes: int, config=None) -> np.ndarray:
    """(V, H, W) int64 rendered label images of ``gaussians`` with ``labels`` in every view of a
    :class:`sas_core.data.gaussians.LabelledViews`."""
    from sas_core.geometry.splatting import render_labels

    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) != len(gaussians):
        raise ValueError(f"{len(labels)} labels for {len(gaussians)} Gaussians")
    return np.stack([render_labels(gaussians, labels, pose, views.intrinsics, n_classes, config)
                     for pose in views.poses])


def evaluate_gaussians(scenes: Sequence[tuple], class_names: Sequence[str], config=None,
                       no_feature: str = "openscene") -> dict:
    """mIoU / mAcc of rendered labels over several scenes.

    Args:
        scenes: ``(gaussians, labels (N,), views)`` per scene.
        class_names: the K classes the labels and the ground truth index.
        config: :class:`sas_core.geometry.splatting.SplatConfig`.

    Returns:
        :func:`sas_core.eval.metrics.evaluate` of all pixels pooled, plus ``views`` (count) and
        ``covered`` (fraction of evaluated pixels that got a label).
    """
    from sas_core.eval.metrics import NO_FEATURE, evaluate

    preds, gts = [], []
    for gaussians, labels, views in scenes:
        preds.append(render_view_labels(gaussians, labels, views, len(class_names), config).reshape(-1))
        gts.append(views.labels.reshape(-1))
    pred, gt = np.concatenate(preds), np.concatenate(gts)
    result = evaluate(pred, gt, class_names, no_feature=no_feature)
    keep = gt != 255
    result["views"] = int(sum(len(s[2]) for s in scenes))
    result["covered"] = float((pred[keep] != NO_FEATURE).mean()) if keep.any() else float("nan")
    return result
