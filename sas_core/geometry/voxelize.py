"""Points to voxels (2 cm indoor / 5 cm outdoor) and OpenScene-style 3D augmentation.

:func:`voxelize` quantises points to integer voxel indices ``floor(p / voxel_size)`` and returns
the unique voxels, the point->voxel inverse map and one representative point per voxel (its
first point, as MinkowskiEngine's ``sparse_quantize`` with ``return_index``).

:func:`voxelize_augmented` reproduces OpenScene's training pipeline (``dataset/point_loader.py``
+ ``voxelizer.py``): elastic distortion of the points (granularity/magnitude pairs
``((0.2, 0.4), (0.8, 1.6))`` in metres, probability 0.95), a random rotation (small tilts about
x and y, full turn about z, applied in random order), a random scale in ``[0.9, 1.1]``, floor
to voxels, shift to a zero minimum, and a random horizontal flip of the voxel coordinates (each
of x, y with probability 0.5, overall 0.95). Point jitter (Gaussian, off by default) is extra.
NumPy only (SciPy for the elastic noise); no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from sas_core.config import opt

__all__ = ["voxelize", "AugmentConfig", "rotation_matrix", "random_rotation", "elastic_distortion",
           "random_flip", "jitter", "voxelize_augmented", "batch_coordinates", "INDOOR_VOXEL", "OUTDOOR_VOXEL"]

INDOOR_VOXEL = 0.02
OUTDOOR_VOXEL = 0.05


def _check_points(points) -> np.ndarray:
    p = np.asarray(points)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got shape {p.shape}")
    if p.shape[0] == 0:
        raise ValueError("cannot voxelize an empty point cloud")
    if not np.isfinite(p).all():
        bad = int((~np.isfinite(p).all(1)).sum())
        raise ValueError(f"points contain {bad} non-finite (NaN/inf) rows; drop invalid points first")
    return p


def voxelize(points, voxel_size: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantise points to unique voxels.

    Args:
        points: (N, 3) float coordinates (metres).
        voxel_size: voxel edge length (metres), > 0 (2 cm indoor, 5 cm outdoor).
    Returns:
        coords (M, 3) int32 voxel indices ``floor(p / voxel_size)`` sorted by (x, y, z);
        inverse (N,) int64 voxel row of each point (``coords[inverse]`` is each point's voxel);
        first (M,) int64 index of the first point falling in each voxel.
    """
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be > 0, got {voxel_size}")
    p = _check_points(points)
    q = np.floor(p.astype(np.float64) / float(voxel_size)).astype(np.int64)
    return _unique_voxels(q)


