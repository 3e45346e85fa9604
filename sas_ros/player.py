"""Play a ROS 2 bag into a running graph over rclpy, with the bag's timing (``sas play``).

The node can then be tried on a recording without ``ros2 bag play`` (not available as a wheel).
Messages are published as the bag stores them: their CDR bytes go to ``Publisher.publish`` as
they are (rclpy publishes ``bytes`` raw), so nothing is decoded or re-encoded and every field,
stamp and frame id reaches the subscribers unchanged. Only the Python message class of each
topic's type is needed (for the publisher); topics whose type is not importable here are
skipped with a warning.

Timing: message ``i`` is sent at wall time ``t0 + (log_time_i - first_log_time) / rate``
(:func:`send_offset`); ``loop`` starts over after the last message. ``/tf_static`` is published
transient-local (late subscribers still get the static tree, as with ``ros2 bag play``); other
topics reliable keep-last(``qos_depth``), which best-effort subscribers (sensor QoS) also match.
With ``clock`` the bag time is published on ``/clock`` (``rosgraph_msgs/Clock``) before each
message, for nodes running with ``use_sim_time``.
"""

from __future__ import annotations

import importlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

STATIC_TF = "/tf_static"


def send_offset(log_time_ns: int, first_ns: int, rate: float) -> float:
    """Seconds after the start of playback at which the message logged at ``log_time_ns`` is sent."""
    return max(0.0, (log_time_ns - first_ns) * 1e-9 / rate)


