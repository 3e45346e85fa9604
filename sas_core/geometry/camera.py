"""Pinhole cameras: intrinsics, projection of points into frames, back-projection of depth images.

Conventions (OpenCV / ScanNet / OpenScene):

* camera optical frame: +x right, +y down, +z forward;
* poses are camera-to-world (4, 4) matrices;
* a pixel's integer coordinates ``(u, v)`` = (column, row) are its *centre*, so a camera-frame
  point ``(x, y, z)`` lands at ``u = fx * x / z + cx``, ``v = fy * y / z + cy`` and pixel
  ``(round(u), round(v))`` (OpenScene's ``PointCloudToImageMapper``);
* depth is metric: float32 metres, or uint16 millimetres in ``16UC1`` images / PNG files;
  0, NaN, inf and negative values are "no measurement".

Lens distortion is not modelled: images are assumed rectified (ScanNet, Matterport3D and ROS
``image_rect`` topics are).

Everything here works on NumPy arrays; :func:`project_points` also accepts torch tensors (and
then returns tensors on the same device). torch is never imported at module import.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from sas_core.types import CameraIntrinsics

__all__ = [
    "intrinsics_from_matrix",
    "intrinsics_from_camera_info",
    "scale_intrinsics",
    "world_to_camera",
    "check_pose",
    "project_points",
    "depth_image_to_metres",
    "valid_depth_mask",
    "backproject_depth",
]


# --------------------------------------------------------------------------------------------
# Intrinsics
# --------------------------------------------------------------------------------------------

def intrinsics_from_matrix(K, width: int, height: int) -> CameraIntrinsics:
    """Intrinsics from a 3x3 (or ScanNet-style 4x4) matrix for an image of ``width`` x ``height``.

    Raises ValueError for a non-finite matrix or non-positive focal lengths.
    """
    intr = CameraIntrinsics.from_matrix(K, width, height)
    _check_intrinsics(intr)
    return intr


def _field(obj: Any, *names: str, default=None):
    """First present attribute or mapping key of ``obj`` among ``names``."""
    for name in names:
        if isinstance(obj, dict):
            if name in obj:
                return obj[name]
        elif hasattr(obj, name):
            return getattr(obj, name)
    return default


def intrinsics_from_camera_info(info: Any) -> CameraIntrinsics:
    """Intrinsics from a ``sensor_msgs/CameraInfo``-like object (duck-typed; no ROS import).

    Reads ``k`` (ROS 2) or ``K`` (ROS 1): the 9 row-major entries of the 3x3 matrix of the
    full-resolution sensor; ``width`` and ``height``. Works on rclpy messages, rosbags messages,
    dicts and any object with those fields. Honours ``binning_x``/``binning_y`` (> 1: the image
    is downsampled by that factor) and ``roi`` (a non-empty region of interest crops the image),
    as the CameraInfo documentation describes. Distortion (``d``) is ignored: images are
    assumed rectified.

    Raises ValueError when the matrix is missing, all zeros (an uncalibrated camera) or invalid.
    """
    k = _field(info, "k", "K")
    width = _field(info, "width")
    height = _field(info, "height")
    if k is None or width is None or height is None:
        raise ValueError("camera info needs fields k (or K), width and height")
    k = np.asarray(k, dtype=np.float64).reshape(-1)
    if k.size != 9:
        raise ValueError(f"camera info k must have 9 entries, got {k.size}")
    if not np.any(k):
        raise ValueError("camera info k is all zeros: the camera is not calibrated")
    K = k.reshape(3, 3).copy()
    width, height = int(width), int(height)

    roi = _field(info, "roi")
    if roi is not None:
        rw, rh = int(_field(roi, "width", default=0) or 0), int(_field(roi, "height", default=0) or 0)
        if rw > 0 and rh > 0 and (rw, rh) != (width, height):
            K[0, 2] -= float(_field(roi, "x_offset", default=0) or 0)
            K[1, 2] -= float(_field(roi, "y_offset", default=0) or 0)
            width, height = rw, rh
    bx = int(_field(info, "binning_x", default=0) or 0)
    by = int(_field(info, "binning_y", default=0) or 0)
    bx, by = max(bx, 1), max(by, 1)
    intr = intrinsics_from_matrix(K, width, height)
    if bx > 1 or by > 1:
        intr = scale_intrinsics(intr, width // bx, height // by)
    return intr


def _check_intrinsics(intr: CameraIntrinsics) -> None:
    values = np.array([intr.fx, intr.fy, intr.cx, intr.cy], dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"intrinsics must be finite, got {intr}")
    if intr.fx <= 0 or intr.fy <= 0:
        raise ValueError(f"focal lengths must be positive, got fx={intr.fx}, fy={intr.fy}")
    if intr.width <= 0 or intr.height <= 0:
        raise ValueError(f"image size must be positive, got {intr.width}x{intr.height}")


def scale_intrinsics(intr: CameraIntrinsics, width: int, height: int,
                     convention: str = "edge") -> CameraIntrinsics:
    """The same camera for the image resized to ``width`` x ``height``.

    ``convention``:
      * ``"edge"`` (default, :meth:`CameraIntrinsics.scaled`): image edges map onto image edges,
        so a pixel centre ``u`` maps to ``(u + 0.5) * s - 0.5`` (OpenCV/torch ``resize`` without
        ``align_corners``);
      * ``"openscene"``: OpenScene's ``adjust_intrinsic``: focal lengths scale by the size ratio
        and the principal point by ``(new - 1) / (old - 1)`` (corner pixels map onto corner
        pixels). For ScanNet (cx = 319.5 at 640 px) both conventions give the same camera.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if convention == "edge":
        return intr.scaled(width, height)
    if convention == "openscene":
        sx, sy = width / intr.width, height / intr.height
        ax = (width - 1) / (intr.width - 1) if intr.width > 1 else sx
        ay = (height - 1) / (intr.height - 1) if intr.height > 1 else sy
        return CameraIntrinsics(intr.fx * sx, intr.fy * sy, intr.cx * ax, intr.cy * ay,
                                int(width), int(height))
    raise ValueError(f"unknown resize convention {convention!r}; use 'edge' or 'openscene'")


