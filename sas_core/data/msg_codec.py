"""NumPy <-> ROS message-field codec, duck-typed and free of ROS imports.

Every function here reads or produces the *fields* of ``sensor_msgs/Image``, ``PointCloud2``,
``CameraInfo`` and ``geometry_msgs/Pose``/``Transform``; it never imports a message class. So the
same code serves rclpy messages (``sas_ros.conversions`` builds those from the dicts returned
here), rosbags message dataclasses (``sas replay``) and any plain object with the same attributes.

Conventions:

* Images: ``rgb8``/``bgr8`` decode to (H, W, 3) uint8 **RGB**; ``mono8`` to (H, W) uint8;
  ``16UC1``/``mono16`` to (H, W) uint16 (depth in millimetres); ``32FC1`` to (H, W) float32
  (depth in metres). Row padding (``step`` > width * pixel size) and ``is_bigendian`` are honoured.
* Point clouds: a ``PointCloud2`` decodes to a packed, native-byte-order structured array of
  ``height * width`` points; a field with ``count > 1`` becomes a sub-array column of that length.
  PointField datatypes: INT8=1, UINT8=2, INT16=3, UINT16=4, INT32=5, UINT32=6, FLOAT32=7,
  FLOAT64=8. Packed colour follows PCL: ``rgb`` is a float32 whose 4 bytes are the uint32
  ``0x00RRGGBB``; ``label`` is uint32 and ``score`` float32.
* Poses: 4x4 float64 homogeneous matrices; quaternions are (x, y, z, w) as in ROS.
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional, Sequence

import numpy as np

from sas_core.types import CameraIntrinsics

# --------------------------------------------------------------------------------------------
# PointField datatypes (sensor_msgs/PointField constants)
INT8, UINT8, INT16, UINT16, INT32, UINT32, FLOAT32, FLOAT64 = range(1, 9)
POINTFIELD_DTYPES = {
    INT8: np.dtype("i1"), UINT8: np.dtype("u1"), INT16: np.dtype("i2"), UINT16: np.dtype("u2"),
    INT32: np.dtype("i4"), UINT32: np.dtype("u4"), FLOAT32: np.dtype("f4"), FLOAT64: np.dtype("f8"),
}
_DTYPE_TO_POINTFIELD = {(dt.kind, dt.itemsize): code for code, dt in POINTFIELD_DTYPES.items()}

NATIVE_BIGENDIAN = sys.byteorder == "big"

# Image encodings: name -> (element dtype, channels)
IMAGE_ENCODINGS = {
    "rgb8": (np.dtype("u1"), 3), "bgr8": (np.dtype("u1"), 3),
    "rgba8": (np.dtype("u1"), 4), "bgra8": (np.dtype("u1"), 4),
    "mono8": (np.dtype("u1"), 1), "8UC1": (np.dtype("u1"), 1),
    "mono16": (np.dtype("u2"), 1), "16UC1": (np.dtype("u2"), 1),
    "32FC1": (np.dtype("f4"), 1),
}


def _as_bytes(data) -> np.ndarray:
    """Message ``data`` (bytes, bytearray, array.array('B'), list of ints, ndarray) as 1-D uint8."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8) if data.dtype != np.uint8 else data.reshape(-1)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    try:  # array.array and other buffer-protocol objects
        return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    except TypeError:
        pass
    try:
        return np.asarray(list(data), dtype=np.uint8)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"message data must be bytes or values 0..255 ({type(exc).__name__})") from None


def _size(msg, name: str, default=None) -> int:
    """A size field (height, width, step, point_step, ...) as a non-negative int, else ValueError."""
    value = _get(msg, name, default=default)
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be an integer, got {str(value)[:40]!r}") from None
    if isinstance(value, float) and value != n:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


def _get(msg, *names, default=None):
    """The first of ``names`` that ``msg`` has as an attribute (or dict key)."""
    for name in names:
        if isinstance(msg, dict) and name in msg:
            return msg[name]
        if hasattr(msg, name):
            return getattr(msg, name)
    return default


# --------------------------------------------------------------------------------------------
# Images

