"""3D instance segmentation AP under ScanNet's benchmark protocol.

Follows ``BenchmarkScripts/3d_evaluation/evaluate_semantic_instance.py`` of ScanNet (itself adapted
from Cityscapes), re-implemented here on arrays:

* **Ground truth.** A ground-truth instance is the set of points sharing one (class, instance id)
  pair, for classes of the evaluated set (ScanNet: its 18 instance classes, i.e. ScanNet-20 without
  wall and floor) and instance id >= 0. Instances with fewer than ``min_region_size`` (100) points
  are not evaluated, and predictions overlapping them are not punished for it (below).
  *Void* points are those whose class is outside the evaluated set (or 255), or that have no
  instance id.
* **Predictions.** A prediction is a point mask, a class and a confidence. Predictions of a class
  outside the evaluated set are dropped, so are masks with fewer than ``min_region_size`` points.
  A prediction is only compared with ground truth of its own class.
* **Overlaps.** 0.50, 0.55, ..., 0.90 and 0.25 (``np.append(np.arange(0.5, 0.95, 0.05), 0.25)``,
  the same floating-point values). A match needs IoU **strictly above** the overlap.
* **Matching**, per overlap and class, ground-truth instances in id order, each one's candidate
  predictions in prediction order: a candidate already assigned (at this overlap) is skipped; the
  first candidate above the overlap is assigned to the instance; every further candidate above it
  makes the lower of the two confidences a false positive, the instance keeping the higher
  confidence (those further candidates stay unassigned, as in ScanNet's script). An instance
  without a match is a *hard false negative*.
* **Unmatched predictions**: a prediction that overlaps no instance of its class above the overlap
  is a false positive unless more than ``overlap`` of its points are ignored (void points, points of
  too-small instances of its class); ignored ones are not counted at all.
* **Precision-recall and AP**: scores sorted ascending; one curve point per distinct score
  (precision and recall of the predictions with score >= it, hard false negatives added to the
  false negatives), plus the artificial point (recall 0, precision 1); AP is the sum of each
  precision times half the recall gap between its two neighbours, as the script's convolution of
  the recall sequence with ``[-0.5, 0, 0.5]`` computes it.
* **NaN**: a class without evaluated ground truth gets NaN (AP 0 when it has ground truth but no
  prediction). AP is the NaN-mean over classes and the nine overlaps 0.5..0.9, AP50 / AP25 the
  NaN-means over classes at 0.5 / 0.25; a class's AP is the plain mean of its nine values.

One deviation: where ScanNet's script crashes (ground truth and predictions of a class exist, but
every prediction is ignored and none matches), this returns AP 0.

``class_agnostic=True`` puts every evaluated class into one class "object" (predicted labels are
then not needed): the class-agnostic AP of open-vocabulary instance work (MaskClustering, MOSS).

NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from sas_core.types import IGNORE_LABEL

OVERLAPS = np.append(np.arange(0.5, 0.95, 0.05), 0.25)
"""ScanNet's overlaps: 0.5:0.05:0.9, then 0.25 (the same float values as its script)."""

MIN_REGION_SIZE = 100
"""ScanNet's ``min_region_sizes[0]`` (points)."""

NO_INSTANCE_CLASSES = ("wall", "floor")
"""ScanNet-20 classes that are not instance classes (its benchmark evaluates the other 18)."""


