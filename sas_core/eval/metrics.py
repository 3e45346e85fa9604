"""Semantic-segmentation metrics under OpenScene's evaluation protocol.

OpenScene (``util/metric.py`` and ``run/evaluate.py``) evaluates per point:

* ground truth 255 (``IGNORE_LABEL``) is not evaluated;
* a prediction of 256 (:data:`NO_FEATURE`) marks a point that got no feature (2D fusion saw it in
  no view). It is never a true positive. For **accuracy** it counts as wrong (the denominator of a
  class's accuracy is all its ground-truth points). For **IoU** OpenScene drops those points from
  the confusion matrix altogether (they are neither false negatives nor false positives);
  ``no_feature="wrong"`` counts them as false negatives of their ground-truth class instead;
* a class enters the means only when it has at least one ground-truth point, but the means divide
  by the number of classes of the vocabulary (``average="openscene"``), so an absent class counts as
  0. ``average="present"`` divides by the number of present classes instead. Both are returned.

The confusion matrix here has ground truth in rows and predictions in columns (scikit-learn's
convention; OpenScene's array is the transpose), with one extra last column counting the
no-feature predictions: shape (K, K + 1).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from sas_core.types import IGNORE_LABEL

NO_FEATURE = 256
"""Prediction value of a point that has no feature (OpenScene's ``NO_FEATURE_ID``)."""

LONG_TAIL_K = (21, 40, 80, 160)
"""Matterport3D vocabulary sizes of OpenScene's long-tail evaluation."""


def confusion_matrix(pred, gt, n_classes: int, ignore: int = IGNORE_LABEL) -> np.ndarray:
    """Count (ground truth, prediction) pairs.

    Args:
        pred: (N,) integer predicted class in [0, n_classes), or :data:`NO_FEATURE`.
        gt: (N,) integer ground-truth class in [0, n_classes), or ``ignore``.
        n_classes: K, the vocabulary size.
        ignore: ground-truth value that is not evaluated.

    Returns:
        (K, K + 1) int64 ``C`` with ``C[g, p]`` = number of evaluated points of class g predicted
        as p; column K counts points of class g predicted as :data:`NO_FEATURE`.

    Raises:
        ValueError: on shape mismatch, non-integer input, or labels outside the valid ranges.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 1:
        raise ValueError(f"pred and gt must be 1-D of the same length, got {pred.shape} and {gt.shape}")
    for name, a in (("pred", pred), ("gt", gt)):
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class ids, got dtype {a.dtype}")
    k = int(n_classes)
    if k <= 0:
        raise ValueError(f"n_classes must be positive, got {n_classes}")
    keep = gt != ignore
    gt = gt[keep].astype(np.int64)
    pred = pred[keep].astype(np.int64)
    bad_gt = (gt < 0) | (gt >= k)
    if bad_gt.any():
        raise ValueError(f"ground truth has labels outside [0, {k}) and != {ignore}: "
                         f"{np.unique(gt[bad_gt])[:10].tolist()}")
    pred = np.where(pred == NO_FEATURE, k, pred)
    bad_pred = (pred < 0) | (pred > k)
    if bad_pred.any():
        raise ValueError(f"predictions have labels outside [0, {k}) and != {NO_FEATURE}: "
                         f"{np.unique(pred[bad_pred])[:10].tolist()}")
    return np.bincount(gt * (k + 1) + pred, minlength=k * (k + 1)).reshape(k, k + 1).astype(np.int64)


def miou_macc(confusion, class_names: Optional[Sequence[str]] = None, no_feature: str = "openscene",
              average: str = "openscene") -> dict:
    """IoU and accuracy per class and their means from a :func:`confusion_matrix`.

    Args:
        confusion: (K, K + 1) from :func:`confusion_matrix` (a plain (K, K) matrix is accepted too,
            ground truth in rows).
        class_names: optional K names for the per-class dicts (default "0", "1", ...).
        no_feature: "openscene" (no-feature points are left out of IoU, wrong for accuracy) or
            "wrong" (they are false negatives for IoU too).
        average: which mean goes in ``miou``/``macc``: "openscene" (sum over present classes / K) or
            "present" (mean over classes with ground truth). Both are in the result anyway.

    Returns:
        dict with ``iou`` and ``acc`` (K,) float64 arrays (NaN for classes without ground truth),
        ``present`` (K,) bool, ``per_class`` {name: {"iou", "acc", "points"}} for present classes,
        ``miou``, ``macc`` (chosen average), ``miou_openscene``, ``macc_openscene``,
        ``miou_present``, ``macc_present``, ``points`` (evaluated points), ``no_feature_points``,
        ``overall_acc``.
    """
    c = np.asarray(confusion, dtype=np.int64)
    if c.ndim != 2 or c.shape[1] not in (c.shape[0], c.shape[0] + 1):
        raise ValueError(f"confusion must be (K, K) or (K, K+1), got {c.shape}")
    if no_feature not in ("openscene", "wrong"):
        raise ValueError(f"no_feature must be 'openscene' or 'wrong', got {no_feature!r}")
    if average not in ("openscene", "present"):
        raise ValueError(f"average must be 'openscene' or 'present', got {average!r}")
    k = c.shape[0]
    names = [str(i) for i in range(k)] if class_names is None else [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}-class confusion matrix")
    square = c[:, :k]
    no_feat = c[:, k] if c.shape[1] == k + 1 else np.zeros(k, dtype=np.int64)
    tp = np.diag(square).astype(np.float64)
    gt_points = square.sum(1) + no_feat                  # every evaluated point of the class
    fp = square.sum(0) - tp                              # predicted as the class, other gt
    fn = square.sum(1) - tp                              # gt class, predicted as another class
    if no_feature == "wrong":
        fn = fn + no_feat
    present = gt_points > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(present, tp / np.maximum(tp + fp + fn, 1), np.nan)
        acc = np.where(present, tp / np.maximum(gt_points, 1), np.nan)
    n_present = int(present.sum())
    sum_iou, sum_acc = float(np.nansum(iou)), float(np.nansum(acc))
    result = {
        "iou": iou, "acc": acc, "present": present,
        "per_class": {names[i]: {"iou": float(iou[i]), "acc": float(acc[i]), "points": int(gt_points[i])}
                      for i in range(k) if present[i]},
        "miou_openscene": sum_iou / k, "macc_openscene": sum_acc / k,
        "miou_present": sum_iou / n_present if n_present else float("nan"),
        "macc_present": sum_acc / n_present if n_present else float("nan"),
        "points": int(gt_points.sum()), "no_feature_points": int(no_feat.sum()),
        "overall_acc": float(tp.sum() / gt_points.sum()) if gt_points.sum() else float("nan"),
        "class_names": names, "no_feature": no_feature, "average": average,
    }
    result["miou"] = result[f"miou_{average}"]
    result["macc"] = result[f"macc_{average}"]
    return result


def evaluate(pred, gt, class_names: Sequence[str], ignore: int = IGNORE_LABEL, **kwargs) -> dict:
    """:func:`miou_macc` of :func:`confusion_matrix` for a vocabulary ``class_names`` (K names).

    ``pred``/``gt``: (N,) integer labels as in :func:`confusion_matrix`. ``kwargs`` go to
    :func:`miou_macc`. The result also carries ``confusion`` ((K, K + 1) int64).
    """
    conf = confusion_matrix(pred, gt, len(class_names), ignore=ignore)
    result = miou_macc(conf, class_names, **kwargs)
    result["confusion"] = conf
    return result


def boundary_mask(positions, gt, radius: float = 0.05, ignore: int = IGNORE_LABEL) -> np.ndarray:
    """(N,) bool: evaluated points within ``radius`` metres of a point of another evaluated class.

    The band around ground-truth class boundaries where per-point distillation blurs labels
    (MaskField / XMask3D measure boundary quality there). Exact: one KD-tree per class (scipy)."""
    from scipy.spatial import cKDTree

    pos = np.asarray(positions, np.float64).reshape(-1, 3)
    gt = np.asarray(gt).reshape(-1)
    if len(pos) != len(gt):
        raise ValueError(f"{len(pos)} positions for {len(gt)} labels")
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    valid = gt != ignore
    out = np.zeros(len(gt), bool)
    classes = np.unique(gt[valid])
    if len(classes) < 2:
        return out
    for c in classes:
        own = valid & (gt == c)
        other = np.flatnonzero(valid & (gt != c) & ~out)
        if not len(other):
            continue
        d, _ = cKDTree(pos[own]).query(pos[other], k=1, distance_upper_bound=radius)
        out[other[np.isfinite(d)]] = True  # a point of class c lies within radius of these points
    return out


def boundary_miou(pred, gt, positions, class_names: Sequence[str], radius: float = 0.05,
                  ignore: int = IGNORE_LABEL, **kwargs) -> dict:
    """:func:`evaluate` restricted to the points of :func:`boundary_mask` (boundary mIoU / mAcc).

    The result also carries ``radius`` and ``boundary_points`` (how many points the band holds)."""
    band = boundary_mask(positions, gt, radius, ignore)
    pred = np.asarray(pred).reshape(-1)
    result = evaluate(pred[band], np.asarray(gt).reshape(-1)[band], class_names, ignore=ignore, **kwargs)
    result["radius"] = float(radius)
    result["boundary_points"] = int(band.sum())
    return result


def long_tail_groups(k: int = 160) -> dict:
    """Nested head / common / tail class groups of the Matterport3D long-tail vocabularies.

    OpenScene defines no head/common/tail split for Matterport3D; its K = 21/40/80/160 label lists
    (ours in :mod:`sas_core.text`) are nested by frequency rank for K >= 40 (the 80 list starts with
    the 40 list, the 160 list with the 80 list). We use that nesting: "head" = indices [0, 40),
    "common" = [40, 80), "tail" = [80, 160), cut to ``k``.

    Returns:
        {group name: (n,) int64 class indices} for the non-empty groups of a K = ``k`` vocabulary.
    """
    bounds = {"head": (0, 40), "common": (40, 80), "tail": (80, 160)}
    out = {}
    for name, (lo, hi) in bounds.items():
        idx = np.arange(lo, min(hi, k), dtype=np.int64)
        if idx.size:
            out[name] = idx
    return out


def group_means(result: Mapping, groups: Mapping[str, np.ndarray]) -> dict:
    """Mean IoU / accuracy over groups of classes (only classes present in the ground truth count).

    Args:
        result: a :func:`miou_macc` result.
        groups: {name: class indices}, e.g. :func:`long_tail_groups`.

    Returns:
        {name: {"miou", "macc", "classes" (present classes in the group)}}.
    """
    out = {}
    for name, idx in groups.items():
        idx = np.asarray(idx, dtype=np.int64)
        idx = idx[idx < len(result["iou"])]
        sel = idx[np.asarray(result["present"])[idx]]
        out[name] = {
            "miou": float(np.mean(result["iou"][sel])) if sel.size else float("nan"),
            "macc": float(np.mean(result["acc"][sel])) if sel.size else float("nan"),
            "classes": int(sel.size),
        }
    return out


def table_lines(header, rows, markdown: bool, title: str = "", widths=None) -> list:
    """Lines of a per-class table: a name column then right-aligned figures; Markdown or plain text
    (``widths``: the figure columns' widths, default 6)."""
    lines = [title] if title else []
    if markdown:
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        return lines + ["| " + " | ".join(r) + " |" for r in rows]
    widths = widths or (6,) * (len(header) - 1)
    width = max(len(r[0]) for r in list(rows) + [header])
    fmt = f"{{:<{width}}}" + "".join(f"  {{:>{w}}}" for w in widths)
    return lines + [fmt.format(*header)] + [fmt.format(*r) for r in rows]


def format_table(result: Mapping, markdown: bool = True, title: str = "") -> str:
    """The per-class table (IoU, accuracy, ground-truth points) and the means as text.

    Args:
        result: a :func:`miou_macc` / :func:`evaluate` result.
        markdown: a Markdown table (else aligned plain text).
        title: optional heading line.
    """
    rows = [(name, f"{v['iou'] * 100:.1f}", f"{v['acc'] * 100:.1f}", str(v["points"]))
            for name, v in result["per_class"].items()]
    rows.append(("mean", f"{result['miou'] * 100:.1f}", f"{result['macc'] * 100:.1f}", str(result["points"])))
    lines = table_lines(("class", "IoU", "Acc", "points"), rows, markdown, title, widths=(6, 6, 9))
    note = (f"means over {len(result['iou'])} classes ({result['average']} average; "
            f"{int(np.sum(result['present']))} present); no-feature points: {result['no_feature_points']}")
    lines.append(note)
    return "\n".join(lines)


def to_json(result: Mapping) -> dict:
    """A JSON-serialisable copy of a metrics result (arrays become lists, NaN becomes None)."""
    def conv(v):
        if isinstance(v, np.ndarray):
            return [conv(x) for x in v.tolist()]
        if isinstance(v, (np.floating, float)):
            return None if np.isnan(v) else float(v)
        if isinstance(v, (np.integer,)):
            return int(v)
        if isinstance(v, (np.bool_,)):
            return bool(v)
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v
    return conv(dict(result))
