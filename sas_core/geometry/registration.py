"""Depth registration: a depth image from its own camera, re-rendered in the colour camera.

A depth camera that is not aligned to colour (a RealSense without ``align_depth``, a Kinect's IR
camera) publishes depth in its own optical frame with its own ``CameraInfo``. To colour and map
its points per colour pixel, each valid depth pixel ``(u, v, z)`` is lifted to 3D with the depth
intrinsics, moved into the colour optical frame with ``T_color_depth`` (TF between the two
frames), projected with the colour intrinsics to the pixel ``(floor(u' + 0.5), floor(v' + 0.5))``
and written there with a z-buffer (the nearest depth wins), as ``depth_image_proc``'s register
node does (ros-perception/image_pipeline). Pixels no depth sample reaches stay 0 (no
measurement); with ``fill_holes`` each sample covers the colour pixels between the projections of
its pixel's corners (the register node's ``fill_upsampling_holes``), for a colour image larger
than the depth image.
"""

from __future__ import annotations

import numpy as np

from sas_core.geometry.camera import valid_depth_mask
from sas_core.types import CameraIntrinsics


def register_depth(depth: np.ndarray, depth_intrinsics: CameraIntrinsics, color_intrinsics: CameraIntrinsics,
                   T_color_depth: np.ndarray, fill_holes: bool = False) -> np.ndarray:
    """Re-render ``depth`` in the colour camera.

    Args:
        depth: (H_d, W_d) float metres in the depth optical frame (0 / NaN = none).
        depth_intrinsics: the depth camera, of (H_d, W_d).
        color_intrinsics: the colour camera; the output has its size.
        T_color_depth: (4, 4) transform mapping depth-frame points into the colour frame
            (``TransformBuffer.lookup(color_frame, depth_frame, stamp)``).
        fill_holes: splat each sample over the colour pixels its depth pixel covers.

    Returns:
        (H_c, W_c) float32 z-depth in the colour optical frame, 0 where no sample landed.
    """
    d = np.asarray(depth, np.float32)
    if d.shape != (depth_intrinsics.height, depth_intrinsics.width):
        raise ValueError(f"depth is {d.shape}, its camera info says "
                         f"{(depth_intrinsics.height, depth_intrinsics.width)}")
    T = np.asarray(T_color_depth, np.float64)
    if T.shape != (4, 4) or not np.isfinite(T).all():
        raise ValueError("T_color_depth must be a finite 4x4 matrix")
    H, W = color_intrinsics.height, color_intrinsics.width
    ok = valid_depth_mask(d)
    v, u = np.nonzero(ok)
    z = d[v, u].astype(np.float64)
    if fill_holes:
        corners = [(-0.5, -0.5), (0.5, 0.5)]
    else:
        corners = [(0.0, 0.0)]
    projected = []
    for du, dv in corners:
        x = (u + du - depth_intrinsics.cx) * z / depth_intrinsics.fx
        y = (v + dv - depth_intrinsics.cy) * z / depth_intrinsics.fy
        p = np.stack([x, y, z], 1) @ T[:3, :3].T + T[:3, 3]
        with np.errstate(divide="ignore", invalid="ignore"):
            uc = np.floor(color_intrinsics.fx * p[:, 0] / p[:, 2] + color_intrinsics.cx + 0.5)
            vc = np.floor(color_intrinsics.fy * p[:, 1] / p[:, 2] + color_intrinsics.cy + 0.5)
        projected.append((uc, vc, p[:, 2]))
    out = np.full(H * W, np.inf, np.float64)
    if not fill_holes:
        uc, vc, zc = projected[0]
        keep = (zc > 0) & (uc >= 0) & (uc < W) & (vc >= 0) & (vc < H)
        np.minimum.at(out, (vc[keep] * W + uc[keep]).astype(np.int64), zc[keep])
    else:
        (u1, v1, z1), (u2, v2, z2) = projected
        zc = 0.5 * (z1 + z2)
        keep = (z1 > 0) & (z2 > 0) & (u1 >= 0) & (v1 >= 0) & (u2 < W) & (v2 < H) & (u2 >= u1) & (v2 >= v1)
        u1, v1, u2, v2, zc = (a[keep] for a in (u1, v1, u2, v2, zc))
        nu, nv = (u2 - u1 + 1).astype(np.int64), (v2 - v1 + 1).astype(np.int64)
        for i in range(int(nv.max(initial=0))):
            for j in range(int(nu.max(initial=0))):
                sel = (i < nv) & (j < nu)
                idx = ((v1[sel] + i) * W + (u1[sel] + j)).astype(np.int64)
                np.minimum.at(out, idx, zc[sel])
    out[~np.isfinite(out)] = 0.0
    return out.reshape(H, W).astype(np.float32)
