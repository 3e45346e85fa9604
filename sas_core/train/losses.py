"""Distillation losses of SAS (paper section 3.4), written with plain torch scatter means.

All losses come in two forms: a *sum* over elements plus the element count (so a caller running
data-parallel can divide by the global count of the joint batch and get exactly the gradient of
one process seeing the whole batch), and the usual *mean* (``reduction="mean"``).

Notation (shapes):
    f3d: (M, C) network output for M supervised voxels (not normalised).
    f2d: (M, C) fused 2D target features of the same voxels.
    seg: (M,) int64 superpoint id of every voxel (any non-negative ids; made contiguous here).
    text: (K, C) L2-normalised class text embeddings.

Stage 1 (eq. 10):
    pixel-point distillation (OpenScene):   L = mean_i 1 - cos(f3d_i, f2d_i)
    superpoint distillation (SAS):          L_p  = mean_i 1 - cos(f3d_i, mean_{sp(i)} f2d)
                                            L_sp = mean_s 1 - cos(mean_s f3d, mean_s f2d)
Stage 2, temporal ensembling self-distillation (eq. 13):
    L_p^ST  = CE(logits(f3d_i), pseudo_i)         over voxels
    L_sp^ST = CE(logits(mean_s f3d), pseudo_s)    over superpoints

Logits. Eq. 13 writes CE(argmax(F3D . text), P); the argmax is not differentiable, so (as in the
authors' public code) the cross-entropy is taken on the similarity scores against the class
text embeddings. The public code uses the raw dot product of the unnormalised 3D feature with
the unit text embeddings. We use *cosine similarity divided by a temperature* instead
(``logits = cos(f3d, text) / temperature``, CLIP's convention, default temperature 0.07, i.e. the
initial CLIP logit scale 1/0.07): it does not depend on the output norm, which the cosine losses of
stage 1 leave unconstrained, so the strength of the self-distillation term does not drift with
the feature norm. ``temperature=None`` reproduces the raw dot product of the public code.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

_EPS = 1e-8


def contiguous_ids(seg: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Relabel arbitrary ids (M,) int64 to 0..L-1; returns (ids (M,), L)."""
    if seg.numel() == 0:
        return seg.long(), 0
    uniq, inverse = torch.unique(seg, sorted=True, return_inverse=True)
    return inverse, int(uniq.numel())


