"""Robot bags of any topic layout: stream discovery, poses from TF, synchronised RGB-D frames.

A ROS 2 bag (sqlite3 or mcap, read with ``rosbags``; a bag folder or one of its files) is read
in three steps:

1. :func:`index_bag` lists its topics (type, count, rate, the first message's frame id and
   encoding) without decoding the big messages.
2. :func:`choose_streams` picks colour / depth / camera_info / LiDAR topics by message type and
   the ROS 2 camera drivers' names (``image_raw``, ``image_rect_raw``, ``image_color``,
   ``aligned_depth_to_color``, ``depth/image``, ``camera_info`` beside its image, ``points``;
   the ``/compressed`` and ``/compressedDepth`` transports), and the pose source: ``/tf`` +
   ``/tf_static`` (camera pose = ``lookup(map_frame, image.header.frame_id, stamp)``), else a
   PoseStamped / Odometry topic beside the sensor. Every choice can be overridden
   (:class:`StreamOptions`); two equally good candidates are an error that lists them. Each
   choice carries the reason it was made (``sas bag-info`` prints them).
3. :func:`iter_frames` streams the bag once: colour and depth are paired by header stamp (the
   nearest within ``sync_tolerance``), depth in another optical frame is registered into the
   colour camera (:func:`sas_core.geometry.registration.register_depth`), the camera info is the
   nearest valid one, and the pose comes from the chosen source. A frame without a pose (before
   the first transform, after the last, across a gap longer than ``max_pose_gap``, a frame not
   connected to the map frame, a TF loop) is skipped and counted by reason, never guessed; so
   is every bad message (a corrupt image, a bad CameraInfo, an undecodable cloud), with its
   topic and index (:class:`ReplayStats`). Nothing of this aborts the replay.

Timing follows tf2: static transforms hold at all times, dynamic ones are interpolated between
their samples (:class:`sas_core.geometry.transforms.TransformBuffer`, whose cache here spans the
whole bag), and a stamp outside the samples is an extrapolation.
"""

from __future__ import annotations

import bisect
import math
import heapq
import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np

from sas_core.config import opt
from sas_core.data import image_codec, msg_codec

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
INFO = "sensor_msgs/msg/CameraInfo"
CLOUD = "sensor_msgs/msg/PointCloud2"
TF = "tf2_msgs/msg/TFMessage"
POSE_TYPES = ("geometry_msgs/msg/PoseStamped", "geometry_msgs/msg/PoseWithCovarianceStamped",
              "nav_msgs/msg/Odometry")
TF_TOPICS = ("/tf", "/tf_static")
TRANSPORTS = ("compressed", "compressedDepth")
MAX_PROBLEMS = 50  # problems kept with their messages (all are counted)


@dataclass
class StreamOptions:
    """Which streams of a bag to replay and how to time them (``sas replay`` / ``sas bag-info``)."""

    color_topic: str = opt("", "colour image topic (Image or CompressedImage); '' = discovered")
    depth_topic: str = opt("", "depth image topic (Image, or CompressedImage .../compressedDepth); '' = discovered")
    info_topic: str = opt("", "CameraInfo of the colour camera; '' = the camera_info beside the colour image")
    depth_info_topic: str = opt("", "CameraInfo of a depth camera not registered to colour; '' = the "
                                    "camera_info beside the depth image")
    lidar_topic: str = opt("", "PointCloud2 topic of a LiDAR; '' = discovered")
    pose_topic: str = opt("", "PoseStamped (the sensor's pose) or Odometry topic; '' = /tf + /tf_static when "
                              "they hold the sensor's frame, else a pose topic beside the sensor")
    map_frame: str = opt("", "fixed frame of the map; '' = 'map' if in TF, else the root of the sensor's TF tree")
    sync_tolerance: float = opt(0.02, "colour and depth stamps closer than this (s) form one frame")
    max_pose_gap: float = opt(0.5, "no pose is interpolated across a gap between transforms longer than "
                                   "this (s)")
    use_lidar: bool = opt(True, "replay a LiDAR stream too when the bag has one", cli=False)


class StreamError(ValueError):
    """The bag's streams cannot be chosen (missing topic, ambiguity, no pose source)."""


# ----------------------------------------------------------------------------------------------
# Opening and indexing

