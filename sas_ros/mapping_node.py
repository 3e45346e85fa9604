"""The SAS mapping node: RGB-D and/or LiDAR in, a labelled voxel map and text queries out.

Thin ROS glue around :class:`sas_core.mapping.Mapper` (the same pipeline `sas replay` drives):
this node decodes messages (``sas_core.data.msg_codec``), looks poses up, owns the QoS, the
threads, timers and services, and logs; every computation is the Mapper's.

Inputs (relative names, remap them; sensor-data QoS, or reliable keep-all with ``reliable_inputs``):
  ``color/image_raw`` (or, with ``color_transport: compressed``, ``<color/image_raw>/compressed``:
  sensor_msgs/CompressedImage, image_transport's naming after remapping) + ``depth/image_raw``
  (approximately synchronised, ``camera_info`` cached), ``points`` (LiDAR PointCloud2), poses
  from TF (``/tf`` + ``/tf_static``: tf2_ros, or the node's own listener into sas_core's
  TransformBuffer), a ``pose`` topic or odometry (see :mod:`sas_ros.poses`), and in fusion mode
  with the simulated teacher also ``semantic/image_raw`` and ``instance/image_raw`` (16UC1 ground
  truth of the synthetic world; instance + 1, 0 = none).
Outputs: ``~/labelled_cloud`` (x, y, z, rgb, label, score, instance), ``~/map_cloud`` (x, y, z, rgb),
  ``~/label_map`` (transient local), ``~/stats`` (std_msgs/String JSON: rates, latencies, drops).
Services: ``~/query`` (TextQuery), ``~/set_vocabulary``, ``~/save_map``, ``~/load_map``,
  ``~/reset`` (Trigger). Every request is bounded (:class:`sas_core.mapping.ServiceLimits`:
  ``max_query_texts``, ``max_text_length``, ``max_query_points``, ``max_vocabulary``) and checked
  by the Mapper; every callback catches everything: a refused request gets ``success: false`` and
  a message naming the limit, an unexpected error ``internal error: <type>`` (traceback logged
  once), and the node keeps serving.

Maps (parameters ``map_dir``, ``map_file``, ``autosave_period``): ``~/save_map`` / ``~/load_map``
  take names under ``map_dir`` (:func:`sas_core.io.confined_path`: no absolute path, ``..`` or
  symlink out of it); a map is one folder written atomically with a checked manifest
  (:func:`sas_core.geometry.voxel_map.write_map`); leftover temporaries of killed saves are removed
  at start; ``map_file`` is loaded at start and, with ``autosave_period`` > 0, rewritten every
  period when the map changed and once on shutdown.

Parameters: one per field of :class:`sas_core.mapping.MapperConfig` (pipeline) and of
:class:`sas_ros.params.NodeConfig` (ROS-only), declared by :func:`sas_ros.params.declare_config`
with the field's help as description; ``config/*.yaml`` list them.

Threads: subscription callbacks only push onto a bounded keep-latest queue (oldest dropped,
counted; with ``reliable_inputs`` a full queue makes the callback wait instead, so DDS holds the
messages and the publisher slows down: no frame lost); an integration worker decodes, waits up to
``pose_wait`` (``reliable_pose_wait`` with ``reliable_inputs``) for the frame's pose, and hands
frames to the Mapper; in fusion mode a teacher worker runs the teacher(s) at its own rate on the
frames :meth:`Mapper.select_teacher_frame` picks (by time and viewpoint change; keep-latest
``teacher_queue``) and fuses them (:meth:`Mapper.fuse_frame`); a labelling worker, woken by a timer, runs
:meth:`Mapper.label_pass` and :meth:`Mapper.refit_query_basis`, then publishes the clouds. The
Mapper's lock guards the map; long passes take it in slices. Shutdown (SIGINT / SIGTERM): the
workers stop quietly and are joined before the node is destroyed.

Bad input never raises out of a callback: each reason code (``nan_depth``, ``size_mismatch``,
``no_camera_info``, ``unknown_frame``, ``empty_cloud``, ...; :class:`sas_core.mapping.Rejected`
and :class:`sas_ros.poses.PoseUnavailable` carry it) is logged (throttled per reason) and
counted in ``~/stats``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import traceback
from collections import deque
from typing import Optional

import numpy as np
import rclpy
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import ColorRGBA, String
from std_srvs.srv import Trigger

from sas_core.data import msg_codec as codec
from sas_core.data import image_codec
from sas_core.mapping import Mapper, MapperConfig, Rejected, ServiceLimits
from sas_core.types import IGNORE_LABEL, Frame
from sas_core.viz import label_palette
from sas_interfaces.msg import LabelMap
from sas_interfaces.srv import LoadMap, SaveMap, SetVocabulary, TextQuery
from sas_ros import conversions as conv
from sas_ros.params import NodeConfig, declare_config
from sas_ros.poses import PoseSource, PoseUnavailable
from sas_ros.sync import make_synchronizer


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
    """See the module docstring. ``self.mapper`` is the :class:`~sas_core.mapping.Mapper`;
    ``self.cfg`` the :class:`NodeConfig`."""

    def __init__(self, node_name: str = "sas_mapping_node", **kwargs):
        # state first: nothing below may fail before every attribute destroy_node() and the
        # callbacks use exists (a bad parameter must give one clear line, not an AttributeError)
        self.running = True
        self.update_event = threading.Event()
        self.worker = self.labeller = None
        self.mapper = None
        self.camera_info = None
        self._info_cv = threading.Condition()  # frames that came before the first camera info wait on it
        self.queue: deque = deque()
        self.queue_cv = threading.Condition()
        self._last_warn: dict = {}
        self.drops: dict = {}
        self.n_updates = 0
        self.n_inputs_done = 0  # inputs the integration worker finished (integrated, dropped or failed)
        self._input_busy = False
        self.integrate_rate = _Rate()
        self.integrate_ms: deque = deque(maxlen=200)
        self.update_ms: deque = deque(maxlen=50)
        self.query_ms: deque = deque(maxlen=50)
        self.instance_ms: deque = deque(maxlen=50)  # per-voxel instance updates that regrouped something
        self.e2e_ms: deque = deque(maxlen=200)
        self._pending_recv: list = []   # receive times of frames integrated since the last publish
        self._recv_lock = threading.Lock()
        self.poses = None
        self.teacher_worker = None
        self.teacher_queue: deque = deque()    # (teacher frame, receive time) for the teacher worker
        self.teacher_cv = threading.Condition()
        self._teacher_busy = False
        self.teacher_skipped = 0
        self.teacher_rate = _Rate(30.0)
        self.teacher_ms: deque = deque(maxlen=50)          # teacher forward + fusion per frame
        self.teacher_latency_ms: deque = deque(maxlen=50)  # frame arrival -> its features in the map
        self.map_dir = None
        self._autosave_path = None      # set once the map_file is loaded (never autosave before that)
        self._saved_changes = None
        self._save_lock = threading.Lock()
        self._internal_errors: set = set()
        super().__init__(node_name, **kwargs)
        try:
            self._setup()
        except BaseException:
            self.destroy_node()
            raise

    def _setup(self) -> None:
        self.cfg = cfg = declare_config(self, NodeConfig)
        self.mapper_config = declare_config(self, MapperConfig)
        self.unknown_parameters = self._warn_unknown_parameters()
        if self.mapper_config.mode == "segmenter" and not self.mapper_config.checkpoint:
            from sas_core.models import load_model_paths  # models file: its default distilled checkpoint

            default = load_model_paths(cfg.models_file or None).checkpoint
            if default:
                self.mapper_config = dataclasses.replace(self.mapper_config, checkpoint=str(default))
        models = None
        if self.mapper_config.mode == "fusion" and self.mapper_config.teacher != "simulated":
            from sas_core.models import load_model_paths  # the CLIP / SAM weights of the real teachers

            models = load_model_paths(cfg.models_file or None)
        self.limits = declare_config(self, ServiceLimits)
        self.mapper = Mapper(self.mapper_config, models=models, limits=self.limits)  # ValueError: bad setting / no CUDA / weights
        self._setup_maps()

        # ---- interfaces
        sensor_qos = qos_profile_sensor_data
        if cfg.reliable_inputs:  # lossless replay: DDS keeps every sample while the callbacks wait
            sensor_qos = QoSProfile(depth=max(10, cfg.input_queue), history=HistoryPolicy.KEEP_ALL,
                                    reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                             reliability=ReliabilityPolicy.RELIABLE)
        self.pub_labelled = self.create_publisher(PointCloud2, "~/labelled_cloud", 2)
        self.pub_map = self.create_publisher(PointCloud2, "~/map_cloud", 2)
        self.pub_label_map = self.create_publisher(LabelMap, "~/label_map", latched)
        self.pub_stats = self.create_publisher(String, "~/stats", 10)
        from visualization_msgs.msg import MarkerArray

        self.pub_objects = self.create_publisher(MarkerArray, "~/objects", latched)  # the last query's objects
        self.poses = PoseSource(self, cfg.pose_source, cfg.map_frame, cfg.pose_topic,
                                sensor_frame=cfg.camera_frame, tolerance=cfg.pose_tolerance,
                                tf_backend=cfg.tf_backend, tf_cache_time=cfg.tf_cache_time, drop=self._drop)
        self._lidar_pose_sub = None
        if cfg.use_lidar and self.poses.mode == "pose" and cfg.lidar_pose_topic:
            from geometry_msgs.msg import PoseStamped

            self._lidar_pose_sub = self.create_subscription(
                PoseStamped, cfg.lidar_pose_topic,
                lambda m: self.poses.add(m.header.frame_id, cfg.lidar_frame,
                                         codec.stamp_to_seconds(m.header.stamp), m.pose), 50)
        self._sync = None
        if cfg.use_rgbd:
            self.create_subscription(CameraInfo, "color/camera_info", self._on_camera_info, sensor_qos,
                                     callback_group=MutuallyExclusiveCallbackGroup())  # never behind a waiting image
            color = (Image, "color/image_raw", sensor_qos)
            if cfg.color_transport == "compressed":  # image_transport: the base topic (remapped) + /compressed
                color = (CompressedImage, self.resolve_topic_name("color/image_raw") + "/compressed", sensor_qos)
            topics = [color, (Image, "depth/image_raw", sensor_qos)]
            if self.mapper.needs_ground_truth:  # the simulated teacher reads the synthetic world's labels
                topics += [(Image, "semantic/image_raw", sensor_qos), (Image, "instance/image_raw", sensor_qos)]
            self._sync = make_synchronizer(self, topics, self._on_rgbd, cfg.sync_queue, cfg.sync_slop)
        if cfg.use_lidar:
            self.create_subscription(PointCloud2, "points", self._on_cloud, sensor_qos)
        services = ReentrantCallbackGroup()
        for srv_type, name, fn in ((TextQuery, "query", self._srv_query),
                                   (SetVocabulary, "set_vocabulary", self._srv_set_vocabulary),
                                   (SaveMap, "save_map", self._srv_save_map), (LoadMap, "load_map", self._srv_load_map),
                                   (Trigger, "reset", self._srv_reset)):
            self.create_service(srv_type, f"~/{name}", self._guarded(name, fn), callback_group=services)
        timers = MutuallyExclusiveCallbackGroup()
        self.create_timer(cfg.update_period, self.update_event.set, callback_group=timers)
        self.create_timer(cfg.stats_period, self._publish_stats, callback_group=timers)
        if cfg.autosave_period > 0:
            self.create_timer(cfg.autosave_period, self.autosave, callback_group=MutuallyExclusiveCallbackGroup())
        self._publish_label_map()
        self.worker = threading.Thread(target=self._integration_loop, name="sas-integrate", daemon=True)
        self.labeller = threading.Thread(target=self._labelling_loop, name="sas-label", daemon=True)
        self.worker.start()
        self.labeller.start()
        mc = self.mapper_config
        if mc.mode == "fusion":
            self.teacher_worker = threading.Thread(target=self._teacher_loop, name="sas-teacher", daemon=True)
            self.teacher_worker.start()
        teacher = f", teacher {'+'.join(t.name for t in self.mapper.teachers)}" if mc.mode == "fusion" else ""
        self.get_logger().info(
            f"SAS mapping node: mode={mc.mode}{teacher}, poses from {self.poses.source}, colour {cfg.color_transport}, "
            f"voxel {mc.voxel_size} m, max {mc.max_points} points, vocabulary of {len(self.mapper.vocabulary)} classes")

    # ------------------------------------------------------------------ views of the mapper
    @property
    def map(self):
        """The Mapper's VoxelMap (hold :attr:`lock` while reading it)."""
        return self.mapper.map

    @property
    def lock(self):
        return self.mapper.lock

    @property
    def vocabulary(self) -> list:
        return self.mapper.vocabulary

    @property
    def class_text(self):
        return self.mapper.class_text

    @property
    def mode(self) -> str:
        return self.mapper.mode

    @property
    def n_frames(self) -> int:
        return 0 if self.mapper is None else self.mapper.n_frames

    @property
    def n_sweeps(self) -> int:
        return 0 if self.mapper is None else self.mapper.n_sweeps

    # ------------------------------------------------------------------ helpers
    def _ros_log_ok(self, level: str, text: str) -> bool:
        """True when ROS can log; once the context is shut down (SIGINT shuts it at once, while the
        workers are still finishing; rcl could not publish to /rosout and would say so) ``text`` goes
        to stderr and this returns False. The ROS call stays at each call site: rclpy keys its
        throttling and severity on the caller's line."""
        if self.context.ok():
            return True
        import sys

        print(f"[{level.upper()}] [{self.get_logger().name}]: {text}", file=sys.stderr, flush=True)
        return False

    def _drop(self, reason: str, text: str) -> None:
        """Count and log (throttled per reason) a dropped input."""
        self.drops[reason] = self.drops.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last_warn.get(reason, -1e9) >= self.cfg.log_throttle:
            self._last_warn[reason] = now
            msg = f"[{reason}] {text} (dropped {self.drops[reason]} so far)"
            if self._ros_log_ok("warning", msg):
                self.get_logger().warning(msg)

    def _push(self, item) -> None:
        with self.queue_cv:
            limit = max(1, self.cfg.input_queue)
            if self.cfg.reliable_inputs:  # backpressure: wait for room (the subscriptions stop taking)
                while self.running and len(self.queue) >= limit:
                    self.queue_cv.wait(timeout=0.1)
            elif len(self.queue) >= limit:
                self.queue.popleft()
                self.drops["queue_full"] = self.drops.get("queue_full", 0) + 1
            self.queue.append(item)
            self.queue_cv.notify_all()

    def _push_teacher(self, frame: Frame, recv: float) -> None:
        """Hand a picked frame to the teacher worker (keep-latest; waits with reliable_inputs)."""
        with self.teacher_cv:
            limit = max(1, self.cfg.teacher_queue)
            if self.cfg.reliable_inputs:
                while self.running and len(self.teacher_queue) >= limit:
                    self.teacher_cv.wait(timeout=0.1)
            elif len(self.teacher_queue) >= limit:
                self.teacher_queue.popleft()
                self.teacher_skipped += 1
            self.teacher_queue.append((frame, recv))
            self.teacher_cv.notify_all()

    @property
    def input_pending(self) -> int:
        """Inputs queued for the integration worker or being integrated."""
        return len(self.queue) + int(self._input_busy)

    @property
    def teacher_pending(self) -> int:
        """Teacher frames queued or being fused."""
        return len(self.teacher_queue) + int(self._teacher_busy)

    def _stopping(self) -> bool:
        """The node is shutting down (destroy_node, or the context went with SIGINT / SIGTERM)."""
        return not self.running or not self.context.ok()

    # ------------------------------------------------------------------ callbacks (never block)
    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            self.camera_info = codec.camera_info_to_intrinsics(msg)
        except ValueError as exc:
            self._drop("bad_camera_info", f"camera info rejected: {exc}")
            return
        with self._info_cv:
            self._info_cv.notify_all()

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
                self._input_busy = True
                self.queue_cv.notify_all()  # room for a waiting (reliable_inputs) callback
            try:
                t0 = time.perf_counter()
                ok = self.integrate_rgbd(*msgs, recv=recv) if kind == "rgbd" else self.integrate_cloud(*msgs, recv=recv)
                if ok:
                    now = time.monotonic()
                    self.integrate_ms.append((time.perf_counter() - t0) * 1e3)
                    self.integrate_rate.tick(now)
                    with self._recv_lock:
                        self._pending_recv.append(recv)
            except Exception as exc:  # never let bad input kill the worker
                if self._stopping():
                    break
                self._drop("error", f"{kind} frame failed: {exc!r}\n{traceback.format_exc(limit=3)}")
            finally:  # after the teacher hand-off too: a waiter sees the frame's teacher work queued
                self.n_inputs_done += 1
                self._input_busy = False

    def _pose_timeout(self, recv: Optional[float]) -> float:
        """Seconds a frame received at ``recv`` may still wait for its pose: ``pose_wait`` from its
        arrival (live), or ``reliable_pose_wait`` from now with ``reliable_inputs`` (lossless
        replay: the time a frame spent in our own queue under backpressure does not count against
        it, and a pose sample lost on the way comes only with the writer's next heartbeat)."""
        if recv is None or not self.running:
            return 0.0
        if self.cfg.reliable_inputs:
            return float(self.cfg.reliable_pose_wait)
        return max(0.0, float(self.cfg.pose_wait) - (time.monotonic() - recv))

    def decode_rgbd(self, color_msg, depth_msg, semantic_msg=None, instance_msg=None, recv=None) -> Frame:
        """Messages -> a :class:`Frame` in the map frame (colour: Image or CompressedImage). Waits
        for the pose until ``pose_wait`` after ``recv`` (monotonic receive time). Raises Rejected /
        PoseUnavailable."""
        intr = self.camera_info
        if intr is None:  # the first frames may come before the first camera info: wait as for a pose
            with self._info_cv:
                self._info_cv.wait_for(lambda: self.camera_info is not None or not self.running,
                                       timeout=self._pose_timeout(recv))
            intr = self.camera_info
        if intr is None:
            raise Rejected("no_camera_info", "no camera info received on 'color/camera_info' yet")
        try:
            depth = codec.depth_to_metres(depth_msg)
            color = image_codec.decode_color(color_msg)  # Image or CompressedImage -> RGB
            semantic = instance = None
            if semantic_msg is not None:
                semantic = codec.image_to_numpy(semantic_msg).astype(np.int64)
                if instance_msg is not None:
                    instance = codec.image_to_numpy(instance_msg).astype(np.int64) - 1
        except ValueError as exc:
            raise Rejected("bad_image", f"image rejected: {exc}") from None
        if color.ndim == 2:
            color = np.repeat(color[:, :, None], 3, axis=2)
        shapes = [a.shape[:2] for a in (color, semantic, instance) if a is not None]
        if depth.shape != (intr.height, intr.width) or any(s != depth.shape for s in shapes):
            raise Rejected("size_mismatch", f"size mismatch: color {color.shape[1]}x{color.shape[0]}, depth "
                                            f"{depth.shape[1]}x{depth.shape[0]}, camera info {intr.width}x{intr.height}"
                                            + ("" if semantic is None else f", ground truth {semantic.shape[::-1]}"))
        frame_id = depth_msg.header.frame_id or color_msg.header.frame_id
        stamp = codec.stamp_to_seconds(depth_msg.header.stamp)
        pose = self.poses.lookup(frame_id, stamp, timeout=self._pose_timeout(recv))
        return Frame(color=color, depth=depth, intrinsics=intr, pose=pose, stamp=stamp, semantic=semantic,
                     instance=instance, frame_id=frame_id)

    def integrate_rgbd(self, color_msg, depth_msg, semantic_msg=None, instance_msg=None, recv=None) -> bool:
        """Decode, check and integrate one RGB-D frame; in fusion mode a frame the Mapper picks for
        the teacher goes to the teacher worker. Returns False (logged) when dropped."""
        recv = time.monotonic() if recv is None else recv
        try:
            frame = self.decode_rgbd(color_msg, depth_msg, semantic_msg, instance_msg, recv=recv)
            teacher_frame = self.mapper.teacher_input(frame)
            self.mapper.integrate_rgbd(frame, fuse=False)
        except Rejected as exc:
            self._drop(exc.reason, f"{exc}; frame dropped")
            return False
        except PoseUnavailable as exc:
            self._drop(exc.reason, f"frame {depth_msg.header.frame_id!r} at "
                                   f"{codec.stamp_to_seconds(depth_msg.header.stamp):.3f}: {exc}; frame dropped")
            return False
        if teacher_frame is not None and self.mapper.select_teacher_frame(teacher_frame.stamp, teacher_frame.pose):
            self._push_teacher(teacher_frame, recv)
        return True

    # ------------------------------------------------------------------ teacher worker
    def _teacher_loop(self) -> None:
        """Runs the teacher(s) on the picked frames and fuses them into the map, at its own rate."""
        while self.running:
            with self.teacher_cv:
                if not self.teacher_queue:
                    self.teacher_cv.wait(timeout=0.1)
                    continue
                frame, recv = self.teacher_queue.popleft()
                self._teacher_busy = True
                self.teacher_cv.notify_all()
            try:
                t0 = time.perf_counter()
                self.mapper.fuse_frame(frame)
                now = time.monotonic()
                self.teacher_ms.append((time.perf_counter() - t0) * 1e3)
                self.teacher_latency_ms.append((now - recv) * 1e3)
                self.teacher_rate.tick(now)
            except Exception as exc:  # a failing teacher never kills the worker
                if self._stopping():
                    break
                self._drop("teacher_error", f"teacher failed on the frame at {frame.stamp}: {exc!r}\n"
                                            f"{traceback.format_exc(limit=3)}")
            finally:
                self._teacher_busy = False

    def integrate_cloud(self, msg, recv=None) -> bool:
        """Decode, check and integrate one LiDAR cloud (points in ``msg.header.frame_id``)."""
        try:
            arr = conv.cloud_to_array(msg)
            xyz = codec.cloud_xyz(arr, remove_nans=False)
        except ValueError as exc:
            self._drop("bad_cloud", f"point cloud rejected: {exc}")
            return False
        stamp = codec.stamp_to_seconds(msg.header.stamp)
        frame_id = msg.header.frame_id
        names = arr.dtype.names or ()
        colors = codec.unpack_rgb(arr["rgb"]) if "rgb" in names else None
        intensity = arr["intensity"] if "intensity" in names and colors is None else None
        try:
            if not np.isfinite(xyz).all(1).any():
                raise Rejected("empty_cloud", f"empty point cloud on 'points' (frame {frame_id!r})")
            pose = np.eye(4) if frame_id == self.cfg.map_frame else \
                self.poses.lookup(frame_id, stamp, timeout=self._pose_timeout(recv))
            self.mapper.integrate_sweep(xyz, pose, intensity=intensity, colors=colors, stamp=stamp)
        except Rejected as exc:
            self._drop(exc.reason, f"{exc}; ignored")
            return False
        except PoseUnavailable as exc:
            self._drop(exc.reason, f"cloud frame {frame_id!r} at {stamp:.3f}: {exc}; cloud dropped")
            return False
        return True

    # ------------------------------------------------------------------ labelling worker
    def _labelling_loop(self) -> None:
        while self.running:
            if not self.update_event.wait(timeout=0.2):
                continue
            self.update_event.clear()
            try:
                self.update_labels()
                if self._stopping():
                    break
                self.publish_clouds()
            except Exception as exc:
                if self._stopping():  # the context went (SIGINT) while publishing: not an error
                    break
                self._drop("error", f"labelling pass failed: {exc!r}\n{traceback.format_exc(limit=3)}")

    def update_labels(self) -> None:
        """One labelling pass (the Mapper's), every ``instance_update_every``-th pass the instance
        ids of what changed (:meth:`Mapper.update_instances`), then the query-basis refit when one
        is due (also after a vocabulary change with no new data)."""
        t0 = time.perf_counter()
        self.n_updates += 1
        if self.mapper.label_pass():
            self.update_ms.append((time.perf_counter() - t0) * 1e3)
        every = int(self.mapper_config.instance_update_every)
        if every > 0 and self.n_updates % every == 0:
            st = self.mapper.update_instances()
            if st["changed"]:
                self.instance_ms.append(st["ms"])
        self.mapper.refit_query_basis(running=lambda: self.running)

    def publish_clouds(self) -> None:
        stamp = self.get_clock().now().to_msg()
        frame = self.cfg.map_frame
        data = self.mapper.export()
        with self._recv_lock:
            pending, self._pending_recv = self._pending_recv, []
        if len(data["positions"]) == 0:
            return
        labels = np.where(data["labels"] < 0, IGNORE_LABEL, data["labels"])
        self.pub_labelled.publish(conv.xyz_cloud(data["positions"], frame, stamp, colors=data["colors"],
                                                 labels=labels, scores=data["scores"],
                                                 instance=data["instance"].astype(np.int32)))
        if self.cfg.publish_map_cloud:
            self.pub_map.publish(conv.xyz_cloud(data["positions"], frame, stamp, colors=data["colors"]))
        now = time.monotonic()
        self.e2e_ms.extend((now - r) * 1e3 for r in pending)

    def _publish_label_map(self) -> None:
        names = list(self.mapper.vocabulary)
        msg = LabelMap()
        msg.header = conv.make_header(self.cfg.map_frame, self.get_clock().now().to_msg())
        msg.ids = list(range(len(names)))
        msg.names = names
        colors = label_palette()[np.arange(len(names)) % 255]
        msg.colors = [ColorRGBA(r=float(c[0]) / 255, g=float(c[1]) / 255, b=float(c[2]) / 255, a=1.0) for c in colors]
        self.pub_label_map.publish(msg)

    def stats(self) -> dict:
        now = time.monotonic()
        med = lambda d: float(np.median(list(d))) if d else None  # noqa: E731
        s = self.mapper.stats()
        return dict(points=s["points"], frames=s["frames"], sweeps=s["sweeps"], updates=self.n_updates,
                    integrate_hz=round(self.integrate_rate.hz(now), 2), integrate_ms_median=med(self.integrate_ms),
                    update_ms_median=med(self.update_ms), query_ms_median=med(self.query_ms),
                    instance_ms_median=med(self.instance_ms), instances=s["instances"],
                    frame_to_cloud_ms_median=med(self.e2e_ms), queue=len(self.queue), drops=dict(self.drops),
                    sync_unmatched=getattr(self._sync, "unmatched", None),  # None with message_filters
                    evicted=s["evicted"], map_bytes=s["map_bytes"], mode=s["mode"],
                    vocabulary_size=s["vocabulary_size"],
                    teacher=("+".join(t.name for t in self.mapper.teachers) if s["mode"] == "fusion" else None),
                    teacher_frames=s["teacher_frames"], teacher_hz=round(self.teacher_rate.hz(now), 3),
                    teacher_ms_median=med(self.teacher_ms), teacher_latency_ms_median=med(self.teacher_latency_ms),
                    teacher_queue=len(self.teacher_queue), teacher_skipped=self.teacher_skipped,
                    poses=self.poses.source if self.poses is not None else None,
                    tf_transforms=self.poses.n_tf if self.poses is not None else 0)

    def _publish_stats(self) -> None:
        if self._stopping():
            return
        s = self.stats()
        try:
            self.pub_stats.publish(String(data=json.dumps(s)))
        except Exception:  # the context went between the check and the publish (SIGINT)
            if self._stopping():
                return
            raise
        msg = (f"map {s['points']} points from {s['frames']} frames and {s['sweeps']} sweeps; "
               f"{s['integrate_hz']} Hz over the last 10 s ({s['integrate_ms_median'] or 0:.1f} ms/frame), "
               f"frame->cloud {s['frame_to_cloud_ms_median'] or 0:.0f} ms, drops {s['drops']}")
        if self._ros_log_ok("info", msg):
            self.get_logger().info(msg, throttle_duration_sec=30.0)

    # ------------------------------------------------------------------ services
    def _guarded(self, name: str, fn):
        """``fn`` as a service callback that never raises: a refused request (ValueError, OSError)
        answers ``success: false`` with its message (clipped), anything else ``internal error:
        <type>`` with the traceback logged once per (service, type)."""
        from sas_core.text import clip_text

        def callback(request, response):
            try:
                return fn(request, response)
            except (ValueError, OSError) as exc:
                message = clip_text(exc, 500)
                reason, words = getattr(exc, "reason", "bad_request"), list(getattr(exc, "words", ()))
            except Exception as exc:  # never let one request stop the node
                message = reason = f"internal error: {type(exc).__name__}"
                words = []
                key = (name, type(exc).__name__)
                if key not in self._internal_errors:
                    self._internal_errors.add(key)
                    self.get_logger().error(f"~/{name}: {message}\n{traceback.format_exc()}")
                else:
                    self.get_logger().error(f"~/{name}: {message} (traceback logged before)")
            fresh = type(response)()
            fresh.success, fresh.message = False, message
            if hasattr(fresh, "unknown"):
                fresh.unknown = words
            if not reason.startswith("internal"):
                self._drop(reason, f"~/{name}: {message}")
            return fresh

        return callback

    def _srv_query(self, request, response):
        t0 = time.perf_counter()
        # 0 in the request means the node's default (query_threshold / query_max_points); the
        # Mapper bounds the rest (ServiceLimits) and raises Rejected naming the limit
        answers = self.mapper.query(list(request.texts), float(request.threshold) or None,
                                    int(request.max_points) or None, int(request.max_objects) or None)
        object_index, first = [], 0
        for i, a in enumerate(answers):
            response.best_scores.append(a.best if np.isfinite(a.best) else 0.0)
            response.counts.append(a.count)
            response.centroids.append(conv.point_msg(a.centroid))
            response.bbox_min.append(conv.point_msg(a.bbox_min))
            response.bbox_max.append(conv.point_msg(a.bbox_max))
            for inst in a.objects:
                response.objects.append(conv.detected_object(inst, i, float(a.scores[inst.indices].max())))
            object_index.append(np.where(a.object_of >= 0, a.object_of + first, -1).astype(np.int32))
            first += len(a.objects)
        stamp = self.get_clock().now().to_msg()
        positions = np.concatenate([a.positions for a in answers])
        response.points = conv.xyz_cloud(positions, self.cfg.map_frame, stamp,
                                         scores=np.concatenate([a.scores for a in answers]),
                                         text_index=np.concatenate([np.full(len(a.positions), i, np.uint32)
                                                                    for i, a in enumerate(answers)]),
                                         object=np.concatenate(object_index),
                                         instance=np.concatenate([a.instance for a in answers]).astype(np.int32))
        response.success = True
        response.message = "; ".join(f"{a.text!r}: {a.count} points, {len(a.objects)} objects (best {b:.3f})"
                                     for a, b in zip(answers, response.best_scores))
        self.pub_objects.publish(conv.object_markers(response.objects, [a.text for a in answers],
                                                     self.cfg.map_frame, stamp, self.cfg.marker_lifetime))
        self.query_ms.append((time.perf_counter() - t0) * 1e3)
        return response

    def _srv_set_vocabulary(self, request, response):
        names = list(request.labels)
        if not any(str(n).strip() for n in names):
            names = self.mapper_config.vocabulary  # the configured default (a spec string)
        template = str(request.prompt_template) or None
        response.unknown = []
        self.mapper.set_vocabulary(names, template)  # Rejected (unknown_word: .words) -> _guarded
        self._publish_label_map()
        self.update_event.set()
        response.success, response.message = True, f"vocabulary set to {len(self.mapper.vocabulary)} classes"
        return response

    def _srv_save_map(self, request, response):
        from sas_core.io import confined_path

        path = confined_path(self.map_dir, request.path)  # ValueError: absolute, '..', symlink out
        with self._save_lock:
            folder = self.mapper.save(path, overwrite=bool(request.overwrite))  # FileExistsError
        response.success, response.message = True, f"saved {len(self.mapper)} voxels to {folder}"
        return response

    def _srv_load_map(self, request, response):
        n = self.load_map(request.name)
        response.success, response.n_voxels = True, n
        response.message = f"loaded {n} voxels from {request.name!r} ({len(self.mapper.vocabulary)} classes)"
        return response

    def _srv_reset(self, request, response):
        self.mapper.reset()
        with self._recv_lock:
            self._pending_recv = []
        with self.queue_cv:
            self.queue.clear()
        response.success, response.message = True, "map cleared"
        return response

    # ------------------------------------------------------------------ map persistence
    def _warn_unknown_parameters(self) -> list:
        """Parameters given to the node (``-p name:=value``, a YAML file) that it does not have are
        ignored by ROS without a word; name each, with the closest real one. Returns their names.
        Known: every config field the node declares (``parameter_fields``) and anything declared so far."""
        import difflib

        from sas_ros.params import parameter_fields

        given = set(getattr(self, "_parameter_overrides", {}) or {})
        known = set(parameter_fields()) | set(self._parameters) | {"use_sim_time"}
        unknown = sorted(n for n in given - known if not n.startswith("qos_overrides."))
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            self.get_logger().warning(f"unknown parameter {name!r} ignored"
                                      + (f" (did you mean {close[0]!r}?)" if close else ""))
        return unknown

    def _setup_maps(self) -> None:
        """map_dir checked, leftover temporaries of killed saves removed, map_file loaded (ValueError:
        refuse to start with one line)."""
        from pathlib import Path

        from sas_core.io import clean_temp_dirs, confined_path

        cfg = self.cfg
        if not np.isfinite(cfg.autosave_period) or cfg.autosave_period < 0:
            raise ValueError(f"autosave_period must be >= 0 seconds, got {cfg.autosave_period}")
        if not cfg.map_dir.strip():
            raise ValueError("map_dir is empty: give the folder of saved maps")
        self.map_dir = Path(os.path.expanduser(cfg.map_dir)).absolute()  # created by the first save
        if self.map_dir.exists() and not self.map_dir.is_dir():
            raise ValueError(f"map_dir {self.map_dir} is not a folder")
        removed = clean_temp_dirs(self.map_dir)
        if removed:
            self.get_logger().warning(f"removed {len(removed)} unfinished save(s) of killed processes in "
                                      f"{self.map_dir}: {', '.join(p.name for p in removed[:5])}")
        target = None
        if cfg.map_file:
            try:
                target = confined_path(self.map_dir, cfg.map_file)
            except ValueError as exc:
                raise ValueError(f"map_file: {exc}") from None
            if target.exists():
                n = self.load_map(cfg.map_file)
                self.get_logger().info(f"loaded map {target}: {n} voxels")
            elif cfg.autosave_period <= 0:
                raise ValueError(f"map_file {cfg.map_file!r}: no map {target} (set autosave_period to create it, "
                                 "or clear map_file)")
        elif cfg.autosave_period > 0:
            target = confined_path(self.map_dir, "autosave")
        self._saved_changes = self.mapper.n_changes
        self._autosave_path = target if cfg.autosave_period > 0 else None

    def load_map(self, name: str) -> int:
        """Replace the map by the saved map ``name`` under map_dir; returns its voxel count.
        Raises ValueError (a bad name, Rejected ``bad_map``) and leaves the map unchanged then."""
        from sas_core.io import confined_path

        path = confined_path(self.map_dir, name)
        if not path.exists():
            raise ValueError(f"no map {str(name)[:80]!r} in {self.map_dir}")
        n = self.mapper.load(path)
        if hasattr(self, "pub_label_map"):  # (at start the publishers come after the map_file)
            self._publish_label_map()
        self.update_event.set()
        return n

    def autosave(self, final: bool = False) -> bool:
        """Save the map atomically to the autosave target when it changed since the last save (the
        timer; ``final`` on shutdown). Never raises (errors are logged). Returns True when saved."""
        path = self._autosave_path
        if path is None or self.mapper is None:
            return False
        with self._save_lock:
            changes = self.mapper.n_changes
            if changes == self._saved_changes:
                return False
            try:
                t0 = time.perf_counter()
                self.mapper.save(path, overwrite=True)
                self._saved_changes = changes
            except Exception as exc:
                self._drop("autosave_failed", f"autosave to {path} failed: {type(exc).__name__}: {exc}")
                return False
        text = f"{len(self.mapper)} voxels to {path} in {time.perf_counter() - t0:.2f} s"
        if final:
            if self._ros_log_ok("info", f"final save: {text}"):
                self.get_logger().info(f"final save: {text}")
        elif self._ros_log_ok("info", f"autosaved {text}"):
            self.get_logger().info(f"autosaved {text}", throttle_duration_sec=60.0)
        return True

    def destroy_node(self):
        self.running = False
        self.update_event.set()
        if self.poses is not None:
            self.poses.close()  # wakes a worker waiting for a pose
        for cv in (self.queue_cv, self.teacher_cv, self._info_cv):
            with cv:
                cv.notify_all()
        for t in (self.worker, self.labeller, self.teacher_worker):
            if t is not None and t.is_alive() and t is not threading.current_thread():
                t.join(timeout=10.0 if t is self.teacher_worker else 2.0)  # a teacher forward may take seconds
        self.autosave(final=True)
        return super().destroy_node()


def main(args=None) -> int:
    """Run the node until SIGINT / SIGTERM; returns 0 after a clean stop, 1 for bad parameters.

    rclpy's signal handlers shut the context down at once (waking the executor); then the workers
    are stopped and joined, the executor and the node destroyed, in that order, so no thread
    publishes into the gone context (they check it, and stop quietly)."""
    import sys

    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    argv = list(sys.argv[1:] if args is None else args)
    own = argv[:argv.index("--ros-args")] if "--ros-args" in argv else argv
    if "-h" in own or "--help" in own:
        from sas_ros.params import parameters_help

        print(parameters_help())
        return 0
    rclpy.init(args=args)
    node = executor = None
    try:
        try:
            node = MappingNode()
        except (ValueError, FileNotFoundError) as exc:  # bad parameters / no CUDA / missing checkpoint
            rclpy.logging.get_logger("sas_mapping_node").fatal(str(exc))
            return 1
        executor = MultiThreadedExecutor(num_threads=4)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.running = False  # the workers stop first
        if executor is not None:
            try:
                executor.shutdown(timeout_sec=5.0)
            except Exception:  # pragma: no cover - an executor of a context already gone
                pass
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
