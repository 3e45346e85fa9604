"""A small CPU splatting renderer for 3D Gaussians (the forward pass of 3DGS, Kerbl et al. 2023).

For one pinhole camera (OpenCV optical frame, camera-to-world pose, pixel centres at integer
coordinates, as everywhere in this package):

1. **Project** (:func:`project_gaussians`). A centre ``p`` goes to camera coordinates
   ``t = W p + w`` and to the pixel ``(fx tx / tz + cx, fy ty / tz + cy)``; Gaussians with
   ``tz <= near`` (0.2 m, as 3DGS) are culled. The 2D covariance is the EWA splat
   ``J W Sigma W^T J^T`` with the Jacobian of the perspective map at ``t``,
   ``J = [[fx/tz, 0, -fx tx/tz^2], [0, fy/tz, -fy ty/tz^2]]`` (``tx/tz`` and ``ty/tz`` clamped to
   1.3 times the field of view, as 3DGS does), plus ``dilation`` = 0.3 px^2 on the diagonal (3DGS's
   low-pass filter, no opacity compensation). Its inverse (the *conic*) and a radius of three
   standard deviations of the major axis, ``ceil(3 sqrt(lambda_max))``, are kept.
2. **Sort** the visible Gaussians by view depth ``tz`` (stable: ties keep file order).
3. **Composite** front to back per pixel: ``alpha = min(0.99, o exp(-d^T conic d / 2))`` for the
   pixel's offset ``d`` from the projected centre (pixels within the radius's square); a
   contribution with ``alpha < 1/255`` is skipped; when the transmittance would fall below 1e-4
   the pixel stops (early termination; that contribution is not added), as the 3DGS rasteriser does.
   Colour ``C = sum_i c_i alpha_i T_i`` with ``T_i = prod_{j<i} (1 - alpha_j)``; the background
   adds ``T_final * background``.

**Labels** are rendered as the argmax of the composited class one-hot: each pixel accumulates
``w_k = sum_{i: label_i = k} alpha_i T_i`` and takes the class with the largest ``w_k`` (the
rendered class-probability map of Semantic Gaussians / Feature 3DGS, argmax-ed), when the labelled
Gaussians cover at least ``min_label_weight`` of the pixel (``sum_k w_k``); otherwise the pixel
gets :data:`sas_core.eval.metrics.NO_FEATURE` (256). Gaussians whose label is outside ``0..K-1``
(e.g. 256, no feature) occlude but vote for no class.

**Colours** come from the SH coefficients evaluated in the viewing direction (degrees 0..3, the
reference ``computeColorFromSH``: ``SH_C0 * dc + ... + 0.5``, clamped at 0).

The compositing kernel is compiled with numba when it is importable (parallel over image rows;
every pixel is independent, so the result does not depend on the thread count) and runs as
plain Python otherwise (slow; the tests use it as the reference). No GPU rasteriser is
installed here; on a machine with ``gsplat`` one could be added behind the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from sas_core.config import opt
from sas_core.numba_support import import_numba
from sas_core.types import CameraIntrinsics

__all__ = ["SplatConfig", "Projected", "Rendering", "project_gaussians", "eval_sh", "composite", "render",
           "render_labels"]

NO_LABEL = 256
"""Rendered label of a pixel no labelled Gaussian covers enough (= :data:`sas_core.eval.NO_FEATURE`)."""


@dataclass(frozen=True)
class SplatConfig:
    """Settings of the splatting renderer (defaults: the 3DGS rasteriser's constants)."""

    near: float = opt(0.2, "Gaussians closer than this to the camera (m, camera z) are culled")
    dilation: float = opt(0.3, "added to the diagonal of every 2D covariance (px^2; 3DGS's low-pass filter)")
    alpha_min: float = opt(1.0 / 255.0, "contributions below this opacity are skipped")
    alpha_max: float = opt(0.99, "the opacity of one contribution is clamped to this")
    transmittance_min: float = opt(1e-4, "a pixel stops when its transmittance would fall below this")
    min_label_weight: float = opt(0.5, "a pixel gets a label when labelled Gaussians cover at least this much of "
                                       "it (else no feature)")
    background: tuple = opt((0.0, 0.0, 0.0), "colour behind everything")

    def __post_init__(self):
        if self.near <= 0 or self.dilation < 0:
            raise ValueError("near must be > 0 and dilation >= 0")
        if not 0 <= self.alpha_min < self.alpha_max <= 1:
            raise ValueError("need 0 <= alpha_min < alpha_max <= 1")
        if not 0 <= self.transmittance_min < 1 or not 0 <= self.min_label_weight <= 1:
            raise ValueError("transmittance_min must be in [0, 1) and min_label_weight in [0, 1]")


class Projected(NamedTuple):
    """Screen-space Gaussians of one camera (N rows, one per input Gaussian).

    uv: (N, 2) float64 pixel coordinates of the centres; depth: (N,) float64 camera z;
    cov2d: (N, 3) float64 (a, b, c) of the dilated 2D covariance [[a, b], [b, c]];
    conic: (N, 3) float64 (A, B, C) of its inverse; radius: (N,) int64 pixels (3 sigma);
    visible: (N,) bool (in front of the near plane, non-degenerate, overlapping the image).
    """

    uv: np.ndarray
    depth: np.ndarray
    cov2d: np.ndarray
    conic: np.ndarray
    radius: np.ndarray
    visible: np.ndarray


@dataclass
class Rendering:
    """One rendered view.

    color: (H, W, 3) float32; alpha: (H, W) float32 accumulated opacity ``1 - T_final``;
    depth: (H, W) float32 ``sum_i z_i alpha_i T_i / alpha`` (0 where alpha is 0);
    label: (H, W) int64 or None (256 = no label); class_weights: (H, W, K) float32 or None.
    """

    color: np.ndarray
    alpha: np.ndarray
    depth: np.ndarray
    label: Optional[np.ndarray] = None
    class_weights: Optional[np.ndarray] = None


def project_gaussians(positions, covariances, pose, intrinsics: CameraIntrinsics,
                      config: Optional[SplatConfig] = None) -> Projected:
    """Project (N, 3) centres and (N, 3, 3) world covariances into a camera (EWA splatting)."""
    from sas_core.geometry.camera import world_to_camera

    cfg = config or SplatConfig()
    p = np.asarray(positions, np.float64).reshape(-1, 3)
    cov = np.asarray(covariances, np.float64).reshape(-1, 3, 3)
    if len(cov) != len(p):
        raise ValueError(f"{len(p)} centres but {len(cov)} covariances")
    w2c = world_to_camera(pose)
    Rw, tw = w2c[:3, :3], w2c[:3, 3]
    t = p @ Rw.T + tw
    fx, fy, cx, cy = intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy
    W, H = intrinsics.width, intrinsics.height
    tz = t[:, 2]
    front = tz > cfg.near
    z = np.where(front, tz, 1.0)
    uv = np.stack([fx * t[:, 0] / z + cx, fy * t[:, 1] / z + cy], axis=1)
    limx = 1.3 * max(cx, W - 1 - cx, 1.0) / fx
    limy = 1.3 * max(cy, H - 1 - cy, 1.0) / fy
    tx = np.clip(t[:, 0] / z, -limx, limx) * z
    ty = np.clip(t[:, 1] / z, -limy, limy) * z
    J = np.zeros((len(p), 2, 3))
    J[:, 0, 0] = fx / z
    J[:, 0, 2] = -fx * tx / (z * z)
    J[:, 1, 1] = fy / z
    J[:, 1, 2] = -fy * ty / (z * z)
    T = J @ Rw  # (N, 2, 3)
    c2 = T @ cov @ np.swapaxes(T, 1, 2)
    a = c2[:, 0, 0] + cfg.dilation
    b = c2[:, 0, 1]
    c = c2[:, 1, 1] + cfg.dilation
    det = a * c - b * b
    ok = front & (det > 0) & np.isfinite(det)
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    conic = np.stack([c * inv, -b * inv, a * inv], axis=1)
    mid = 0.5 * (a + c)
    lam = mid + np.sqrt(np.maximum(0.1, mid * mid - det))
    radius = np.where(ok, np.ceil(3.0 * np.sqrt(np.maximum(lam, 0.0))), 0).astype(np.int64)
    inside = ((uv[:, 0] + radius >= 0) & (uv[:, 0] - radius <= W - 1) & (uv[:, 1] + radius >= 0)
              & (uv[:, 1] - radius <= H - 1))
    visible = ok & (radius > 0) & inside
    return Projected(uv, tz, np.stack([a, b, c], axis=1), conic, radius, visible)


# ------------------------------------------------------------------------------------------------
# spherical harmonics (the reference implementation's constants)

_C1 = 0.4886025119029199
_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
       1.445305721320277, -0.5900435899266435)


