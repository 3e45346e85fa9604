"""Sensor poses for the mapping node: TF (``/tf`` + ``/tf_static``), a pose topic or odometry.

``PoseSource`` answers ``lookup(frame_id, stamp, timeout) -> (4, 4) sensor-to-map`` or raises
:class:`PoseUnavailable` with a reason code. Modes (``pose_source`` parameter):

* ``tf``: the transform ``map_frame <- frame_id`` at the image's stamp, from one of two
  backends (``tf_backend``):

  - ``tf2_ros``: ``tf2_ros.Buffer`` + ``TransformListener`` (a full ROS install);
  - ``sas``: the node subscribes to ``/tf`` and ``/tf_static`` itself (``tf2_msgs/TFMessage``:
    the real package, or the one ``scripts/setup_env.sh`` builds where it is missing) and feeds
    :class:`sas_core.geometry.transforms.TransformBuffer` (tf2's semantics: static links at all
    times, dynamic ones interpolated within ``tf_cache_time``, never extrapolated). QoS as
    tf2_ros' ``TransformListener``: ``/tf`` reliable, volatile, keep-last 100; ``/tf_static``
    reliable, transient-local (latched), keep-last 100.
  - ``auto``: ``tf2_ros`` when importable, else ``sas``.
* ``pose``: a ``geometry_msgs/PoseStamped`` topic whose ``header.frame_id`` is the map frame and
  whose pose is that of the sensor frame named ``sensor_frame`` (the bag's ``/camera/pose``).
* ``odometry``: a ``nav_msgs/Odometry`` topic (``header.frame_id`` = map/odom frame,
  ``child_frame_id`` = the sensor frame).
* ``auto``: both TF (when a backend is importable) and the pose topic; once a pose message has
  come the pose topic answers, until then TF does.

Topic poses are kept in a short time-ordered buffer; a lookup takes the pose nearest in time
within ``tolerance`` seconds (no extrapolation). A frame may arrive before its pose (images are
often faster than TF): ``lookup(..., timeout=s)`` waits up to ``s`` seconds for it, woken by
every pose / TF message; what is still missing then raises with its reason (``unknown_frame``,
``no_pose``, ``extrapolation``, ``disconnected``, ``loop``). A stamp that falls in a gap of the
pose stream (poses before and after it, none near it) raises at once.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque

import numpy as np

from sas_core.data.msg_codec import pose_msg_to_matrix, stamp_to_seconds


class PoseUnavailable(LookupError):
    """No pose for a frame at a stamp; the message says why, ``reason`` is a code: ``unknown_frame``
    (no pose / transform ever known for the frame), ``no_pose`` (none near the stamp), or from TF
    ``extrapolation`` (the stamp lies outside the data), ``disconnected`` (the frame's tree does
    not reach the map frame), ``loop``. ``retry``: whether waiting for more data may help."""

    def __init__(self, message: str, reason: str = "no_pose", retry: bool = True):
        super().__init__(message)
        self.reason = reason
        self.retry = retry


class PoseBuffer:
    """Time-ordered buffer of (stamp, 4x4) for one sensor frame, nearest-stamp lookup with tolerance."""

    def __init__(self, maxlen: int = 2000):
        self._stamps: deque = deque(maxlen=maxlen)
        self._poses: deque = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def add(self, stamp: float, pose: np.ndarray) -> None:
        with self._lock:
            if self._stamps and stamp < self._stamps[-1]:  # out of order (bag loop restart): start over
                if stamp < self._stamps[0] or self._stamps[-1] - stamp > 1.0:
                    self._stamps.clear()
                    self._poses.clear()
                else:
                    return
            self._stamps.append(stamp)
            self._poses.append(pose)

    def clear(self) -> None:
        with self._lock:
            self._stamps.clear()
            self._poses.clear()

    def __len__(self) -> int:
        return len(self._stamps)

    def lookup(self, stamp: float, tolerance: float) -> np.ndarray:
        with self._lock:
            if not self._stamps:
                raise PoseUnavailable("no pose received yet")
            stamps = list(self._stamps)
            i = bisect.bisect_left(stamps, stamp)
            best = min((j for j in (i - 1, i) if 0 <= j < len(stamps)), key=lambda j: abs(stamps[j] - stamp))
            if abs(stamps[best] - stamp) > tolerance:
                # poses of one stream arrive in order (a reliable reader holds later ones back until
                # a lost one is resent), so with poses on both sides of the stamp none will come
                # for it: a gap in the stream, not worth waiting for. Before the first pose (a bag
                # loop restarting) or after the last one, it may still come.
                gap = stamps[0] <= stamp and stamps[-1] > stamp + tolerance
                raise PoseUnavailable(f"no pose within {tolerance:.3f} s of stamp {stamp:.3f} "
                                      f"(nearest {stamps[best]:.3f}{', a gap in the poses' if gap else ''})",
                                      retry=not gap)
            return self._poses[best]


TF_BACKENDS = ("auto", "tf2_ros", "sas")

#: QoS depth of tf2_ros' TransformListener for /tf and /tf_static (ros2/geometry2, tf2_ros)
TF_QOS_DEPTH = 100


def tf2_ros_available() -> bool:
    try:
        import tf2_ros  # noqa: F401
    except ImportError:
        return False
    return True


def tf2_msgs_available() -> bool:
    try:
        from tf2_msgs.msg import TFMessage  # noqa: F401
    except ImportError:
        return False
    return True


def tf_qos():
    """(dynamic, static) QoS profiles of tf2_ros' TransformListener."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    dynamic = QoSProfile(depth=TF_QOS_DEPTH, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
    static = QoSProfile(depth=TF_QOS_DEPTH, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.TRANSIENT_LOCAL)
    return dynamic, static


