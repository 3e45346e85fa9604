"""Fusing per-point features of several 2D teachers (SAS section 3.3, eq. 6-8) and its baselines.

All teachers live in one text-aligned embedding space (section 3.1), so their fused per-point
features ``F_t`` (N, C) can be combined point by point:

* ``capability_fusion`` (eq. 6-8): each teacher predicts a class per point,
  ``p_t = argmax_k F_t . text_k`` (eq. 6). The weight of teacher ``t`` is its capability on every
  class that any teacher predicted there, ``w_t = mean_u S_t[p_u]`` (eq. 7, written for two
  teachers as ``(S_t[p_L] + S_t[p_S]) / 2``). The fused feature is
  ``F = sum_t softmax_t(w_t / tau) F_t`` with ``tau = 0.05`` (eq. 8).
* ``add_fusion``: the paper's "Adding" row, the plain sum (or mean) of the teachers' features.
* ``linear_fusion``: the paper's "Linear" row, each teacher weighted by its best cosine
  similarity to the class texts, ``w_t = max_k cos(F_t, text_k)``, weights normalised to sum 1.

Normalisation (checked against the paper text and its public code, peoplelu/SAS
``feat_fusion/fusion_scannet.py``): the paper never normalises the point features around the
fusion, and the public code fuses the multi-view-averaged features as they are (argmax on the raw
dot products, weighted sum of the raw features, no renormalisation afterwards). The argmax of eq.
6 does not depend on a feature's norm, so this only matters for the weighted sum; it is the
default here (``normalize_inputs=False``, ``normalize_output=False``); both can be switched on.
The public code also divides the two summed capabilities by their total before the softmax
(``w_t / sum_u w_u`` instead of eq. 7's ``/ 2``); that variant is ``weight_norm="sum"``, eq. 7
(the default) is ``weight_norm="mean"``. (The public code also leaves points where LSeg predicts
ScanNet's catch-all "other" class unfused; that dataset-specific step is not reproduced here.)

Validity masks: a teacher without a feature at a point (``masks[t][n] == False``, e.g. a point
no frame of that teacher saw) neither votes a class into eq. 7 nor receives weight in eq. 8 there;
points that no teacher covers come out as zero vectors (see ``fused_mask``).

Everything is per point, so every function accepts any number of points and runs on the device of
its inputs; ``chunk_size`` bounds peak memory for large clouds, and ``FeatureFuser`` is the
stateful form for streaming callers (fuse each chunk of points as it arrives).

Shapes: T teachers, N points, C feature channels, K classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from sas_core.config import opt

METHODS = ("capability", "add", "linear")


@dataclass
class FusionConfig:
    """Settings of the teacher-feature fusion (defaults: paper eq. 6-8)."""

    method: str = opt("capability", "capability | add | linear (the rows of the paper's Table 3)",
                      choices=METHODS)
    tau: float = opt(0.05, "temperature of the softmax over teachers (eq. 8)")
    weight_norm: str = opt("mean", "'mean': eq. 7 (mean over teachers); 'sum': public code (divide by the sum)",
                           choices=("mean", "sum"))
    add_reduce: str = opt("sum", "'sum' (the paper's 'Adding') or 'mean' over valid teachers; same direction",
                          choices=("sum", "mean"))
    normalize_inputs: bool = opt(False, "L2-normalise every teacher feature before fusing (paper: no)")
    normalize_output: bool = opt(False, "L2-normalise the fused feature (paper: no)")
    chunk_size: int = opt(1 << 18, "points per chunk (bounds peak memory); 0 = all at once")

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown fusion method {self.method!r}; choose one of {METHODS}")
        if not (self.tau > 0 and np.isfinite(self.tau)):
            raise ValueError(f"tau must be a positive finite number, got {self.tau}")
        if self.weight_norm not in ("mean", "sum"):
            raise ValueError(f"weight_norm must be 'mean' or 'sum', got {self.weight_norm!r}")
        if self.add_reduce not in ("sum", "mean"):
            raise ValueError(f"add_reduce must be 'sum' or 'mean', got {self.add_reduce!r}")
        if self.chunk_size < 0:
            raise ValueError("chunk_size must be >= 0")


# --------------------------------------------------------------------------------------------
# input checking


def _as_tensor(x, device=None):
    import torch

    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    return x.to(device) if device is not None else x


def _check_inputs(features, masks, text=None, capability=None):
    """Validate shapes; return (features list, masks (T,N) bool tensor, text, capability)."""
    import torch

    if len(features) == 0:
        raise ValueError("fusion needs at least one teacher's features")
    feats = [_as_tensor(f) for f in features]
    device = feats[0].device
    feats = [f.to(device) for f in feats]
    n, c = None, None
    for t, f in enumerate(feats):
        if f.ndim != 2:
            raise ValueError(f"teacher {t}: features must be (N, C), got shape {tuple(f.shape)}")
        if not torch.is_floating_point(f):
            raise ValueError(f"teacher {t}: features must be floating point, got {f.dtype}")
        if n is None:
            n, c = f.shape
        elif f.shape != (n, c):
            raise ValueError(f"teacher {t}: features have shape {tuple(f.shape)}, teacher 0 has {(n, c)}")
    if masks is None:
        mask = torch.ones((len(feats), n), dtype=torch.bool, device=device)
    else:
        if len(masks) != len(feats):
            raise ValueError(f"got {len(masks)} masks for {len(feats)} teachers")
        ms = []
        for t, m in enumerate(masks):
            m = _as_tensor(m, device)
            if m is None or m.shape != (n,):
                raise ValueError(f"teacher {t}: mask must have shape ({n},), got {tuple(m.shape)}")
            ms.append(m.bool())
        mask = torch.stack(ms)
    if text is not None:
        text = _as_tensor(text, device)
        if text.ndim != 2 or text.shape[1] != c:
            raise ValueError(f"text must be (K, {c}), got shape {tuple(text.shape)}")
        if text.shape[0] == 0:
            raise ValueError("text must hold at least one class embedding")
    if capability is not None:
        capability = _as_tensor(capability, device).float()
        k = text.shape[0] if text is not None else None
        if capability.ndim != 2 or capability.shape[0] != len(feats) or (k is not None and capability.shape[1] != k):
            raise ValueError(
                f"capability must be (T={len(feats)}, K={k}), got shape {tuple(capability.shape)}"
            )
        if not torch.isfinite(capability).all():
            raise ValueError("capability contains NaN/inf (a class without evidence?); fill it before fusing")
    return feats, mask, text, capability


def _stack(feats, normalize: bool):
    """(T, N, C) float32 stack of the teachers' features, optionally L2-normalised, NaN-free."""
    import torch

    x = torch.stack([f.float() for f in feats])
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=-1)
    return x


