"""Instance proposals on the synthetic world: mesh superpoints, simulated mask teacher, fused features.

The synthetic world's stand-ins for the real inputs of :func:`~sas_core.instances.pipeline.propose_instances`:
superpoints from the room mesh (as ScanNet's come from its meshes), masks from the simulated mask
teacher (``SimulatedTeacher.mask_ids``: wobbly borders, gaps, missed objects; or the rendered
instance images as an oracle), per-point features fused from the simulated dense teacher with the
multi-view fusion rule. Everything here is synthetic and says so nowhere else: callers report it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

MASK_SOURCES = ("teacher", "oracle", "none")


def scene_superpoints(scene) -> np.ndarray:
    """(N,) superpoints of a SyntheticScene's surface samples, segmented on the room mesh."""
    from sas_core.train.datasets import mesh_point_superpoints

    pc = scene.points
    if "triangle" not in pc.extra:
        raise ValueError("the scene's points do not record their triangles (points.extra['triangle'])")
    return mesh_point_superpoints(scene.vertices, scene.triangles, pc.extra["triangle"])


def simulated_teachers(encoder, seed: int = 0, vocabulary: Optional[Sequence[str]] = None):
    """(dense, mask) simulated teachers of the synthetic world (:func:`make_simulated_pair`)."""
    from sas_core.teachers.simulated import make_simulated_pair

    return make_simulated_pair(encoder, seed=seed, vocabulary=vocabulary)


def fused_dense_features(scene, dense_teacher):
    """(N, C) fp16 torch features of the scene's points fused from ``dense_teacher`` (zero where unseen)."""
    from sas_core.geometry.multiview import fuse_frames

    return fuse_frames(scene.points.positions, scene.frames, dense_teacher, progress=False).features


def fused_teacher_features(scene, teachers, text, kind: str = "capability"):
    """(N, C) float32 torch features of the scene's points from both simulated teachers.

    ``kind``: "dense" (the dense teacher alone), "add" (plain mean of both) or "capability"
    (SAS's capability-guided fusion, eq. 6-8; the teachers' true per-class accuracies,
    ``SimulatedTeacher.expected_accuracy()``, stand in for the probe-measured capability table
    that ``sas capability`` builds).
    """
    import torch

    from sas_core.fusion import add_fusion, capability_fusion
    from sas_core.geometry.multiview import fuse_frames

    dense, mask_teacher = teachers
    fd = fuse_frames(scene.points.positions, scene.frames, dense, progress=False)
    if kind == "dense":
        return fd.features.float()
    fm = fuse_frames(scene.points.positions, scene.frames, mask_teacher, progress=False)
    feats, masks = [fd.features.float(), fm.features.float()], [fd.mask, fm.mask]
    if kind == "add":
        return add_fusion(feats, masks)
    if kind != "capability":
        raise ValueError(f"kind must be 'dense', 'add' or 'capability', got {kind!r}")
    cap = torch.as_tensor(np.stack([dense.expected_accuracy(), mask_teacher.expected_accuracy()]), dtype=torch.float32)
    return capability_fusion(feats, torch.as_tensor(text, dtype=torch.float32), cap, 0.05, masks)


def synthetic_instances(scene, encoder, class_names: Sequence[str], text, masks: str = "teacher", seed: int = 0,
                        features=None, superpoints=None, config=None, teachers=None):
    """Labelled instance proposals of one synthetic room.

    Args:
        scene: a :class:`sas_core.data.synthetic.SyntheticScene` with frames.
        encoder: the synthetic text encoder; ``class_names``/``text``: the vocabulary and its (K, C) embeddings.
        masks: "teacher" (simulated mask teacher), "oracle" (rendered instance images) or "none"
            (the region-growing fallback on the features).
        seed: teacher seed; ``teachers``: an optional (dense, mask) pair to reuse.
        features: optional (N, C) per-point features (default: fused from the simulated dense teacher).
        superpoints: optional (N,) ids (default :func:`scene_superpoints`).
        config: :class:`~sas_core.instances.clustering.InstanceConfig`.

    Returns:
        (instances, features, superpoints).
    """
    from sas_core.instances.masks import frame_instance_masks
    from sas_core.instances.pipeline import propose_instances

    if masks not in MASK_SOURCES:
        raise ValueError(f"masks must be one of {', '.join(MASK_SOURCES)}, got {masks!r}")
    dense, mask_teacher = teachers or simulated_teachers(encoder, seed, class_names)
    if features is None:
        features = fused_dense_features(scene, dense)
    sp = scene_superpoints(scene) if superpoints is None else superpoints
    source = {"teacher": mask_teacher.mask_ids, "oracle": frame_instance_masks, "none": None}[masks]
    inst = propose_instances(scene.points.positions, sp, scene.frames if source else None, source,
                             features=features, text=text, class_names=list(class_names), config=config)
    return inst, features, sp
