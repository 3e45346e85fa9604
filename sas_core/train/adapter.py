"""3DSS-VLG's embeddings specialisation: a residual adapter on the fused 2D features (scene labels).

Stage "embeddings specialisation" (Xu et al., ECCV 2024; their public code): the fused 2D point
features are scored against the class text embeddings, the classes absent from the scene's label list
are masked out (-999) and the argmax gives a pseudo-label per point; a small residual adapter on the
2D features (CLIP-Adapter style: ``Linear(C, C / r) -> ReLU -> Linear(C / r, C) -> ReLU``, no biases,
``out = alpha * A(x) + (1 - alpha) * x``; the paper: 768 -> 192 -> 768, r = 4, alpha = 0.05) is trained
with cross-entropy between ``cos(adapter(x), text) / temperature`` and those masked pseudo-labels.
The cross-entropy runs over every class of the vocabulary, so the adapted features move away from the
classes a scene does not contain: that is the knowledge the scene lists add.

Stage "embeddings soft guidance": the 3D network is distilled with ``1 - cos`` against the adapted
features (our stage 1 / stage 2 with the adapted features as targets: :func:`specialize_scenes`
returns the scenes with their targets replaced). Scenes without a label list keep their fused
features as they are, and the adapter is trained only on scenes that have one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from sas_core.config import opt


@dataclass
class AdapterConfig:
    """The embeddings-specialisation adapter (defaults: 3DSS-VLG's)."""

    reduction: int = opt(4, "hidden width = feature size / reduction (768 -> 192)")
    alpha: float = opt(0.05, "residual ratio: out = alpha * adapter(x) + (1 - alpha) * x")
    epochs: int = opt(20, "passes over the supervised points of the labelled scenes")
    lr: float = opt(1e-2, "Adam learning rate (ours: alpha 0.05 damps the adapter's steps)")
    batch_size: int = opt(4096, "points per step")
    temperature: float = opt(0.07, "logits = cos(adapter(x), text) / temperature")
    seed: int = opt(0, "initialisation and point order")


def build_adapter(dim: int, config: Optional[AdapterConfig] = None):
    """The residual adapter module for ``dim``-d features."""
    import torch

    cfg = config or AdapterConfig()
    hidden = max(1, dim // max(1, cfg.reduction))

    class EmbeddingAdapter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Sequential(torch.nn.Linear(dim, hidden, bias=False), torch.nn.ReLU(inplace=True),
                                          torch.nn.Linear(hidden, dim, bias=False), torch.nn.ReLU(inplace=True))
            self.alpha = float(cfg.alpha)

        def forward(self, x):
            return self.alpha * self.fc(x) + (1.0 - self.alpha) * x

    return EmbeddingAdapter()


def masked_pseudo_labels(features, text, allowed):
    """(N,) int64 argmax of ``cos(features, text)`` over the scene's classes (``allowed`` (K,) bool)."""
    from sas_core.train.scene_labels import masked_text_labels

    return masked_text_labels(features, text, allowed)[0]


def train_adapter(scenes: Sequence, text, class_names: Sequence[str], config: Optional[AdapterConfig] = None,
                  device: str = "cpu"):
    """Train the adapter on the labelled scenes (``scene.classes`` set); returns (adapter, history).

    ``history``: one dict per epoch (mean loss, and the fraction of points whose adapted argmax over
    the whole vocabulary agrees with the masked pseudo-label)."""
    import torch

    from sas_core.train.losses import text_logits
    from sas_core.train.scene_labels import class_mask

    cfg = config or AdapterConfig()
    text = torch.as_tensor(text, dtype=torch.float32, device=device)
    xs, ys = [], []
    for s in scenes:
        if s.classes is None or s.features is None:
            continue
        x = torch.as_tensor(np.asarray(s.features, np.float32), device=device)
        xs.append(x)
        ys.append(masked_pseudo_labels(x, text, torch.as_tensor(class_mask(s.classes, class_names, s.name))))
    if not xs:
        raise ValueError("the adapter needs scenes with fused features and a scene label list")
    x, y = torch.cat(xs), torch.cat(ys)
    keep = x.abs().sum(1) > 0
    x, y = x[keep], y[keep]
    torch.manual_seed(cfg.seed)
    adapter = build_adapter(x.shape[1], cfg).to(device)
    opt_ = torch.optim.Adam(adapter.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x), generator=gen).to(device)
        total, agree = 0.0, 0
        for a in range(0, len(x), cfg.batch_size):
            idx = order[a:a + cfg.batch_size]
            logits = text_logits(adapter(x[idx]), text, cfg.temperature)
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            opt_.zero_grad(set_to_none=True)
            loss.backward()
            opt_.step()
            total += float(loss.detach()) * len(idx)
            agree += int((logits.argmax(1) == y[idx]).sum())
        history.append({"epoch": epoch + 1, "loss": total / len(x), "agree": agree / len(x)})
    adapter.eval()
    return adapter, history


def specialize_scenes(scenes: Sequence, text, class_names: Sequence[str], config: Optional[AdapterConfig] = None,
                      device: str = "cpu"):
    """Embeddings specialisation then soft-guidance targets: (scenes with adapted targets, history).

    Scenes with a label list get ``adapter(features)`` (fp16) as their distillation targets; the
    others are returned unchanged. The input scenes are not modified."""
    import torch

    adapter, history = train_adapter(scenes, text, class_names, config, device)
    out = []
    with torch.no_grad():
        for s in scenes:
            if s.classes is None or s.features is None:
                out.append(s)
                continue
            x = torch.as_tensor(np.asarray(s.features, np.float32), device=device)
            y = adapter(x)
            y[x.abs().sum(1) == 0] = 0  # points without a 2D feature stay without one
            out.append(dataclasses.replace(s, features=y.cpu().numpy().astype(np.float16)))
    return out, history