def image_to_numpy(msg) -> np.ndarray:
    """Decode a ``sensor_msgs/Image``.

    Returns:
        (H, W, 3) uint8 RGB for rgb8 / bgr8 / rgba8 / bgra8 (alpha dropped); (H, W) uint8 for
        mono8; (H, W) uint16 for 16UC1 / mono16; (H, W) float32 for 32FC1. Always a fresh,
        native-byte-order, C-contiguous array.

    Raises:
        ValueError: unsupported encoding, or ``data`` shorter than ``step * height``, or ``step``
        smaller than a row.
    """
    encoding = str(_get(msg, "encoding"))
    if encoding not in IMAGE_ENCODINGS:
        raise ValueError(f"unsupported image encoding {encoding!r}; supported: {', '.join(IMAGE_ENCODINGS)}")
    dtype, channels = IMAGE_ENCODINGS[encoding]
    height, width = _size(msg, "height"), _size(msg, "width")
    row_bytes = width * channels * dtype.itemsize
    step = _size(msg, "step", default=0) or row_bytes
    if step < row_bytes:
        raise ValueError(f"image step {step} is smaller than a row of {width} x {encoding} ({row_bytes} bytes)")
    raw = _as_bytes(_get(msg, "data"))
    # sizes are checked against the data before anything is allocated; the last row may lack its
    # padding (it needs row_bytes, not step), and nothing is ever padded: memory <= data size
    if height and width and raw.size < step * (height - 1) + row_bytes:
        raise ValueError(f"image data has {raw.size} bytes, {height} rows of step {step} need "
                         f"{step * (height - 1) + row_bytes}")
    if height == 0 or width == 0:
        shape = (height, width, 3) if channels >= 3 else (height, width)
        return np.zeros(shape, dtype=dtype)
    rows = np.lib.stride_tricks.as_strided(raw, shape=(height, row_bytes), strides=(step, 1), writeable=False)
    big = bool(_get(msg, "is_bigendian", default=False))
    element = dtype.newbyteorder(">" if big else "<") if dtype.itemsize > 1 else dtype
    image = np.ascontiguousarray(rows).view(element).reshape(height, width, channels)
    image = image.astype(dtype.newbyteorder("="), copy=True)
    if channels == 1:
        return image[:, :, 0].copy()
    if encoding.startswith("bgr"):
        image = image[:, :, [2, 1, 0]]
    return np.ascontiguousarray(image[:, :, :3])


def depth_to_metres(msg) -> np.ndarray:
    """Decode a depth ``Image`` to (H, W) float32 metres; invalid depth (0, NaN, inf, < 0) is 0.

    16UC1 / mono16 are millimetres (0 = invalid); 32FC1 is metres. The decoding rule is
    :func:`sas_core.geometry.camera.depth_image_to_metres` (one home).
    """
    from sas_core.geometry.camera import depth_image_to_metres

    encoding = str(_get(msg, "encoding"))
    if encoding not in ("16UC1", "mono16", "32FC1"):
        raise ValueError(f"depth image must be 16UC1 (mm) or 32FC1 (m), got {encoding!r}")
    return depth_image_to_metres(image_to_numpy(msg), encoding)


def image_fields(array: np.ndarray, encoding: str) -> dict:
    """Fields of a ``sensor_msgs/Image`` for ``array`` (the inverse of :func:`image_to_numpy`).

    Args:
        array: (H, W, 3) uint8 **RGB** for rgb8 / bgr8 (bgr8 swaps on write); (H, W, 4) for
            rgba8 / bgra8; (H, W) uint8 for mono8; (H, W) uint16 millimetres, or float metres
            (rounded to mm, invalid -> 0), for 16UC1; (H, W) float metres for 32FC1.
        encoding: the target encoding.

    Returns:
        dict(height, width, encoding, is_bigendian, step, data) with ``data`` a 1-D uint8 array
        in native byte order (``is_bigendian`` says which).
    """
    if encoding not in IMAGE_ENCODINGS:
        raise ValueError(f"unsupported image encoding {encoding!r}; supported: {', '.join(IMAGE_ENCODINGS)}")
    dtype, channels = IMAGE_ENCODINGS[encoding]
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    expected_ndim = 3 if channels > 1 else 2
    if array.ndim != expected_ndim or (channels > 1 and array.shape[2] != channels):
        want = f"(H, W, {channels})" if channels > 1 else "(H, W)"
        raise ValueError(f"{encoding} needs an array of shape {want}, got {array.shape}")
    if encoding in ("16UC1", "mono16") and array.dtype.kind == "f":
        mm = np.where(np.isfinite(array) & (array > 0), np.round(array * 1000.0), 0.0)
        array = np.clip(mm, 0, np.iinfo(np.uint16).max)
    elif dtype.kind in "iu" and array.dtype.kind == "f":
        raise ValueError(f"{encoding} needs an integer array, got {array.dtype}")
    out = np.ascontiguousarray(array.astype(dtype, copy=False))
    if encoding.startswith("bgr"):
        out = np.ascontiguousarray(out[:, :, [2, 1, 0, 3][:channels]])
    height, width = out.shape[:2]
    return dict(height=int(height), width=int(width), encoding=encoding, is_bigendian=NATIVE_BIGENDIAN,
                step=int(width * channels * dtype.itemsize), data=out.reshape(-1).view(np.uint8).copy())