def _finish(out, any_valid, normalize_output: bool, dtype):
    import torch

    if normalize_output:
        out = torch.nn.functional.normalize(out, dim=-1)
    out = torch.where(any_valid[:, None], out, torch.zeros_like(out))
    return out.to(dtype)


def _chunks(n: int, chunk_size: int) -> Iterator[slice]:
    step = n if chunk_size <= 0 else chunk_size
    for s in range(0, max(n, 1), max(step, 1)):
        yield slice(s, min(s + step, n))


# --------------------------------------------------------------------------------------------
# weights


def predict_classes(features, text):
    """Eq. 6: ``argmax_k features . text_k``.  features (..., C), text (K, C) -> (...,) int64
    (raw dot products, as the public code; :func:`sas_core.text.text_labels`)."""
    from sas_core.text import text_labels

    f = _as_tensor(features)
    return text_labels(f, _as_tensor(text, f.device))[0]


def capability_weights(preds, capability, masks=None, tau: float = 0.05, weight_norm: str = "mean"):
    """Eq. 7 + the softmax of eq. 8.

    Args:
        preds: (T, N) int64 predicted class of every teacher at every point (eq. 6).
        capability: (T, K) float, ``S[t][k]``.
        masks: optional (T, N) bool; invalid teachers neither vote nor receive weight.
        tau: softmax temperature.
        weight_norm: "mean" (eq. 7) or "sum" (public code: divide by the sum over teachers).

    Returns:
        (T, N) float32 weights; each column sums to 1 over the valid teachers (0 where none is).
    """
    import torch

    preds = _as_tensor(preds)
    cap = _as_tensor(capability, preds.device).float()
    T, N = preds.shape
    valid = torch.ones_like(preds, dtype=torch.bool) if masks is None else _as_tensor(masks, preds.device).bool()
    # S_t[p_u] for all t, u:  (T, U=T, N)
    s = cap[:, preds]  # cap[t, preds[u, n]] -> (T, T, N)
    vu = valid[None, :, :].float()  # only valid teachers u vote
    n_votes = vu.sum(dim=1)  # (1, N)
    w = (s * vu).sum(dim=1) / n_votes.clamp(min=1.0)  # (T, N) mean over valid u
    if weight_norm == "sum":
        total = (w * valid).sum(dim=0, keepdim=True)
        w = w / total.clamp(min=1e-12)
    elif weight_norm != "mean":
        raise ValueError(f"weight_norm must be 'mean' or 'sum', got {weight_norm!r}")
    logits = (w / tau).masked_fill(~valid, float("-inf"))
    any_valid = valid.any(dim=0)
    logits = torch.where(any_valid[None, :], logits, torch.zeros_like(logits))
    out = torch.softmax(logits, dim=0)
    return torch.where(any_valid[None, :], out, torch.zeros_like(out))


