"""Temporal ensembling self-distillation (TESD) state: a per-scene running average of outputs.

SAS section 3.4, eq. 11-12: for every training scene we keep ``F_hat = alpha * F_hat + (1 - alpha)
* F3D`` over the training steps that see the scene, average it over superpoints, and take the
argmax against the class text embeddings as pseudo-labels.

Storage. One (N, C) float16 tensor per scene, indexed by the scene's *original points* (not
voxels: augmentation changes the voxelisation every epoch, points stay), each point taking the
output of the voxel it falls in. 100k points x 512 channels is 100 MB per scene in fp16; the state
is kept in memory and saved inside the training checkpoint (``state_dict``), so resuming restores
exactly the history of the interrupted run. For datasets whose history does not fit in memory,
``offload_dir`` keeps each scene's tensor in its own file (written atomically) instead of in
memory; :meth:`state_dict` still returns every history, for the checkpoint.

Initialisation follows the authors' public code: when stage 2 starts, every scene's history is
set to the current network's superpoint-averaged prediction (:meth:`initialize`).
Pseudo-labels (eq. 12): the argmax of the superpoint-averaged ensemble, for superpoints and (as in
the public code) for their points; the literal per-point argmax is an option.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from sas_core.text import text_labels
from sas_core.train.losses import contiguous_ids, segment_mean


class TemporalEnsemble:
    """Per-scene exponential average of network outputs, stored compactly in float16.

    Args:
        alpha: EMA constant in [0, 1) (``F_hat = alpha F_hat + (1 - alpha) F``).
        offload_dir: optional folder; when given, scene histories live in ``<dir>/<scene>.pt``
            instead of memory.
    """

    def __init__(self, alpha: float = 0.99, offload_dir: Optional[str] = None):
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"TESD alpha must be in [0, 1), got {alpha}")
        self.alpha = float(alpha)
        self.offload_dir = Path(offload_dir) if offload_dir else None
        self._mem: Dict[str, torch.Tensor] = {}
        if self.offload_dir:
            self.offload_dir.mkdir(parents=True, exist_ok=True)

    # -- storage ---------------------------------------------------------------------------------
    def _file(self, scene: str) -> Path:
        return self.offload_dir / f"{scene}.pt"

    def scenes(self) -> list:
        if self.offload_dir:
            return sorted(p.stem for p in self.offload_dir.glob("*.pt"))
        return sorted(self._mem)

    def __contains__(self, scene: str) -> bool:
        return self._file(scene).exists() if self.offload_dir else scene in self._mem

    def get(self, scene: str) -> torch.Tensor:
        """(N, C) float16 history of ``scene``."""
        if scene not in self:
            raise KeyError(f"no TESD history for scene {scene!r}")
        if self.offload_dir:
            from sas_core.io import load_torch_file

            value = load_torch_file(self._file(scene), what="TESD history")
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{self._file(scene)}: TESD history must be a tensor, got {type(value).__name__}")
            return value
        return self._mem[scene]

    def _put(self, scene: str, value: torch.Tensor) -> None:
        value = value.detach().to("cpu", torch.float16).contiguous()
        if self.offload_dir:
            from sas_core.io import atomic_path

            with atomic_path(self._file(scene)) as tmp:
                torch.save(value, tmp)
        else:
            self._mem[scene] = value

    # -- method ----------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, scene: str, features: torch.Tensor, superpoints: Optional[torch.Tensor] = None) -> None:
        """Start ``scene``'s history from per-point outputs (N, C), superpoint-averaged if given."""
        features = features.detach().float()
        if superpoints is not None:
            ids, n = contiguous_ids(superpoints.to(features.device))
            means, _ = segment_mean(features, ids, n)
            features = means[ids]
        self._put(scene, features)

    @torch.no_grad()
    def update(self, scene: str, features: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """EMA-update rows ``index`` (P,) (all rows if None) with outputs (P, C); returns them (P, C) f32.

        A scene without history is initialised with ``features`` (needs ``index`` None).
        """
        features = features.detach().float()
        if scene not in self:
            if index is not None:
                raise ValueError(f"scene {scene!r} has no TESD history yet; initialise it with all points")
            self._put(scene, features)
            return features
        hist = self.get(scene)
        rows = hist.float() if index is None else hist[index.cpu()].float()
        if rows.shape != features.shape:
            raise ValueError(f"TESD history rows {tuple(rows.shape)} vs outputs {tuple(features.shape)} for {scene!r}")
        new = self.alpha * rows.to(features.device) + (1.0 - self.alpha) * features
        if index is None:
            hist = new
        else:
            hist = hist.clone() if self.offload_dir is None else hist
            hist[index.cpu()] = new.to("cpu", torch.float16)
        self._put(scene, hist)
        return new

    @staticmethod
    @torch.no_grad()
    def guide_with_fused(sp_labels: torch.Tensor, means: torch.Tensor, fused: torch.Tensor, supervised: torch.Tensor,
                         ids: torch.Tensor, n: int, text: torch.Tensor) -> torch.Tensor:
        """OpenScene's 2D-3D ensemble rule applied to the superpoint pseudo-labels (NOT in the paper): per
        superpoint, the label of the mean fused 2D feature over its supervised voxels where that has the
        higher cosine text score than the ensemble mean ``means`` (L, C); superpoints without a fused
        voxel keep ``sp_labels``. Keeps the classes the 2D teachers see and the network has lost."""
        sup = supervised.to(torch.bool)
        if not bool(sup.any()):
            return sp_labels
        fused_means, counts = segment_mean(fused[sup].float(), ids[sup], n)
        l2, s2 = text_labels(fused_means, text, normalize=True)
        _, s3 = text_labels(means, text, normalize=True)
        take = (counts > 0) & (s2 > s3)
        return torch.where(take, l2, sp_labels)

    @staticmethod
    @torch.no_grad()
    def pseudo_labels(ensemble: torch.Tensor, seg: torch.Tensor, text: torch.Tensor,
                      point_from_superpoint: bool = True, allowed: Optional[torch.Tensor] = None,
                      fused: Optional[torch.Tensor] = None, supervised: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Eq. 12: (point labels (M,), superpoint labels (L,)) from the ensemble and the text.

        ``ensemble`` (M, C), ``seg`` (M,) superpoint ids (made contiguous, sorted unique order),
        ``text`` (K, C). Superpoint labels are the argmax of the superpoint-mean ensemble. Point
        labels: with ``point_from_superpoint`` (default, as the authors' public code) each point
        takes its superpoint's label (the superpoint-averaged ensemble mapped back onto the
        points); otherwise the argmax of the point's own ensemble (eq. 12 read literally).
        ``allowed``: optional (M, K) bool, the classes of each row's scene-level label list
        (3DSS-VLG, :mod:`sas_core.train.scene_labels`): absent classes get -999 before the argmax,
        so no pseudo-label names a class absent from its scene (a superpoint lies in one scene).
        ``fused`` (M, C) and ``supervised`` (M,) bool: the rows' fused 2D targets; when given, superpoint
        labels follow :meth:`guide_with_fused` (not in the paper; without ``allowed`` only).
        """
        ids, n = contiguous_ids(seg)
        means, _ = segment_mean(ensemble.float(), ids, n)
        if allowed is None:
            sp = text_labels(means, text, normalize=True)[0]
            if fused is not None:
                sp = TemporalEnsemble.guide_with_fused(sp, means, fused, supervised, ids, n, text)
            point = sp[ids] if point_from_superpoint else text_labels(ensemble, text, normalize=True)[0]
            return point, sp
        if fused is not None:
            raise ValueError("fused-guided pseudo-labels are not combined with scene-level labels")
        from sas_core.train.scene_labels import masked_text_labels

        allowed = allowed.to(torch.bool)
        sp_allowed = torch.zeros((n, allowed.shape[1]), dtype=torch.bool, device=allowed.device)
        sp_allowed[ids] = allowed  # every row of a superpoint has the same list
        sp = masked_text_labels(means, text, sp_allowed)[0]
        point = sp[ids] if point_from_superpoint else masked_text_labels(ensemble, text, allowed)[0]
        return point, sp

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain data for a checkpoint: alpha and every scene's fp16 history."""
        return {"alpha": self.alpha, "scenes": {s: self.get(s) for s in self.scenes()}}

    def load_state_dict(self, state: dict) -> None:
        self.alpha = float(state["alpha"])
        if self.offload_dir:
            for p in self.offload_dir.glob("*.pt"):
                os.unlink(p)
        self._mem = {}
        for scene, value in state["scenes"].items():
            self._put(scene, value)

    def merge(self, state: dict) -> None:
        """Add the scenes of another ensemble's ``state_dict`` (used to gather DDP ranks)."""
        for scene, value in state["scenes"].items():
            self._put(scene, value)

    def nbytes(self) -> int:
        return sum(t.numel() * 2 for t in (self.get(s) for s in self.scenes()))

    def __repr__(self) -> str:
        return f"TemporalEnsemble(alpha={self.alpha}, scenes={len(self.scenes())})"