# --------------------------------------------------------------------------------------------
# PointCloud2

def pointcloud2_dtype(fields: Iterable, point_step: int, is_bigendian: bool = False) -> np.dtype:
    """The structured dtype (with offsets and ``itemsize = point_step``) a PointCloud2 describes.

    ``fields`` are PointField-like objects (``name``, ``offset``, ``datatype``, ``count``) or
    ``(name, offset, datatype, count)`` tuples. Fields with an empty name are skipped (padding).
    """
    names, formats, offsets = [], [], []
    for field in fields:
        if isinstance(field, (tuple, list)):
            name, offset, datatype, count = field
        else:
            name, offset, datatype = field.name, field.offset, field.datatype
            count = getattr(field, "count", 1)
        if not name:
            continue
        if not isinstance(datatype, (int, np.integer)) or datatype not in POINTFIELD_DTYPES:
            raise ValueError(f"PointField {name!r} has unknown datatype {datatype} (valid: 1..8)")
        base = POINTFIELD_DTYPES[datatype].newbyteorder(">" if is_bigendian else "<")
        try:
            count, offset = int(count), int(offset)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"PointField {name!r}: offset {offset!r} and count {count!r} must be integers") from None
        if count < 1:  # ROS: count is the number of elements; 0 is not a field
            raise ValueError(f"PointField {name!r} has count {count}; it must be >= 1")
        if int(offset) < 0 or int(offset) + base.itemsize * count > int(point_step):
            raise ValueError(f"PointField {name!r} (offset {offset}, {count} x {base}) does not fit in "
                             f"point_step {point_step}")
        names.append(str(name))
        formats.append(base if count == 1 else (base, (count,)))
        offsets.append(int(offset))
    if len(set(names)) != len(names):
        raise ValueError(f"PointCloud2 has duplicate field names: {names}")
    dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": int(point_step)})
    return dtype


def pointcloud2_to_array(msg, remove_nans: bool = False) -> np.ndarray:
    """Decode a ``sensor_msgs/PointCloud2`` to a packed native-order structured array (N,).

    N = height * width (row padding via ``row_step`` is skipped). Fields with ``count > 1`` become
    sub-array columns. With ``remove_nans``, points with a NaN in x, y or z are dropped (as
    ``sensor_msgs_py.point_cloud2.read_points(skip_nans=True)``).

    Raises:
        ValueError: ``point_step`` smaller than the fields, ``data`` too short, unknown datatype.
    """
    height, width = _size(msg, "height"), _size(msg, "width")
    point_step = _size(msg, "point_step")
    row_step = _size(msg, "row_step", default=0) or point_step * width
    if row_step < point_step * width:
        raise ValueError(f"row_step {row_step} is smaller than width {width} x point_step {point_step}")
    raw = _as_bytes(_get(msg, "data"))
    n = height * width
    # the sizes against the data first: nothing below allocates more than the data holds
    need = row_step * (height - 1) + point_step * width if n else 0
    if raw.size < need:
        raise ValueError(f"PointCloud2 data has {raw.size} bytes, {height}x{width} points need {need}")
    if n and point_step == 0:
        raise ValueError(f"PointCloud2 point_step is 0 for {height}x{width} points")
    big = bool(_get(msg, "is_bigendian", default=False))
    dtype = pointcloud2_dtype(_get(msg, "fields"), point_step, big)
    native = np.dtype([(name, _native(dtype.fields[name][0])) for name in dtype.names])
    if n == 0:
        return np.zeros(0, dtype=native)
    if row_step != point_step * width:
        raw = np.ascontiguousarray(np.lib.stride_tricks.as_strided(
            raw, shape=(height, point_step * width), strides=(row_step, 1))).reshape(-1)
    points = np.frombuffer(raw[: n * point_step].tobytes(), dtype=dtype, count=n)
    out = np.empty(n, dtype=native)
    for name in dtype.names:
        out[name] = points[name]
    if remove_nans:
        keep = np.ones(n, dtype=bool)
        for name in ("x", "y", "z"):
            if name in native.names and out[name].dtype.kind == "f":
                keep &= ~np.isnan(out[name])
        out = out[keep]
    return out


