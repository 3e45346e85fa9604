"""A depth-camera sensor model for the synthetic world (off by default).

The synthetic renderer gives perfect frames: exact z-depth everywhere, clean colour, the true
pose. Real RGB-D cameras do not. :func:`apply_sensor` turns rendered :class:`Frame` s into what a
sensor would report, with effects measured on real devices:

* **axial depth noise growing with range.** Kinect v1 (structured light):
  ``sigma_z = 0.0012 + 0.0019 (z - 0.4)^2`` m (Nguyen, Izadi, Lovell 2012, "Modeling Kinect
  sensor noise for improved 3D reconstruction and tracking", 3DIMPVT). Active stereo
  (RealSense-like): depth from disparity ``d = f b / z``, so a disparity error of
  ``sigma_d`` pixels gives ``sigma_z = z^2 sigma_d / (f b)`` (Intel's RMS-error formula with
  subpixel accuracy ``sigma_d``, baseline ``b``, focal length ``f`` in pixels).
* **disparity quantisation**: the sensor reports depth on a lattice of disparities
  ``k * step`` (Kinect v1: 1/8 pixel, f = 580 px, b = 7.5 cm), so depth steps grow as z^2.
* **missing depth**: outside the working range, at depth discontinuities (the projector's and
  the camera's views disagree, stereo matching fails on occlusion edges) and on dark, low-albedo
  surfaces (little reflected IR); each with its probability.
* **colour noise** (Gaussian, in 8-bit units) and a **per-frame exposure gain** (log-normal).
* **pose drift and jitter**: the Frame's reported pose is the true pose perturbed by a random
  walk (odometry drift, in translation and rotation) plus independent per-frame jitter. The
  image is still rendered from the true pose; the ground-truth images (semantic, instance) and
  the scene's surface points and labels stay exact. The true pose of frame ``stamp`` is
  ``scene.camera_pose(stamp)``.

Everything is seeded: the same frames, config and seed give the same bytes. The preset ``none``
returns the frames unchanged (the same objects), so the default synthetic world is bit-identical
to the one without a sensor model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np

from sas_core.config import opt, replace_checked
from sas_core.types import Frame

DEPTH_MODELS = ("none", "kinect", "stereo")


@dataclass
class SensorConfig:
    """Effects of :func:`apply_sensor`; every default is "off" (presets in :data:`SENSOR_PRESETS`)."""

    depth_model: str = opt("none", "axial depth noise: kinect (Nguyen et al. 2012) or stereo (z^2 sd / (f b))",
                           choices=DEPTH_MODELS)
    noise_scale: float = opt(1.0, "multiplies the depth-noise sigma")
    stereo_baseline_m: float = opt(0.05, "stereo baseline b (m) of the stereo noise model (RealSense D435: 50 mm)")
    stereo_subpixel: float = opt(0.08, "disparity RMS error sigma_d (pixels) of the stereo noise model")
    focal_px: Optional[float] = opt(None, "focal length (px) of the sensor's native resolution for the stereo "
                                          "noise and quantisation; None: the frame's fx")
    disparity_step_px: float = opt(0.0, "disparity quantisation step (px); 0: off (Kinect v1: 1/8)")
    quant_baseline_m: float = opt(0.075, "baseline (m) of the disparity quantisation (Kinect v1: 7.5 cm)")
    min_range_m: float = opt(0.0, "depth below this is missing (0: no limit)")
    max_range_m: float = opt(0.0, "depth above this is missing (0: no limit)")
    edge_jump: float = opt(0.05, "a pixel is a depth edge when a 4-neighbour's depth differs by more than this "
                                 "fraction of its own depth (or the neighbour has none)")
    edge_dropout: float = opt(0.0, "probability that depth is missing on a depth-edge pixel")
    dark_threshold: float = opt(0.1, "a pixel is dark when its luminance (0..1, before colour noise) is below this")
    dark_dropout: float = opt(0.0, "probability that depth is missing on a dark pixel")
    color_noise: float = opt(0.0, "Gaussian colour noise sigma (8-bit units)")
    exposure_sigma: float = opt(0.0, "per-frame exposure gain exp(N(0, sigma)) on the colour image")
    drift_trans_m: float = opt(0.0, "pose random walk: translation step sigma per frame (m, per axis)")
    drift_rot_deg: float = opt(0.0, "pose random walk: rotation step sigma per frame (deg, per axis)")
    jitter_trans_m: float = opt(0.0, "independent per-frame pose jitter, translation sigma (m, per axis)")
    jitter_rot_deg: float = opt(0.0, "independent per-frame pose jitter, rotation sigma (deg, per axis)")

    def __post_init__(self):
        if self.depth_model not in DEPTH_MODELS:
            raise ValueError(f"unknown depth_model {self.depth_model!r}; known: {', '.join(DEPTH_MODELS)}")
        for name in ("edge_dropout", "dark_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} is a probability, got {p}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and f.name not in ("edge_dropout", "dark_dropout") and v < 0:
                raise ValueError(f"{f.name} must be >= 0, got {v}")

    @property
    def is_identity(self) -> bool:
        return self == SensorConfig()


#: Named sensors: field values of :class:`SensorConfig`. Pose errors are those of a visual
#: odometry front end over a short sequence (a few mm and a tenth of a degree per frame at most).
SENSOR_PRESETS: Dict[str, dict] = {
    "none": {},
    "kinect": dict(depth_model="kinect", disparity_step_px=1 / 8, focal_px=580.0, quant_baseline_m=0.075,
                   min_range_m=0.4, max_range_m=4.5, edge_dropout=0.6, dark_dropout=0.5, dark_threshold=0.1,
                   color_noise=3.0, exposure_sigma=0.08, drift_trans_m=0.002, drift_rot_deg=0.05,
                   jitter_trans_m=0.002, jitter_rot_deg=0.1),
    "realsense": dict(depth_model="stereo", stereo_baseline_m=0.05, stereo_subpixel=0.08, focal_px=640.0,
                      disparity_step_px=1 / 32, quant_baseline_m=0.05, min_range_m=0.2, max_range_m=6.0,
                      edge_dropout=0.4, dark_dropout=0.3, dark_threshold=0.08, color_noise=2.0,
                      exposure_sigma=0.05, drift_trans_m=0.002, drift_rot_deg=0.05, jitter_trans_m=0.001,
                      jitter_rot_deg=0.05),
}


def sensor_config(preset: str = "none", **changes) -> SensorConfig:
    """A :class:`SensorConfig` from a preset of :data:`SENSOR_PRESETS`, then ``changes``."""
    if preset not in SENSOR_PRESETS:
        raise ValueError(f"unknown sensor preset {preset!r}; known: {', '.join(SENSOR_PRESETS)}")
    return replace_checked(SensorConfig(), **{**SENSOR_PRESETS[preset], **changes})


def depth_sigma(z, config: SensorConfig, fx: float) -> np.ndarray:
    """Axial noise sigma (m) at depth ``z`` (m) of the config's depth model (0 where z <= 0)."""
    z = np.asarray(z, np.float64)
    if config.depth_model == "kinect":
        s = 0.0012 + 0.0019 * (z - 0.4) ** 2
    elif config.depth_model == "stereo":
        f = config.focal_px or fx
        s = z ** 2 * config.stereo_subpixel / (f * config.stereo_baseline_m)
    else:
        s = np.zeros_like(z)
    return np.where(z > 0, config.noise_scale * s, 0.0)


