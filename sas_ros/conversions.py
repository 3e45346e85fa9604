"""rclpy message construction and parsing around :mod:`sas_core.data.msg_codec`.

``sensor_msgs_py.point_cloud2`` is used for reading clouds when it is importable (a normal ROS 2
install); our NumPy codec otherwise. Both give the same packed native-order structured arrays
(``test/test_conversions.py`` compares them where sensor_msgs_py exists). Building messages
always goes through the codec (one vectorised copy into the message's byte buffer).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Point, Pose, Quaternion, Transform, Vector3
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header

from sas_core.data import msg_codec as codec
from sas_core.types import CameraIntrinsics

try:  # pragma: no cover - depends on the ROS install
    from sensor_msgs_py import point_cloud2 as _pc2
except ImportError:  # not available as a wheel
    _pc2 = None

HAVE_SENSOR_MSGS_PY = _pc2 is not None

# re-exported decoders (duck-typed: rclpy or rosbags messages)
image_to_numpy = codec.image_to_numpy
depth_to_metres = codec.depth_to_metres
camera_info_to_intrinsics = codec.camera_info_to_intrinsics
pose_msg_to_matrix = codec.pose_msg_to_matrix


def to_stamp(seconds: float) -> Time:
    sec, nsec = codec.seconds_to_stamp(seconds)
    return Time(sec=int(sec), nanosec=int(nsec))


def stamp_seconds(stamp) -> float:
    return codec.stamp_to_seconds(stamp)


def make_header(frame_id: str = "", stamp=None) -> Header:
    """A Header; ``stamp`` is seconds (float), a Time, or None (zero)."""
    if stamp is None:
        stamp = Time()
    elif not isinstance(stamp, Time):
        stamp = to_stamp(float(stamp))
    return Header(frame_id=frame_id, stamp=stamp)


def numpy_to_image(array: np.ndarray, encoding: str, frame_id: str = "", stamp=None) -> Image:
    """(H, W[, C]) array -> sensor_msgs/Image (see :func:`msg_codec.image_fields`)."""
    f = codec.image_fields(array, encoding)
    msg = Image(header=make_header(frame_id, stamp), height=f["height"], width=f["width"], encoding=f["encoding"],
                is_bigendian=int(f["is_bigendian"]), step=f["step"])
    msg.data = f["data"].tobytes()
    return msg


def cloud_to_array(msg: PointCloud2, remove_nans: bool = False) -> np.ndarray:
    """PointCloud2 -> packed native-order structured array (N,) (sensor_msgs_py when importable)."""
    if _pc2 is not None:  # pragma: no cover - exercised on full ROS installs
        points = _pc2.read_points(msg, skip_nans=remove_nans)
        points = np.asarray(points).reshape(-1)
        native = np.dtype([(n, codec._native(points.dtype.fields[n][0])) for n in points.dtype.names])
        out = np.empty(len(points), native)
        for n in points.dtype.names:
            out[n] = points[n]
        return out
    return codec.pointcloud2_to_array(msg, remove_nans=remove_nans)


def array_to_cloud(array: np.ndarray, frame_id: str = "", stamp=None, is_dense: Optional[bool] = None) -> PointCloud2:
    """Structured array (N,) -> sensor_msgs/PointCloud2 (unorganised, height 1)."""
    f = codec.pointcloud2_fields(array, is_dense=is_dense)
    msg = PointCloud2(header=make_header(frame_id, stamp), height=f["height"], width=f["width"],
                      fields=[PointField(name=n, offset=o, datatype=d, count=c) for n, o, d, c in f["fields"]],
                      is_bigendian=f["is_bigendian"], point_step=f["point_step"], row_step=f["row_step"],
                      is_dense=f["is_dense"])
    msg.data = f["data"].tobytes()
    return msg


def xyz_cloud(positions: np.ndarray, frame_id: str = "", stamp=None, colors=None, labels=None, scores=None,
              **extra) -> PointCloud2:
    """x, y, z[, rgb][, label][, score][, extra...] cloud (see :func:`msg_codec.make_cloud_array`)."""
    return array_to_cloud(codec.make_cloud_array(positions, colors, labels, scores, **extra), frame_id, stamp)


def intrinsics_to_camera_info(intrinsics: CameraIntrinsics, frame_id: str = "", stamp=None) -> CameraInfo:
    f = codec.intrinsics_to_camera_info_fields(intrinsics)
    return CameraInfo(header=make_header(frame_id, stamp), width=f["width"], height=f["height"],
                      distortion_model=f["distortion_model"], d=f["d"], k=f["k"], r=f["r"], p=f["p"])


def matrix_to_pose_msg(T: np.ndarray) -> Pose:
    xyz, q = codec.matrix_to_pose(T)
    return Pose(position=Point(x=float(xyz[0]), y=float(xyz[1]), z=float(xyz[2])),
                orientation=Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])))


def matrix_to_transform_msg(T: np.ndarray) -> Transform:
    xyz, q = codec.matrix_to_pose(T)
    return Transform(translation=Vector3(x=float(xyz[0]), y=float(xyz[1]), z=float(xyz[2])),
                     rotation=Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])))


def point_msg(xyz) -> Point:
    return Point(x=float(xyz[0]), y=float(xyz[1]), z=float(xyz[2]))