def _native(dt: np.dtype) -> np.dtype:
    if dt.subdtype is not None:
        base, shape = dt.subdtype
        return np.dtype((base.newbyteorder("="), shape))
    return dt.newbyteorder("=")


def pointcloud2_fields(array: np.ndarray, is_dense: Optional[bool] = None, height: int = 1,
                       is_bigendian: Optional[bool] = None) -> dict:
    """Fields of a ``sensor_msgs/PointCloud2`` for a structured array (inverse of the decoder).

    The array's own layout is kept (offsets and itemsize, so padding survives); sub-array columns
    become ``count > 1`` fields. Byte order: ``is_bigendian`` if given, else the array's (all
    fields must agree), native for single-byte fields.

    Args:
        array: (N,) structured array of fields with PointField-compatible dtypes.
        is_dense: default: True unless a float x, y or z is NaN.
        height: 1 for unorganised clouds, else N must be height * width.

    Returns:
        dict(height, width, fields=[(name, offset, datatype, count)], is_bigendian, point_step,
        row_step, data (1-D uint8), is_dense).
    """
    array = np.asarray(array)
    if array.dtype.names is None:
        raise ValueError("pointcloud2_fields needs a structured array (named fields)")
    array = array.reshape(-1)
    n = len(array)
    if height <= 0 or n % height:
        raise ValueError(f"{n} points do not form {height} rows")
    orders = set()
    for name in array.dtype.names:
        base = array.dtype.fields[name][0]
        base = base.subdtype[0] if base.subdtype else base
        if base.itemsize > 1:
            orders.add(">" if base.byteorder == ">" or (base.byteorder == "=" and NATIVE_BIGENDIAN)
                       else "<")
    if is_bigendian is None:
        if len(orders) > 1:
            is_bigendian = NATIVE_BIGENDIAN
        else:
            is_bigendian = orders == {">"}
    order = ">" if is_bigendian else "<"
    fields, formats = [], []
    for name in array.dtype.names:
        dt, offset = array.dtype.fields[name][:2]
        base, shape = (dt.subdtype if dt.subdtype else (dt, ()))
        count = int(np.prod(shape)) if shape else 1
        code = _DTYPE_TO_POINTFIELD.get((base.kind, base.itemsize))
        if code is None or base.kind not in "iuf":
            raise ValueError(f"field {name!r} has dtype {dt} with no PointField datatype")
        fields.append((name, int(offset), code, count))
        base = base.newbyteorder(order)
        formats.append(base if count == 1 else (base, (count,)))
    target = np.dtype({"names": list(array.dtype.names), "formats": formats,
                       "offsets": [f[1] for f in fields], "itemsize": array.dtype.itemsize})
    out = np.zeros(n, dtype=target)
    for name in array.dtype.names:
        out[name] = array[name].reshape(out[name].shape)
    if is_dense is None:
        is_dense = True
        for name in ("x", "y", "z"):
            if name in array.dtype.names and array.dtype[name].kind == "f" and np.isnan(array[name]).any():
                is_dense = False
    point_step = int(target.itemsize)
    width = n // height
    return dict(height=int(height), width=int(width), fields=fields, is_bigendian=bool(is_bigendian),
                point_step=point_step, row_step=point_step * width,
                data=out.view(np.uint8).reshape(-1).copy(), is_dense=bool(is_dense))


