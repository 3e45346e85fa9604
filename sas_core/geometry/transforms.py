"""A transform tree with tf2's semantics, without ROS (for bags, tests and nodes without tf2_ros).

Semantics follow tf2's ``BufferCore`` (ros2/geometry2):

- every frame has at most one parent; a transform ``parent -> child`` stored at a stamp maps
  points of ``child`` into ``parent`` (``p_parent = T @ p_child``), as a
  ``geometry_msgs/TransformStamped`` with ``header.frame_id = parent`` and
  ``child_frame_id = child``;
- static transforms (``/tf_static``) hold at all times; dynamic ones (``/tf``) are kept for
  ``cache_time`` seconds behind the newest sample of their frame and interpolated between the two
  samples around the requested stamp (linear in translation, slerp in rotation); a stamp outside
  the samples is an *extrapolation* error that says by how much (tf2 never extrapolates);
- ``lookup(target, source, stamp)`` walks both frames up to their common ancestor; ``stamp=None``
  (tf2's ``TimePointZero``) means the latest time at which every dynamic link of the chain has
  data;
- frame names lose a leading ``/``; NaN values, non-unit quaternions (off by more than 0.01, as
  tf2 refuses) and self-parented frames are refused; a frame that changes parent starts a new
  history (tf2 keeps per-sample parents; robots re-parent only when a localiser restarts).

Times are float seconds (stamps 1.7e9 s keep ~0.2 us resolution; samples within ``EPS`` of a
requested stamp count as exact).
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from typing import Dict, List, Optional

import numpy as np

#: two stamps closer than this (seconds) are the same instant
EPS = 1e-6
#: tf2's MAX_GRAPH_DEPTH: deeper chains are treated as a loop
MAX_DEPTH = 1000


class TransformError(LookupError):
    """A lookup or insert that tf2 would refuse; ``reason`` is one of
    ``unknown_frame``, ``disconnected``, ``extrapolation``, ``loop``, ``invalid``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _name(frame: str) -> str:
    frame = str(frame).strip()
    return frame[1:] if frame.startswith("/") else frame