def quantize_depth(z, config: SensorConfig, fx: float) -> np.ndarray:
    """Depth (m) snapped to the disparity lattice ``k * step`` (``k >= 1``); 0 stays 0."""
    z = np.asarray(z, np.float64)
    if config.disparity_step_px <= 0:
        return z
    fb = (config.focal_px or fx) * config.quant_baseline_m
    valid = z > 0
    d = np.where(valid, fb / np.where(valid, z, 1.0), 0.0)
    k = np.maximum(np.round(d / config.disparity_step_px), 1.0)
    return np.where(valid, fb / (k * config.disparity_step_px), 0.0)


def depth_edges(depth: np.ndarray, jump: float) -> np.ndarray:
    """(H, W) bool: valid pixels with a 4-neighbour whose depth differs by more than ``jump * z``
    (a neighbour without depth counts as a jump)."""
    z = np.asarray(depth, np.float64)
    valid = z > 0
    edge = np.zeros(z.shape, bool)
    for axis in (0, 1):
        for shift in (1, -1):
            nb = np.roll(z, shift, axis=axis)
            diff = np.abs(nb - z) > jump * z
            diff |= nb <= 0
            # np.roll wraps around: the wrapped row/column is not a neighbour
            idx = [slice(None), slice(None)]
            idx[axis] = 0 if shift == 1 else -1
            diff[tuple(idx)] = False
            edge |= diff
    return edge & valid


def luminance(color: np.ndarray) -> np.ndarray:
    """(H, W) Rec. 601 luma in [0, 1] of an 8-bit RGB image."""
    c = np.asarray(color, np.float64) / 255.0
    return 0.299 * c[..., 0] + 0.587 * c[..., 1] + 0.114 * c[..., 2]