def bag_root(path) -> Path:
    """The path rosbags should open: a bag folder, or a ``.db3`` / ``.mcap`` file (its folder when
    the folder has a ``metadata.yaml``, so split bags read whole)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"bag {path} does not exist")
    if path.is_dir():
        if not (path / "metadata.yaml").is_file():
            raise ValueError(f"{path} is not a ROS 2 bag folder (no metadata.yaml)")
        return path
    if path.suffix not in (".db3", ".mcap"):
        raise ValueError(f"{path} is not a bag: give a bag folder or its .db3 / .mcap file")
    return path.parent if (path.parent / "metadata.yaml").is_file() else path


def open_reader(path):
    """An open ``rosbags.rosbag2.Reader`` (close it)."""
    from rosbags.rosbag2 import Reader

    root = bag_root(path)
    try:
        reader = Reader(root)
        reader.open()
    except Exception as exc:
        raise ValueError(f"cannot open bag {path}: {exc}") from exc
    return reader


def typestore():
    from sas_core.data.rosbag_io import typestore as _ts

    return _ts()


@dataclass
class TopicInfo:
    """One topic of a bag. Times are log times (s)."""

    topic: str
    msgtype: str
    count: int
    first: Optional[float] = None
    last: Optional[float] = None
    frame_id: Optional[str] = None
    encoding: Optional[str] = None  # images: encoding / CompressedImage format
    size: Optional[tuple] = None  # raw images and camera infos: (height, width)
    is_depth: bool = False

    @property
    def rate_hz(self) -> float:
        if self.count > 1 and self.first is not None and self.last is not None and self.last > self.first:
            return (self.count - 1) / (self.last - self.first)
        return 0.0


@dataclass
class BagIndex:
    path: Path
    topics: Dict[str, TopicInfo]
    start: float
    end: float

    def of_type(self, *types: str) -> List[str]:
        return sorted(t for t, i in self.topics.items() if i.msgtype in types)


def _describe_first(info: TopicInfo, msg) -> None:
    header = getattr(msg, "header", None)
    if header is not None:
        info.frame_id = str(header.frame_id)
    if info.msgtype == IMAGE:
        info.encoding = str(msg.encoding)
        info.size = (int(msg.height), int(msg.width))
        info.is_depth = image_codec.is_depth_message(msg)
    elif info.msgtype == COMPRESSED:
        info.encoding = str(msg.format)
        info.is_depth = image_codec.is_depth_message(msg)
    elif info.msgtype == INFO:
        info.size = (int(msg.height), int(msg.width))


def index_bag(path, rates: bool = True) -> BagIndex:
    """Topics of a bag with types and counts, the first message's frame id / encoding / size, and
    (``rates``) first and last log times (reading every message's time, decoding none)."""
    store = typestore()
    reader = open_reader(path)
    try:
        topics: Dict[str, TopicInfo] = {}
        conns: Dict[str, list] = {}
        for c in reader.connections:
            info = topics.setdefault(c.topic, TopicInfo(c.topic, c.msgtype, 0))
            info.count += c.msgcount
            conns.setdefault(c.topic, []).append(c)
        for topic, info in topics.items():
            if info.msgtype in (IMAGE, COMPRESSED, INFO, CLOUD) + POSE_TYPES and info.count:
                for conn, t, raw in reader.messages(connections=conns[topic]):
                    try:
                        _describe_first(info, store.deserialize_cdr(raw, conn.msgtype))
                    except Exception:  # described as unknown; iter_frames counts the bad message
                        pass
                    break
        start = reader.start_time * 1e-9 if reader.message_count else 0.0
        end = reader.end_time * 1e-9 if reader.message_count else 0.0
        if rates:
            for conn, t, _ in reader.messages():
                info = topics[conn.topic]
                s = t * 1e-9
                info.first = s if info.first is None else min(info.first, s)
                info.last = s if info.last is None else max(info.last, s)
        return BagIndex(Path(path), topics, start, end)
    finally:
        reader.close()


# ----------------------------------------------------------------------------------------------
# TF

@dataclass
class TfTree:
    """What a bag's /tf and /tf_static hold: the buffer, each child's parent, and the stamps of
    the dynamic transforms (for the gap rule)."""

    buffer: object
    parents: Dict[str, str]
    static: set
    stamps: Dict[str, np.ndarray]
    counts: Dict[str, int]

    def frames(self) -> set:
        return set(self.parents) | set(self.parents.values())

    def root_of(self, frame: str) -> Optional[str]:
        """The root above ``frame`` (None on a loop)."""
        seen = {frame}
        while frame in self.parents:
            frame = self.parents[frame]
            if frame in seen:
                return None
            seen.add(frame)
        return frame

    def chain(self, frame: str) -> List[str]:
        out, seen = [frame], {frame}
        while frame in self.parents and self.parents[frame] not in seen:
            frame = self.parents[frame]
            out.append(frame)
            seen.add(frame)
        return out


def load_tf(reader, store, skip_children=(), stats: Optional["ReplayStats"] = None) -> TfTree:
    """Read ``/tf`` and ``/tf_static`` into a TransformBuffer whose cache spans the bag (a bad
    transform is counted in ``stats`` as ``bad_tf`` and skipped; ``skip_children``: frames whose
    edges come from an Odometry topic instead)."""
    from sas_core.geometry.transforms import TransformBuffer

    buf = TransformBuffer(cache_time=math.inf)  # offline: the whole bag's history
    stamps: Dict[str, list] = {}
    conns = [c for c in reader.connections if c.topic in TF_TOPICS and c.msgtype == TF]
    index = Counter()
    if conns:
        for conn, _, raw in reader.messages(connections=conns):
            i = index[conn.topic]
            index[conn.topic] += 1
            is_static = conn.topic == "/tf_static"
            try:
                msg = store.deserialize_cdr(raw, conn.msgtype)
            except Exception as exc:
                if stats is not None:
                    stats.problem(conn.topic, i, "bad_tf", f"cannot decode a TFMessage: {exc}", frame=False)
                continue
            for t in msg.transforms:
                child = frame_name(t.child_frame_id)
                if child in skip_children:
                    continue
                try:  # one bad transform costs only itself
                    buf.add_tf_message(_OneTransform(t), static=is_static)
                except Exception as exc:
                    if stats is not None:
                        stats.problem(conn.topic, i, "bad_tf", str(exc), frame=False)
                    continue
                if not is_static:
                    stamps.setdefault(child, []).append(msg_codec.stamp_to_seconds(t.header.stamp))
    links = buf.frames()
    return TfTree(buf, {c: d["parent"] for c, d in links.items()}, {c for c, d in links.items() if d["static"]},
                  {k: np.sort(np.asarray(v)) for k, v in stamps.items()}, {k: len(v) for k, v in stamps.items()})


class _OneTransform:
    """A TFMessage of one TransformStamped."""

    def __init__(self, t):
        self.transforms = [t]


def frame_name(frame) -> str:
    """A frame id as tf2 stores it (no leading '/')."""
    frame = str(frame).strip()
    return frame[1:] if frame.startswith("/") else frame


class PoseUnavailable(LookupError):
    """No pose for a stamp; ``reason``: extrapolation, gap, disconnected, unknown_frame, loop, invalid."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class PoseTrack:
    """Where a sensor's pose comes from: ``lookup(target, child or the message's frame, stamp)`` in
    ``tree.buffer``, refused across gaps longer than ``max_gap`` between dynamic samples."""

    tree: TfTree
    target: str
    kind: str  # "tf", "pose" (PoseStamped of the sensor) or "odometry"
    topic: str = "/tf"
    child: Optional[str] = None  # fixed source frame (PoseStamped tracks), else the message's frame
    max_gap: float = 0.5

    def pose(self, frame_id: str, stamp: float) -> np.ndarray:
        from sas_core.geometry.transforms import TransformError

        source = self.child or frame_name(frame_id)
        try:
            T = self.tree.buffer.lookup(self.target, source, stamp)
        except TransformError as exc:
            raise PoseUnavailable(getattr(exc, "reason", "invalid"), str(exc)) from None
        self._check_gaps(source, stamp)
        T = np.asarray(T, np.float64)
        if T.shape != (4, 4) or not np.isfinite(T).all():
            raise PoseUnavailable("invalid", f"transform {self.target} <- {source} is not a finite 4x4 matrix")
        return T

    def _check_gaps(self, source: str, stamp: float) -> None:
        a, b = self.tree.chain(source), self.tree.chain(self.target)
        common = next((f for f in a if f in b), None)
        used = a[: a.index(common)] + b[: b.index(common)] if common is not None else a + b
        for frame in used:
            s = self.tree.stamps.get(frame)
            if s is None or not len(s) or frame in self.tree.static:
                continue
            i = bisect.bisect_left(s.tolist(), stamp)
            if i < len(s) and abs(s[i] - stamp) < 1e-9:
                continue
            if 0 < i < len(s) and s[i] - s[i - 1] > self.max_gap:
                raise PoseUnavailable("gap", f"transform {self.tree.parents.get(frame)} -> {frame} has a gap of "
                                             f"{s[i] - s[i - 1]:.3f} s around {stamp:.3f} (max_pose_gap "
                                             f"{self.max_gap} s)")

    def describe(self) -> str:
        if self.kind == "tf":
            return f"/tf + /tf_static, map frame {self.target!r}"
        return f"{self.kind} topic {self.topic} (frame {self.target!r})"


def _pose_track_from_topic(reader, store, topic: str, msgtype: str, max_gap: float, tf: Optional[TfTree],
                           stats: "ReplayStats") -> PoseTrack:
    """A PoseStamped (pose of the sensor) or, with TF present, an Odometry edge."""
    from sas_core.geometry.transforms import TransformBuffer

    conns = [c for c in reader.connections if c.topic == topic]
    msgs = []
    check = TransformBuffer(cache_time=1.0)  # refuses what tf2 refuses, before anything is stored
    for i, (conn, _, raw) in enumerate(reader.messages(connections=conns)):
        try:
            msg = store.deserialize_cdr(raw, conn.msgtype)
            m = (msg_codec.stamp_to_seconds(msg.header.stamp), str(msg.header.frame_id),
                 str(getattr(msg, "child_frame_id", "") or "") or "__sensor__", msg_codec.pose_msg_to_matrix(msg))
            check.set_transform(m[1], m[2], m[0], m[3])
            msgs.append(m)
        except Exception as exc:  # any undecodable or refused message is counted, never fatal
            stats.problem(topic, i, "bad_pose_msg", str(exc), frame=False)
    if not msgs:
        raise StreamError(f"pose topic {topic} has no usable message")
    parent = msgs[0][1]
    odom_edge = msgtype == "nav_msgs/msg/Odometry" and tf is not None and msgs[0][2] != "__sensor__"
    if odom_edge:  # the odometry replaces TF's edge for its child frame; statics still chain to the sensor
        child = frame_name(msgs[0][2])
        for s, p, c, T in msgs:
            tf.buffer.set_transform(p, c, s, T)
        tf.parents[child] = frame_name(parent)
        tf.stamps[child] = np.sort([m[0] for m in msgs])
        tf.static.discard(child)
        return PoseTrack(tf, frame_name(parent), "odometry", topic, None, max_gap)
    buf = TransformBuffer(cache_time=math.inf)
    sensor = "__sensor__"
    for s, p, _, T in msgs:
        buf.set_transform(p, sensor, s, T)
    tree = TfTree(buf, {sensor: frame_name(parent)}, set(), {sensor: np.sort([m[0] for m in msgs])},
                  {sensor: len(msgs)})
    return PoseTrack(tree, frame_name(parent), "pose" if msgtype != "nav_msgs/msg/Odometry" else "odometry", topic,
                     sensor, max_gap)


# ----------------------------------------------------------------------------------------------
# Discovery

def base_topic(topic: str) -> str:
    """The image topic without its transport suffix (``.../image_raw/compressed`` -> ``.../image_raw``)."""
    head, _, last = topic.rpartition("/")
    return head if last in TRANSPORTS and head else topic


def camera_namespace(topic: str) -> str:
    """The camera's namespace (``/camera/camera/color`` of ``/camera/camera/color/image_raw``)."""
    return base_topic(topic).rpartition("/")[0]