def pack_rgb(colors: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 (or float in [0, 1]) colours -> (N,) float32 PCL-packed ``rgb``."""
    colors = np.asarray(colors)
    if colors.ndim != 2 or colors.shape[1] < 3:
        raise ValueError(f"colours must be (N, 3), got {colors.shape}")
    if colors.dtype.kind == "f":
        colors = np.clip(np.round(colors[:, :3] * 255.0), 0, 255)
    c = colors[:, :3].astype(np.uint32)
    packed = (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]
    return packed.astype(np.uint32).view(np.float32)


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """(N,) float32 (or uint32) packed ``rgb``/``rgba`` -> (N, 3) uint8 RGB."""
    packed = np.ascontiguousarray(packed)
    as_u32 = packed.view(np.uint32) if packed.dtype.itemsize == 4 else packed.astype(np.uint32)
    return np.stack([(as_u32 >> 16) & 0xFF, (as_u32 >> 8) & 0xFF, as_u32 & 0xFF], axis=-1).astype(np.uint8)


def make_cloud_array(positions: np.ndarray, colors: Optional[np.ndarray] = None,
                     labels: Optional[np.ndarray] = None, scores: Optional[np.ndarray] = None,
                     **extra: np.ndarray) -> np.ndarray:
    """A structured array x, y, z (float32)[, rgb (packed float32)][, label (uint32)][, score (float32)]
    plus ``extra`` (N,) columns with their own dtypes (e.g. ``text_index=uint32 array``)."""
    positions = np.asarray(positions, dtype=np.float32).reshape(-1, 3)
    n = len(positions)
    cols = [("x", np.float32), ("y", np.float32), ("z", np.float32)]
    if colors is not None:
        cols.append(("rgb", np.float32))
    if labels is not None:
        cols.append(("label", np.uint32))
    if scores is not None:
        cols.append(("score", np.float32))
    extra = {k: np.asarray(v).reshape(n) for k, v in extra.items()}
    cols += [(k, v.dtype) for k, v in extra.items()]
    out = np.empty(n, dtype=cols)
    out["x"], out["y"], out["z"] = positions[:, 0], positions[:, 1], positions[:, 2]
    if colors is not None:
        out["rgb"] = pack_rgb(np.asarray(colors).reshape(n, -1))
    if labels is not None:
        labels = np.asarray(labels)
        if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.uint32).max):
            raise ValueError("labels must fit in uint32 (use 255 for 'no label')")
        out["label"] = labels.reshape(n)
    if scores is not None:
        out["score"] = np.asarray(scores, dtype=np.float32).reshape(n)
    for k, v in extra.items():
        out[k] = v
    return out


def cloud_xyz(array: np.ndarray, remove_nans: bool = True) -> np.ndarray:
    """(N, 3) float32 x, y, z of a structured cloud array (NaN rows dropped with ``remove_nans``)."""
    missing = [n for n in ("x", "y", "z") if array.dtype.names is None or n not in array.dtype.names]
    if missing:
        raise ValueError(f"point cloud has no {', '.join(missing)} field(s); fields: {array.dtype.names}")
    xyz = np.stack([array["x"], array["y"], array["z"]], axis=1).astype(np.float32)
    if remove_nans:
        xyz = xyz[np.isfinite(xyz).all(axis=1)]
    return xyz


# --------------------------------------------------------------------------------------------
# CameraInfo, stamps and poses

def camera_info_to_intrinsics(msg) -> CameraIntrinsics:
    """``sensor_msgs/CameraInfo`` (``k``, or ROS 1 ``K``) -> :class:`CameraIntrinsics`.

    Delegates to :func:`sas_core.geometry.camera.intrinsics_from_camera_info` (binning and ROI
    honoured). Raises ValueError for a missing or all-zero K (uncalibrated camera), a
    non-positive focal length or a missing image size.
    """
    from sas_core.geometry.camera import intrinsics_from_camera_info

    k = _get(msg, "k", "K")
    if k is not None and hasattr(k, "__len__") and len(k) != 9:  # before any conversion of a huge k
        raise ValueError(f"camera info k must have 9 entries, got {len(k)}")
    for name in ("width", "height"):
        if _get(msg, name) is not None:
            _size(msg, name)
    try:
        return intrinsics_from_camera_info(msg)
    except (TypeError, OverflowError) as exc:
        raise ValueError(f"camera info rejected: {type(exc).__name__}: {exc}") from None


def intrinsics_to_camera_info_fields(intrinsics: CameraIntrinsics) -> dict:
    """Fields of a ``CameraInfo`` (plumb_bob, no distortion) for ``intrinsics``."""
    K = intrinsics.K
    P = np.zeros((3, 4))
    P[:, :3] = K
    return dict(width=int(intrinsics.width), height=int(intrinsics.height), distortion_model="plumb_bob",
                d=[0.0] * 5, k=K.reshape(-1).tolist(), r=np.eye(3).reshape(-1).tolist(),
                p=P.reshape(-1).tolist())


def stamp_to_seconds(stamp) -> float:
    """``builtin_interfaces/Time`` (``sec``/``nanosec``, or ROS 1 ``secs``/``nsecs``) -> float seconds."""
    if stamp is None:
        return 0.0
    if isinstance(stamp, (int, float)):
        return float(stamp)
    sec = _get(stamp, "sec", "secs", default=0)
    nsec = _get(stamp, "nanosec", "nsecs", default=0)
    return float(sec) + float(nsec) * 1e-9


def seconds_to_stamp(seconds: float) -> tuple[int, int]:
    """float seconds -> (sec, nanosec) with 0 <= nanosec < 1e9."""
    import math

    sec = math.floor(float(seconds))
    nsec = int(round((float(seconds) - sec) * 1e9))
    if nsec >= 1_000_000_000:
        sec, nsec = sec + 1, nsec - 1_000_000_000
    return int(sec), nsec


def quaternion_to_matrix(quat_xyzw: Sequence[float]) -> np.ndarray:
    """(x, y, z, w) quaternion (normalised here) -> (3, 3) float64 rotation."""
    q = np.asarray(quat_xyzw, dtype=np.float64).reshape(4)
    norm = np.linalg.norm(q)
    if not np.isfinite(norm) or norm < 1e-12:
        raise ValueError(f"quaternion {q.tolist()} has zero or invalid norm")
    x, y, z, w = q / norm
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def matrix_to_quaternion(R: np.ndarray) -> np.ndarray:
    """(3, 3) rotation -> (x, y, z, w) unit quaternion with w >= 0 (nearest rotation if not exact)."""
    from scipy.spatial.transform import Rotation

    q = Rotation.from_matrix(np.asarray(R, dtype=np.float64)[:3, :3]).as_quat()
    return q if q[3] >= 0 else -q


def pose_to_matrix(position_xyz: Sequence[float], quat_xyzw: Sequence[float]) -> np.ndarray:
    """Translation (x, y, z) and quaternion (x, y, z, w) -> (4, 4) float64 homogeneous transform."""
    T = np.eye(4)
    T[:3, :3] = quaternion_to_matrix(quat_xyzw)
    T[:3, 3] = np.asarray(position_xyz, dtype=np.float64).reshape(3)
    if not np.isfinite(T).all():
        raise ValueError("pose has non-finite values")
    return T


def matrix_to_pose(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(4, 4) transform -> (xyz (3,), quat_xyzw (4,)) float64."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4):
        raise ValueError(f"transform must be 4x4, got {T.shape}")
    return T[:3, 3].copy(), matrix_to_quaternion(T[:3, :3])


def _xyz(v) -> list[float]:
    return [float(_get(v, "x")), float(_get(v, "y")), float(_get(v, "z"))]


def _xyzw(q) -> list[float]:
    return [float(_get(q, "x")), float(_get(q, "y")), float(_get(q, "z")), float(_get(q, "w"))]


def pose_msg_to_matrix(msg) -> np.ndarray:
    """Any of Pose, PoseStamped, PoseWithCovariance(Stamped), Odometry, Transform, TransformStamped
    (duck-typed) -> (4, 4) float64."""
    for _ in range(4):  # unwrap .pose / .transform containers
        if hasattr(msg, "position") and hasattr(msg, "orientation"):
            return pose_to_matrix(_xyz(msg.position), _xyzw(msg.orientation))
        if hasattr(msg, "translation") and hasattr(msg, "rotation"):
            return pose_to_matrix(_xyz(msg.translation), _xyzw(msg.rotation))
        inner = _get(msg, "pose", "transform")
        if inner is None:
            break
        msg = inner
    raise ValueError(f"{type(msg).__name__} has no pose (position/orientation or translation/rotation)")
