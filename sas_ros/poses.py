"""Sensor poses for the mapping node: TF when tf2_ros is importable, else a pose topic.

``PoseSource`` answers ``lookup(frame_id, stamp) -> (4, 4) sensor-to-map`` or raises
:class:`PoseUnavailable` with a reason (unknown frame, no pose near the stamp, ...). Modes
(``pose_source`` parameter):

* ``tf``: ``tf2_ros.Buffer`` + ``TransformListener`` (map <- sensor frame at the stamp).
* ``pose``: a ``geometry_msgs/PoseStamped`` topic whose ``header.frame_id`` is the map frame and
  whose pose is that of the sensor frame named ``sensor_frame`` (the bag's ``/camera/pose``).
* ``odometry``: a ``nav_msgs/Odometry`` topic (``header.frame_id`` = map/odom frame,
  ``child_frame_id`` = the sensor frame).
* ``auto``: ``tf`` when tf2_ros is importable, else ``pose``.

Topic poses are kept in a short time-ordered buffer; a lookup takes the pose nearest in time
within ``tolerance`` seconds (no extrapolation).
"""

from __future__ import annotations

import bisect
import threading
from collections import deque


import numpy as np

from sas_core.data.msg_codec import pose_msg_to_matrix, stamp_to_seconds


class PoseUnavailable(LookupError):
    """No pose for a frame at a stamp; the message says why, ``reason`` is a code: ``unknown_frame``
    (no pose / transform ever known for the frame) or ``no_pose`` (none near the stamp)."""

    def __init__(self, message: str, reason: str = "no_pose"):
        super().__init__(message)
        self.reason = reason


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
                raise PoseUnavailable(f"no pose within {tolerance:.3f} s of stamp {stamp:.3f} "
                                      f"(nearest {stamps[best]:.3f})")
            return self._poses[best]


class PoseSource:
    """Poses of sensor frames in ``map_frame`` for a node (see the module docstring)."""

    def __init__(self, node, mode: str = "auto", map_frame: str = "map", topic: str = "pose",
                 sensor_frame: str = "", tolerance: float = 0.05, qos=10):
        self.node = node
        self.map_frame = map_frame
        self.sensor_frame = sensor_frame
        self.tolerance = float(tolerance)
        self.buffers: dict[str, PoseBuffer] = {}
        self.rejected = 0
        if mode == "auto":
            try:
                import tf2_ros  # noqa: F401
                mode = "tf"
            except ImportError:
                mode = "pose"
        if mode not in ("tf", "pose", "odometry"):
            raise ValueError(f"pose_source must be auto, tf, pose or odometry, got {mode!r}")
        self.mode = mode
        self.subscription = None
        if mode == "tf":
            import tf2_ros

            self.tf_buffer = tf2_ros.Buffer()
            self.tf_listener = tf2_ros.TransformListener(self.tf_buffer, node)
        elif mode == "pose":
            from geometry_msgs.msg import PoseStamped

            self.subscription = node.create_subscription(PoseStamped, topic, self._on_pose, qos)
        else:
            from nav_msgs.msg import Odometry

            self.subscription = node.create_subscription(Odometry, topic, self._on_odometry, qos)

    def _warn(self, text: str) -> None:
        self.node.get_logger().warning(text, throttle_duration_sec=2.0)

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

    def clear(self) -> None:
        for b in self.buffers.values():
            b.clear()

    def lookup(self, frame_id: str, stamp: float) -> np.ndarray:
        """(4, 4) pose of ``frame_id`` in the map frame at ``stamp`` (s); raises PoseUnavailable."""
        if self.mode == "tf":
            from rclpy.duration import Duration
            from rclpy.time import Time

            try:
                sec = int(stamp)
                t = self.tf_buffer.lookup_transform(self.map_frame, frame_id,
                                                    Time(seconds=sec, nanoseconds=int(round((stamp - sec) * 1e9))),
                                                    timeout=Duration(seconds=0.0))
            except Exception as exc:  # tf2 raises several lookup exception types
                reason = "no_pose" if self.tf_buffer.can_transform(self.map_frame, frame_id, Time()) else "unknown_frame"
                raise PoseUnavailable(f"no transform {self.map_frame} <- {frame_id}: {exc}", reason) from exc
            return pose_msg_to_matrix(t.transform)
        buffer = self.buffers.get(frame_id)
        if buffer is None:
            known = ", ".join(sorted(self.buffers)) or "none yet"
            raise PoseUnavailable(f"unknown frame {frame_id!r}: poses are known for {known}", "unknown_frame")
        return buffer.lookup(stamp, self.tolerance)