def _segments(topic: str) -> List[str]:
    return [s for s in topic.lower().split("/") if s]


_IMAGE_NAMES = ("image_rect_color", "image_color", "image_rect", "image_rect_raw", "image_raw", "image")


def _name_rank(topic: str) -> int:
    last = base_topic(topic).rpartition("/")[2]
    return _IMAGE_NAMES.index(last) if last in _IMAGE_NAMES else len(_IMAGE_NAMES)


def _transport_rank(topic: str, depth: bool) -> int:
    last = topic.rpartition("/")[2]
    if last == "compressedDepth":
        return 1 if depth else 9
    if last == "compressed":
        return 2 if not depth else 3
    return 0


def _color_score(topic: str, info: TopicInfo) -> int:
    segs = _segments(base_topic(topic))
    if any(s.startswith(("infra", "ir", "fisheye", "confidence", "disparity", "depth")) or
           s in ("label", "labels", "semantic", "mask", "instance") for s in segs):
        return 0
    enc = info.encoding or ""
    if info.msgtype == COMPRESSED:
        try:
            enc = image_codec.parse_compressed_format(enc).encoding
        except image_codec.ImageDecodeError:
            return 0
    score = 1
    if any(k in " ".join(segs) for k in ("color", "colour", "rgb")):
        score += 2
    if enc.startswith("mono") or enc == "8UC1":
        score -= 1
    return max(score, 0) + 1