def _unique_voxels(q: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo = q.min(0)
    span = q.max(0) - lo + 1
    if float(span[0]) * float(span[1]) * float(span[2]) >= 2.0 ** 62:
        raise ValueError("point cloud extent too large for this voxel size")
    qs = q - lo
    keys = (qs[:, 0] * span[1] + qs[:, 1]) * span[2] + qs[:, 2]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    if np.abs(q[first]).max(initial=0) >= 2 ** 31:
        raise ValueError("voxel indices overflow int32; use a larger voxel size")
    return q[first].astype(np.int32), inverse.reshape(-1).astype(np.int64), first.astype(np.int64)


def batch_coordinates(coords_list: Sequence[np.ndarray]) -> np.ndarray:
    """Stack per-scene (M_i, 3) voxel coordinates into (sum M_i, 4) int32 ``[batch, x, y, z]``."""
    parts = [np.concatenate([np.full((len(c), 1), i, np.int32), np.asarray(c, np.int32)], 1)
             for i, c in enumerate(coords_list)]
    return np.concatenate(parts, 0) if parts else np.zeros((0, 4), np.int32)


@dataclass
class AugmentConfig:
    """OpenScene's 3D augmentation parameters (dataset/point_loader.py)."""

    scale_bound: Tuple[float, float] = opt((0.9, 1.1), "random isotropic scale range")
    rotation_bound: Tuple[Optional[Tuple[float, float]], ...] = opt(
        ((-np.pi / 64, np.pi / 64), (-np.pi / 64, np.pi / 64), (-np.pi, np.pi)), "per-axis angle ranges (rad)")
    elastic_params: Optional[Tuple[Tuple[float, float], ...]] = opt(((0.2, 0.4), (0.8, 1.6)),
                                                                    "(granularity, magnitude) pairs in metres")
    elastic_prob: float = opt(0.95, "probability of applying the elastic distortion")
    flip_prob: float = opt(0.95, "probability of considering horizontal flips at all")
    upright_axis: int = opt(2, "axis never flipped (z up)")
    jitter_std: float = opt(0.0, "Gaussian point jitter std (m), 0 = off (not in OpenScene)")
    jitter_clip: float = opt(0.05, "jitter clipped to +- this (m)")


def rotation_matrix(axis, theta: float) -> np.ndarray:
    """(3, 3) rotation by ``theta`` radians about ``axis`` (right-handed, Rodrigues)."""
    a = np.asarray(axis, np.float64)
    a = a / np.linalg.norm(a)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(theta) * K + (1 - np.cos(theta)) * (K @ K)


def random_rotation(rng: np.random.Generator, bounds=AugmentConfig.rotation_bound) -> np.ndarray:
    """Product of per-axis random rotations in random order (OpenScene's voxelizer)."""
    mats = []
    for axis_ind, bound in enumerate(bounds):
        axis = np.zeros(3)
        axis[axis_ind] = 1
        theta = rng.uniform(*bound) if bound is not None else 0.0
        mats.append(rotation_matrix(axis, theta))
    order = rng.permutation(len(mats))
    return mats[order[0]] @ mats[order[1]] @ mats[order[2]]


def elastic_distortion(points: np.ndarray, granularity: float, magnitude: float,
                       rng: np.random.Generator) -> np.ndarray:
    """Smooth random displacement field (noise on a ``granularity`` grid, box-blurred twice
    along each axis, trilinearly interpolated) times ``magnitude``; (N, 3) -> (N, 3)."""
    from scipy.interpolate import RegularGridInterpolator
    from scipy.ndimage import convolve1d

    p = np.asarray(points, np.float64)
    lo = p.min(0)
    noise_dim = ((p - lo).max(0) // granularity).astype(int) + 3
    noise = rng.standard_normal((*noise_dim, 3)).astype(np.float32)
    box = np.ones(3, np.float32) / 3
    for _ in range(2):
        for ax in range(3):
            noise = convolve1d(noise, box, axis=ax, mode="constant", cval=0.0)
    axes = [np.linspace(a - granularity, a + granularity * (d - 2), d) for a, d in zip(lo, noise_dim)]
    interp = RegularGridInterpolator(axes, noise, bounds_error=False, fill_value=0.0)
    return p + interp(p) * magnitude


def random_flip(coords: np.ndarray, rng: np.random.Generator, upright_axis: int = 2,
                prob: float = 0.95) -> np.ndarray:
    """Flip each horizontal axis (``c -> max(c) - c``) with probability 0.5 (overall ``prob``)."""
    c = np.array(coords, copy=True)
    if rng.random() < prob:
        for ax in range(3):
            if ax != upright_axis and rng.random() < 0.5:
                c[:, ax] = c[:, ax].max() - c[:, ax]
    return c


def jitter(points: np.ndarray, std: float, clip: float, rng: np.random.Generator) -> np.ndarray:
    """Add clipped Gaussian noise (std, clip in metres) to (N, 3) points."""
    return points + np.clip(rng.normal(0.0, std, size=points.shape), -clip, clip)


def voxelize_augmented(points, voxel_size: float, config: Optional[AugmentConfig] = None,
                       rng: Optional[np.random.Generator] = None, augment: bool = True):
    """OpenScene training voxelisation with augmentation.

    Args:
        points: (N, 3) metres.
        voxel_size: voxel edge (m).
        config: augmentation parameters (defaults = OpenScene).
        rng: NumPy generator (seeded by the caller for reproducibility).
        augment: False gives plain voxelisation shifted to a zero minimum (evaluation).
    Returns:
        coords (M, 3) int32 (min 0), inverse (N,) int64, first (M,) int64, transform (4, 4) float64
        mapping (distorted) points to continuous voxel coordinates before flooring.
    """
    cfg = config or AugmentConfig()
    rng = rng if rng is not None else np.random.default_rng()
    p = _check_points(points).astype(np.float64)
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be > 0, got {voxel_size}")
    T = np.eye(4)
    if augment:
        if cfg.elastic_params and rng.random() < cfg.elastic_prob:
            for gran, mag in cfg.elastic_params:
                p = elastic_distortion(p, gran, mag, rng)
        if cfg.jitter_std > 0:
            p = jitter(p, cfg.jitter_std, cfg.jitter_clip, rng)
        scale = rng.uniform(*cfg.scale_bound) / voxel_size
        T[:3, :3] = random_rotation(rng, cfg.rotation_bound) * scale
    else:
        T[:3, :3] = np.eye(3) / voxel_size
    q = np.floor(p @ T[:3, :3].T)
    lo = q.min(0)
    T[:3, 3] = -lo
    q = (q - lo).astype(np.int64)
    coords, inverse, first = _unique_voxels(q)
    if augment:
        coords = random_flip(coords, rng, cfg.upright_axis, cfg.flip_prob)
    return coords, inverse, first, T
