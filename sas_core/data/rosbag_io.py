"""ROS 2 bags of the synthetic world, written and read with ``rosbags`` (no ROS runtime).

Topics (fixed by the project contract)::

    /camera/color/image_raw     sensor_msgs/Image rgb8            frame camera_color_optical_frame
    /camera/depth/image_raw     sensor_msgs/Image 16UC1 (mm), aligned to color, same frame
    /camera/color/camera_info   sensor_msgs/CameraInfo (plumb_bob, zero distortion), same frame
    /camera/pose                geometry_msgs/PoseStamped, frame "map": pose of the optical frame
    /lidar/points               sensor_msgs/PointCloud2 x,y,z,intensity f32 + ring u16, frame "lidar"
    /lidar/pose                 geometry_msgs/PoseStamped, frame "map": pose of the "lidar" frame

This is our own synthetic layout, one case among the layouts robots record: reading goes through
:mod:`sas_core.data.bag_streams`, which discovers any layout (these topics included).
Header stamps equal the bag's log times. The camera runs at 15 Hz from 1_700_000_000 s.
Messages are encoded and decoded through :mod:`sas_core.data.msg_codec`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from sas_core.data import msg_codec
from sas_core.types import CameraIntrinsics, Frame

COLOR_TOPIC = "/camera/color/image_raw"
DEPTH_TOPIC = "/camera/depth/image_raw"
INFO_TOPIC = "/camera/color/camera_info"
POSE_TOPIC = "/camera/pose"
LIDAR_TOPIC = "/lidar/points"
LIDAR_POSE_TOPIC = "/lidar/pose"
MAP_FRAME = "map"
CAMERA_FRAME = "camera_color_optical_frame"
LIDAR_FRAME = "lidar"
TOPIC_TYPES = {
    COLOR_TOPIC: "sensor_msgs/msg/Image", DEPTH_TOPIC: "sensor_msgs/msg/Image",
    INFO_TOPIC: "sensor_msgs/msg/CameraInfo", POSE_TOPIC: "geometry_msgs/msg/PoseStamped",
    LIDAR_TOPIC: "sensor_msgs/msg/PointCloud2", LIDAR_POSE_TOPIC: "geometry_msgs/msg/PoseStamped",
}
STORAGES = ("sqlite3", "mcap")

# LiDAR point layout (Velodyne-like, padded to 32 bytes)
LIDAR_DTYPE = np.dtype({"names": ["x", "y", "z", "intensity", "ring"],
                        "formats": ["<f4", "<f4", "<f4", "<f4", "<u2"],
                        "offsets": [0, 4, 8, 12, 16], "itemsize": 32})


def typestore():
    """The rosbags typestore of the newest ROS 2 distribution rosbags knows (Kilted, else Jazzy)."""
    from rosbags.typesys import Stores, get_typestore

    for name in ("ROS2_KILTED", "ROS2_JAZZY", "LATEST"):
        if hasattr(Stores, name):
            return get_typestore(getattr(Stores, name))
    raise RuntimeError("rosbags has no ROS 2 typestore")  # pragma: no cover


class MessageBuilder:
    """Builders of rosbags message objects from msg_codec field dicts."""

    def __init__(self, store):
        self.store = store
        t = store.types
        self.Time, self.Header = t["builtin_interfaces/msg/Time"], t["std_msgs/msg/Header"]
        self.Image, self.CameraInfo = t["sensor_msgs/msg/Image"], t["sensor_msgs/msg/CameraInfo"]
        self.ROI, self.PointField = t["sensor_msgs/msg/RegionOfInterest"], t["sensor_msgs/msg/PointField"]
        self.PointCloud2 = t["sensor_msgs/msg/PointCloud2"]
        self.PoseStamped, self.Pose = t["geometry_msgs/msg/PoseStamped"], t["geometry_msgs/msg/Pose"]
        self.Point, self.Quaternion = t["geometry_msgs/msg/Point"], t["geometry_msgs/msg/Quaternion"]
        self.CompressedImage = t["sensor_msgs/msg/CompressedImage"]
        self.Vector3, self.Transform = t["geometry_msgs/msg/Vector3"], t["geometry_msgs/msg/Transform"]
        self.TransformStamped, self.TFMessage = t["geometry_msgs/msg/TransformStamped"], t["tf2_msgs/msg/TFMessage"]
        self.Odometry, self.Twist = t["nav_msgs/msg/Odometry"], t["geometry_msgs/msg/Twist"]
        self.PoseCov = t["geometry_msgs/msg/PoseWithCovariance"]
        self.TwistCov = t["geometry_msgs/msg/TwistWithCovariance"]

    def header(self, stamp: float, frame_id: str):
        sec, nsec = msg_codec.seconds_to_stamp(stamp)
        return self.Header(stamp=self.Time(sec=sec, nanosec=nsec), frame_id=frame_id)

    def image(self, array, encoding, stamp, frame_id):
        f = msg_codec.image_fields(array, encoding)
        return self.Image(header=self.header(stamp, frame_id), height=f["height"], width=f["width"],
                          encoding=f["encoding"], is_bigendian=int(f["is_bigendian"]), step=f["step"],
                          data=np.ascontiguousarray(f["data"], np.uint8))

    def camera_info(self, intrinsics: CameraIntrinsics, stamp, frame_id):
        f = msg_codec.intrinsics_to_camera_info_fields(intrinsics)
        return self.CameraInfo(
            header=self.header(stamp, frame_id), height=f["height"], width=f["width"],
            distortion_model=f["distortion_model"], d=np.asarray(f["d"], np.float64),
            k=np.asarray(f["k"], np.float64), r=np.asarray(f["r"], np.float64), p=np.asarray(f["p"], np.float64),
            binning_x=0, binning_y=0, roi=self.ROI(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))

    def pose(self, T, stamp, frame_id=MAP_FRAME):
        xyz, q = msg_codec.matrix_to_pose(T)
        return self.PoseStamped(header=self.header(stamp, frame_id), pose=self.Pose(
            position=self.Point(x=float(xyz[0]), y=float(xyz[1]), z=float(xyz[2])),
            orientation=self.Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3]))))

    def compressed(self, fields: dict, stamp, frame_id):
        """A CompressedImage from ``image_codec.compress_color`` / ``compress_depth`` fields."""
        return self.CompressedImage(header=self.header(stamp, frame_id), format=str(fields["format"]),
                                    data=np.ascontiguousarray(fields["data"], np.uint8))

    def transform(self, parent: str, child: str, stamp: float, T):
        xyz, q = msg_codec.matrix_to_pose(T)
        return self.TransformStamped(header=self.header(stamp, parent), child_frame_id=child, transform=self.Transform(
            translation=self.Vector3(x=float(xyz[0]), y=float(xyz[1]), z=float(xyz[2])),
            rotation=self.Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3]))))

    def tf(self, transforms):
        """A TFMessage of ``(parent, child, stamp, T)`` tuples."""
        return self.TFMessage(transforms=[self.transform(*t) for t in transforms])

    def odometry(self, parent: str, child: str, stamp: float, T):
        """nav_msgs/Odometry: the pose of ``child`` in ``parent`` (zero twist and covariances)."""
        pose = self.pose(T, stamp, parent).pose
        zero = self.Vector3(x=0.0, y=0.0, z=0.0)
        return self.Odometry(header=self.header(stamp, parent), child_frame_id=child,
                             pose=self.PoseCov(pose=pose, covariance=np.zeros(36)),
                             twist=self.TwistCov(twist=self.Twist(linear=zero, angular=zero), covariance=np.zeros(36)))

    def cloud(self, structured, stamp, frame_id):
        f = msg_codec.pointcloud2_fields(structured)
        fields = [self.PointField(name=n, offset=o, datatype=d, count=c) for n, o, d, c in f["fields"]]
        return self.PointCloud2(header=self.header(stamp, frame_id), height=f["height"], width=f["width"],
                                fields=fields, is_bigendian=f["is_bigendian"], point_step=f["point_step"],
                                row_step=f["row_step"], data=np.ascontiguousarray(f["data"], np.uint8),
                                is_dense=f["is_dense"])


def lidar_array(sweep) -> np.ndarray:
    """(M,) structured LIDAR_DTYPE array of a LidarSweep."""
    out = np.zeros(len(sweep.points), LIDAR_DTYPE)
    out["x"], out["y"], out["z"] = sweep.points[:, 0], sweep.points[:, 1], sweep.points[:, 2]
    out["intensity"] = sweep.intensity
    out["ring"] = sweep.ring
    return out


def _ns(stamp: float) -> int:
    sec, nsec = msg_codec.seconds_to_stamp(stamp)
    return sec * 1_000_000_000 + nsec


def write_bag(scene, path, storage: str = "sqlite3", progress: bool = False) -> Path:
    """Write ``scene``'s frames (and LiDAR sweeps) as a ROS 2 bag directory at ``path``.

    The bag is written into a temporary folder next to ``path`` and renamed into place, so a
    failure never leaves a half-written bag; an existing bag at ``path`` is replaced.

    Args:
        scene: a SyntheticScene (``frames``, ``lidar``, ``intrinsics``).
        storage: "sqlite3" or "mcap".
    Returns:
        ``path``.
    """
    m = MessageBuilder(typestore())
    events = []
    for f in scene.frames:
        events.append((f.stamp, 0, COLOR_TOPIC, lambda f=f: m.image(f.color, "rgb8", f.stamp, CAMERA_FRAME)))
        events.append((f.stamp, 1, DEPTH_TOPIC, lambda f=f: m.image(f.depth, "16UC1", f.stamp, CAMERA_FRAME)))
        events.append((f.stamp, 2, INFO_TOPIC, lambda f=f: m.camera_info(f.intrinsics, f.stamp, CAMERA_FRAME)))
        events.append((f.stamp, 3, POSE_TOPIC, lambda f=f: m.pose(f.pose, f.stamp)))
    for s in getattr(scene, "lidar", None) or []:
        events.append((s.stamp, 4, LIDAR_TOPIC, lambda s=s: m.cloud(lidar_array(s), s.stamp, LIDAR_FRAME)))
        events.append((s.stamp, 5, LIDAR_POSE_TOPIC, lambda s=s: m.pose(s.pose, s.stamp)))
    return write_bag_events(path, [(t, o, topic, TOPIC_TYPES[topic], make) for t, o, topic, make in events],
                            storage=storage, progress=progress, store=m.store)


def write_bag_events(path, events, storage: str = "sqlite3", progress: bool = False, store=None) -> Path:
    """Write a ROS 2 bag of any layout, atomically (see :func:`write_bag`).

    Args:
        events: ``(log time s, order, topic, msgtype, make)`` tuples; ``make()`` returns the rosbags
            message (built with :class:`MessageBuilder`). Written sorted by (time, order).
        storage: "sqlite3" or "mcap".
    """
    from rosbags.rosbag2 import StoragePlugin, Writer

    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    store = store or typestore()
    events = sorted(events, key=lambda e: (_ns(e[0]), e[1]))
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    bag_dir = tmp / path.name
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    try:
        with Writer(bag_dir, version=9, storage_plugin=plugin) as writer:
            conns = {}
            for topic, msgtype in dict.fromkeys((e[2], e[3]) for e in events):
                if topic in conns:
                    raise ValueError(f"topic {topic} is given two message types")
                conns[topic] = writer.add_connection(topic, msgtype, typestore=store)
            it = events
            if progress:
                from tqdm import tqdm

                it = tqdm(events, desc=f"bag {path.name}", unit="msg", leave=False)
            for t, _, topic, msgtype, make in it:
                writer.write(conns[topic], _ns(t), store.serialize_cdr(make(), msgtype))
        for p in bag_dir.iterdir():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            old = tmp / ".old"
            os.replace(path, old)
        os.replace(bag_dir, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------------------------
# Reading

def _open_reader(path):
    from sas_core.data.bag_streams import open_reader

    return open_reader(path)


def bag_topics(path) -> dict:
    """{topic: (msgtype, message count)} of a bag."""
    reader = _open_reader(path)
    try:
        out = {}
        for c in reader.connections:
            t, n = out.get(c.topic, (c.msgtype, 0))
            out[c.topic] = (t, n + c.msgcount)
        return out
    finally:
        reader.close()


def iter_bag_frames(path, color_topic: Optional[str] = None, depth_topic: Optional[str] = None,
                    info_topic: Optional[str] = None, pose_topic: Optional[str] = None,
                    lidar_topic: Optional[str] = None, with_lidar: bool = True,
                    stats=None, **options) -> Iterator[Union[Frame, "object"]]:
    """Read a bag back: yields :class:`Frame` and LidarSweep objects in time order.

    Any topic layout: the streams are discovered (or named here) and timed by
    :func:`sas_core.data.bag_streams.iter_frames` (poses from /tf + /tf_static or a pose topic;
    frames without a pose are skipped and counted in ``stats``, a
    :class:`~sas_core.data.bag_streams.ReplayStats`). ``options`` are further
    :class:`~sas_core.data.bag_streams.StreamOptions` fields. Raises ValueError when a named
    topic is missing or the streams cannot be chosen.
    """
    from sas_core.data.bag_streams import StreamOptions, iter_frames

    opts = StreamOptions(color_topic=color_topic or "", depth_topic=depth_topic or "", info_topic=info_topic or "",
                         pose_topic=pose_topic or "", lidar_topic=lidar_topic or "", use_lidar=with_lidar,
                         **options)
    yield from iter_frames(path, opts, stats=stats)


def read_bag(path, **kwargs) -> tuple[list, list]:
    """All of a bag at once: (frames, lidar sweeps)."""
    frames, sweeps = [], []
    for item in iter_bag_frames(path, **kwargs):
        (frames if isinstance(item, Frame) else sweeps).append(item)
    return frames, sweeps