def _depth_score(topic: str) -> int:
    segs = " ".join(_segments(topic))
    return 3 if ("aligned_depth_to_color" in segs or "registered" in segs) else 2


def _pick(kind: str, candidates: Dict[str, int], depth: bool, flag: str) -> tuple:
    """Best-scored candidate: one camera namespace, then its best image name and transport.
    Returns (topic or None, reason). Ambiguity raises StreamError listing the candidates."""
    if not candidates:
        return None, f"no {kind} topic"
    best = max(candidates.values())
    top = [t for t, s in candidates.items() if s == best]
    spaces = sorted({camera_namespace(t) for t in top})
    if len(spaces) > 1:
        listed = ", ".join(sorted(top))
        raise StreamError(f"{len(spaces)} {kind} streams fit equally well: {listed}; choose one with {flag}")
    in_space = sorted(top, key=lambda t: (_name_rank(t), _transport_rank(t, depth), t))
    chosen = in_space[0]
    others = [t for t in candidates if t != chosen]
    why = "the only " + kind + " topic" if not others else \
        f"best of {len(candidates)} {kind} candidates by name and transport (others: {', '.join(sorted(others))})"
    return chosen, why


@dataclass
class StreamChoice:
    """The streams replay uses, each with why (``reasons``)."""

    color: Optional[str] = None
    depth: Optional[str] = None
    color_info: Optional[str] = None
    depth_info: Optional[str] = None
    lidar: Optional[str] = None
    register: bool = False
    camera_pose: Optional[PoseTrack] = None
    lidar_pose: Optional[PoseTrack] = None
    reasons: Dict[str, str] = field(default_factory=dict)

    @property
    def rgbd(self) -> bool:
        return bool(self.color and self.depth)

    def as_dict(self) -> dict:
        return {"color": self.color, "depth": self.depth, "color_info": self.color_info,
                "depth_info": self.depth_info, "lidar": self.lidar, "register_depth": self.register,
                "camera_pose": self.camera_pose.describe() if self.camera_pose else None,
                "lidar_pose": self.lidar_pose.describe() if self.lidar_pose else None,
                "reasons": dict(self.reasons)}


def _require(index: BagIndex, topic: str, types, flag: str) -> None:
    if topic not in index.topics:
        raise StreamError(f"bag has no topic {topic} ({flag}); topics: {', '.join(sorted(index.topics))}")
    if index.topics[topic].msgtype not in types:
        raise StreamError(f"{flag} {topic} is a {index.topics[topic].msgtype}, expected {' or '.join(types)}")


def _info_beside(index: BagIndex, image: str) -> Optional[str]:
    t = camera_namespace(image) + "/camera_info"
    return t if t in index.topics and index.topics[t].msgtype == INFO else None


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(_segments(a), _segments(b)):
        if x != y:
            break
        n += 1
    return n


def check_options(index: BagIndex, options: StreamOptions) -> None:
    """Every topic named in ``options`` exists with a fitting type (before anything is read)."""
    for flag, topic, types in (("--color-topic", options.color_topic, (IMAGE, COMPRESSED)),
                               ("--depth-topic", options.depth_topic, (IMAGE, COMPRESSED)),
                               ("--info-topic", options.info_topic, (INFO,)),
                               ("--depth-info-topic", options.depth_info_topic, (INFO,)),
                               ("--lidar-topic", options.lidar_topic, (CLOUD,)),
                               ("--pose-topic", options.pose_topic, POSE_TYPES)):
        if topic:
            _require(index, topic, types, flag)
    if options.sync_tolerance < 0 or options.max_pose_gap <= 0:
        raise StreamError("--sync-tolerance must be >= 0 and --max-pose-gap > 0")


