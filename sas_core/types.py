"""Named containers shared by every part of the library.

Conventions (the same as ScanNet / OpenScene):

* Cameras follow the OpenCV pinhole model: +x right, +y down, +z forward (optical frame).
* Poses are camera-to-world 4x4 homogeneous matrices (float64).
* Depth is metric (float32 metres); invalid depth is 0 or NaN.
* Colours are uint8 RGB in images and float32 in [0, 1] in point clouds.
* Semantic labels are int64 class indices into a vocabulary; 255 means "ignore".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

IGNORE_LABEL = 255


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole intrinsics of an image of ``width`` x ``height`` pixels."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    @property
    def K(self) -> np.ndarray:
        """(3, 3) float64 intrinsic matrix."""
        return np.array(
            [[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]], dtype=np.float64
        )

    @classmethod
    def from_matrix(cls, K, width: int, height: int) -> "CameraIntrinsics":
        """From a 3x3 (or 4x4, as ScanNet's ``intrinsic_color.txt``) matrix."""
        K = np.asarray(K, dtype=np.float64)
        if K.shape not in ((3, 3), (4, 4)):
            raise ValueError(f"intrinsic matrix must be 3x3 or 4x4, got shape {K.shape}")
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        return cls(float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]), int(width), int(height))

    def scaled(self, width: int, height: int) -> "CameraIntrinsics":
        """The same camera for the image resized to ``width`` x ``height``.

        Uses the pixel-edge convention (a pixel centre at u maps to (u + 0.5) * s - 0.5).
        """
        sx, sy = width / self.width, height / self.height
        return CameraIntrinsics(
            self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5,
            int(width), int(height),
        )


@dataclass
class Frame:
    """One RGB-D observation.

    Attributes:
        color: (H, W, 3) uint8 RGB.
        depth: (H, W) float32 metres; 0 or NaN where unknown.
        intrinsics: camera model of ``color`` and ``depth`` (same size).
        pose: (4, 4) float64 camera-to-world.
        stamp: seconds.
        semantic: optional (H, W) int64 ground-truth class per pixel (255 = none).
        instance: optional (H, W) int64 ground-truth instance id per pixel (-1 = none).
    """

    color: np.ndarray
    depth: np.ndarray
    intrinsics: CameraIntrinsics
    pose: np.ndarray
    stamp: float = 0.0
    semantic: Optional[np.ndarray] = None
    instance: Optional[np.ndarray] = None
    frame_id: str = "camera"

    def __post_init__(self):
        h, w = self.intrinsics.height, self.intrinsics.width
        if self.depth.shape != (h, w):
            raise ValueError(f"depth is {self.depth.shape}, intrinsics say {(h, w)}")
        if self.color is not None and self.color.shape[:2] != (h, w):
            raise ValueError(f"color is {self.color.shape[:2]}, intrinsics say {(h, w)}")
        if np.asarray(self.pose).shape != (4, 4):
            raise ValueError(f"pose must be 4x4, got {np.asarray(self.pose).shape}")


@dataclass
class PointCloud:
    """A point cloud with optional per-point attributes (Open3D-style names).

    Attributes:
        positions: (N, 3) float32 metres (world frame unless stated otherwise).
        colors: optional (N, 3) float32 in [0, 1].
        normals: optional (N, 3) float32 unit vectors.
        labels: optional (N,) int64 semantic class (255 = ignore).
        instances: optional (N,) int64 instance id (-1 = none).
    """

    positions: np.ndarray
    colors: Optional[np.ndarray] = None
    normals: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    instances: Optional[np.ndarray] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.positions = np.asarray(self.positions, dtype=np.float32).reshape(-1, 3)
        n = len(self.positions)
        for name in ("colors", "normals", "labels", "instances"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} rows, positions has {n}")

    def __len__(self) -> int:
        return len(self.positions)

    def select(self, index) -> "PointCloud":
        """A new cloud with the rows selected by ``index`` (boolean mask or indices)."""
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return replace(
            self,
            positions=self.positions[index],
            colors=pick(self.colors),
            normals=pick(self.normals),
            labels=pick(self.labels),
            instances=pick(self.instances),
            extra={k: v[index] for k, v in self.extra.items()},
        )