@dataclass
class SceneInstances:
    """Ground truth and predicted instances of one scene.

    Attributes:
        gt_labels: (N,) int64 class per point (index into ``class_names``; 255 = ignore).
        gt_instances: (N,) int64 instance id per point (-1 = none).
        pred_masks: P predicted masks, each an (N,) bool array or an int array of point indices;
            or one (P, N) bool array.
        pred_labels: (P,) int64 class of each prediction (index into ``class_names``); may be None
            for class-agnostic evaluation.
        pred_scores: (P,) float confidence of each prediction.
    """

    gt_labels: np.ndarray
    gt_instances: np.ndarray
    pred_masks: Sequence
    pred_labels: Optional[np.ndarray]
    pred_scores: np.ndarray

    def __post_init__(self):
        self.gt_labels = np.asarray(self.gt_labels, dtype=np.int64).reshape(-1)
        self.gt_instances = np.asarray(self.gt_instances, dtype=np.int64).reshape(-1)
        if self.gt_labels.shape != self.gt_instances.shape:
            raise ValueError(f"gt_labels has {len(self.gt_labels)} points, gt_instances {len(self.gt_instances)}")
        n = len(self.gt_labels)
        masks = []
        for i, m in enumerate(list(self.pred_masks)):
            m = np.asarray(m)
            if m.dtype == bool:
                if m.shape != (n,):
                    raise ValueError(f"prediction {i}: mask of shape {m.shape} for {n} points")
                m = np.flatnonzero(m)
            else:
                m = np.unique(m.astype(np.int64).reshape(-1))
                if m.size and (m[0] < 0 or m[-1] >= n):
                    raise ValueError(f"prediction {i}: point index outside [0, {n})")
            masks.append(m)
        self.pred_masks = masks
        self.pred_scores = np.asarray(self.pred_scores, dtype=np.float64).reshape(-1)
        if len(self.pred_scores) != len(masks):
            raise ValueError(f"{len(masks)} masks but {len(self.pred_scores)} scores")
        if self.pred_labels is not None:
            self.pred_labels = np.asarray(self.pred_labels, dtype=np.int64).reshape(-1)
            if len(self.pred_labels) != len(masks):
                raise ValueError(f"{len(masks)} masks but {len(self.pred_labels)} labels")


def instance_classes(class_names: Sequence[str]) -> list:
    """Indices of the classes evaluated by default: all but wall and floor (ScanNet's 18 of 20)."""
    return [i for i, n in enumerate(class_names) if n not in NO_INSTANCE_CLASSES]