def choose_topics(index: BagIndex, options: StreamOptions) -> StreamChoice:
    """Choose the image / info / LiDAR topics (no poses yet). Raises StreamError."""
    check_options(index, options)
    ch = StreamChoice()
    images = {t: i for t, i in index.topics.items() if i.msgtype in (IMAGE, COMPRESSED) and i.count}
    if options.color_topic:
        ch.color, ch.reasons["color"] = options.color_topic, "--color-topic"
    else:
        cands = {t: _color_score(t, i) for t, i in images.items() if not i.is_depth}
        cands = {t: s for t, s in cands.items() if s > 0}
        ch.color, ch.reasons["color"] = _pick("colour", cands, False, "--color-topic")
    if options.depth_topic:
        ch.depth, ch.reasons["depth"] = options.depth_topic, "--depth-topic"
    else:
        cands = {t: _depth_score(t) for t, i in images.items() if i.is_depth}
        ch.depth, ch.reasons["depth"] = _pick("depth", cands, True, "--depth-topic")
    if ch.color and ch.depth:
        if options.info_topic:
            ch.color_info, ch.reasons["color_info"] = options.info_topic, "--info-topic"
        else:
            ch.color_info = _info_beside(index, ch.color)
            if ch.color_info:
                ch.reasons["color_info"] = "camera_info beside the colour image"
            else:
                infos = [t for t in index.of_type(INFO) if t != _info_beside(index, ch.depth)]
                if len(infos) != 1:
                    raise StreamError(f"no camera_info beside {ch.color}; CameraInfo topics: "
                                      f"{', '.join(index.of_type(INFO)) or 'none'}; choose one with --info-topic")
                ch.color_info, ch.reasons["color_info"] = infos[0], "the only CameraInfo topic"
        if options.depth_info_topic:
            ch.depth_info, ch.reasons["depth_info"] = options.depth_info_topic, "--depth-info-topic"
        else:
            ch.depth_info = _info_beside(index, ch.depth)
            if ch.depth_info == ch.color_info:
                ch.depth_info = None
            if ch.depth_info:
                ch.reasons["depth_info"] = "camera_info beside the depth image"
        cf, df = index.topics[ch.color].frame_id, index.topics[ch.depth].frame_id
        if cf is not None and df is not None and cf != df:
            if not ch.depth_info:
                raise StreamError(f"depth ({ch.depth}) is in frame {df!r}, colour ({ch.color}) in {cf!r}: "
                                  "registering depth into the colour camera needs the depth CameraInfo "
                                  "(--depth-info-topic)")
            ch.register = True
            ch.reasons["register_depth"] = f"depth frame {df!r} differs from colour frame {cf!r}: registered " \
                                           f"with TF and both CameraInfos"
        elif ch.depth_info and index.topics[ch.depth_info].size and index.topics[ch.color_info].size and \
                index.topics[ch.depth_info].size != index.topics[ch.color_info].size:
            ch.register = True
            ch.reasons["register_depth"] = "depth and colour cameras differ in size: registered with both " \
                                           "CameraInfos"
        else:
            ch.reasons["register_depth"] = "depth is registered to colour (same frame)"
    elif ch.color and not ch.depth:
        ch.reasons["rgbd"] = "colour without depth: no RGB-D frames"
    if not options.use_lidar:
        ch.reasons["lidar"] = "LiDAR disabled"
    elif options.lidar_topic:
        ch.lidar, ch.reasons["lidar"] = options.lidar_topic, "--lidar-topic"
    else:
        clouds = {t: (2 if _segments(t)[-1].endswith(("points", "points_raw", "cloud")) else 1)
                  for t in index.of_type(CLOUD) if index.topics[t].count and _segments(t)}
        clouds = {t: s for t, s in clouds.items()
                  if not any(k in _segments(t) for k in ("depth", "color", "rgb", "map", "sas"))}
        ch.lidar, ch.reasons["lidar"] = _pick("LiDAR", clouds, False, "--lidar-topic (or --no-lidar)")
    if not ch.rgbd and not ch.lidar:
        raise StreamError("bag has neither an RGB-D pair (colour + depth images) nor a LiDAR cloud; topics: "
                          + ", ".join(f"{t} ({i.msgtype})" for t, i in sorted(index.topics.items())))
    return ch


def _tf_target(tf: TfTree, frame: str, options: StreamOptions) -> tuple:
    """(map frame, why) for a sensor frame in the TF tree."""
    if options.map_frame:
        if options.map_frame not in tf.frames():
            raise StreamError(f"--map-frame {options.map_frame!r} is not in the bag's TF tree; frames: "
                              f"{', '.join(sorted(tf.frames()))}")
        return options.map_frame, f"--map-frame {options.map_frame!r}"
    if "map" in tf.frames():
        return "map", "frame 'map' is in TF"
    root = tf.root_of(frame)
    if root is None:
        return "map", "TF has a loop above the sensor frame (frames will be skipped)"
    return root, f"no frame 'map' in TF: the root of {frame!r}'s tree"


