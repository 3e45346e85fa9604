"""A corpus of robot-style bags written from synthetic rooms (session fixture ``corpus``).

Each layout is laid out the way robots record (see /work/shared/ROBOT-DATA.md and the sources it
names) and carries its ground truth: the scene (surface samples), the true camera / LiDAR pose at
each stamp, and what replay should count.

* ``realsense``: realsense-ros 4.x names (``/camera/camera/color/image_raw`` rgb8,
  ``/camera/camera/aligned_depth_to_color/image_raw`` 16UC1 and its camera_info, plus the
  unaligned ``depth/image_rect_raw`` that must not be chosen), poses only by ``/tf`` +
  ``/tf_static`` along map -> odom -> base_link -> camera_link -> camera_color_optical_frame;
  map -> odom at 20 Hz, odom -> base_link at 100 Hz, the camera at 2.5 Hz, depth stamped 3 ms
  after colour, the first two images before any TF.
* ``tum``: TUM RGB-D names (``/camera/rgb/image_color`` bgr8, ``/camera/depth/image`` 32FC1 with
  NaN holes, 4 ms early), ROS 1 frame ids with a leading '/', everything on ``/tf``, no 'map'
  (root ``world``), and a 1 s gap in the TF stream that two frames fall into.
* ``jpeg`` / ``png``: colour on ``.../image_raw/compressed`` (jpeg; png), depth on
  ``.../image_raw/compressedDepth`` (16UC1; 32FC1 inverse-depth quantised).
* ``unregistered``: colour 80x60 and depth 64x48 (wider lens) in their own optical frames 5 cm
  apart, each with its CameraInfo, the extrinsics on ``/tf_static``.
* ``lidar``: Ouster-like padded PointCloud2 (x y z, intensity, t, reflectivity, ring, ambient,
  range; 48-byte points; no-return points at the origin) on ``/ouster/points`` in ``os_lidar``,
  pose by TF (map -> odom -> base_link -> os_sensor -> os_lidar), no camera.
* bad inputs: ``tf_loop``, ``disconnected``, ``bad_messages`` (a corrupt JPEG, a compressedDepth
  without its header, an all-zero CameraInfo), ``size_mismatch`` (depth of another size in the
  colour frame, no depth CameraInfo).

Most layouts are written as sqlite3 and mcap (``<name>`` and ``<name>_mcap``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

FRAME_STEP = 6  # scene frames at 15 Hz -> the bag's camera at 2.5 Hz
N_FRAMES = 60  # trajectory length (4 s); 10 frames of it are recorded
SIZE = (80, 60)
R_OPT = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # REP 103 optical axes in a body frame


def rt(R=None, t=(0.0, 0.0, 0.0)) -> np.ndarray:
    T = np.eye(4)
    if R is not None:
        T[:3, :3] = R
    T[:3, 3] = t
    return T


def rz(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


inv = np.linalg.inv


@dataclass
class Case:
    """One bag of the corpus and its ground truth."""

    name: str
    path: Path
    scene: object
    poses: dict = field(default_factory=dict)  # stamp -> true sensor-to-map pose of the frames replay should use
    expect: dict = field(default_factory=dict)  # frames_used, skipped, other, sweeps_used, streams
    kind: str = "rgbd"


def _scene(seed: int, lidar: bool = False):
    from sas_core.data.synthetic import SynthConfig, generate_scene

    return generate_scene(SynthConfig(seed=seed, n_frames=N_FRAMES, width=SIZE[0], height=SIZE[1],
                                      with_lidar=False, lidar_azimuth_steps=256, points_per_m2=2000))


def _stamps(scene):
    return [f.stamp for f in scene.frames[::FRAME_STEP]]


def _render(scene, pose, intr, stamp):
    from sas_core.data.synthetic import render_frames

    return render_frames(scene, [pose], intr, [stamp])[0]


def _tf_series(start, end, hz):
    n = int(math.floor((end - start) * hz)) + 1
    return [start + i / hz for i in range(n)]


class Writer:
    """Collects (stamp, order, topic, msgtype, make) events and writes them with rosbag_io."""

    def __init__(self):
        from sas_core.data.rosbag_io import MessageBuilder, typestore

        self.m = MessageBuilder(typestore())
        self.events = []

    def add(self, stamp, topic, msgtype, make, order=0):
        self.events.append((stamp, order, topic, msgtype, make))

    def image(self, topic, array, encoding, stamp, frame):
        self.add(stamp, topic, "sensor_msgs/msg/Image", lambda: self.m.image(array, encoding, stamp, frame))

    def compressed(self, topic, fields, stamp, frame):
        self.add(stamp, topic, "sensor_msgs/msg/CompressedImage", lambda: self.m.compressed(fields, stamp, frame))

    def info(self, topic, intr, stamp, frame):
        self.add(stamp, topic, "sensor_msgs/msg/CameraInfo", lambda: self.m.camera_info(intr, stamp, frame))

    def tf(self, stamp, transforms, static=False):
        self.add(stamp, "/tf_static" if static else "/tf", "tf2_msgs/msg/TFMessage",
                 lambda: self.m.tf([(p, c, stamp if not static else stamp, T) for p, c, T in transforms]), order=-1)

    def cloud(self, topic, structured, stamp, frame):
        self.add(stamp, topic, "sensor_msgs/msg/PointCloud2", lambda: self.m.cloud(structured, stamp, frame))

    def write(self, path, storage):
        from sas_core.data.rosbag_io import write_bag_events

        return write_bag_events(path, self.events, storage=storage, store=self.m.store)


# ----------------------------------------------------------------------------------------------- layouts

T_BASE_CAM = rt(rz(0.1), (0.2, 0.0, 0.5))  # base_link -> camera_link
T_CAM_COLOR = rt(R_OPT, (0.0, 0.015, 0.0))  # camera_link -> camera_color_optical_frame
T_CAM_DEPTH = rt(R_OPT, (0.0, -0.035, 0.0))  # camera_link -> camera_depth_optical_frame (5 cm baseline)


def _map_odom(t, t0):
    return rt(rz(0.05 + 0.01 * (t - t0)), (0.3 + 0.02 * (t - t0), -0.2, 0.0))


def realsense(scene, w: Writer, aligned=True, raw_depth=True, tf_from_frame=2, depth_dt=0.003,
              depth_size=None, depth_info=True, n=None):
    """Returns {stamp: true colour pose} of the frames that have TF."""
    from sas_core.data.synthetic import default_intrinsics

    stamps = _stamps(scene)[:n]
    intr = scene.intrinsics
    dintr = default_intrinsics(64, 48, hfov_deg=75.0)
    ns = "/camera/camera"
    cf, df = "camera_color_optical_frame", "camera_depth_optical_frame"
    t0 = stamps[0]
    w.tf(t0 - 0.5, [("base_link", "camera_link", T_BASE_CAM), ("camera_link", cf, T_CAM_COLOR),
                    ("camera_link", df, T_CAM_DEPTH)], static=True)
    tf_start = stamps[tf_from_frame] - 0.1 if tf_from_frame else t0 - 0.1
    base_opt = T_BASE_CAM @ T_CAM_COLOR
    for s in _tf_series(tf_start, stamps[-1] + 0.1, 20.0):
        w.tf(s, [("map", "odom", _map_odom(s, t0))])
    for s in _tf_series(tf_start, stamps[-1] + 0.1, 100.0):
        w.tf(s, [("odom", "base_link", inv(_map_odom(s, t0)) @ scene.camera_pose(s) @ inv(base_opt))])
    truth = {}
    for k, s in enumerate(stamps):
        pose = scene.camera_pose(s)
        color = _render(scene, pose, intr, s)
        w.image(f"{ns}/color/image_raw", color.color, "rgb8", s, cf)
        w.info(f"{ns}/color/camera_info", intr, s, cf)
        sd = s + depth_dt
        if aligned:
            ai = intr if depth_size is None else default_intrinsics(*depth_size)
            d = _render(scene, scene.camera_pose(sd), ai, sd)
            w.image(f"{ns}/aligned_depth_to_color/image_raw", d.depth, "16UC1", sd, cf)
            if depth_info:
                w.info(f"{ns}/aligned_depth_to_color/camera_info", ai, sd, cf)
        if raw_depth:
            dpose = scene.camera_pose(sd) @ inv(T_CAM_COLOR) @ T_CAM_DEPTH
            d = _render(scene, dpose, dintr, sd)
            w.image(f"{ns}/depth/image_rect_raw", d.depth, "16UC1", sd, df)
            w.info(f"{ns}/depth/camera_info", dintr, sd, df)
        if k >= tf_from_frame:
            truth[s] = pose
    return truth


def tum(scene, w: Writer, gap_frames=(4, 5)):
    stamps = _stamps(scene)
    intr = scene.intrinsics
    opt = "/openni_rgb_optical_frame"
    links = [("/kinect", "/openni_camera", rt(None, (0.0, 0.0, 0.05))),
             ("/openni_camera", "/openni_rgb_frame", rt(None, (0.0, -0.0125, 0.0))),
             ("/openni_rgb_frame", opt, rt(R_OPT))]
    kinect_opt = links[0][2] @ links[1][2] @ links[2][2]
    gap = (stamps[gap_frames[0]] - 0.3, stamps[gap_frames[-1]] + 0.3)
    for s in _tf_series(stamps[0] - 0.1, stamps[-1] + 0.1, 100.0):
        if gap[0] < s < gap[1]:
            continue
        w.tf(s, [("/world", "/kinect", scene.camera_pose(s) @ inv(kinect_opt))] + links)
    rng = np.random.default_rng(5)
    truth = {}
    for k, s in enumerate(stamps):
        pose = scene.camera_pose(s)
        f = _render(scene, pose, intr, s)
        w.image("/camera/rgb/image_color", f.color, "bgr8", s, opt)
        w.info("/camera/rgb/camera_info", intr, s, opt)
        sd = s - 0.004
        d = _render(scene, scene.camera_pose(sd), intr, sd).depth.copy()
        d[(d <= 0) | (rng.random(d.shape) < 0.03)] = np.nan
        w.image("/camera/depth/image", d, "32FC1", sd, opt)
        w.info("/camera/depth/camera_info", intr, sd, opt)
        if k not in gap_frames:
            truth[s] = pose
    return truth


def compressed(scene, w: Writer, codec="jpeg", depth_encoding="16UC1", corrupt=(), no_header=(), bad_info=(),
               no_depth=(), n=None):
    from sas_core.data.image_codec import compress_color, compress_depth

    stamps = _stamps(scene)[:n]
    intr = scene.intrinsics
    cf = "camera_color_optical_frame"
    w.tf(stamps[0] - 0.5, [("camera_link", cf, rt(R_OPT))], static=True)
    for s in _tf_series(stamps[0] - 0.1, stamps[-1] + 0.1, 100.0):
        w.tf(s, [("map", "camera_link", scene.camera_pose(s) @ inv(rt(R_OPT)))])
    truth = {}
    for k, s in enumerate(stamps):
        pose = scene.camera_pose(s)
        f = _render(scene, pose, intr, s)
        cfields = compress_color(f.color, codec, encoding="rgb8" if codec == "jpeg" else "bgr8")
        if k in corrupt:
            garbage = b"\xff\xd8\xff\xe0" + b"\x13" * 300  # a JPEG start, then nothing decodable
            cfields = {"format": cfields["format"], "data": np.frombuffer(garbage, np.uint8)}
        w.compressed("/camera/color/image_raw/compressed", cfields, s, cf)
        if k in bad_info:  # an uncalibrated camera: all-zero K
            w.add(s, "/camera/color/camera_info", "sensor_msgs/msg/CameraInfo",
                  lambda s=s: _zero_info(w.m, intr, s, cf))
        else:
            w.info("/camera/color/camera_info", intr, s, cf)
        sd = s + 0.002
        d = _render(scene, scene.camera_pose(sd), intr, sd)
        dfields = compress_depth(d.depth * (0 if k in no_depth else 1), depth_encoding)
        if k in no_header:
            dfields = {"format": dfields["format"], "data": dfields["data"][12:]}
        w.compressed("/camera/depth/image_raw/compressedDepth", dfields, sd, cf)
        if k not in corrupt and k not in no_header and k not in no_depth:
            truth[s] = pose
    return truth


def odometry(scene, w: Writer):
    """TF holds only statics (map -> odom, base_link -> camera_link -> optical); odom -> base_link
    comes from nav_msgs/Odometry on /odom at 50 Hz (a bag that did not record the odometry's TF)."""
    stamps = _stamps(scene)
    intr = scene.intrinsics
    cf = "camera_color_optical_frame"
    map_odom = rt(rz(0.3), (1.0, -0.5, 0.0))
    base_opt = T_BASE_CAM @ T_CAM_COLOR
    w.tf(stamps[0] - 0.5, [("map", "odom", map_odom), ("base_link", "camera_link", T_BASE_CAM),
                           ("camera_link", cf, T_CAM_COLOR)], static=True)
    for s in _tf_series(stamps[0] - 0.1, stamps[-1] + 0.1, 50.0):
        T = inv(map_odom) @ scene.camera_pose(s) @ inv(base_opt)
        w.add(s, "/odom", "nav_msgs/msg/Odometry", lambda s=s, T=T: w.m.odometry("odom", "base_link", s, T))
    truth = {}
    for s in stamps:
        f = _render(scene, scene.camera_pose(s), intr, s)
        w.image("/camera/color/image_raw", f.color, "rgb8", s, cf)
        w.info("/camera/color/camera_info", intr, s, cf)
        w.image("/camera/depth/image_raw", f.depth, "16UC1", s, cf)
        truth[s] = f.pose
    return truth


def _zero_info(m, intr, stamp, frame):
    msg = m.camera_info(intr, stamp, frame)
    msg.k[:] = 0.0
    return msg


T_BASE_SENSOR = rt(None, (0.05, 0.0, 0.3))
T_SENSOR_LIDAR = rt(rz(math.pi), (0.0, 0.0, 0.036))  # Ouster's os_lidar is turned 180 deg about z

OUSTER_DTYPE = np.dtype({"names": ["x", "y", "z", "intensity", "t", "reflectivity", "ring", "ambient", "range"],
                         "formats": ["<f4", "<f4", "<f4", "<f4", "<u4", "<u2", "<u2", "<u2", "<u4"],
                         "offsets": [0, 4, 8, 16, 20, 24, 26, 28, 32], "itemsize": 48})


def lidar(scene, w: Writer, corrupt=()):
    from sas_core.data.synthetic import _lidar_pose, render_lidar

    stamps = _stamps(scene)
    L = lambda s: _lidar_pose(scene.room_size, scene.config, s)  # noqa: E731
    base_lidar = T_BASE_SENSOR @ T_SENSOR_LIDAR
    w.tf(stamps[0] - 0.5, [("map", "odom", rt(rz(0.2), (0.5, 0.4, 0.0))), ("base_link", "os_sensor", T_BASE_SENSOR),
                           ("os_sensor", "os_lidar", T_SENSOR_LIDAR)], static=True)
    map_odom = rt(rz(0.2), (0.5, 0.4, 0.0))
    for s in _tf_series(stamps[0] - 0.1, stamps[-1] + 0.1, 50.0):
        w.tf(s, [("odom", "base_link", inv(map_odom) @ L(s) @ inv(base_lidar))])
    truth = {}
    rng = np.random.default_rng(7)
    for k, s in enumerate(stamps):
        sweep = render_lidar(scene, [L(s)], [s])[0]
        n = len(sweep.points)
        pts = np.zeros(n + n // 10, OUSTER_DTYPE)  # every 11th point: no return, at the origin
        real = np.ones(len(pts), bool)
        real[rng.choice(len(pts), n // 10, replace=False)] = False
        for i, name in enumerate("xyz"):
            pts[name][real] = sweep.points[:, i]
        pts["intensity"][real] = sweep.intensity
        pts["ring"][real] = sweep.ring
        pts["reflectivity"][real] = np.clip(sweep.intensity, 0, 255).astype(np.uint16)
        pts["range"][real] = (np.linalg.norm(sweep.points, axis=1) * 1000).astype(np.uint32)
        pts["t"] = np.arange(len(pts), dtype=np.uint32) * 1000
        if k in corrupt:  # data shorter than width x point_step says
            w.add(s, "/ouster/points", "sensor_msgs/msg/PointCloud2", lambda s=s, pts=pts: _short_cloud(w.m, pts, s))
            continue
        w.cloud("/ouster/points", pts, s, "os_lidar")
        truth[s] = L(s)
    return truth


def _small_rgbd(scene, w: Writer, static):
    """Three frames in the synthetic layout's topics with the TF tree ``static`` (+ odom -> base_link)."""
    stamps = _stamps(scene)[:3]
    intr = scene.intrinsics
    cf = "camera_color_optical_frame"
    w.tf(stamps[0] - 0.5, static, static=True)
    for s in _tf_series(stamps[0] - 0.1, stamps[-1] + 0.1, 50.0):
        w.tf(s, [("odom", "base_link", np.eye(4))])
    for s in stamps:
        f = _render(scene, scene.camera_pose(s), intr, s)
        w.image("/camera/color/image_raw", f.color, "rgb8", s, cf)
        w.info("/camera/color/camera_info", intr, s, cf)
        w.image("/camera/depth/image_raw", f.depth, "16UC1", s, cf)


def _short_cloud(m, pts, stamp):
    msg = m.cloud(pts, stamp, "os_lidar")
    msg.data = msg.data[: len(msg.data) // 2]
    return msg


def tf_loop(scene, w: Writer):
    """rig -> mount -> rig: the camera's chain never reaches a root."""
    _small_rgbd(scene, w, [("map", "odom", np.eye(4)), ("rig", "mount", np.eye(4)), ("mount", "rig", np.eye(4)),
                           ("rig", "camera_color_optical_frame", rt(R_OPT))])


def disconnected(scene, w: Writer):
    """The camera hangs under 'rig', which nothing connects to 'map'."""
    _small_rgbd(scene, w, [("map", "odom", np.eye(4)), ("rig", "camera_color_optical_frame", rt(R_OPT))])


# ----------------------------------------------------------------------------------------------- the corpus

LAYOUTS = {
    # name: (room, builder, kwargs, storages, expectations)
    "realsense": ("A", realsense, {}, ("sqlite3", "mcap"),
                  dict(frames_seen=10, frames_used=8, skipped={"no_pose:extrapolation": 2},
                       color="/camera/camera/color/image_raw",
                       depth="/camera/camera/aligned_depth_to_color/image_raw", register=False)),
    "tum": ("B", tum, {}, ("sqlite3", "mcap"),
            dict(frames_seen=10, frames_used=8, skipped={"no_pose:gap": 2}, color="/camera/rgb/image_color",
                 depth="/camera/depth/image", register=False, map_frame="world")),
    "jpeg": ("A", compressed, dict(codec="jpeg", depth_encoding="16UC1"), ("sqlite3", "mcap"),
             dict(frames_seen=10, frames_used=10, skipped={}, color="/camera/color/image_raw/compressed",
                  depth="/camera/depth/image_raw/compressedDepth", register=False)),
    "png": ("B", compressed, dict(codec="png", depth_encoding="32FC1"), ("sqlite3",),
            dict(frames_seen=10, frames_used=10, skipped={}, color="/camera/color/image_raw/compressed",
                 depth="/camera/depth/image_raw/compressedDepth", register=False)),
    "unregistered": ("A", realsense, dict(aligned=False, raw_depth=True, tf_from_frame=0), ("sqlite3", "mcap"),
                     dict(frames_seen=10, frames_used=10, skipped={}, color="/camera/camera/color/image_raw",
                          depth="/camera/camera/depth/image_rect_raw", register=True)),
    "odometry": ("B", odometry, {}, ("sqlite3",),
                 dict(frames_seen=10, frames_used=10, skipped={}, color="/camera/color/image_raw",
                      depth="/camera/depth/image_raw", register=False)),
    "lidar": ("B", lidar, {}, ("sqlite3", "mcap"),
              dict(sweeps_seen=10, sweeps_used=10, skipped={}, lidar="/ouster/points")),
    "bad_cloud": ("B", lidar, dict(corrupt=(3,)), ("sqlite3",),
                  dict(sweeps_seen=10, sweeps_used=9, skipped={"bad_cloud": 1}, lidar="/ouster/points")),
    "tf_loop": ("A", tf_loop, {}, ("sqlite3",), dict(error="no_pose:loop")),
    "disconnected": ("A", disconnected, {}, ("sqlite3",), dict(error="no_pose:disconnected")),
    "bad_messages": ("A", compressed, dict(codec="jpeg", corrupt=(1,), no_header=(2,), bad_info=(3,), no_depth=(4,),
                                           n=6),
                     ("sqlite3",), dict(frames_seen=6, frames_used=3,
                                        skipped={"corrupt_image": 1, "no_depth_header": 1, "nan_depth": 1},
                                        other={"bad_camera_info": 1})),
    "size_mismatch": ("A", realsense, dict(aligned=True, raw_depth=False, tf_from_frame=0, depth_size=(40, 30),
                                           depth_info=False, n=3), ("sqlite3",), dict(error="size_mismatch")),
}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """{name: Case} for every layout and storage (``<name>`` sqlite3, ``<name>_mcap``)."""
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def build_corpus(root: Path) -> dict:
    rooms = {"A": _scene(21), "B": _scene(22)}
    cases = {}
    for name, (room, build, kwargs, storages, expect) in LAYOUTS.items():
        w = Writer()
        truth = build(rooms[room], w, **kwargs)
        for storage in storages:
            key = name if storage == "sqlite3" else f"{name}_{storage}"
            path = w.write(root / key, storage)
            cases[key] = Case(key, path, rooms[room], truth or {}, dict(expect),
                              "lidar" if "lidar" in expect else "rgbd")
    return cases