# --------------------------------------------------------------------------------------------
# Poses and projection
# --------------------------------------------------------------------------------------------

def check_pose(pose) -> np.ndarray:
    """``pose`` as a (4, 4) float64 camera-to-world matrix; ValueError if malformed or non-finite."""
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape != (4, 4):
        raise ValueError(f"pose must be a 4x4 camera-to-world matrix, got shape {pose.shape}")
    if not np.all(np.isfinite(pose)):
        raise ValueError("pose contains NaN or inf (no pose for this frame?)")
    if np.abs(pose[3] - (0.0, 0.0, 0.0, 1.0)).max() > 1e-6:
        raise ValueError(f"pose's last row must be [0, 0, 0, 1], got {pose[3].tolist()}")
    return pose


def world_to_camera(pose) -> np.ndarray:
    """(4, 4) float64 world-to-camera matrix: the inverse of the camera-to-world ``pose``."""
    pose = check_pose(pose)
    try:
        return np.linalg.inv(pose)
    except np.linalg.LinAlgError as exc:
        raise ValueError("pose is singular") from exc


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def project_points(points, pose, intrinsics: CameraIntrinsics) -> Tuple[Any, Any]:
    """Project world points into a camera.

    Args:
        points: (N, 3) world coordinates (NumPy array or torch tensor).
        pose: (4, 4) camera-to-world matrix.
        intrinsics: the camera.

    Returns:
        uv: (N, 2) float32 pixel coordinates (column u, row v) of the projections; the pixel a
            point falls in is ``round(uv)`` (round half to even, as ``np.round``).
        z: (N,) float32 depth along the optical axis (camera-frame z; <= 0 is behind the camera,
            where ``uv`` is meaningless).

    The world-to-camera transform is composed in float64 and applied in float32 (one (N, 3) x
    (3, 3) product). Torch input gives torch output on the same device.
    """
    w2c = world_to_camera(pose)
    R, t = w2c[:3, :3].astype(np.float32), w2c[:3, 3].astype(np.float32)
    fx, fy, cx, cy = (np.float32(v) for v in (intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy))
    if _is_torch(points):
        import torch

        pts = points.reshape(-1, 3).to(torch.float32)
        Rt = torch.from_numpy(np.ascontiguousarray(R.T)).to(pts.device)
        cam = torch.addmm(torch.from_numpy(t).to(pts.device), pts, Rt)
        z = cam[:, 2]
        uv = torch.stack([cam[:, 0] * float(fx) / z + float(cx), cam[:, 1] * float(fy) / z + float(cy)], dim=1)
        return uv, z.contiguous()
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    cam = pts @ R.T + t
    z = np.ascontiguousarray(cam[:, 2])
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = np.stack([cam[:, 0] * fx / z + cx, cam[:, 1] * fy / z + cy], axis=1).astype(np.float32)
    return uv, z