def _sensor_track(reader, store, index: BagIndex, tf: TfTree, sensor_topic: str, options: StreamOptions,
                  explicit: bool, stats: "ReplayStats") -> tuple:
    """(PoseTrack or None, reason) for the sensor publishing ``sensor_topic``."""
    frame = frame_name(index.topics[sensor_topic].frame_id or "")
    if explicit:
        msgtype = index.topics[options.pose_topic].msgtype
        track = _pose_track_from_topic(reader, store, options.pose_topic, msgtype, options.max_pose_gap,
                                       tf if tf.parents else None, stats)
        if track.tree is tf:  # Odometry edges in the TF tree: the map frame as for TF
            track.target, why = _tf_target(tf, frame, options)
            return track, f"--pose-topic: Odometry {options.pose_topic} edges in the TF tree; {why}"
        return track, "--pose-topic"
    if frame and frame in tf.frames():
        root = tf.root_of(frame)
        odom_why = ""
        if root is not None and root != "map" and tf.root_of(options.map_frame or "map") != root:
            # the sensor's tree stops at e.g. base_link: an Odometry topic may carry the missing edge
            odoms = [t for t in index.of_type("nav_msgs/msg/Odometry") if index.topics[t].count
                     and root in _odom_children(reader, store, t)]
            if len(odoms) == 1:
                _pose_track_from_topic(reader, store, odoms[0], "nav_msgs/msg/Odometry", options.max_pose_gap, tf,
                                       stats)
                odom_why = f"; the edge above {root!r} from Odometry {odoms[0]}"
        target, why = _tf_target(tf, frame, options)
        root = tf.root_of(frame)
        if root is None:
            why += "; warning: the sensor's TF chain has a loop (its frames will be skipped)"
        elif root != tf.root_of(target):
            why += f"; warning: {frame!r} hangs under {root!r}, not connected to {target!r} (its frames will be " \
                   "skipped)"
        return PoseTrack(tf, target, "tf", "/tf", None, options.max_pose_gap), \
            f"sensor frame {frame!r} is in /tf + /tf_static; {why}{odom_why}"
    poses = [t for t in index.of_type(*POSE_TYPES) if index.topics[t].count]
    if poses:
        scored = sorted(poses, key=lambda t: -_common_prefix(t, sensor_topic))
        best = _common_prefix(scored[0], sensor_topic)
        tied = [t for t in scored if _common_prefix(t, sensor_topic) == best]
        if best > 0 and len(tied) == 1:
            t = tied[0]
            track = _pose_track_from_topic(reader, store, t, index.topics[t].msgtype, options.max_pose_gap,
                                           None, stats)
            return track, f"pose topic {t} beside the sensor (frame {frame!r} is not in TF)"
        if len(poses) == 1 and best == 0:
            t = poses[0]
            track = _pose_track_from_topic(reader, store, t, index.topics[t].msgtype, options.max_pose_gap,
                                           None, stats)
            return track, f"the only pose topic {t} (frame {frame!r} is not in TF)"
        return None, f"frame {frame!r} is not in TF and the pose topics {', '.join(poses)} fit equally: " \
                     "choose one with --pose-topic"
    where = "the bag has no /tf" if not tf.parents else f"frame {frame!r} is not in /tf + /tf_static"
    return None, f"no pose source: {where} and no PoseStamped / Odometry topic"


def choose_streams(reader, store, index: BagIndex, options: StreamOptions, stats: "ReplayStats",
                   tf: Optional[TfTree] = None) -> tuple:
    """(StreamChoice with pose tracks, TfTree). Raises StreamError when the primary sensor has no
    pose source (the secondary one, a LiDAR beside a camera, is then dropped with its reason)."""
    ch = choose_topics(index, options)
    if tf is None:
        skip = ()
        if options.pose_topic and index.topics[options.pose_topic].msgtype == "nav_msgs/msg/Odometry":
            skip = tuple(_odom_children(reader, store, options.pose_topic))
        tf = load_tf(reader, store, skip, stats)
    primary = ch.color if ch.rgbd else ch.lidar
    track, why = _sensor_track(reader, store, index, tf, primary, options, bool(options.pose_topic), stats)
    key = "camera_pose" if ch.rgbd else "lidar_pose"
    if track is None:
        raise StreamError(f"{primary}: {why}")
    setattr(ch, key, track)
    ch.reasons[key] = why
    if ch.rgbd and ch.lidar:
        ltrack, lwhy = _sensor_track(reader, store, index, tf, ch.lidar, options, False, stats)
        if ltrack is None:
            ch.reasons["lidar"] = f"not replayed: {lwhy}"
            ch.lidar = None
        else:
            ch.lidar_pose, ch.reasons["lidar_pose"] = ltrack, lwhy
    return ch, tf


def _odom_children(reader, store, topic: str) -> set:
    out = set()
    conns = [c for c in reader.connections if c.topic == topic]
    for conn, _, raw in reader.messages(connections=conns):
        try:
            out.add(str(store.deserialize_cdr(raw, conn.msgtype).child_frame_id))
        except Exception:
            pass
        break
    return out


# ----------------------------------------------------------------------------------------------
# Statistics

@dataclass
class ReplayStats:
    """Counts of what a replay used and skipped. ``skipped`` counts colour frames (and sweeps) by
    reason; ``problems`` keeps the first :data:`MAX_PROBLEMS` with topic, index and message."""

    frames_seen: int = 0
    frames_used: int = 0
    sweeps_seen: int = 0
    sweeps_used: int = 0
    skipped: Counter = field(default_factory=Counter)
    other: Counter = field(default_factory=Counter)  # messages that are not frames (bad TF, unpaired depth)
    problems: list = field(default_factory=list)
    origin: dict = field(default_factory=dict, repr=False)  # id(yielded item) -> (topic, index), see where()

    def where(self, item) -> tuple:
        """(topic, message index) of an item :func:`iter_frames` yielded (forgotten once asked)."""
        return self.origin.pop(id(item), ("?", -1))

    def problem(self, topic: str, index: int, reason: str, message: str, frame: bool = True) -> None:
        (self.skipped if frame else self.other)[reason] += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append({"topic": topic, "index": int(index), "reason": reason, "message": str(message)})

    def as_dict(self) -> dict:
        return {"frames_seen": self.frames_seen, "frames_used": self.frames_used, "sweeps_seen": self.sweeps_seen,
                "sweeps_used": self.sweeps_used, "skipped": dict(sorted(self.skipped.items())),
                "other": dict(sorted(self.other.items())), "problems": list(self.problems)}

    def why_nothing(self) -> str:
        if not self.skipped:
            return "no frame or sweep in the bag"
        top = ", ".join(f"{r} ({n})" for r, n in self.skipped.most_common())
        first = next((p for p in self.problems if p["reason"] in self.skipped), None)
        return top + (f"; first: {first['topic']} #{first['index']}: {first['message']}" if first else "")