def eval_sh(sh_dc, sh_rest, directions) -> np.ndarray:
    """(N, 3) colour of SH coefficients ``sh_dc`` (N, 3), ``sh_rest`` (N, R, 3) seen along unit
    ``directions`` (N, 3) (centre minus camera position), ``+ 0.5`` and clamped at 0 as 3DGS does."""
    from sas_core.data.gaussians import SH_C0

    dc = np.asarray(sh_dc, np.float64)
    rest = np.asarray(sh_rest, np.float64)
    r = rest.shape[1]
    out = SH_C0 * dc
    if r:
        d = np.asarray(directions, np.float64)
        x, y, z = d[:, 0:1], d[:, 1:2], d[:, 2:3]
        out = out - _C1 * y * rest[:, 0] + _C1 * z * rest[:, 1] - _C1 * x * rest[:, 2]
        if r > 3:
            xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
            out = (out + _C2[0] * xy * rest[:, 3] + _C2[1] * yz * rest[:, 4]
                   + _C2[2] * (2 * zz - xx - yy) * rest[:, 5] + _C2[3] * xz * rest[:, 6]
                   + _C2[4] * (xx - yy) * rest[:, 7])
            if r > 8:
                out = (out + _C3[0] * y * (3 * xx - yy) * rest[:, 8] + _C3[1] * xy * z * rest[:, 9]
                       + _C3[2] * y * (4 * zz - xx - yy) * rest[:, 10]
                       + _C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * rest[:, 11]
                       + _C3[4] * x * (4 * zz - xx - yy) * rest[:, 12] + _C3[5] * z * (xx - yy) * rest[:, 13]
                       + _C3[6] * x * (xx - 3 * yy) * rest[:, 14])
    return np.maximum(out + 0.5, 0.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# compositing


def _composite_rows(y_lo, y_hi, order, uv, conic, radius, opacity, colors, depth, labels, n_classes, W,
                    alpha_min, alpha_max, t_min, out_color, out_t, out_depth, out_w):
    """Front-to-back compositing of the Gaussians ``order`` (sorted by depth) into rows y_lo..y_hi-1."""
    for y in range(y_lo, y_hi):
        for j in range(order.shape[0]):
            g = order[j]
            r = radius[g]
            v = uv[g, 1]
            if y < v - r or y > v + r:
                continue
            u = uv[g, 0]
            x0 = max(0, int(np.ceil(u - r)))
            x1 = min(W - 1, int(np.floor(u + r)))
            A, B, C = conic[g, 0], conic[g, 1], conic[g, 2]
            op = opacity[g]
            dy = v - y
            lab = labels[g]
            for x in range(x0, x1 + 1):
                T = out_t[y, x]
                if T <= 0.0:  # stopped (early termination)
                    continue
                dx = u - x
                power = -0.5 * (A * dx * dx + C * dy * dy) - B * dx * dy
                if power > 0.0:
                    continue
                alpha = min(alpha_max, op * np.exp(power))
                if alpha < alpha_min:
                    continue
                test_t = T * (1.0 - alpha)
                if test_t < t_min:
                    out_t[y, x] = -T  # done; keep |T| as the final transmittance
                    continue
                w = alpha * T
                out_color[y, x, 0] += w * colors[g, 0]
                out_color[y, x, 1] += w * colors[g, 1]
                out_color[y, x, 2] += w * colors[g, 2]
                out_depth[y, x] += w * depth[g]
                if 0 <= lab < n_classes:
                    out_w[y, x, lab] += w
                out_t[y, x] = test_t


_numba = import_numba()
if _numba is not None:
    _composite_rows_nb = _numba.njit(cache=True, nogil=True)(_composite_rows)

    @_numba.njit(parallel=True, cache=True)
    def _composite_nb(order, uv, conic, radius, opacity, colors, depth, labels, n_classes, H, W, alpha_min,
                      alpha_max, t_min, out_color, out_t, out_depth, out_w):
        for y in _numba.prange(H):
            _composite_rows_nb(y, y + 1, order, uv, conic, radius, opacity, colors, depth, labels, n_classes, W,
                               alpha_min, alpha_max, t_min, out_color, out_t, out_depth, out_w)


def composite(projected: Projected, opacities, colors, H: int, W: int, labels=None, n_classes: int = 0,
              config: Optional[SplatConfig] = None, use_numba: Optional[bool] = None):
    """Sort the visible Gaussians by depth and alpha-composite them (step 3 of the module docstring).

    Args:
        projected: from :func:`project_gaussians`.
        opacities: (N,) activated opacities in [0, 1]; colors: (N, 3) per-Gaussian colours.
        labels: optional (N,) integer class per Gaussian; n_classes: K (class weight channels).
        use_numba: None: when numba is importable; False: the plain-Python reference.

    Returns:
        (color (H, W, 3), transmittance (H, W), depth-weighted sum (H, W)) float64 and class weights
        (H, W, K) float32, without the background term.
    """
    cfg = config or SplatConfig()
    vis = np.flatnonzero(projected.visible)
    order = vis[np.argsort(projected.depth[vis], kind="stable")].astype(np.int64)
    n = len(projected.uv)
    lab = np.full(n, -1, np.int64) if labels is None else np.asarray(labels).astype(np.int64).reshape(n)
    k = int(n_classes) if labels is not None else 0
    out_color = np.zeros((H, W, 3))
    out_t = np.ones((H, W))
    out_depth = np.zeros((H, W))
    out_w = np.zeros((H, W, max(k, 1)), np.float32)  # float32: K channels per pixel add up
    args = (order, np.ascontiguousarray(projected.uv, np.float64), np.ascontiguousarray(projected.conic, np.float64),
            np.ascontiguousarray(projected.radius, np.int64), np.ascontiguousarray(opacities, np.float64).reshape(n),
            np.ascontiguousarray(colors, np.float64).reshape(n, 3), np.ascontiguousarray(projected.depth, np.float64),
            lab, k)
    tail = (float(cfg.alpha_min), float(cfg.alpha_max), float(cfg.transmittance_min), out_color, out_t, out_depth,
            out_w)
    if use_numba is None:
        use_numba = _numba is not None
    if use_numba:
        if _numba is None:
            raise RuntimeError("numba is not importable")
        from sas_core.numba_support import launch_threads

        launch_threads()
        _composite_nb(*args, int(H), int(W), *tail)
    else:
        _composite_rows(0, int(H), *args, int(W), *tail)
    return out_color, np.abs(out_t), out_depth, out_w[..., :k]


def render(gaussians, pose, intrinsics: CameraIntrinsics, labels=None, n_classes: Optional[int] = None,
           config: Optional[SplatConfig] = None, colors=None, use_numba: Optional[bool] = None) -> Rendering:
    """Render a :class:`sas_core.data.gaussians.GaussianScene` from a camera-to-world ``pose``.

    Args:
        labels: optional (N,) class per Gaussian (default: ``gaussians.labels`` when set); then
            ``label`` and ``class_weights`` are rendered too (K = ``n_classes``, default max + 1).
        colors: optional (N, 3) colours to composite instead of the SH colour.
    """
    cfg = config or SplatConfig()
    pose = np.asarray(pose, np.float64)
    proj = project_gaussians(gaussians.positions, gaussians.covariances(), pose, intrinsics, cfg)
    if colors is None:
        dirs = gaussians.positions.astype(np.float64) - pose[:3, 3]
        dirs /= np.maximum(np.linalg.norm(dirs, axis=1, keepdims=True), 1e-12)
        colors = eval_sh(gaussians.sh_dc, gaussians.sh_rest, dirs)
    if labels is None:
        labels = gaussians.labels
    k = 0
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64)
        valid = labels[(labels >= 0) & (labels < 256)]
        k = int(n_classes) if n_classes is not None else (int(valid.max()) + 1 if len(valid) else 0)
    H, W = intrinsics.height, intrinsics.width
    color, T, dsum, w = composite(proj, gaussians.opacities(), colors, H, W, labels, k, cfg, use_numba)
    alpha = 1.0 - T
    color = color + T[..., None] * np.asarray(cfg.background, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        depth = np.where(alpha > 0, dsum / np.maximum(alpha, 1e-12), 0.0)
    label = None
    if labels is not None:
        label = labels_from_weights(w, cfg.min_label_weight)
    return Rendering(color.astype(np.float32), alpha.astype(np.float32), depth.astype(np.float32), label,
                     None if labels is None else w.astype(np.float32))


def labels_from_weights(weights, min_weight: float = 0.5) -> np.ndarray:
    """(H, W) int64 argmax of (H, W, K) composited class weights; :data:`NO_LABEL` where their sum
    is below ``min_weight`` (or K = 0)."""
    w = np.asarray(weights)
    if w.shape[-1] == 0:
        return np.full(w.shape[:-1], NO_LABEL, np.int64)
    lab = w.argmax(axis=-1).astype(np.int64)
    total = w.sum(axis=-1)
    lab[(total < min_weight) | (total <= 0)] = NO_LABEL
    return lab


def render_labels(gaussians, labels, pose, intrinsics: CameraIntrinsics, n_classes: int,
                  config: Optional[SplatConfig] = None) -> np.ndarray:
    """(H, W) int64 rendered label image (256 = no label) of Gaussians with ``labels``."""
    return render(gaussians, pose, intrinsics, labels=labels, n_classes=n_classes, config=config,
                  colors=np.zeros((len(gaussians), 3), np.float32)).label