def segment_mean(x: torch.Tensor, seg: torch.Tensor, n_segments: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean of the rows of ``x`` (M, C) per segment ``seg`` (M,) in 0..L-1 (torch index_add).

    Returns (means (L, C) in x's dtype, counts (L,) float). Empty segments get a zero mean.
    """
    if x.shape[0] != seg.shape[0]:
        raise ValueError(f"segment ids have {seg.shape[0]} rows, features have {x.shape[0]}")
    n = int(seg.max().item()) + 1 if n_segments is None and seg.numel() else int(n_segments or 0)
    sums = x.new_zeros((n, x.shape[1])).index_add_(0, seg, x)
    counts = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, seg, torch.ones_like(seg, dtype=x.dtype))
    return sums / counts.clamp_min(1).unsqueeze(1), counts


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M,) 1 - cos(a_i, b_i) for (M, C) inputs (zero vectors count as cos 0)."""
    return 1.0 - F.cosine_similarity(a, b, dim=1, eps=_EPS)


def _reduce(values: torch.Tensor, reduction: str):
    if reduction == "sum":
        return values.sum(), values.numel()
    if reduction == "mean":
        return values.mean() if values.numel() else values.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def point_loss(f3d: torch.Tensor, f2d: torch.Tensor, reduction: str = "mean"):
    """Pixel-point distillation ``1 - cos(f3d, f2d)`` averaged over voxels (OpenScene's loss).

    With ``reduction="sum"`` returns (sum, count)."""
    if f3d.shape != f2d.shape:
        raise ValueError(f"3D features {tuple(f3d.shape)} and 2D targets {tuple(f2d.shape)} differ")
    return _reduce(cosine_distance(f3d, f2d.to(f3d.dtype)), reduction)


def superpoint_targets(f2d: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """F_SP^2D: the superpoint mean of the 2D targets mapped back onto every voxel, (M, C)."""
    ids, n = contiguous_ids(seg)
    means, _ = segment_mean(f2d.float(), ids, n)
    return means[ids]


def superpoint_distillation_loss(f3d: torch.Tensor, f2d: torch.Tensor, seg: torch.Tensor, reduction: str = "mean"):
    """SAS superpoint distillation (eq. 10): returns (L_p, L_sp).

    L_p compares every voxel's 3D feature with its superpoint's mean 2D feature; L_sp compares the
    superpoint means of both. With ``reduction="sum"`` each is a (sum, count) pair.
    """
    if f3d.shape != f2d.shape:
        raise ValueError(f"3D features {tuple(f3d.shape)} and 2D targets {tuple(f2d.shape)} differ")
    ids, n = contiguous_ids(seg)
    f2d = f2d.to(f3d.dtype)
    mean2d, _ = segment_mean(f2d, ids, n)
    mean3d, _ = segment_mean(f3d, ids, n)
    lp = _reduce(cosine_distance(f3d, mean2d[ids]), reduction)
    lsp = _reduce(cosine_distance(mean3d, mean2d), reduction)
    return lp, lsp


def text_logits(features: torch.Tensor, text: torch.Tensor, temperature: Optional[float] = 0.07) -> torch.Tensor:
    """(M, K) class scores of (M, C) features against (K, C) unit text embeddings.

    ``cos(f, text) / temperature``; ``temperature=None`` gives the raw dot product ``f . text``.
    """
    text = text.to(features.dtype)
    if temperature is None:
        return features @ text.t()
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return F.normalize(features, dim=1, eps=_EPS) @ F.normalize(text, dim=1).t() / temperature


def class_balance_weights(labels: torch.Tensor) -> torch.Tensor:
    """(M,) per-element weights ``M / (C * count(label_i))`` over the C classes present in ``labels``:
    every present class weighs the same in total, and the weights sum to M (so a weighted sum divided by
    the element count is the class-balanced mean)."""
    if labels.numel() == 0:
        return torch.ones(0)
    uniq, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return (labels.numel() / (uniq.numel() * counts.float()))[inverse]


def tesd_loss(f3d: torch.Tensor, seg: torch.Tensor, point_labels: torch.Tensor, sp_labels: torch.Tensor,
              text: torch.Tensor, temperature: Optional[float] = 0.07, reduction: str = "mean",
              balance: bool = False):
    """Temporal-ensembling self-distillation cross-entropies (eq. 13): returns (L_p^ST, L_sp^ST).

    Args:
        f3d: (M, C) current outputs of the voxels.
        seg: (M,) superpoint ids (any non-negative ids).
        point_labels: (M,) int64 pseudo-labels of the voxels (from the temporal ensemble).
        sp_labels: (L,) int64 pseudo-labels of the superpoints, indexed by the contiguous id of
            ``seg`` (sorted unique order, as :func:`contiguous_ids`).
        text: (K, C) class embeddings.
        balance: weight every element by :func:`class_balance_weights` of its pseudo-label, so each
            pseudo-class present weighs the same (NOT in the paper; a diagnostic of self-training that
            favours frequent classes).
    """
    ids, n = contiguous_ids(seg)
    if sp_labels.shape[0] != n:
        raise ValueError(f"{sp_labels.shape[0]} superpoint labels for {n} superpoints")
    mean3d, _ = segment_mean(f3d, ids, n)
    lp = F.cross_entropy(text_logits(f3d, text, temperature), point_labels, reduction="none")
    lsp = F.cross_entropy(text_logits(mean3d, text, temperature), sp_labels, reduction="none")
    if balance:
        lp = lp * class_balance_weights(point_labels).to(lp)
        lsp = lsp * class_balance_weights(sp_labels).to(lsp)
    return _reduce(lp, reduction), _reduce(lsp, reduction)
