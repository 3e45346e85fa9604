"""2D teachers: CLIP-aligned per-pixel features from images (SAS step 1), all in one text space.

* :class:`~sas_core.teachers.dense_clip.DenseClipTeacher`: dense CLIP (MaskCLIP / SCLIP /
  ClearCLIP / NACLIP last-block recipes), the stand-in for LSeg.
* :class:`~sas_core.teachers.mask_teacher.MaskClipTeacher`: SAM masks labelled by CLIP crops and
  aligned via text, the stand-in for SEEM.
* :class:`~sas_core.teachers.simulated.SimulatedTeacher`: ground-truth-driven teachers with
  realistic, instance-coherent confusions for the synthetic world.
* :class:`~sas_core.teachers.precomputed.PrecomputedTeacher`: OpenScene's fused LSeg/OpenSeg
  point features.

Build them by name with :func:`~sas_core.teachers.registry.build_teachers` (:data:`TEACHERS`).
The protocol is in :mod:`sas_core.teachers.base`. Names are imported lazily so that
``import sas_core.teachers`` does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Teacher": "base", "PointTeacher": "base", "frame_from_image": "base", "check_teacher_output": "base",
    "DenseClipConfig": "dense_clip", "DenseClipTeacher": "dense_clip", "RECIPES": "dense_clip",
    "MaskTeacherConfig": "mask_teacher", "MaskClipTeacher": "mask_teacher", "MaskPrediction": "mask_teacher",
    "load_sam": "mask_teacher", "build_tiny_sam": "mask_teacher",
    "SimulatedTeacherConfig": "simulated", "SimulatedTeacher": "simulated", "make_simulated_pair": "simulated",
    "PrecomputedConfig": "precomputed", "PrecomputedTeacher": "precomputed",
    "TEACHERS": "registry", "TeacherOptions": "registry", "build_teachers": "registry", "build_teacher": "registry",
    # open_clip loading lives in sas_core.clip (below both teachers and sas_core.text); re-exported here
    "load_open_clip": "sas_core.clip", "build_tiny_clip": "sas_core.clip", "save_tiny_clip": "sas_core.clip",
    "register_tiny_clip": "sas_core.clip",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        where = _EXPORTS[name]
        module = importlib.import_module(where if "." in where else f"sas_core.teachers.{where}")
        return getattr(module, name)
    raise AttributeError(f"module 'sas_core.teachers' has no attribute {name!r}")
