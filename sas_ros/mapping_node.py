"""The SAS mapping node: RGB-D and/or LiDAR in, a labelled voxel map and text queries out.

Inputs (relative names, remap them; sensor-data QoS):
  ``color/image_raw`` + ``depth/image_raw`` (approximately synchronised, ``camera_info`` cached),
  ``points`` (LiDAR PointCloud2), poses from TF or a ``pose`` topic (see :mod:`sas_ros.poses`),
  and in fusion mode with the simulated teacher also ``semantic/image_raw`` and
  ``instance/image_raw`` (16UC1 ground truth of the synthetic world; instance + 1, 0 = none).
Outputs: ``~/labelled_cloud`` (x, y, z, rgb, label, score), ``~/map_cloud`` (x, y, z, rgb),
  ``~/label_map`` (transient local), ``~/stats`` (std_msgs/String JSON: rates, latencies, drops).
Services: ``~/query`` (TextQuery), ``~/set_vocabulary``, ``~/save_map``, ``~/reset`` (Trigger).

Threads: subscription callbacks only decode headers and push onto a bounded keep-latest queue
(oldest dropped, counted); an integration worker turns frames into map points; a labelling worker,
woken by a timer, runs the network (``mode: segmenter``) on the changed region of the map, or
classifies the running teacher-feature means (``mode: fusion``), then publishes the clouds.
A lock guards the map; queries and services hold it only for the map lookups, and the long
passes over the whole map (relabelling after a vocabulary change, refitting the query basis) take
it in slices of ``LOCK_SLICE`` voxels, so integration and queries go on meanwhile.

Bad input never raises out of a callback: each reason (``nan_depth``, ``size_mismatch``,
``no_camera_info``, ``unknown_frame``, ``empty_cloud``, ...) is logged (throttled per reason) and
counted in ``~/stats``.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from collections import deque
from typing import Optional

import numpy as np
import rclpy
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import ColorRGBA, String
from std_srvs.srv import Trigger

from sas_core.data import msg_codec as codec
from sas_core.geometry.voxel_map import LOCK_SLICE, VoxelMap, VoxelMapConfig, rgbd_points
from sas_core.types import IGNORE_LABEL, CameraIntrinsics
from sas_interfaces.msg import LabelMap
from sas_interfaces.srv import SaveMap, SetVocabulary, TextQuery
from sas_ros import conversions as conv
from sas_ros.poses import PoseSource, PoseUnavailable
from sas_ros.sync import make_synchronizer

# name -> (default, description). Declared once each; config/*.yaml mirrors the defaults.
PARAMETERS = {
    "map_frame": ("map", "fixed frame of the map and of every output"),
    "voxel_size": (0.05, "voxel edge in metres (one map point per voxel)"),
    "max_points": (1_000_000, "map capacity in voxels; older/farther voxels are evicted beyond it"),
    "eviction": ("oldest", "eviction policy when full: oldest (least recently seen) or farthest"),
    "max_radius": (0.0, "drop voxels farther than this from the sensor, metres (0 = keep all)"),
    "use_rgbd": (True, "subscribe to color/image_raw, depth/image_raw and camera_info"),
    "use_lidar": (False, "subscribe to points (LiDAR PointCloud2)"),
    "pose_source": ("auto", "auto | tf | pose | odometry (auto: tf when tf2_ros is importable, else pose)"),
    "pose_topic": ("pose", "PoseStamped / Odometry topic of the sensor pose (pose/odometry modes)"),
    "camera_frame": ("camera_color_optical_frame", "sensor frame the pose topic describes; images in other frames are dropped"),
    "lidar_pose_topic": ("", "PoseStamped topic of the LiDAR pose (pose mode; empty = no LiDAR pose topic)"),
    "lidar_frame": ("lidar", "LiDAR sensor frame id"),
    "pose_tolerance": (0.05, "max |stamp difference| in seconds between a frame and its pose"),
    "reliable_inputs": (False, "subscribe with reliable QoS (bag replay without loss) instead of sensor-data best effort"),
    "sync_slop": (0.05, "approximate-sync window in seconds for colour/depth (and ground truth)"),
    "sync_queue": (10, "per-topic queue length of the synchroniser"),
    "input_queue": (4, "frames waiting for integration; the oldest is dropped beyond it"),
    "pixel_stride": (2, "integrate every n-th pixel in both directions"),
    "min_depth": (0.1, "ignore depth at or below this (m)"),
    "max_depth": (8.0, "ignore depth beyond this (m)"),
    "mode": ("segmenter", "labelling: segmenter (distilled 3D network), fusion (live 2D teachers) or none"),
    "checkpoint": ("", "distilled checkpoint for mode segmenter (sas distill output)"),
    "device": ("cpu", "torch device of the network"),
    "precision": ("fp32", "network arithmetic: fp32, bf16 (CPU or CUDA) or fp16 (CUDA)"),
    "vocabulary": ("scannet20", "vocabulary name (scannet20, matterport21, ...) or comma-separated class names"),
    "prompt_template": ("a {} in a scene", "prompt template for class names"),
    "teacher": ("simulated", "fusion mode teacher: simulated (synthetic world ground truth topics)"),
    "teacher_stride": (2, "fusion mode: teacher features are taken at every n-th pixel"),
    "text_dim": (512, "fusion mode: dimension of the synthetic text space"),
    "update_period": (1.0, "seconds between labelling passes (network / fusion classification)"),
    "region_margin": (1.0, "metres of context around the changed region given to the network"),
    "full_update_every": (10, "every n-th labelling pass covers the whole map (0 = never)"),
    "publish_map_cloud": (True, "also publish ~/map_cloud (x, y, z, rgb)"),
    "query_threshold": (0.5, "default relevance threshold of ~/query"),
    "query_max_points": (5000, "default max returned points of ~/query"),
    "query_rank": (64, "rank of the reduced query store (see sas_core.geometry.voxel_map)"),
    "stats_period": (5.0, "seconds between ~/stats messages and the rate log line"),
    "log_throttle": (2.0, "seconds between repeated warnings of the same kind"),
}

PALETTE = np.array([
    [174, 199, 232], [152, 223, 138], [31, 119, 180], [255, 187, 120], [188, 189, 34], [140, 86, 75],
    [255, 152, 150], [214, 39, 40], [197, 176, 213], [148, 103, 189], [196, 156, 148], [23, 190, 207],
    [247, 182, 210], [219, 219, 141], [255, 127, 14], [158, 218, 229], [44, 160, 44], [112, 128, 144],
    [227, 119, 194], [82, 84, 163]], np.uint8)


def resolve_vocabulary(value: str) -> list:
    """A vocabulary name (``sas_core.text.get_vocabulary``) or comma-separated class names."""
    from sas_core.text import get_vocabulary

    value = value.strip()
    if "," not in value:
        try:
            return list(get_vocabulary(value))
        except (KeyError, ValueError):
            pass
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise ValueError(f"empty vocabulary {value!r}")
    return names


class _Rate:
    """Events per second over a sliding window."""

    def __init__(self, window: float = 10.0):
        self.t = deque()
        self.window = window

    def tick(self, now: float) -> None:
        self.t.append(now)
        while self.t and now - self.t[0] > self.window:
            self.t.popleft()

    def hz(self, now: float) -> float:
        while self.t and now - self.t[0] > self.window:
            self.t.popleft()
        if len(self.t) < 2:
            return 0.0
        return (len(self.t) - 1) / max(self.t[-1] - self.t[0], 1e-9)


class MappingNode(Node):
    """See the module docstring."""

    def __init__(self, node_name: str = "sas_mapping_node", **kwargs):
        super().__init__(node_name, **kwargs)
        for name, (default, description) in PARAMETERS.items():
            self.declare_parameter(name, default, ParameterDescriptor(description=description))
        p = {name: self.get_parameter(name).value for name in PARAMETERS}
        self.p = p
        self._last_warn: dict = {}
        self.drops: dict = {}
        self.lock = threading.RLock()
        self.map = VoxelMap(VoxelMapConfig(voxel_size=float(p["voxel_size"]), max_points=int(p["max_points"]),
                                           eviction=str(p["eviction"]), max_radius=float(p["max_radius"]),
                                           query_rank=int(p["query_rank"])))
        self.mode = str(p["mode"])
        if self.mode not in ("segmenter", "fusion", "none"):
            raise ValueError(f"mode must be segmenter, fusion or none, got {self.mode!r}")
        self.segmenter = None
        self.teacher = None
        self.encoder = None
        self._setup_model()
        self.vocabulary: list = []
        self.template = str(p["prompt_template"])
        self.class_text: Optional[np.ndarray] = None
        if self.encoder is not None:
            self._set_vocabulary(resolve_vocabulary(str(p["vocabulary"])), self.template)

        # ---- state
        self.camera_info: Optional[CameraIntrinsics] = None
        self.queue: deque = deque()
        self.queue_cv = threading.Condition()
        self.running = True
        self.n_frames = 0
        self.n_sweeps = 0
        self.n_updates = 0
        self.integrate_rate = _Rate()
        self.integrate_ms: deque = deque(maxlen=200)
        self.update_ms: deque = deque(maxlen=50)
        self.query_ms: deque = deque(maxlen=50)
        self.e2e_ms: deque = deque(maxlen=200)
        self._pending_recv: list = []   # receive times of frames integrated since the last publish
        self.update_event = threading.Event()

        # ---- interfaces
        sensor_qos = qos_profile_sensor_data
        if p["reliable_inputs"]:
            sensor_qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                             reliability=ReliabilityPolicy.RELIABLE)
        self.pub_labelled = self.create_publisher(PointCloud2, "~/labelled_cloud", 2)
        self.pub_map = self.create_publisher(PointCloud2, "~/map_cloud", 2)
        self.pub_label_map = self.create_publisher(LabelMap, "~/label_map", latched)
        self.pub_stats = self.create_publisher(String, "~/stats", 10)
        self.poses = PoseSource(self, str(p["pose_source"]), str(p["map_frame"]), str(p["pose_topic"]),
                                sensor_frame=str(p["camera_frame"]), tolerance=float(p["pose_tolerance"]))
        self._lidar_pose_sub = None
        if p["use_lidar"] and self.poses.mode == "pose" and p["lidar_pose_topic"]:
            from geometry_msgs.msg import PoseStamped

            self._lidar_pose_sub = self.create_subscription(
                PoseStamped, str(p["lidar_pose_topic"]),
                lambda m: self.poses.add(m.header.frame_id, str(p["lidar_frame"]),
                                         codec.stamp_to_seconds(m.header.stamp), m.pose), 50)
        self._sync = None
        if p["use_rgbd"]:
            self.create_subscription(CameraInfo, "color/camera_info", self._on_camera_info, sensor_qos)
            topics = [(Image, "color/image_raw", sensor_qos), (Image, "depth/image_raw", sensor_qos)]
            if self.teacher is not None:
                topics += [(Image, "semantic/image_raw", sensor_qos), (Image, "instance/image_raw", sensor_qos)]
            self._sync = make_synchronizer(self, topics, self._on_rgbd, int(p["sync_queue"]), float(p["sync_slop"]))
        if p["use_lidar"]:
            self.create_subscription(PointCloud2, "points", self._on_cloud, sensor_qos)
        services = ReentrantCallbackGroup()
        self.create_service(TextQuery, "~/query", self._srv_query, callback_group=services)
        self.create_service(SetVocabulary, "~/set_vocabulary", self._srv_set_vocabulary, callback_group=services)
        self.create_service(SaveMap, "~/save_map", self._srv_save_map, callback_group=services)
        self.create_service(Trigger, "~/reset", self._srv_reset, callback_group=services)
        timers = MutuallyExclusiveCallbackGroup()
        self.create_timer(float(p["update_period"]), self.update_event.set, callback_group=timers)
        self.create_timer(float(p["stats_period"]), self._publish_stats, callback_group=timers)
        self._publish_label_map()
        self.worker = threading.Thread(target=self._integration_loop, name="sas-integrate", daemon=True)
        self.labeller = threading.Thread(target=self._labelling_loop, name="sas-label", daemon=True)
        self.worker.start()
        self.labeller.start()
        self.get_logger().info(
            f"SAS mapping node: mode={self.mode}, poses from {self.poses.mode}, voxel {p['voxel_size']} m, "
            f"max {p['max_points']} points, vocabulary of {len(self.vocabulary)} classes")

    # ------------------------------------------------------------------ set-up
    def _setup_model(self) -> None:
        p = self.p
        if self.mode == "segmenter":
            if not p["checkpoint"]:
                raise ValueError("mode 'segmenter' needs the 'checkpoint' parameter (a sas distill checkpoint)")
            from sas_core.infer import InferenceConfig, Segmenter

            self.segmenter = Segmenter.from_checkpoint(str(p["checkpoint"]), device=str(p["device"]),
                                                       config=InferenceConfig(precision=str(p["precision"])))
            self.encoder = self.segmenter.text_encoder
        elif self.mode == "fusion":
            from sas_core.text import SyntheticTextEncoder

            vocab = resolve_vocabulary(str(p["vocabulary"]))
            self.encoder = SyntheticTextEncoder(vocab, dim=int(p["text_dim"]))
            if p["teacher"] != "simulated":
                raise ValueError(f"fusion mode supports teacher 'simulated', got {p['teacher']!r}")
            from sas_core.teachers.simulated import SimulatedTeacher, SimulatedTeacherConfig

            self.teacher = SimulatedTeacher(SimulatedTeacherConfig(name="live_sim", vocabulary=tuple(vocab)),
                                            self.encoder)

    def _class_text(self, names, template) -> np.ndarray:
        from sas_core.text import class_embeddings

        emb = class_embeddings(self.encoder, names, template)
        return emb.detach().cpu().float().numpy()

    def _set_vocabulary(self, names, template) -> None:
        text = self._class_text(names, template)  # raises ValueError on unknown words
        if self.segmenter is not None and hasattr(self.segmenter, "set_vocabulary"):
            self.segmenter.set_vocabulary(list(names), [template])
        with self.lock:
            self.vocabulary, self.template, self.class_text = list(names), template, text
            self.map.set_anchor(text)
            slots = self.map.slots()
        # relabel the whole map in chunks, releasing the lock in between (seconds on 1M voxels)
        for chunk in np.array_split(slots, max(1, len(slots) // LOCK_SLICE + 1)):
            with self.lock:
                if self.class_text is not text:  # a newer vocabulary took over
                    return
                self.map.classify(text, chunk[chunk < self.map.capacity])  # (a reset shrinks the map)

    # ------------------------------------------------------------------ helpers
    def _drop(self, reason: str, text: str) -> None:
        """Count and log (throttled per reason) a dropped input."""
        self.drops[reason] = self.drops.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last_warn.get(reason, -1e9) >= float(self.p["log_throttle"]):
            self._last_warn[reason] = now
            self.get_logger().warning(f"[{reason}] {text} (dropped {self.drops[reason]} so far)")

    def _push(self, item) -> None:
        with self.queue_cv:
            if len(self.queue) >= max(1, int(self.p["input_queue"])):
                self.queue.popleft()
                self.drops["queue_full"] = self.drops.get("queue_full", 0) + 1
            self.queue.append(item)
            self.queue_cv.notify()

    # ------------------------------------------------------------------ callbacks (never block)
    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            self.camera_info = codec.camera_info_to_intrinsics(msg)
        except ValueError as exc:
            self._drop("bad_camera_info", f"camera info rejected: {exc}")

    def _on_rgbd(self, *msgs) -> None:
        self._push(("rgbd", msgs, time.monotonic()))

    def _on_cloud(self, msg: PointCloud2) -> None:
        self._push(("lidar", (msg,), time.monotonic()))

    # ------------------------------------------------------------------ integration worker
    def _integration_loop(self) -> None:
        while self.running:
            with self.queue_cv:
                if not self.queue:
                    self.queue_cv.wait(timeout=0.1)
                    continue
                kind, msgs, recv = self.queue.popleft()
            try:
                t0 = time.perf_counter()
                ok = self.integrate_rgbd(*msgs) if kind == "rgbd" else self.integrate_cloud(*msgs)
                if ok:
                    now = time.monotonic()
                    self.integrate_ms.append((time.perf_counter() - t0) * 1e3)
                    self.integrate_rate.tick(now)
                    with self.lock:
                        self._pending_recv.append(recv)
            except Exception as exc:  # never let bad input kill the worker
                self._drop("error", f"{kind} frame failed: {exc!r}\n{traceback.format_exc(limit=3)}")

    def integrate_rgbd(self, color_msg, depth_msg, semantic_msg=None, instance_msg=None) -> bool:
        """Decode, check and integrate one RGB-D frame. Returns False (logged) when dropped."""
        intr = self.camera_info
        if intr is None:
            self._drop("no_camera_info", "no camera info received on 'color/camera_info' yet; frame dropped")
            return False
        try:
            depth = codec.depth_to_metres(depth_msg)
            color = codec.image_to_numpy(color_msg)
        except ValueError as exc:
            self._drop("bad_image", f"image rejected: {exc}")
            return False
        if color.ndim == 2:
            color = np.repeat(color[:, :, None], 3, axis=2)
        if depth.shape != (intr.height, intr.width) or color.shape[:2] != depth.shape:
            self._drop("size_mismatch", f"size mismatch: color {color.shape[1]}x{color.shape[0]}, depth "
                                        f"{depth.shape[1]}x{depth.shape[0]}, camera info {intr.width}x{intr.height}")
            return False
        sub_depth = depth[::max(1, int(self.p["pixel_stride"])), ::max(1, int(self.p["pixel_stride"]))]
        with np.errstate(invalid="ignore"):
            any_valid = np.any((sub_depth > float(self.p["min_depth"])) & (sub_depth <= float(self.p["max_depth"])))
        if not any_valid:
            self._drop("nan_depth", "depth image has no valid measurement (all 0/NaN/out of range); frame dropped")
            return False
        frame_id = depth_msg.header.frame_id or color_msg.header.frame_id
        stamp = codec.stamp_to_seconds(depth_msg.header.stamp)
        try:
            pose = self.poses.lookup(frame_id, stamp)
        except PoseUnavailable as exc:
            reason = "unknown_frame" if "unknown frame" in str(exc) or "transform" in str(exc) else "no_pose"
            self._drop(reason, f"frame {frame_id!r} at {stamp:.3f}: {exc}; frame dropped")
            return False
        pts, cols, _ = rgbd_points(depth, color, intr, pose, int(self.p["pixel_stride"]),
                                   float(self.p["min_depth"]), float(self.p["max_depth"]))
        with self.lock:
            self.map.integrate(pts, cols, sensor_origin=pose[:3, 3])
        if self.teacher is not None and semantic_msg is not None:
            self._fuse_teacher(color, depth, intr, pose, stamp, semantic_msg, instance_msg)
        self.n_frames += 1
        return True

    def _fuse_teacher(self, color, depth, intr, pose, stamp, semantic_msg, instance_msg) -> None:
        from sas_core.types import Frame

        try:
            semantic = codec.image_to_numpy(semantic_msg).astype(np.int64)
            instance = codec.image_to_numpy(instance_msg).astype(np.int64) - 1 if instance_msg is not None else None
        except ValueError as exc:
            self._drop("bad_image", f"ground-truth image rejected: {exc}")
            return
        if semantic.shape != depth.shape or (instance is not None and instance.shape != depth.shape):
            self._drop("size_mismatch", "semantic/instance image size differs from depth")
            return
        t = max(1, int(self.p["teacher_stride"]))
        sub = CameraIntrinsics(intr.fx / t, intr.fy / t, intr.cx / t, intr.cy / t,
                               depth[::t, ::t].shape[1], depth[::t, ::t].shape[0])
        frame = Frame(color=np.ascontiguousarray(color[::t, ::t]), depth=np.ascontiguousarray(depth[::t, ::t]),
                      intrinsics=sub, pose=pose, stamp=stamp, semantic=np.ascontiguousarray(semantic[::t, ::t]),
                      instance=None if instance is None else np.ascontiguousarray(instance[::t, ::t]))
        feats, valid = self.teacher.features(frame)
        feats = feats.float().numpy() if hasattr(feats, "numpy") else np.asarray(feats, np.float32)
        valid = np.asarray(valid) & (frame.depth > float(self.p["min_depth"])) & (frame.depth <= float(self.p["max_depth"]))
        vv, uu = np.nonzero(valid)
        z = frame.depth[vv, uu].astype(np.float64)
        x = (uu * t - intr.cx) * z / intr.fx
        y = (vv * t - intr.cy) * z / intr.fy
        pts = np.stack([x, y, z], 1) @ pose[:3, :3].T + pose[:3, 3]
        with self.lock:
            slots = self.map.lookup(pts)
            ok = slots >= 0
            self.map.accumulate_features(slots[ok], feats[vv[ok], uu[ok]])

    def integrate_cloud(self, msg) -> bool:
        """Decode, check and integrate one LiDAR cloud (points in ``msg.header.frame_id``)."""
        try:
            arr = conv.cloud_to_array(msg)
            xyz = codec.cloud_xyz(arr, remove_nans=True)
        except ValueError as exc:
            self._drop("bad_cloud", f"point cloud rejected: {exc}")
            return False
        if len(xyz) == 0:
            self._drop("empty_cloud", f"empty point cloud on 'points' (frame {msg.header.frame_id!r}); ignored")
            return False
        stamp = codec.stamp_to_seconds(msg.header.stamp)
        frame_id = msg.header.frame_id
        if frame_id == self.p["map_frame"]:
            pose = np.eye(4)
        else:
            try:
                pose = self.poses.lookup(frame_id, stamp)
            except PoseUnavailable as exc:
                self._drop("unknown_frame" if "unknown frame" in str(exc) else "no_pose",
                           f"cloud frame {frame_id!r} at {stamp:.3f}: {exc}; cloud dropped")
                return False
        pts = (xyz.astype(np.float64) @ pose[:3, :3].T + pose[:3, 3]).astype(np.float32)
        colors = None
        if "rgb" in arr.dtype.names:
            colors = codec.unpack_rgb(arr["rgb"])[np.isfinite(codec.cloud_xyz(arr, remove_nans=False)).all(1)]
        elif "intensity" in arr.dtype.names:
            inten = arr["intensity"][np.isfinite(codec.cloud_xyz(arr, remove_nans=False)).all(1)]
            g = np.clip(inten / max(float(np.max(inten)), 1e-6) * 255, 0, 255).astype(np.uint8)
            colors = np.repeat(g[:, None], 3, axis=1)
        with self.lock:
            self.map.integrate(pts, colors, sensor_origin=pose[:3, 3])
        self.n_sweeps += 1
        return True

    # ------------------------------------------------------------------ labelling worker
    def _labelling_loop(self) -> None:
        while self.running:
            if not self.update_event.wait(timeout=0.2):
                continue
            self.update_event.clear()
            try:
                self.update_labels()
                self.publish_clouds()
            except Exception as exc:
                self._drop("error", f"labelling pass failed: {exc!r}\n{traceback.format_exc(limit=3)}")

    def update_labels(self) -> None:
        """One labelling pass over the changed region (or the whole map every n-th pass), then
        the query-basis refit when one is due (also after a vocabulary change with no new data)."""
        t0 = time.perf_counter()
        self.n_updates += 1
        full_every = int(self.p["full_update_every"])
        full = full_every > 0 and self.n_updates % full_every == 0
        if self._label_region(full):
            self.update_ms.append((time.perf_counter() - t0) * 1e3)
        self._refit_query_basis()

    def _label_region(self, full: bool) -> bool:
        """Label what changed since the last pass; False when there was nothing to do."""
        with self.lock:
            dirty = self.map.take_dirty()
            if self.mode == "fusion":
                if self.class_text is not None and len(dirty):
                    self.map.classify(self.class_text, None if full else dirty)
                return True
            if self.mode != "segmenter" or (len(dirty) == 0 and not full):
                return False
            region = self.map.slots() if full else self.map.region_slots(dirty, float(self.p["region_margin"]))
            positions = self.map.positions[region].copy()
            colors = self.map.colors[region].copy()
        if len(region) == 0:
            return False
        feats = self.segmenter.features(positions, colors=colors)
        with self.lock:
            still = self.map.valid[region] & (np.floor(self.map.positions[region] / self.map.config.voxel_size)
                                              == np.floor(positions / self.map.config.voxel_size)).all(1)
            feats_np = feats.detach().cpu().float().numpy() if hasattr(feats, "detach") else np.asarray(feats)
            self.map.set_features(region[still], feats_np[still])
            if self.class_text is not None:
                self.map.classify(self.class_text, region[still])
        return True

    def _refit_query_basis(self, rows: int = LOCK_SLICE) -> None:
        """Refit the map's query basis when it is due, in steps of ``rows`` voxels with the map
        lock released in between (a refit of a 1M-voxel map is seconds of work; queries keep
        the old basis, exact, until the last step)."""
        with self.lock:
            if not self.map.refit_pending:
                if not self.map.needs_refit():
                    return
                self.map.start_refit()
        done = False
        while not done and self.running:
            with self.lock:
                done = self.map.refit_step(rows)

    def publish_clouds(self) -> None:
        stamp = self.get_clock().now().to_msg()
        frame = str(self.p["map_frame"])
        with self.lock:
            if len(self.map) == 0:
                return
            data = self.map.export()
            pending, self._pending_recv = self._pending_recv, []
        labels = np.where(data["labels"] < 0, IGNORE_LABEL, data["labels"])
        self.pub_labelled.publish(conv.xyz_cloud(data["positions"], frame, stamp, colors=data["colors"],
                                                 labels=labels, scores=data["scores"]))
        if self.p["publish_map_cloud"]:
            self.pub_map.publish(conv.xyz_cloud(data["positions"], frame, stamp, colors=data["colors"]))
        now = time.monotonic()
        self.e2e_ms.extend((now - r) * 1e3 for r in pending)

    def _publish_label_map(self) -> None:
        msg = LabelMap()
        msg.header = conv.make_header(str(self.p["map_frame"]), self.get_clock().now().to_msg())
        msg.ids = list(range(len(self.vocabulary)))
        msg.names = list(self.vocabulary)
        msg.colors = [ColorRGBA(r=float(c[0]) / 255, g=float(c[1]) / 255, b=float(c[2]) / 255, a=1.0)
                      for c in PALETTE[np.arange(len(self.vocabulary)) % len(PALETTE)]]
        self.pub_label_map.publish(msg)

    def stats(self) -> dict:
        now = time.monotonic()
        med = lambda d: float(np.median(list(d))) if d else None  # noqa: E731
        return dict(points=len(self.map), frames=self.n_frames, sweeps=self.n_sweeps, updates=self.n_updates,
                    integrate_hz=round(self.integrate_rate.hz(now), 2), integrate_ms_median=med(self.integrate_ms),
                    update_ms_median=med(self.update_ms), query_ms_median=med(self.query_ms),
                    frame_to_cloud_ms_median=med(self.e2e_ms), queue=len(self.queue), drops=dict(self.drops),
                    evicted=self.map.n_evicted, map_bytes=self.map.memory_bytes(), mode=self.mode,
                    vocabulary_size=len(self.vocabulary))

    def _publish_stats(self) -> None:
        s = self.stats()
        self.pub_stats.publish(String(data=json.dumps(s)))
        self.get_logger().info(
            f"map {s['points']} points, {s['integrate_hz']} Hz integration "
            f"({s['integrate_ms_median'] or 0:.1f} ms/frame), frame->cloud "
            f"{s['frame_to_cloud_ms_median'] or 0:.0f} ms, drops {s['drops']}", throttle_duration_sec=30.0)

    # ------------------------------------------------------------------ services
    def _srv_query(self, request, response):
        t0 = time.perf_counter()
        texts = [str(t) for t in request.texts]
        response.success = False
        if not texts or any(not t.strip() for t in texts):
            response.message = "empty query text: give one or more non-empty texts"
            self._drop("empty_query", response.message)
            return response
        if self.encoder is None:
            response.message = "this node has no text encoder (mode 'none')"
            return response
        try:
            emb = self.encoder.encode(texts)
            emb = emb.detach().cpu().float().numpy() if hasattr(emb, "detach") else np.asarray(emb, np.float32)
        except ValueError as exc:
            response.message = f"cannot encode the query: {exc}"
            self._drop("bad_query", response.message)
            return response
        threshold = float(request.threshold) or float(self.p["query_threshold"])
        max_points = int(request.max_points) or int(self.p["query_max_points"])
        pos_all, score_all, index_all = [], [], []
        with self.lock:
            if self.map.feature_dim == 0:
                response.message = "the map has no features yet (no labelling pass has run)"
                return response
            for i, t in enumerate(emb):
                res = self.map.query(t, threshold=threshold, max_points=max_points)
                p = self.map.positions[res.slots].copy()
                pos_all.append(p)
                score_all.append(res.scores)
                index_all.append(np.full(len(p), i, np.uint32))
                response.best_scores.append(float(res.best_score) if np.isfinite(res.best_score) else 0.0)
                response.counts.append(int(res.count))
                if len(p):
                    response.centroids.append(conv.point_msg(p.mean(0)))
                    response.bbox_min.append(conv.point_msg(p.min(0)))
                    response.bbox_max.append(conv.point_msg(p.max(0)))
                else:
                    nan = [float("nan")] * 3
                    response.centroids.append(conv.point_msg(nan))
                    response.bbox_min.append(conv.point_msg(nan))
                    response.bbox_max.append(conv.point_msg(nan))
        positions = np.concatenate(pos_all) if pos_all else np.zeros((0, 3), np.float32)
        response.points = conv.xyz_cloud(positions, str(self.p["map_frame"]), self.get_clock().now().to_msg(),
                                         scores=np.concatenate(score_all), text_index=np.concatenate(index_all))
        response.success = True
        response.message = "; ".join(f"{t!r}: {c} points (best {b:.3f})"
                                     for t, c, b in zip(texts, response.counts, response.best_scores))
        self.query_ms.append((time.perf_counter() - t0) * 1e3)
        return response

    def _srv_set_vocabulary(self, request, response):
        names = [str(n).strip() for n in request.labels if str(n).strip()] or \
            resolve_vocabulary(str(self.p["vocabulary"]))
        template = str(request.prompt_template) or self.template
        response.unknown = []
        if self.encoder is None:
            response.success, response.message = False, "this node has no text encoder (mode 'none')"
            return response
        if "{}" not in template:
            response.success, response.message = False, f"prompt template {template!r} has no '{{}}'"
            return response
        try:
            self._set_vocabulary(names, template)
        except ValueError as exc:
            words = list(getattr(exc, "words", ()))
            if not words:  # find the offending names one by one
                for n in names:
                    try:
                        self._class_text([n], template)
                    except ValueError:
                        words.append(n)
            response.unknown = words
            response.success, response.message = False, f"vocabulary unchanged: {exc}"
            self._drop("unknown_word", response.message)
            return response
        self._publish_label_map()
        self.update_event.set()
        response.success, response.message = True, f"vocabulary set to {len(names)} classes"
        return response

    def _srv_save_map(self, request, response):
        if not request.path:
            response.success, response.message = False, "empty path"
            return response
        try:
            with self.lock:
                ply, npz = self.map.save(request.path, class_names=self.vocabulary or None)
            response.success, response.message = True, f"saved {ply} and {npz}"
        except (OSError, ValueError) as exc:
            response.success, response.message = False, f"save failed: {exc}"
        return response

    def _srv_reset(self, request, response):
        with self.lock:
            self.map.reset()
            self._pending_recv = []
        with self.queue_cv:
            self.queue.clear()
        response.success, response.message = True, "map cleared"
        return response

    def destroy_node(self):
        self.running = False
        self.update_event.set()
        for t in (self.worker, self.labeller):
            if t.is_alive() and t is not threading.current_thread():
                t.join(timeout=2.0)
        return super().destroy_node()


def main(args=None) -> int:
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    rclpy.init(args=args)
    node = None
    try:
        try:
            node = MappingNode()
        except (ValueError, FileNotFoundError) as exc:  # bad parameters / missing checkpoint: one clear line
            rclpy.logging.get_logger("sas_mapping_node").fatal(str(exc))
            return 1
        executor = MultiThreadedExecutor(num_threads=4)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