class PoseSource:
    """Poses of sensor frames in ``map_frame`` for a node (see the module docstring).

    Args:
        node: the rclpy node that owns the subscriptions.
        mode: ``auto`` | ``tf`` | ``pose`` | ``odometry``.
        tf_backend: ``auto`` | ``tf2_ros`` | ``sas`` (mode ``tf`` / ``auto``).
        tf_cache_time: seconds of dynamic TF kept (backend ``sas``; tf2's default is 10).
        drop: optional ``drop(reason, text)`` that counts and logs bad pose / TF messages.
    """

    def __init__(self, node, mode: str = "auto", map_frame: str = "map", topic: str = "pose",
                 sensor_frame: str = "", tolerance: float = 0.05, qos=10, tf_backend: str = "auto",
                 tf_cache_time: float = 10.0, drop=None):
        self.node = node
        self.map_frame = map_frame
        self.sensor_frame = sensor_frame
        self.tolerance = float(tolerance)
        self.buffers: dict[str, PoseBuffer] = {}
        self.rejected = 0
        self.n_tf = 0  # transforms received (backend sas)
        self._drop = drop
        self._cv = threading.Condition()  # notified on every pose / TF message (waiting lookups)
        self._closed = False
        if mode not in ("auto", "tf", "pose", "odometry"):
            raise ValueError(f"pose_source must be auto, tf, pose or odometry, got {mode!r}")
        if tf_backend not in TF_BACKENDS:
            raise ValueError(f"tf_backend must be one of {', '.join(TF_BACKENDS)}, got {tf_backend!r}")
        if tf_backend == "auto":
            tf_backend = "tf2_ros" if tf2_ros_available() else "sas"
        if tf_backend == "sas" and not tf2_msgs_available():
            if mode == "tf":
                raise ValueError("pose_source 'tf' needs tf2_msgs (or tf2_ros), which is not importable: "
                                 "run scripts/setup_env.sh (it builds tf2_msgs) and source scripts/env.sh")
            tf_backend = None
        if tf_backend == "tf2_ros" and not tf2_ros_available():
            raise ValueError("tf_backend 'tf2_ros' requested but tf2_ros is not importable; use tf_backend 'sas'")
        self.mode = mode
        self.tf_backend = tf_backend if mode in ("tf", "auto") else None
        self.tf_buffer = None
        self.subscription = None
        self.tf_subscriptions = []
        if self.tf_backend == "tf2_ros":
            import tf2_ros

            self.tf_buffer = tf2_ros.Buffer()
            self.tf_listener = tf2_ros.TransformListener(self.tf_buffer, node)
        elif self.tf_backend == "sas":
            from rclpy.callback_groups import ReentrantCallbackGroup
            from tf2_msgs.msg import TFMessage

            from sas_core.geometry.transforms import TransformBuffer

            self.tf_buffer = TransformBuffer(cache_time=tf_cache_time)
            dynamic, static = tf_qos()
            group = ReentrantCallbackGroup()  # as tf2_ros: TF never waits behind the node's other callbacks
            self.tf_subscriptions = [
                node.create_subscription(TFMessage, "/tf", lambda m: self._on_tf(m, False), dynamic,
                                         callback_group=group),
                node.create_subscription(TFMessage, "/tf_static", lambda m: self._on_tf(m, True), static,
                                         callback_group=group)]
        # poses in their own callback group: they must never wait behind an image callback that
        # waits for room in the node's queue (reliable_inputs), or the frames would wait for them
        from rclpy.callback_groups import MutuallyExclusiveCallbackGroup

        if mode in ("pose", "auto"):
            from geometry_msgs.msg import PoseStamped

            self.subscription = node.create_subscription(PoseStamped, topic, self._on_pose, qos,
                                                         callback_group=MutuallyExclusiveCallbackGroup())
        elif mode == "odometry":
            from nav_msgs.msg import Odometry

            self.subscription = node.create_subscription(Odometry, topic, self._on_odometry, qos,
                                                         callback_group=MutuallyExclusiveCallbackGroup())

    @property
    def source(self) -> str:
        """Where poses come from, in words (for the start-up log line)."""
        tf = {"tf2_ros": "TF (tf2_ros)", "sas": "TF (/tf + /tf_static, TransformBuffer)"}.get(self.tf_backend)
        if self.mode == "auto":
            return f"{tf} or the pose topic" if tf else "the pose topic (no TF backend importable)"
        return tf if self.mode == "tf" else f"the {self.mode} topic"

    def _warn(self, text: str, reason: str = "bad_pose") -> None:
        if self._drop is not None:
            self._drop(reason, text)
        else:
            self.node.get_logger().warning(text, throttle_duration_sec=2.0)

    def _notify(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _on_tf(self, msg, static: bool) -> None:
        from sas_core.geometry.transforms import TransformError

        try:
            n = self.tf_buffer.add_tf_message(msg, static=static)
        except TransformError as exc:  # the good transforms before the bad one were added
            n = 0
            self.rejected += 1
            self._warn(f"{'/tf_static' if static else '/tf'} transform ignored: {exc}", "bad_tf")
        with self._cv:  # the TF callbacks run concurrently (reentrant group)
            self.n_tf += n
            self._cv.notify_all()

    def _on_pose(self, msg) -> None:
        self.add(msg.header.frame_id, self.sensor_frame, stamp_to_seconds(msg.header.stamp), msg.pose)

    def _on_odometry(self, msg) -> None:
        self.add(msg.header.frame_id, msg.child_frame_id or self.sensor_frame,
                 stamp_to_seconds(msg.header.stamp), msg.pose.pose)

    def add(self, parent: str, child: str, stamp: float, pose_msg) -> None:
        """Store a pose of ``child`` in ``parent`` (must be the map frame)."""
        if parent != self.map_frame:
            self.rejected += 1
            self._warn(f"pose in frame {parent!r} ignored: expected the map frame {self.map_frame!r}")
            return
        try:
            T = pose_msg_to_matrix(pose_msg)
        except ValueError as exc:
            self.rejected += 1
            self._warn(f"invalid pose ignored: {exc}")
            return
        self.buffers.setdefault(child, PoseBuffer()).add(stamp, T)
        self._notify()

    def clear(self) -> None:
        for b in self.buffers.values():
            b.clear()
        if self.tf_backend == "sas":
            self.tf_buffer.clear()

    def close(self) -> None:
        """Wake and end every waiting lookup (node shutdown)."""
        self._closed = True
        self._notify()

    def lookup(self, frame_id: str, stamp: float, timeout: float = 0.0) -> np.ndarray:
        """(4, 4) pose of ``frame_id`` in the map frame at ``stamp`` (s); waits up to ``timeout``
        seconds for a pose / transform that has not arrived yet; raises PoseUnavailable."""
        deadline = time.monotonic() + max(0.0, float(timeout))
        while True:
            try:
                return self._lookup(frame_id, stamp)
            except PoseUnavailable as exc:
                left = deadline - time.monotonic()
                if not exc.retry or left <= 0 or self._closed:
                    raise
                with self._cv:  # woken by the next pose / TF message (tf2_ros: polled)
                    self._cv.wait(timeout=min(left, 0.02 if self.tf_backend == "tf2_ros" else left))

    def _lookup(self, frame_id: str, stamp: float) -> np.ndarray:
        if self.mode == "tf" or (self.mode == "auto" and self.tf_backend and not self.buffers):
            if self.tf_backend == "sas":
                return self._lookup_sas(frame_id, stamp)
            return self._lookup_tf2_ros(frame_id, stamp)
        buffer = self.buffers.get(frame_id)
        if buffer is None:
            known = ", ".join(sorted(self.buffers)) or "none yet"
            raise PoseUnavailable(f"unknown frame {frame_id!r}: poses are known for {known}", "unknown_frame")
        return buffer.lookup(stamp, self.tolerance)

    def _lookup_sas(self, frame_id: str, stamp: float) -> np.ndarray:
        from sas_core.geometry.transforms import TransformError

        try:
            return self.tf_buffer.lookup(self.map_frame, frame_id, stamp)
        except TransformError as exc:
            # future data may still come (frames before TF); a stamp older than the cache, a loop
            # or a bad entry will not get better by waiting
            past = exc.reason == "extrapolation" and "into the past" in str(exc)
            raise PoseUnavailable(f"no transform {self.map_frame} <- {frame_id}: {exc}", exc.reason,
                                  retry=exc.reason in ("unknown_frame", "disconnected", "extrapolation")
                                  and not past) from None

    def _lookup_tf2_ros(self, frame_id: str, stamp: float) -> np.ndarray:  # pragma: no cover - full ROS only
        from rclpy.duration import Duration
        from rclpy.time import Time

        try:
            sec = int(math.floor(stamp))
            t = self.tf_buffer.lookup_transform(self.map_frame, frame_id,
                                                Time(seconds=sec, nanoseconds=int(round((stamp - sec) * 1e9))),
                                                timeout=Duration(seconds=0.0))
        except Exception as exc:  # tf2 raises several lookup exception types
            reason = "no_pose" if self.tf_buffer.can_transform(self.map_frame, frame_id, Time()) else "unknown_frame"
            raise PoseUnavailable(f"no transform {self.map_frame} <- {frame_id}: {exc}", reason) from exc
        return pose_msg_to_matrix(t.transform)
