"""The Teacher protocol shared by every 2D teacher.

A teacher turns one RGB-D :class:`~sas_core.types.Frame` into a CLIP-aligned feature per pixel:

    features(frame) -> (features (H, W, C) torch float16/float32, rows L2-normalised,
                        valid (H, W) torch bool)

Pixels without a prediction (a mask teacher's uncovered pixels) have ``valid == False`` and
zero features. ``C`` is the ``dim`` of the shared text encoder the teacher is aligned to.
Per-point sources (OpenScene's precomputed fused features) follow :class:`PointTeacher` instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol, Tuple, runtime_checkable

import numpy as np

from sas_core.types import CameraIntrinsics, Frame

if TYPE_CHECKING:  # pragma: no cover
    import torch


@runtime_checkable
class Teacher(Protocol):
    """A 2D teacher. Attributes: ``name`` (str, used in capability tables), ``dim`` (C)."""

    name: str
    dim: int

    def features(self, frame: Frame) -> Tuple["torch.Tensor", "torch.Tensor"]:
        """(features (H, W, C) float16/32 L2-normalised, valid (H, W) bool) on the CPU."""
        ...


@runtime_checkable
class PointTeacher(Protocol):
    """A source of per-point 2D features already fused onto a scene's points."""

    name: str
    dim: int

    def point_features(self, scene: str) -> Tuple["torch.Tensor", "torch.Tensor"]:
        """(features (N, C) float16, mask (N,) bool) for the N points of ``scene``."""
        ...


def frame_from_image(rgb: np.ndarray, semantic: Optional[np.ndarray] = None,
                     instance: Optional[np.ndarray] = None, stamp: float = 0.0) -> Frame:
    """Wrap a bare RGB image (e.g. a synthesised capability image) as a Frame for a teacher.

    Depth is a constant 1 m and the pose the identity; teachers that need geometry do not use it.

    Args:
        rgb: (H, W, 3) uint8.
        semantic / instance: optional (H, W) int64 ground truth (for simulated teachers).
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    h, w = rgb.shape[:2]
    intr = CameraIntrinsics(fx=float(w), fy=float(w), cx=(w - 1) / 2, cy=(h - 1) / 2, width=w, height=h)
    return Frame(color=rgb, depth=np.ones((h, w), np.float32), intrinsics=intr, pose=np.eye(4),
                 stamp=stamp, semantic=None if semantic is None else np.asarray(semantic, np.int64),
                 instance=None if instance is None else np.asarray(instance, np.int64))


def check_teacher_output(features, valid, height: int, width: int, dim: int) -> None:
    """Raise ValueError unless (features, valid) follow the Teacher contract (shapes, dtypes)."""
    import torch

    if tuple(features.shape) != (height, width, dim):
        raise ValueError(f"teacher features are {tuple(features.shape)}, expected {(height, width, dim)}")
    if features.dtype not in (torch.float16, torch.float32):
        raise ValueError(f"teacher features must be float16/float32, got {features.dtype}")
    if tuple(valid.shape) != (height, width) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be ({height}, {width}) bool, got {tuple(valid.shape)} {valid.dtype}")