# --------------------------------------------------------------------------------------------
# fusion functions (batch; chunked internally)


def capability_fusion(
    features: Sequence,
    text,
    capability,
    tau: float = 0.05,
    masks: Optional[Sequence] = None,
    *,
    weight_norm: str = "mean",
    normalize_inputs: bool = False,
    normalize_output: bool = False,
    chunk_size: int = 1 << 18,
    return_weights: bool = False,
):
    """Capability-guided fusion, SAS eq. 6-8, for any number of teachers.

    Args:
        features: T tensors (N, C) (float16/32, any device), one per teacher, same text space.
        text: (K, C) class text embeddings of the vocabulary the capability table was built for.
        capability: (T, K) ``S[t][k]`` in the order of ``features`` and ``text``
            (``CapabilityTable.matrix(teachers, vocabulary)`` gives it in that order).
        tau: temperature of the softmax over teachers (paper: 0.05).
        masks: optional T bool tensors (N,): where teacher t has a feature.
        weight_norm, normalize_inputs, normalize_output: see ``FusionConfig``.
        chunk_size: points per chunk; 0 = all at once.
        return_weights: also return the (T, N) weights.

    Returns:
        (N, C) fused features in the dtype of ``features[0]`` (zeros where no teacher is valid);
        with ``return_weights``: (fused, weights (T, N) float32).
    """
    import torch

    feats, mask, text, cap = _check_inputs(features, masks, text, capability)
    if not (tau > 0):
        raise ValueError(f"tau must be positive, got {tau}")
    n = feats[0].shape[0]
    dtype = feats[0].dtype
    text32 = text.float()
    outs, weights = [], []
    for sl in _chunks(n, chunk_size):
        x = _stack([f[sl] for f in feats], normalize_inputs)  # (T, n, C)
        m = mask[:, sl]
        preds = predict_classes(x, text32)  # eq. 6, (T, n)
        w = capability_weights(preds, cap, m, tau=tau, weight_norm=weight_norm)  # eq. 7-8 softmax
        out = torch.einsum("tn,tnc->nc", w, x)
        outs.append(_finish(out, m.any(dim=0), normalize_output, dtype))
        if return_weights:
            weights.append(w)
    fused = torch.cat(outs) if outs else torch.zeros((0, feats[0].shape[1]), dtype=dtype, device=feats[0].device)
    if return_weights:
        return fused, (torch.cat(weights, dim=1) if weights else torch.zeros((len(feats), 0)))
    return fused


def add_fusion(
    features: Sequence,
    masks: Optional[Sequence] = None,
    *,
    reduce: str = "sum",
    normalize_inputs: bool = False,
    normalize_output: bool = False,
    chunk_size: int = 1 << 18,
):
    """The paper's "Adding" baseline: ``F = sum_t F_t`` over the valid teachers (or their mean).

    features: T tensors (N, C); masks: optional T bool (N,). Returns (N, C) in features[0].dtype.
    """
    import torch

    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    feats, mask, _, _ = _check_inputs(features, masks)
    n, dtype = feats[0].shape[0], feats[0].dtype
    outs = []
    for sl in _chunks(n, chunk_size):
        x = _stack([f[sl] for f in feats], normalize_inputs)
        m = mask[:, sl].float()
        out = torch.einsum("tn,tnc->nc", m, x)
        if reduce == "mean":
            out = out / m.sum(dim=0).clamp(min=1.0)[:, None]
        outs.append(_finish(out, mask[:, sl].any(dim=0), normalize_output, dtype))
    return torch.cat(outs)


