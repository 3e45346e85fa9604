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


def detected_object(inst, text_index: int, best_score: float):
    """sas_interfaces/DetectedObject of a :class:`sas_core.instances.Instance` (map frame)."""
    import math

    from sas_interfaces.msg import DetectedObject

    half = 0.5 * float(inst.obb_yaw)
    box = Pose(position=point_msg(inst.obb_center),
               orientation=Quaternion(x=0.0, y=0.0, z=math.sin(half), w=math.cos(half)))
    size = Vector3(x=float(inst.obb_size[0]), y=float(inst.obb_size[1]), z=float(inst.obb_size[2]))
    return DetectedObject(text_index=int(text_index), score=float(inst.score), best_score=float(best_score),
                          n_points=int(inst.n_points), centroid=point_msg(inst.centroid), box=box, box_size=size,
                          aabb_min=point_msg(inst.aabb_min), aabb_max=point_msg(inst.aabb_max))


def object_markers(objects, texts, frame_id: str, stamp, lifetime: float = 0.0):
    """visualization_msgs/MarkerArray for RViz: a DELETEALL, then per object a translucent CUBE
    (its oriented box) and a TEXT_VIEW_FACING label above it ("text 0.62"), in namespace
    ``objects`` / ``labels``; colours by text index (the label palette)."""
    from builtin_interfaces.msg import Duration
    from visualization_msgs.msg import Marker, MarkerArray

    from sas_core.viz import label_palette

    palette = label_palette()
    life = Duration(sec=int(lifetime), nanosec=int((lifetime % 1.0) * 1e9))
    out = MarkerArray(markers=[Marker(action=Marker.DELETEALL, header=make_header(frame_id, stamp))])
    for k, obj in enumerate(objects):
        r, g, b = (float(c) / 255.0 for c in palette[obj.text_index % 255])
        header = make_header(frame_id, stamp)
        cube = Marker(header=header, ns="objects", id=k, type=Marker.CUBE, action=Marker.ADD, pose=obj.box,
                      scale=Vector3(x=max(obj.box_size.x, 0.01), y=max(obj.box_size.y, 0.01),
                                    z=max(obj.box_size.z, 0.01)), lifetime=life)
        cube.color.r, cube.color.g, cube.color.b, cube.color.a = r, g, b, 0.35
        label = Marker(header=header, ns="labels", id=k, type=Marker.TEXT_VIEW_FACING, action=Marker.ADD,
                       scale=Vector3(x=0.0, y=0.0, z=0.12), lifetime=life,
                       text=f"{texts[obj.text_index]} {obj.score:.2f}")
        label.pose.position = Point(x=obj.box.position.x, y=obj.box.position.y,
                                    z=obj.box.position.z + 0.5 * obj.box_size.z + 0.1)
        label.pose.orientation.w = 1.0
        label.color.r, label.color.g, label.color.b, label.color.a = 1.0, 1.0, 1.0, 1.0
        out.markers += [cube, label]
    return out