# --------------------------------------------------------------------------------------------
# Depth images
# --------------------------------------------------------------------------------------------

_MM_ENCODINGS = ("16UC1", "mono16", "16uc1")
_M_ENCODINGS = ("32FC1", "32fc1")


def depth_image_to_metres(array, encoding: str = "16UC1", depth_scale: Optional[float] = None) -> np.ndarray:
    """A depth image in metres: (H, W) float32 with 0 wherever there is no measurement.

    Args:
        array: (H, W) depth image.
        encoding: ``"16UC1"`` / ``"mono16"`` (unsigned 16-bit millimetres, ROS and ScanNet PNG) or
            ``"32FC1"`` (float32 metres).
        depth_scale: units per metre of integer images (default 1000, millimetres; Matterport3D's
            PNGs use 4000).

    NaN, inf, zero and negative values all become 0.
    """
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim != 2:
        raise ValueError(f"depth image must be (H, W), got shape {a.shape}")
    if encoding in _MM_ENCODINGS:
        if a.dtype.kind not in "ui":
            raise ValueError(f"{encoding} depth must be an integer image, got {a.dtype}")
        scale = 1000.0 if depth_scale is None else float(depth_scale)
        if scale <= 0:
            raise ValueError(f"depth_scale must be positive, got {depth_scale}")
        out = a.astype(np.float32) / np.float32(scale)
    elif encoding in _M_ENCODINGS:
        out = a.astype(np.float32, copy=True)
        if depth_scale is not None:
            out /= np.float32(depth_scale)
    else:
        raise ValueError(f"unsupported depth encoding {encoding!r}; use 16UC1 (mm) or 32FC1 (m)")
    out[~(np.isfinite(out) & (out > 0))] = 0.0
    return out


def valid_depth_mask(depth, min_depth: float = 0.0, max_depth: Optional[float] = None) -> np.ndarray:
    """(H, W) bool: depth is finite, > ``min_depth`` (and > 0) and <= ``max_depth`` if given."""
    d = np.asarray(depth)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(d) & (d > max(float(min_depth), 0.0))
        if max_depth is not None:
            ok &= d <= float(max_depth)
    return ok


def backproject_depth(depth, intrinsics: CameraIntrinsics, pose=None, min_depth: float = 0.0,
                      max_depth: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Lift the valid pixels of a depth image to 3D points.

    Args:
        depth: (H, W) metres (float), or a ``16UC1`` millimetre image (uint16, converted with
            :func:`depth_image_to_metres`). H, W must match ``intrinsics``.
        intrinsics: the depth camera.
        pose: optional (4, 4) camera-to-world; points are in the camera frame without it.
        min_depth, max_depth: measurements <= min_depth or > max_depth are dropped (sensor range).

    Returns:
        points: (M, 3) float32, one per valid pixel (finite, positive, in range), row-major order.
        pixel_index: (M,) int64 flat index ``v * W + u`` of each point's pixel.
    """
    d = np.asarray(depth)
    if d.dtype == np.uint16:
        d = depth_image_to_metres(d, "16UC1")
    if d.shape != (intrinsics.height, intrinsics.width):
        raise ValueError(f"depth is {d.shape}, intrinsics say {(intrinsics.height, intrinsics.width)}")
    ok = valid_depth_mask(d, min_depth, max_depth)
    index = np.flatnonzero(ok)
    z = d.reshape(-1)[index].astype(np.float64)
    v, u = np.divmod(index, intrinsics.width)
    x = (u - intrinsics.cx) * z / intrinsics.fx
    y = (v - intrinsics.cy) * z / intrinsics.fy
    pts = np.stack([x, y, z], axis=1)
    if pose is not None:
        pose = check_pose(pose)
        pts = pts @ pose[:3, :3].T + pose[:3, 3]
    return pts.astype(np.float32), index.astype(np.int64)