def linear_weights(x, text, masks=None):
    """Weights of the "Linear" baseline: best cosine similarity of each teacher to the texts.

    x: (T, N, C) features; text (K, C); masks optional (T, N) bool.
    Returns (T, N) float32 weights, clamped at 0 and normalised to sum 1 over the valid teachers
    (equal weights where every similarity is <= 0; zeros where no teacher is valid).
    """
    import torch

    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    tn = torch.nn.functional.normalize(text.float(), dim=-1)
    sim = torch.einsum("tnc,kc->tnk", xn, tn).amax(dim=-1).clamp(min=0.0)  # (T, N)
    valid = torch.ones_like(sim, dtype=torch.bool) if masks is None else masks.bool()
    sim = sim * valid
    total = sim.sum(dim=0, keepdim=True)
    equal = valid.float() / valid.sum(dim=0, keepdim=True).clamp(min=1)
    return torch.where(total > 0, sim / total.clamp(min=1e-12), equal)


def linear_fusion(
    features: Sequence,
    text,
    masks: Optional[Sequence] = None,
    *,
    normalize_inputs: bool = False,
    normalize_output: bool = False,
    chunk_size: int = 1 << 18,
):
    """The paper's "Linear" baseline: ``F = sum_t w_t F_t`` with ``w_t`` the teacher's best text
    similarity at the point, normalised over teachers (see ``linear_weights``).

    features: T tensors (N, C); text (K, C); masks optional T bool (N,). Returns (N, C).
    """
    import torch

    feats, mask, text, _ = _check_inputs(features, masks, text)
    n, dtype = feats[0].shape[0], feats[0].dtype
    outs = []
    for sl in _chunks(n, chunk_size):
        x = _stack([f[sl] for f in feats], normalize_inputs)
        w = linear_weights(x, text, mask[:, sl])
        out = torch.einsum("tn,tnc->nc", w, x)
        outs.append(_finish(out, mask[:, sl].any(dim=0), normalize_output, dtype))
    return torch.cat(outs)


def fuse(features: Sequence, text=None, capability=None, masks=None, config: Optional[FusionConfig] = None):
    """Dispatch on ``config.method``; returns (N, C) fused features."""
    cfg = config or FusionConfig()
    common = dict(normalize_inputs=cfg.normalize_inputs, normalize_output=cfg.normalize_output,
                  chunk_size=cfg.chunk_size)
    if cfg.method == "add":
        return add_fusion(features, masks, reduce=cfg.add_reduce, **common)
    if text is None:
        raise ValueError(f"fusion method {cfg.method!r} needs the class text embeddings")
    if cfg.method == "linear":
        return linear_fusion(features, text, masks, **common)
    if capability is None:
        raise ValueError("capability fusion needs a capability table (sas capability)")
    return capability_fusion(features, text, capability, cfg.tau, masks, weight_norm=cfg.weight_norm, **common)


def fused_mask(masks: Sequence):
    """(N,) bool: points where at least one teacher has a feature."""
    import torch

    return torch.stack([_as_tensor(m).bool() for m in masks]).any(dim=0)


class FeatureFuser:
    """Streaming form: holds the text embeddings, capability matrix and config; call it on each
    chunk of points as it arrives (e.g. newly observed voxels of a live map).

    Example::

        fuser = FeatureFuser(text, table.matrix(["A", "B"], vocab), FusionConfig())
        for feats_a, feats_b, mask_a, mask_b in chunks:
            out = fuser([feats_a, feats_b], [mask_a, mask_b])   # (n, C)
    """

    def __init__(self, text=None, capability=None, config: Optional[FusionConfig] = None, device=None):
        self.config = config or FusionConfig()
        self.device = device
        self.text = None if text is None else _as_tensor(text, device)
        self.capability = None if capability is None else _as_tensor(capability, device).float()

    def __call__(self, features: Sequence, masks: Optional[Sequence] = None):
        feats = [_as_tensor(f, self.device) for f in features]
        dev = feats[0].device
        text = None if self.text is None else self.text.to(dev)
        cap = None if self.capability is None else self.capability.to(dev)
        return fuse(feats, text, cap, masks, self.config)

    def stream(self, chunks: Iterable) -> Iterator:
        """Fuse an iterable of ``(features_list, masks_list_or_None)``; yields (n, C) per chunk."""
        for item in chunks:
            features, masks = item
            yield self(features, masks)