# ----------------------------------------------------------------------------------------------
# Reading frames

@dataclass
class _Info:
    stamp: float
    intrinsics: object
    frame_id: str


def _load_infos(reader, store, topic: Optional[str], stats: ReplayStats) -> List[_Info]:
    if not topic:
        return []
    out = []
    conns = [c for c in reader.connections if c.topic == topic]
    for i, (conn, _, raw) in enumerate(reader.messages(connections=conns)):
        try:
            msg = store.deserialize_cdr(raw, conn.msgtype)
            out.append(_Info(msg_codec.stamp_to_seconds(msg.header.stamp), msg_codec.camera_info_to_intrinsics(msg),
                             str(msg.header.frame_id)))
        except Exception as exc:
            stats.problem(topic, i, "bad_camera_info", str(exc), frame=False)
    out.sort(key=lambda x: x.stamp)
    return out


def _nearest_info(infos: List[_Info], stamps: List[float], t: float) -> Optional[_Info]:
    if not infos:
        return None
    i = bisect.bisect_left(stamps, t)
    best = min((j for j in (i - 1, i) if 0 <= j < len(infos)), key=lambda j: abs(stamps[j] - t))
    return infos[best]


class _Pairer:
    """Nearest-stamp pairing of two streams in (roughly) time order, bounded memory: a colour
    message is decided once depth has passed its stamp + tolerance, or the bag's clock (the newest
    stamp of any stream) has passed it by ``slack`` more seconds (a depth stream that stopped), or
    the bag has ended."""

    def __init__(self, tol: float, slack: float = 1.0):
        self.tol, self.slack = tol, slack
        self.colors: list = []  # (stamp, index, msg)
        self.depths: list = []
        self.latest_depth = -np.inf
        self.latest = -np.inf
        self.unpaired_depth = 0

    def add(self, kind: str, stamp: float, index: int, msg) -> None:
        self.latest = max(self.latest, stamp)
        if kind == "color":
            bisect.insort(self.colors, (stamp, index, msg), key=lambda e: (e[0], e[1]))
        else:
            bisect.insort(self.depths, (stamp, index, msg), key=lambda e: (e[0], e[1]))
            self.latest_depth = max(self.latest_depth, stamp)

    def tick(self, stamp: float) -> None:
        """Another stream's message at ``stamp`` moves the bag's clock."""
        self.latest = max(self.latest, stamp)

    def _due(self, stamp: float) -> bool:
        return self.latest_depth > stamp + self.tol or self.latest > stamp + self.tol + self.slack

    def ready(self, final: bool = False) -> Iterator[tuple]:
        while self.colors and (final or self._due(self.colors[0][0])):
            c = self.colors.pop(0)
            best = None
            for j, d in enumerate(self.depths):
                dt = abs(d[0] - c[0])
                if dt <= self.tol and (best is None or dt < abs(self.depths[best][0] - c[0])):
                    best = j
            depth = self.depths.pop(best) if best is not None else None
            # depth older than this colour minus the tolerance can no longer pair
            stale = [d for d in self.depths if d[0] < c[0] - self.tol]
            self.unpaired_depth += len(stale)
            self.depths = [d for d in self.depths if d[0] >= c[0] - self.tol]
            yield c, depth
        if final:
            self.unpaired_depth += len(self.depths)
            self.depths = []


def _cloud_points(msg) -> tuple:
    """(xyz (N, 3) float32, intensity (N,) or None) of a PointCloud2, without NaN rows or the
    (0, 0, 0) points drivers (Ouster) publish for no return."""
    cloud = msg_codec.pointcloud2_to_array(msg)
    xyz = msg_codec.cloud_xyz(cloud, remove_nans=False)
    keep = np.isfinite(xyz).all(1) & (np.abs(xyz).sum(1) > 0)
    names = cloud.dtype.names
    inten = None
    for n in ("intensity", "reflectivity", "signal"):
        if n in names and cloud[n].ndim == 1:
            inten = cloud[n].astype(np.float32)[keep]
            break
    ring = cloud["ring"].astype(np.uint16)[keep] if "ring" in names and cloud["ring"].ndim == 1 else None
    return xyz[keep], inten, ring