def _rotation_to_quat(R: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(R).as_quat()


def _matrix(translation: np.ndarray, quat: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    T = np.eye(4)
    T[:3, :3] = Rotation.from_quat(quat).as_matrix()
    T[:3, 3] = translation
    return T


def _slerp(q0: np.ndarray, q1: np.ndarray, f: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation, Slerp

    return Slerp([0.0, 1.0], Rotation.from_quat(np.stack([q0, q1])))(f).as_quat()


class _Link:
    """The history of one frame's transform to its parent."""

    __slots__ = ("parent", "static", "stamps", "translations", "quats")

    def __init__(self, parent: str, static: bool):
        self.parent, self.static = parent, static
        self.stamps: List[float] = []
        self.translations: List[np.ndarray] = []
        self.quats: List[np.ndarray] = []

    def insert(self, stamp: float, t: np.ndarray, q: np.ndarray, cache_time: float) -> None:
        if self.static:
            self.stamps, self.translations, self.quats = [stamp], [t], [q]
            return
        i = bisect_left(self.stamps, stamp - EPS)
        if i < len(self.stamps) and abs(self.stamps[i] - stamp) <= EPS:  # same instant: replace
            self.translations[i], self.quats[i] = t, q
        else:
            self.stamps.insert(i, stamp)
            self.translations.insert(i, t)
            self.quats.insert(i, q)
        if math.isfinite(cache_time):
            cut = bisect_left(self.stamps, self.stamps[-1] - cache_time - EPS)
            if cut:
                del self.stamps[:cut], self.translations[:cut], self.quats[:cut]

    def at(self, stamp: Optional[float], child: str) -> np.ndarray:
        """(4, 4) parent <- child at ``stamp`` (None: the newest sample)."""
        if self.static or stamp is None:
            return _matrix(self.translations[-1], self.quats[-1])
        first, last = self.stamps[0], self.stamps[-1]
        if stamp < first - EPS or stamp > last + EPS:
            ahead = stamp > last
            gap = stamp - last if ahead else first - stamp
            raise TransformError(
                "extrapolation",
                f"lookup of {self.parent} -> {child} at {stamp:.6f} would extrapolate {gap:.3f} s into the "
                f"{'future' if ahead else 'past'}: its data covers {first:.6f} .. {last:.6f} "
                f"({len(self.stamps)} samples)")
        i = bisect_left(self.stamps, stamp - EPS)
        if abs(self.stamps[i] - stamp) <= EPS:
            return _matrix(self.translations[i], self.quats[i])
        t0, t1 = self.stamps[i - 1], self.stamps[i]
        f = (stamp - t0) / (t1 - t0)
        translation = (1.0 - f) * self.translations[i - 1] + f * self.translations[i]
        return _matrix(translation, _slerp(self.quats[i - 1], self.quats[i], f))


class TransformBuffer:
    """tf2-like buffer: ``set_transform`` / ``add_tf_message`` in, ``lookup`` out.

    Args:
        cache_time: seconds of dynamic history kept per frame behind its newest sample (tf2's
            default is 10 s); ``math.inf`` keeps everything (offline replay of a whole bag).
    """

    def __init__(self, cache_time: float = 10.0):
        if not cache_time > 0:
            raise ValueError(f"cache_time must be > 0, got {cache_time}")
        self.cache_time = float(cache_time)
        self._links: Dict[str, _Link] = {}
        self._lock = threading.RLock()  # subscriber threads insert while others look up

    # ---------------------------------------------------------------- input
    def set_transform(self, parent: str, child: str, stamp: float, T: np.ndarray, static: bool = False) -> None:
        """Store ``parent <- child`` (4x4, ``p_parent = T @ p_child``) at ``stamp`` (seconds)."""
        T = np.asarray(T, dtype=np.float64)
        if T.shape != (4, 4):
            raise TransformError("invalid", f"transform {parent} -> {child} must be 4x4, got {T.shape}")
        if not np.isfinite(T).all():
            raise TransformError("invalid", f"transform {parent} -> {child} has non-finite values")
        R = T[:3, :3]
        if np.abs(R.T @ R - np.eye(3)).max() > 1e-3 or np.linalg.det(R) < 0:
            raise TransformError("invalid", f"transform {parent} -> {child} has no rotation part")
        self._insert(parent, child, stamp, T[:3, 3].copy(), _rotation_to_quat(R), static)

    def set_transform_quat(self, parent: str, child: str, stamp: float, translation, quat_xyzw,
                           static: bool = False) -> None:
        """Store ``parent <- child`` given as translation (x, y, z) and quaternion (x, y, z, w)."""
        t = np.asarray(translation, dtype=np.float64).reshape(3)
        q = np.asarray(quat_xyzw, dtype=np.float64).reshape(4)
        if not (np.isfinite(t).all() and np.isfinite(q).all()):
            raise TransformError("invalid", f"transform {parent} -> {child} has non-finite values")
        norm = float(np.linalg.norm(q))
        if abs(norm - 1.0) > 0.01:  # tf2 refuses quaternions that are not normalised
            raise TransformError("invalid", f"transform {parent} -> {child}: quaternion {q.tolist()} is not "
                                            f"normalised (norm {norm:.4f})")
        self._insert(parent, child, stamp, t, q / norm, static)

    def _insert(self, parent: str, child: str, stamp: float, t: np.ndarray, q: np.ndarray, static: bool) -> None:
        parent, child = _name(parent), _name(child)
        if not parent or not child:
            raise TransformError("invalid", f"transform needs two frame names, got {parent!r} -> {child!r}")
        if parent == child:
            raise TransformError("invalid", f"frame {child!r} cannot be its own parent")
        stamp = float(stamp)
        if not math.isfinite(stamp):
            raise TransformError("invalid", f"transform {parent} -> {child} has stamp {stamp}")
        with self._lock:
            link = self._links.get(child)
            if link is None or link.parent != parent or link.static != bool(static):
                link = self._links[child] = _Link(parent, bool(static))
            link.insert(stamp, t, q, self.cache_time)

    def add_tf_message(self, msg, static: bool = False) -> int:
        """Add every transform of a ``tf2_msgs/TFMessage`` (duck-typed: rosbags or rclpy objects,
        or anything with ``transforms[i].header.stamp/.frame_id``, ``.child_frame_id`` and
        ``.transform.translation`` / ``.rotation``). Returns the number added; a bad entry raises
        :class:`TransformError` after the good ones before it were added."""
        from sas_core.data.msg_codec import stamp_to_seconds

        n = 0
        for ts in msg.transforms:
            tr, rot = ts.transform.translation, ts.transform.rotation
            self.set_transform_quat(ts.header.frame_id, ts.child_frame_id, stamp_to_seconds(ts.header.stamp),
                                    (tr.x, tr.y, tr.z), (rot.x, rot.y, rot.z, rot.w), static=static)
            n += 1
        return n

    def clear(self) -> None:
        with self._lock:
            self._links.clear()

    # ---------------------------------------------------------------- queries
    def _known(self, frame: str) -> bool:
        return frame in self._links or any(link.parent == frame for link in self._links.values())

    def _chain(self, frame: str) -> List[str]:
        """``[frame, parent, grandparent, ..., root]``; a loop raises."""
        chain, seen = [frame], {frame}
        while chain[-1] in self._links:
            parent = self._links[chain[-1]].parent
            if parent in seen or len(chain) > MAX_DEPTH:
                raise TransformError("loop", "the transform tree has a loop: " + " -> ".join(chain + [parent]))
            chain.append(parent)
            seen.add(parent)
        return chain

    def _path(self, target: str, source: str):
        for frame in (target, source):
            if not self._known(frame):
                known = ", ".join(sorted(self.frame_names())) or "none"
                raise TransformError("unknown_frame", f"frame {frame!r} does not exist (known frames: {known})")
        up_source, up_target = self._chain(source), self._chain(target)
        on_target = set(up_target)
        for i, frame in enumerate(up_source):
            if frame in on_target:
                return up_source[:i], up_target[:up_target.index(frame)]
        raise TransformError("disconnected",
                             f"frames {target!r} and {source!r} are not connected: {target!r} hangs under root "
                             f"{up_target[-1]!r}, {source!r} under root {up_source[-1]!r}")

    def _latest_common(self, frames: List[str]) -> Optional[float]:
        lasts = [self._links[f].stamps[-1] for f in frames if not self._links[f].static]
        return min(lasts) if lasts else None

    def lookup(self, target: str, source: str, stamp: Optional[float] = None) -> np.ndarray:
        """(4, 4) ``T_target_source``: maps points in ``source`` into ``target`` at ``stamp``
        (seconds; None = the latest time every dynamic link of the chain has data).

        Raises:
            TransformError: unknown frame, disconnected trees, a loop, or a stamp outside a dynamic
                link's data (the message names the link and the gap in seconds).
        """
        target, source = _name(target), _name(source)
        if target == source:
            return np.eye(4)
        with self._lock:
            return self._lookup(target, source, stamp)

    def _lookup(self, target: str, source: str, stamp: Optional[float]) -> np.ndarray:
        from_source, from_target = self._path(target, source)
        if stamp is None:
            stamp = self._latest_common(from_source + from_target)
        T_root_source = np.eye(4)
        for frame in from_source:  # source, its parent, ... below the common ancestor
            T_root_source = self._links[frame].at(stamp, frame) @ T_root_source
        T_root_target = np.eye(4)
        for frame in from_target:
            T_root_target = self._links[frame].at(stamp, frame) @ T_root_target
        return np.linalg.inv(T_root_target) @ T_root_source

    def can_transform(self, target: str, source: str, stamp: Optional[float] = None) -> bool:
        try:
            self.lookup(target, source, stamp)
        except TransformError:
            return False
        return True

    def frame_names(self) -> set:
        return set(self._links) | {link.parent for link in self._links.values()}

    def frames(self) -> dict:
        """child -> {parent, static, count, first, last, rate_hz} (rate: None for static / one sample)."""
        out = {}
        with self._lock:
            links = sorted(self._links.items())
        for child, link in links:
            n = len(link.stamps)
            span = link.stamps[-1] - link.stamps[0] if n else 0.0
            out[child] = dict(parent=link.parent, static=link.static, count=n,
                              first=link.stamps[0] if n else None, last=link.stamps[-1] if n else None,
                              rate_hz=(n - 1) / span if (not link.static and n > 1 and span > 0) else None)
        return out

    def __len__(self) -> int:
        return len(self._links)