def schedule(log_times_ns: Sequence[int], rate: float, first_ns: Optional[int] = None) -> List[float]:
    """:func:`send_offset` of each message (``first_ns``, the bag time sent at 0: default the first's)."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if not log_times_ns:
        return []
    t0 = log_times_ns[0] if first_ns is None else first_ns
    return [send_offset(t, t0, rate) for t in log_times_ns]


def message_class(msgtype: str):
    """The rclpy message class of ``pkg/msg/Name`` (ImportError / ValueError if there is none)."""
    parts = msgtype.split("/")
    if len(parts) == 2:  # ROS 1 style pkg/Name
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3 or not all(p.isidentifier() for p in parts):
        raise ValueError(f"not a ROS 2 message type: {msgtype!r}")
    module = importlib.import_module(f"{parts[0]}.{parts[1]}")
    try:
        return getattr(module, parts[2])
    except AttributeError as exc:
        raise ImportError(f"{parts[0]}.{parts[1]} has no {parts[2]}") from exc


@dataclass
class PlayStats:
    """What a playback sent, per topic, and what it skipped (topic -> why)."""

    published: Dict[str, int] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    loops: int = 0
    wall_s: float = 0.0
    bag_s: float = 0.0
    max_lag_s: float = 0.0  # the most a message was sent after its scheduled time

    @property
    def total(self) -> int:
        return sum(self.published.values())

    def as_dict(self) -> dict:
        return {"published": dict(self.published), "total": self.total, "skipped": dict(self.skipped),
                "loops": self.loops, "wall_s": round(self.wall_s, 3), "bag_s": round(self.bag_s, 3),
                "max_lag_s": round(self.max_lag_s, 4)}


def _remapped(topic: str, remaps: Dict[str, str]) -> str:
    return remaps.get(topic, topic)


class BagPlayer:
    """Publishes a bag's messages from ``node`` (an rclpy node spun elsewhere, or not at all:
    publishing needs no spinning).

    Args:
        node: the rclpy node that owns the publishers.
        bag: bag folder or its ``.db3`` / ``.mcap`` file.
        rate: playback speed factor (2 = twice as fast).
        loop: start over after the last message (until ``stop()``).
        topics: only these topics (default: all).
        remaps: bag topic -> published topic.
        start, duration: play the bag from ``start`` s after its first message, for ``duration`` s.
        clock: publish the bag time on ``/clock`` before each message.
        qos_depth: history depth of the publishers.
    """

    def __init__(self, node, bag, rate: float = 1.0, loop: bool = False, topics: Optional[Iterable[str]] = None,
                 remaps: Optional[Dict[str, str]] = None, start: float = 0.0, duration: Optional[float] = None,
                 clock: bool = False, qos_depth: int = 10):
        from sas_core.data.bag_streams import open_reader

        if not rate > 0:
            raise ValueError(f"--rate must be > 0, got {rate}")
        if start < 0 or (duration is not None and not duration > 0):
            raise ValueError("--start must be >= 0 and --duration > 0")
        if qos_depth < 1:
            raise ValueError("qos_depth must be >= 1")
        self.node, self.rate, self.loop = node, float(rate), bool(loop)
        self.remaps = dict(remaps or {})
        self._stop = threading.Event()
        self.stats = PlayStats()
        self.reader = open_reader(bag)
        try:
            wanted = None if topics is None else set(topics)
            present = {c.topic for c in self.reader.connections}
            if wanted is not None and wanted - present:
                raise ValueError(f"topics not in the bag: {sorted(wanted - present)} (it has {sorted(present)})")
            self.connections = []
            self.publishers = {}
            for conn in self.reader.connections:
                if wanted is not None and conn.topic not in wanted:
                    continue
                if conn.topic in self.publishers:
                    self.connections.append(conn)
                    continue
                try:
                    cls = message_class(conn.msgtype)
                except (ImportError, ValueError) as exc:
                    self.stats.skipped[conn.topic] = f"type {conn.msgtype} not importable here ({exc})"
                    continue
                self.publishers[conn.topic] = node.create_publisher(
                    cls, _remapped(conn.topic, self.remaps), self._qos(conn.topic, qos_depth))
                self.connections.append(conn)
            if not self.connections:
                raise ValueError(f"nothing to play in {bag}: " + (
                    "; ".join(f"{t}: {w}" for t, w in self.stats.skipped.items()) or "no messages"))
            first = self.reader.start_time
            self.begin_ns = first + int(round(start * 1e9))
            self.end_ns = None if duration is None else self.begin_ns + int(round(duration * 1e9))
            self.clock_pub = None
            if clock:
                from rosgraph_msgs.msg import Clock

                self._clock_cls = Clock
                self.clock_pub = node.create_publisher(Clock, "/clock", 10)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _qos(topic: str, depth: int):
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

        if topic == STATIC_TF:
            return QoSProfile(depth=max(depth, 100), history=HistoryPolicy.KEEP_LAST,
                              reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        return QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.VOLATILE)

    def topics(self) -> List[Tuple[str, str, str]]:
        """[(bag topic, published topic, type)] of the topics that will be played."""
        seen = {}
        for c in self.connections:
            seen.setdefault(c.topic, (c.topic, _remapped(c.topic, self.remaps), c.msgtype))
        return sorted(seen.values())

    def wait_for_subscribers(self, timeout: float, topics: Optional[Iterable[str]] = None,
                             settle: float = 0.5) -> bool:
        """Wait up to ``timeout`` s until each of ``topics`` (bag names) has a subscriber; True if so.

        Without ``topics``: until any topic has one, then up to ``settle`` s more for the others
        (discovery matches a node's subscriptions one by one; topics nobody reads stay unmatched)."""
        pubs = self.publishers if topics is None else {t: self.publishers[t] for t in topics}
        deadline = time.monotonic() + timeout

        def matched(need_all: bool) -> bool:
            counts = [p.get_subscription_count() > 0 for p in pubs.values()]
            return all(counts) if need_all else any(counts)

        while time.monotonic() < deadline and not self._stop.is_set() and not matched(topics is not None):
            self._stop.wait(0.02)
        if topics is None and matched(False):
            end = min(deadline, time.monotonic() + settle)
            while time.monotonic() < end and not matched(True) and not self._stop.is_set():
                self._stop.wait(0.02)
        return matched(topics is not None)

    def stop(self) -> None:
        self._stop.set()

    def _messages(self):
        for conn, t, raw in self.reader.messages(connections=self.connections, start=self.begin_ns,
                                                  stop=None if self.end_ns is None else self.end_ns + 1):
            yield conn.topic, t, bytes(raw)

    def play(self, progress: Optional[Callable[[int], None]] = None) -> PlayStats:
        """Publish until the end of the bag (or forever with ``loop``) or until :meth:`stop`."""
        stats = self.stats
        wall0 = time.monotonic()
        while not self._stop.is_set():
            start = time.monotonic()
            sent = 0
            last_t = self.begin_ns
            for topic, t, raw in self._messages():
                due = start + send_offset(t, self.begin_ns, self.rate)
                delay = due - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    break
                stats.max_lag_s = max(stats.max_lag_s, time.monotonic() - due)
                if self.clock_pub is not None:
                    msg = self._clock_cls()
                    msg.clock.sec, msg.clock.nanosec = divmod(int(t), 1_000_000_000)
                    self.clock_pub.publish(msg)
                self.publishers[topic].publish(raw)
                stats.published[topic] = stats.published.get(topic, 0) + 1
                sent += 1
                last_t = t
                if progress is not None:
                    progress(1)
            stats.bag_s += (last_t - self.begin_ns) * 1e-9
            if self._stop.is_set() or not self.loop or sent == 0:
                break
            stats.loops += 1
        stats.wall_s = time.monotonic() - wall0
        return stats

    def close(self) -> None:
        """Close the bag. The publishers stay with the node and go with it: destroying them here
        would race an executor that spins the node in another thread (rclpy's InvalidHandle)."""
        if getattr(self, "reader", None) is not None:
            self.reader.close()
            self.reader = None


def node_remappings(bag) -> Tuple[List[str], List[str]]:
    """(``--ros-args`` words, notes): the remappings (and parameters) that connect a mapping node to
    this bag's streams, chosen the way ``sas replay`` chooses them
    (:func:`sas_core.data.bag_streams.choose_topics`), and what the node cannot take live."""
    from sas_core.data.bag_streams import COMPRESSED, StreamOptions, choose_topics, index_bag

    index = index_bag(bag, rates=False)
    ch = choose_topics(index, StreamOptions())
    out, notes = [], []
    if ch.color:
        info = index.topics[ch.color]
        if info.msgtype == COMPRESSED and ch.color.endswith("/compressed"):
            out += ["-r", f"color/image_raw:={ch.color[: -len('/compressed')]}", "-p", "color_transport:=compressed"]
        else:
            out += ["-r", f"color/image_raw:={ch.color}"]
    if ch.depth:
        out += ["-r", f"depth/image_raw:={ch.depth}"]
        if index.topics[ch.depth].msgtype == COMPRESSED:
            notes.append(f"{ch.depth} is compressed depth, which the node does not subscribe to (raw "
                         "sensor_msgs/Image only): replay this bag offline with `sas replay`")
    if ch.register:
        notes.append("depth is not registered to colour in this bag; the live node expects registered "
                     "depth (the driver's aligned_depth_to_color): `sas replay` registers it offline")
    if ch.color_info:
        out += ["-r", f"color/camera_info:={ch.color_info}"]
    if ch.lidar:
        out += ["-r", f"points:={ch.lidar}", "-p", "use_lidar:=true"]
    poses = index.of_type("geometry_msgs/msg/PoseStamped")
    if poses and "/tf" not in index.topics:
        lidar_poses = [t for t in poses if "lidar" in t]
        camera_poses = [t for t in poses if t not in lidar_poses]
        if camera_poses and ch.color:
            out += ["-r", f"pose:={camera_poses[0]}"]
        if lidar_poses and ch.lidar:
            out += ["-p", "pose_source:=pose", "-p", f"lidar_pose_topic:={lidar_poses[0]}"]
    return out, notes


def play_bag_cli(bag, rate: float = 1.0, loop: bool = False, topics=None, remaps=None, start: float = 0.0,
                 duration=None, clock: bool = False, wait_subscribers: float = 5.0, qos_depth: int = 10,
                 log: Callable[[str], None] = print) -> PlayStats:
    """``sas play``: a node of its own (``sas_play``), the remapping hint, a progress bar, Ctrl-C
    stops cleanly (the summary is still printed)."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions
    from tqdm import tqdm

    hint, notes = node_remappings(bag)
    context = rclpy.Context()
    # Python's own SIGINT handling (KeyboardInterrupt) so that Ctrl-C stops playback, not the context
    rclpy.init(context=context, signal_handler_options=SignalHandlerOptions.NO)
    node = player = None
    try:
        node = rclpy.create_node("sas_play", context=context)
        player = BagPlayer(node, bag, rate=rate, loop=loop, topics=topics, remaps=remaps, start=start,
                           duration=duration, clock=clock, qos_depth=qos_depth)
        if hint:
            log("connect a mapping node to this bag with:\n  ./sas node --ros-args " + " ".join(hint))
        for note in notes:
            log(f"note: {note}")
        for topic, why in player.stats.skipped.items():
            log(f"skipped {topic}: {why}")
        if wait_subscribers > 0:
            if not player.wait_for_subscribers(wait_subscribers):
                log(f"nobody subscribes to this bag's topics after {wait_subscribers:g} s; playing anyway")
            else:
                lonely = [t for t, p in player.publishers.items() if p.get_subscription_count() == 0]
                if lonely:
                    log(f"no subscriber on {', '.join(lonely[:4])}{' ...' if len(lonely) > 4 else ''}")
        total = sum(c.msgcount for c in player.connections) if not loop else None
        with tqdm(total=total, unit="msg", desc=f"sas play x{rate:g}", disable=None) as bar:
            try:
                stats = player.play(progress=bar.update)
            except KeyboardInterrupt:
                player.stop()
                stats = player.stats
                log("stopped (Ctrl-C)")
        log(f"published {stats.total} messages on {len(stats.published)} topics in {stats.wall_s:.1f} s "
            f"({stats.bag_s:.1f} s of bag{f', {stats.loops} loops' if stats.loops else ''})")
        return stats
    finally:
        if player is not None:
            player.close()
        if node is not None:
            node.destroy_node()
        rclpy.shutdown(context=context)