def iter_frames(path, options: Optional[StreamOptions] = None, stats: Optional[ReplayStats] = None,
                index: Optional[BagIndex] = None, choice_out: Optional[dict] = None) -> Iterator:
    """Yield :class:`~sas_core.types.Frame` (RGB-D, pose = camera-to-map) and
    :class:`~sas_core.data.synthetic.LidarSweep` (points in the sensor frame, pose sensor-to-map)
    items of a bag in time order. Skips are counted in ``stats``; ``choice_out['choice']`` gets
    the :class:`StreamChoice`. Raises StreamError / FileNotFoundError / ValueError before the
    first item for a bag whose streams cannot be chosen."""
    from sas_core.data.synthetic import LidarSweep
    from sas_core.geometry.registration import register_depth
    from sas_core.types import Frame

    options = options or StreamOptions()
    stats = stats if stats is not None else ReplayStats()
    store = typestore()
    index = index or index_bag(path, rates=False)
    reader = open_reader(path)
    try:
        ch, tf = choose_streams(reader, store, index, options, stats)
        if choice_out is not None:
            choice_out["choice"] = ch
            choice_out["tf"] = tf
        infos = _load_infos(reader, store, ch.color_info, stats) if ch.rgbd else []
        dinfos = _load_infos(reader, store, ch.depth_info, stats) if ch.register else []
        istamps, dstamps = [i.stamp for i in infos], [i.stamp for i in dinfos]
        role = {}
        if ch.rgbd:
            role[ch.color], role[ch.depth] = "color", "depth"
        if ch.lidar:
            role[ch.lidar] = "lidar"
        conns = [c for c in reader.connections if c.topic in role]
        pairer = _Pairer(options.sync_tolerance)
        counters = Counter()
        out, order = [], itertools.count()  # (stamp, seq, item) heap

        def frame_of(c, d):
            stamp, ci, cmsg = c
            stats.frames_seen += 1
            if d is None:
                stats.problem(ch.color, ci, "no_depth", f"no depth within {options.sync_tolerance} s of {stamp:.3f}")
                return None
            _, di, dmsg = d
            try:
                color = image_codec.decode_color(cmsg)
            except image_codec.ImageDecodeError as exc:
                stats.problem(ch.color, ci, exc.reason, str(exc))
                return None
            try:
                depth = image_codec.decode_depth(dmsg)
            except image_codec.ImageDecodeError as exc:
                stats.problem(ch.depth, di, exc.reason, str(exc))
                return None
            info = _nearest_info(infos, istamps, stamp)
            if info is None:
                stats.problem(ch.color, ci, "no_camera_info", f"no valid CameraInfo on {ch.color_info}")
                return None
            intr = info.intrinsics
            if (intr.height, intr.width) != color.shape[:2]:
                intr = intr.scaled(color.shape[1], color.shape[0])
            frame_id = str(cmsg.header.frame_id)
            try:
                pose = ch.camera_pose.pose(frame_id, stamp)
            except PoseUnavailable as exc:
                stats.problem(ch.color, ci, f"no_pose:{exc.reason}", str(exc))
                return None
            if ch.register:
                dinfo = _nearest_info(dinfos, dstamps, d[0])
                if dinfo is None:
                    stats.problem(ch.depth, di, "no_camera_info", f"no valid CameraInfo on {ch.depth_info}")
                    return None
                dintr = dinfo.intrinsics
                if (dintr.height, dintr.width) != depth.shape:
                    dintr = dintr.scaled(depth.shape[1], depth.shape[0])
                dframe = str(dmsg.header.frame_id)
                try:
                    T = np.eye(4) if dframe == frame_id else np.asarray(tf.buffer.lookup(frame_id, dframe, d[0]))
                except Exception as exc:
                    stats.problem(ch.depth, di, f"no_extrinsics:{getattr(exc, 'reason', 'invalid')}", str(exc))
                    return None
                depth = register_depth(depth, dintr, intr, T)
            elif depth.shape != color.shape[:2]:
                stats.problem(ch.depth, di, "size_mismatch",
                              f"depth {depth.shape[1]}x{depth.shape[0]} and colour {color.shape[1]}x{color.shape[0]} "
                              "differ in size and the bag has no depth CameraInfo to register it "
                              "(--depth-info-topic)")
                return None
            frame = Frame(color=color, depth=depth, intrinsics=intr, pose=pose, stamp=stamp, frame_id=frame_id)
            stats.origin[id(frame)] = (ch.color, ci)
            return frame

        for conn, _, raw in reader.messages(connections=conns):
            r = role[conn.topic]
            i = counters[conn.topic]
            counters[conn.topic] += 1
            try:
                msg = store.deserialize_cdr(raw, conn.msgtype)
                stamp = msg_codec.stamp_to_seconds(msg.header.stamp)
            except Exception as exc:
                stats.problem(conn.topic, i, "undecodable", f"cannot decode a {conn.msgtype}: {exc}",
                              frame=(r != "depth"))
                if r == "color":
                    stats.frames_seen += 1
                elif r == "lidar":
                    stats.sweeps_seen += 1
                continue
            if r == "lidar":
                stats.sweeps_seen += 1
                pairer.tick(stamp)
                try:
                    xyz, inten, ring = _cloud_points(msg)
                except ValueError as exc:
                    stats.problem(conn.topic, i, "bad_cloud", str(exc))
                    continue
                if not len(xyz):
                    stats.problem(conn.topic, i, "empty_cloud", "no finite point with a return")
                    continue
                try:
                    pose = ch.lidar_pose.pose(str(msg.header.frame_id), stamp)
                except PoseUnavailable as exc:
                    stats.problem(conn.topic, i, f"no_pose:{exc.reason}", str(exc))
                    continue
                sweep = LidarSweep(
                    stamp=stamp, points=xyz, intensity=inten if inten is not None else np.zeros(len(xyz), np.float32),
                    ring=ring if ring is not None else np.zeros(len(xyz), np.uint16), pose=pose, labels=None,
                    instances=None, frame_id=str(msg.header.frame_id))
                stats.origin[id(sweep)] = (conn.topic, i)
                heapq.heappush(out, (stamp, next(order), sweep))
            else:
                pairer.add(r, stamp, i, msg)
                for c, d in pairer.ready():
                    f = frame_of(c, d)
                    if f is not None:
                        heapq.heappush(out, (f.stamp, next(order), f))
            # items leave in stamp order: nothing older than an undecided colour frame waits behind it
            horizon = pairer.colors[0][0] if pairer.colors else np.inf
            while out and out[0][0] <= horizon:
                yield heapq.heappop(out)[2]
        for c, d in pairer.ready(final=True):
            f = frame_of(c, d)
            if f is not None:
                heapq.heappush(out, (f.stamp, next(order), f))
        while out:
            yield heapq.heappop(out)[2]
        if pairer.unpaired_depth:
            stats.other["depth_unpaired"] += pairer.unpaired_depth
    finally:
        reader.close()