def _rotation(rotvec) -> np.ndarray:
    """(3, 3) rotation of an axis-angle vector (Rodrigues)."""
    v = np.asarray(rotvec, np.float64)
    a = float(np.linalg.norm(v))
    if a < 1e-15:
        return np.eye(3)
    k = v / a
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(a) * K + (1 - math.cos(a)) * (K @ K)


def pose_errors(n: int, config: SensorConfig, seed: int) -> list:
    """``n`` (4, 4) world-frame perturbations ``E_k`` (drift random walk then jitter): the reported
    pose of frame k is ``R = dR_k R_true``, ``t = t_true + dt_k`` (rotation about the camera centre)."""
    rng = np.random.default_rng([int(seed), 16, 1])
    rot_walk, trans_walk = np.zeros(3), np.zeros(3)
    out = []
    for _ in range(n):
        rot_walk = rot_walk + rng.normal(0.0, math.radians(config.drift_rot_deg), 3)
        trans_walk = trans_walk + rng.normal(0.0, config.drift_trans_m, 3)
        rj = rng.normal(0.0, math.radians(config.jitter_rot_deg), 3)
        tj = rng.normal(0.0, config.jitter_trans_m, 3)
        E = np.eye(4)
        E[:3, :3] = _rotation(rj) @ _rotation(rot_walk)
        E[:3, 3] = trans_walk + tj
        out.append(E)
    return out


def perturb_pose(pose: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Reported pose: rotation ``E_R R``, centre ``t + E_t`` (the error rotates about the camera)."""
    out = np.array(pose, np.float64, copy=True)
    out[:3, :3] = error[:3, :3] @ out[:3, :3]
    out[:3, 3] = out[:3, 3] + error[:3, 3]
    return out


def apply_frame(frame: Frame, config: SensorConfig, seed: int, index: int,
                pose_error: Optional[np.ndarray] = None) -> Frame:
    """One frame through the sensor (``index``: its place in the sequence, seeds its noise)."""
    rng = np.random.default_rng([int(seed), 16, 2, int(index)])
    z_true = np.asarray(frame.depth, np.float64)
    valid = np.isfinite(z_true) & (z_true > 0)
    z_true = np.where(valid, z_true, 0.0)
    fx = float(frame.intrinsics.fx)
    z = z_true + rng.standard_normal(z_true.shape) * depth_sigma(z_true, config, fx)
    z = np.where(valid & (z > 0), z, 0.0)
    z = quantize_depth(z, config, fx)
    missing = np.zeros(z.shape, bool)
    if config.min_range_m > 0:
        missing |= valid & (z_true < config.min_range_m)
    if config.max_range_m > 0:
        missing |= valid & (z_true > config.max_range_m)
    if config.edge_dropout > 0:
        missing |= depth_edges(z_true, config.edge_jump) & (rng.random(z.shape) < config.edge_dropout)
    if config.dark_dropout > 0 and frame.color is not None:
        dark = valid & (luminance(frame.color) < config.dark_threshold)
        missing |= dark & (rng.random(z.shape) < config.dark_dropout)
    depth = np.where(missing, 0.0, z).astype(np.float32)
    color = frame.color
    if color is not None and (config.color_noise > 0 or config.exposure_sigma > 0):
        gain = math.exp(rng.normal(0.0, config.exposure_sigma)) if config.exposure_sigma > 0 else 1.0
        c = np.asarray(color, np.float64) * gain
        if config.color_noise > 0:
            c = c + rng.normal(0.0, config.color_noise, c.shape)
        color = np.clip(np.round(c), 0, 255).astype(np.uint8)
    pose = frame.pose if pose_error is None else perturb_pose(frame.pose, pose_error)
    return dataclasses.replace(frame, color=color, depth=depth, pose=pose)


def apply_sensor(frames: Sequence[Frame], config, seed: int = 0) -> list:
    """The frames of one sequence as the sensor reports them (``config``: a SensorConfig or a preset
    name). The identity config returns ``list(frames)`` unchanged."""
    if isinstance(config, str):
        config = sensor_config(config)
    frames = list(frames)
    if config.is_identity:
        return frames
    moving = any(v > 0 for v in (config.drift_trans_m, config.drift_rot_deg, config.jitter_trans_m,
                                 config.jitter_rot_deg))
    errors = pose_errors(len(frames), config, seed) if moving else [None] * len(frames)
    return [apply_frame(f, config, seed, i, e) for i, (f, e) in enumerate(zip(frames, errors))]