def _scene_matches(scene: SceneInstances, class_of: np.ndarray, n_eval: int, min_region_size: int):
    """ScanNet's ``assign_instances_for_scan`` on arrays.

    ``class_of``: (256,) evaluated-class index of each label, -1 when not evaluated.
    Returns (gts, preds): per evaluated class a list of gt dicts / pred dicts.
    """
    lab = scene.gt_labels
    inst = scene.gt_instances
    ok_label = (lab >= 0) & (lab < len(class_of))
    cls = np.full(len(lab), -1, np.int64)
    cls[ok_label] = class_of[lab[ok_label]]
    valid = (cls >= 0) & (inst >= 0)
    void = ~valid
    # ground-truth instances: unique (class, instance id) pairs, in (class, id) order like ScanNet's ids
    gt_id = np.full(len(lab), -1, np.int64)
    gts = [[] for _ in range(n_eval)]
    if valid.any():
        pair = cls[valid] * (int(inst[valid].max()) + 1) + inst[valid]
        uniq, inverse, counts = np.unique(pair, return_inverse=True, return_counts=True)
        gt_id[valid] = inverse
        width = int(inst[valid].max()) + 1
        for g, (p, c) in enumerate(zip(uniq.tolist(), counts.tolist())):
            gts[p // width].append({"gid": g, "vert_count": int(c), "matched_pred": []})
    gt_of_id = {g["gid"]: g for lst in gts for g in lst}
    gt_class = {g["gid"]: k for k, lst in enumerate(gts) for g in lst}
    preds = [[] for _ in range(n_eval)]
    for p, idx in enumerate(scene.pred_masks):
        if n_eval == 1 and scene.pred_labels is None:
            k = 0
        else:
            if scene.pred_labels is None:
                raise ValueError("pred_labels are needed for per-class evaluation")
            label = int(scene.pred_labels[p])
            k = int(class_of[label]) if 0 <= label < len(class_of) else -1
            if k < 0:
                continue  # not an evaluated class
        if len(idx) < min_region_size:
            continue
        pred = {"pid": p, "vert_count": int(len(idx)), "confidence": float(scene.pred_scores[p]),
                "void_intersection": int(void[idx].sum()), "matched_gt": []}
        hit = gt_id[idx]
        hit = hit[hit >= 0]
        if hit.size:
            ids, inter = np.unique(hit, return_counts=True)
            for g, c in zip(ids.tolist(), inter.tolist()):
                if gt_class[g] != k:
                    continue
                gt = gt_of_id[g]
                pred["matched_gt"].append({"gid": g, "vert_count": gt["vert_count"], "intersection": int(c)})
                gt["matched_pred"].append({"pred": pred, "intersection": int(c)})
        preds[k].append(pred)
    return gts, preds


def _average_precision(y_true: np.ndarray, y_score: np.ndarray, hard_fn: int) -> float:
    """Area under ScanNet's precision-recall curve (see the module docstring)."""
    if len(y_true) == 0:
        return 0.0  # ScanNet's script raises here (no TP, no FP); nothing was found
    order = np.argsort(y_score)
    scores, true = y_score[order], y_true[order]
    cum = np.concatenate([[0.0], np.cumsum(true)])          # cum[i]: true examples below sorted index i
    n, n_true = len(scores), cum[-1]
    _, first = np.unique(scores, return_index=True)          # first index of each distinct score
    tp = n_true - cum[first]
    fp = (n - first) - tp
    fn = cum[first] + hard_fn
    precision = np.append(tp / (tp + fp), 1.0)
    recall = np.append(tp / np.maximum(tp + fn, 1e-300), 0.0)
    # step_i = (recall[i-1] - recall[i+1]) / 2 with recall[-1] := recall[0], recall[len] := 0
    left = np.concatenate([[recall[0]], recall[:-1]])
    right = np.append(recall[1:], 0.0)
    return float(np.dot(precision, 0.5 * (left - right)))


def evaluate_instances(scenes: Sequence[SceneInstances], class_names: Sequence[str],
                       eval_classes: Optional[Sequence[int]] = None, class_agnostic: bool = False,
                       min_region_size: int = MIN_REGION_SIZE, overlaps=OVERLAPS) -> dict:
    """ScanNet instance AP over a set of scenes.

    Args:
        scenes: :class:`SceneInstances` per scene.
        class_names: the vocabulary the labels index.
        eval_classes: indices of the evaluated classes (default :func:`instance_classes`).
        class_agnostic: evaluate all evaluated classes as one class "object".
        min_region_size: smallest ground-truth instance / prediction evaluated (points).
        overlaps: IoU thresholds; must contain 0.5 and 0.25 for AP50 / AP25.

    Returns:
        dict with ``ap``, ``ap50``, ``ap25`` (fractions in [0, 1], NaN without ground truth),
        ``per_class`` {name: {ap, ap50, ap25, gt_instances, predictions}}, ``ap_table`` (K, O) array
        (class x overlap), ``overlaps``, ``classes`` (the evaluated names), ``scenes``,
        ``class_agnostic``, ``min_region_size``.
    """
    class_names = list(class_names)
    ev = instance_classes(class_names) if eval_classes is None else [int(k) for k in eval_classes]
    if any(k < 0 or k >= len(class_names) or k == IGNORE_LABEL for k in ev):
        raise ValueError(f"eval_classes {ev} outside the {len(class_names)}-class vocabulary")
    class_of = np.full(max(256, len(class_names)), -1, np.int64)
    if class_agnostic:
        class_of[ev] = 0
        names = ["object"]
    else:
        class_of[ev] = np.arange(len(ev))
        names = [class_names[k] for k in ev]
    overlaps = np.asarray(overlaps, dtype=np.float64)
    matches = [_scene_matches(s, class_of, len(names), int(min_region_size)) for s in scenes]
    for si, (_, preds) in enumerate(matches):  # prediction keys unique over scenes (ScanNet: file names)
        for lst in preds:
            for pred in lst:
                pred["pid"] = (si, pred["pid"])
    table = np.zeros((len(names), len(overlaps)))
    for oi, th in enumerate(overlaps.tolist()):
        visited = set()  # predictions assigned at this overlap (ScanNet's pred_visited)
        for k in range(len(names)):
            y_true, y_score = [], []
            hard_fn = 0
            has_gt = has_pred = False
            for gts, preds in matches:
                gt_list = [g for g in gts[k] if g["vert_count"] >= min_region_size]
                has_gt |= bool(gt_list)
                has_pred |= bool(preds[k])
                cur_true, cur_score, cur_match = [], [], []
                for g in gt_list:
                    matched, score = False, -np.inf
                    for cand in g["matched_pred"]:
                        pred = cand["pred"]
                        if pred["pid"] in visited:
                            continue
                        iou = cand["intersection"] / (g["vert_count"] + pred["vert_count"] - cand["intersection"])
                        if iou > th:
                            conf = pred["confidence"]
                            if matched:  # a duplicate: the lower confidence is a false positive
                                cur_true.append(0.0)
                                cur_score.append(min(score, conf))
                                score = max(score, conf)
                            else:
                                matched, score = True, conf
                                visited.add(pred["pid"])
                    if matched:
                        cur_true.append(1.0)
                        cur_score.append(score)
                    else:
                        hard_fn += 1
                for pred in preds[k]:
                    if any(m["intersection"] / (m["vert_count"] + pred["vert_count"] - m["intersection"]) > th
                           for m in pred["matched_gt"]):
                        continue
                    ignored = pred["void_intersection"] + sum(
                        m["intersection"] for m in pred["matched_gt"] if m["vert_count"] < min_region_size)
                    if ignored / pred["vert_count"] <= th:
                        cur_true.append(0.0)
                        cur_score.append(pred["confidence"])
                y_true += cur_true
                y_score += cur_score
            if has_gt and has_pred:
                table[k, oi] = _average_precision(np.asarray(y_true), np.asarray(y_score), hard_fn)
            elif has_gt:
                table[k, oi] = 0.0
            else:
                table[k, oi] = np.nan
    o50 = np.isclose(overlaps, 0.5)
    o25 = np.isclose(overlaps, 0.25)
    main = ~o25

    def nanmean(a):
        a = np.asarray(a, dtype=np.float64)
        return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")

    per_class = {}
    for k, name in enumerate(names):
        n_gt = sum(1 for gts, _ in matches for g in gts[k] if g["vert_count"] >= min_region_size)
        n_pred = sum(len(preds[k]) for _, preds in matches)
        per_class[name] = {"ap": float(np.mean(table[k, main])) if main.any() else float("nan"),
                           "ap50": nanmean(table[k, o50]), "ap25": nanmean(table[k, o25]),
                           "gt_instances": int(n_gt), "predictions": int(n_pred)}
    return {
        "ap": nanmean(table[:, main]), "ap50": nanmean(table[:, o50]), "ap25": nanmean(table[:, o25]),
        "per_class": per_class, "ap_table": table, "overlaps": overlaps, "classes": names,
        "scenes": len(scenes), "class_agnostic": bool(class_agnostic), "min_region_size": int(min_region_size),
    }


def format_instance_table(result: dict, markdown: bool = True, title: str = "") -> str:
    """Per-class AP / AP50 / AP25 (percent) and the means, as a Markdown or plain-text table."""
    def pct(v):
        return "nan" if v is None or not np.isfinite(v) else f"{v * 100:.1f}"

    rows = [(name, pct(v["ap"]), pct(v["ap50"]), pct(v["ap25"]), str(v["gt_instances"]), str(v["predictions"]))
            for name, v in result["per_class"].items()]
    rows.append(("mean", pct(result["ap"]), pct(result["ap50"]), pct(result["ap25"]),
                 str(sum(v["gt_instances"] for v in result["per_class"].values())),
                 str(sum(v["predictions"] for v in result["per_class"].values()))))
    from sas_core.eval.metrics import table_lines

    lines = table_lines(("class", "AP", "AP50", "AP25", "gt", "pred"), rows, markdown, title,
                        widths=(6, 6, 6, 5, 5))
    kind = "class-agnostic" if result.get("class_agnostic") else "per class"
    lines.append(f"ScanNet protocol ({kind}; AP over overlaps 0.50:0.05:0.90, min region "
                 f"{result.get('min_region_size', MIN_REGION_SIZE)} points; {result.get('scenes', '?')} scenes)")
    return "\n".join(lines)
