"""3D distillation (SAS section 3.4-3.5): datasets and batching, losses, temporal ensembling
self-distillation, the training loop with checkpoints / resume / DDP.

* :mod:`sas_core.train.datasets`: :class:`SceneData`, :class:`OpenSceneScenes` (ScanNet /
  Matterport3D / nuScenes in the OpenScene layout), the synthetic world, :class:`VoxelDataset`,
  :func:`collate`.
* :mod:`sas_core.train.losses`: point / superpoint cosine losses, TESD cross-entropies.
* :mod:`sas_core.train.tesd`: :class:`TemporalEnsemble` (per-scene fp16 EMA of outputs).
* :mod:`sas_core.train.distill`: :class:`DistillConfig`, :class:`Distiller`, ``distill()``.
* :mod:`sas_core.train.scene_labels`: scene-level label lists (3DSS-VLG), masked argmax (-999).
* :mod:`sas_core.train.adapter`: 3DSS-VLG's embeddings-specialisation adapter.
* :mod:`sas_core.train.masks`: 2D masks back-projected onto points, the mask-level loss (MaskField / XMask3D).

Names are imported lazily (``from sas_core.train import Distiller`` loads the submodule on use).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SceneData": "datasets", "OpenSceneScenes": "datasets", "VoxelDataset": "datasets", "DataConfig": "datasets",
    "collate": "datasets", "scene_from_arrays": "datasets", "synthetic_scene_data": "datasets",
    "TemporalEnsemble": "tesd",
    "DistillConfig": "distill", "Distiller": "distill", "DistillResult": "distill",
    "predict_labels": "distill", "scene_point_features": "distill",
    "load_scene_labels": "scene_labels", "masked_text_labels": "scene_labels",
    "AdapterConfig": "adapter", "specialize_scenes": "adapter",
    "SceneMasks": "masks", "scene_masks_from_views": "masks", "mask_loss": "masks",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"sas_core.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'sas_core.train' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
