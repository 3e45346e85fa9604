"""Replay recorded or synthetic frames through a live mapping node (real rclpy, loopback).

Used by the ROS tests, ``sas bench node`` and the last step of ``make demo``:

* :class:`FramePlayer` publishes :class:`sas_core.types.Frame` objects on the bag topics of the
  synthetic world (``/camera/color/image_raw`` rgb8, ``/camera/depth/image_raw`` 16UC1 mm,
  ``/camera/color/camera_info``, ``/camera/pose`` PoseStamped in ``map``; optionally the ground
  truth ``/camera/semantic/image_raw`` and ``/camera/instance/image_raw`` for fusion mode).
* :func:`replay_and_query` starts a :class:`~sas_ros.mapping_node.MappingNode` in-process with the
  bag topics remapped onto its inputs, plays the frames, waits for the labelled cloud, calls
  ``~/query`` for the given texts and returns the answers as plain data.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Optional, Sequence

import numpy as np

CAMERA_FRAME = "camera_color_optical_frame"

# node input -> bag topic
REMAPPINGS = {
    "color/image_raw": "/camera/color/image_raw",
    "depth/image_raw": "/camera/depth/image_raw",
    "color/camera_info": "/camera/color/camera_info",
    "pose": "/camera/pose",
    "semantic/image_raw": "/camera/semantic/image_raw",
    "instance/image_raw": "/camera/instance/image_raw",
    "points": "/lidar/points",
}


def remap_args(remappings: dict = REMAPPINGS) -> list:
    """``--ros-args -r a:=b ...`` for a node's ``cli_args``."""
    out = ["--ros-args"]
    for src, dst in remappings.items():
        out += ["-r", f"{src}:={dst}"]
    return out


class FramePlayer:
    """Publishes frames on the synthetic bag topics from ``node``."""

    def __init__(self, node, ground_truth: bool = False, map_frame: str = "map"):
        from geometry_msgs.msg import PoseStamped
        from sensor_msgs.msg import CameraInfo, Image

        self.node = node
        self.ground_truth = ground_truth
        self.map_frame = map_frame
        qos = 10
        self.pub_color = node.create_publisher(Image, REMAPPINGS["color/image_raw"], qos)
        self.pub_depth = node.create_publisher(Image, REMAPPINGS["depth/image_raw"], qos)
        self.pub_info = node.create_publisher(CameraInfo, REMAPPINGS["color/camera_info"], qos)
        self.pub_pose = node.create_publisher(PoseStamped, REMAPPINGS["pose"], qos)
        self.pub_sem = node.create_publisher(Image, REMAPPINGS["semantic/image_raw"], qos)
        self.pub_inst = node.create_publisher(Image, REMAPPINGS["instance/image_raw"], qos)
        self._PoseStamped = PoseStamped

    def wait_for_subscribers(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        pubs = [self.pub_color, self.pub_depth, self.pub_info, self.pub_pose]
        while time.monotonic() < deadline:
            if all(p.get_subscription_count() > 0 for p in pubs):
                return True
            time.sleep(0.05)
        return False

    def publish(self, frame, stamp: Optional[float] = None, frame_id: str = CAMERA_FRAME,
                info: bool = True, pose: bool = True) -> None:
        """Publish one frame (pose first, then camera info, depth, colour, ground truth)."""
        from sas_ros import conversions as conv

        stamp = frame.stamp if stamp is None else stamp
        if pose:
            msg = self._PoseStamped(header=conv.make_header(self.map_frame, stamp),
                                    pose=conv.matrix_to_pose_msg(frame.pose))
            self.pub_pose.publish(msg)
        if info:
            self.pub_info.publish(conv.intrinsics_to_camera_info(frame.intrinsics, frame_id, stamp))
        depth = frame.depth
        self.pub_depth.publish(conv.numpy_to_image(depth, "16UC1", frame_id, stamp))
        if self.ground_truth and frame.semantic is not None:
            sem = np.clip(frame.semantic, 0, 65535).astype(np.uint16)
            inst = np.zeros_like(sem) if frame.instance is None else np.clip(frame.instance + 1, 0, 65535).astype(np.uint16)
            self.pub_sem.publish(conv.numpy_to_image(sem, "16UC1", frame_id, stamp))
            self.pub_inst.publish(conv.numpy_to_image(inst, "16UC1", frame_id, stamp))
        self.pub_color.publish(conv.numpy_to_image(frame.color, "rgb8", frame_id, stamp))


@contextmanager
def running_node(name: str, params: dict, helper_name: Optional[str] = None):
    """A :class:`~sas_ros.mapping_node.MappingNode` (bag topics remapped onto its inputs, ``params``
    as parameter overrides) and a helper node, spun by one executor in a context of their own;
    yields ``(node, helper)`` and tears everything down in order on exit."""
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter

    from sas_ros.mapping_node import MappingNode

    context = rclpy.Context()
    rclpy.init(context=context)
    executor = MultiThreadedExecutor(num_threads=4, context=context)
    node = helper = None
    try:
        node = MappingNode(name, context=context, cli_args=remap_args(),
                           parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
        helper = rclpy.create_node(helper_name or f"{name}_helper", context=context)
        executor.add_node(node)
        executor.add_node(helper)
        threading.Thread(target=executor.spin, daemon=True).start()
        yield node, helper
    finally:
        executor.shutdown()
        for n in (node, helper):
            if n is not None:
                n.destroy_node()
        rclpy.shutdown(context=context)


def call_service(node, client, request, timeout: float = 10.0):
    """Call a service from a node that is spun by another thread; None on timeout."""
    future = client.call_async(request)
    deadline = time.monotonic() + timeout
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.005)
    return future.result() if future.done() else None


def _handled(node) -> int:
    """Frames the node has integrated or dropped (any reason)."""
    return node.n_frames + sum(node.drops.values())


def load_frames(source, n_frames: Optional[int] = None) -> list:
    """Frames from a bag path (``sas_core.data.rosbag_io.iter_bag_frames``) or an iterable of Frames."""
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        from sas_core.data.rosbag_io import iter_bag_frames

        frames = [f for f in iter_bag_frames(source) if hasattr(f, "depth")]
    else:
        frames = list(source)
    return frames[:n_frames] if n_frames else frames


def replay_and_query(source, texts: Sequence[str], checkpoint: Optional[str] = None, mode: Optional[str] = None,
                     rate_hz: float = 15.0, n_frames: Optional[int] = None, threshold: float = 0.0,
                     max_points: int = 2000, parameters: Optional[dict] = None, timeout: float = 120.0,
                     node_name: str = "sas_mapping_node", paced: bool = True) -> dict:
    """Play frames through a live MappingNode and query it (``make demo``'s ROS step).

    Args:
        source: a bag path or an iterable of Frames (synthetic frames carry ground truth, so
            ``mode="fusion"`` works without a checkpoint).
        texts: texts for ``~/query``.
        checkpoint: distilled checkpoint (``mode`` defaults to "segmenter" with one, else "fusion").
        paced: wait for the node to take each frame before the next (no frame lost to a slow CPU);
            otherwise play at ``rate_hz`` and let the node's keep-latest queue drop frames.
    Returns:
        dict(frames, points, labelled_fields, queries=[dict(text, count, best_score, centroid, bbox_min,
        bbox_max, n_points)], stats, message).
    """
    from sensor_msgs.msg import PointCloud2

    from sas_interfaces.srv import TextQuery
    from sas_ros.query_client import object_dict

    frames = load_frames(source, n_frames)
    if not frames:
        raise ValueError(f"no RGB-D frames in {source!r}")
    mode = mode or ("segmenter" if checkpoint else "fusion")
    params = dict(mode=mode, pose_source="pose", update_period=0.5, checkpoint=checkpoint or "", reliable_inputs=True)
    params.update(parameters or {})
    with running_node(node_name, params, "sas_frame_player") as (node, player_node):
        player = FramePlayer(player_node, ground_truth=(mode == "fusion"))
        clouds = []
        player_node.create_subscription(PointCloud2, f"/{node_name}/labelled_cloud", clouds.append, 2)
        client = player_node.create_client(TextQuery, f"/{node_name}/query")
        if not player.wait_for_subscribers(10.0):
            raise RuntimeError("the mapping node did not subscribe to the camera topics within 10 s")
        period = 1.0 / rate_hz if rate_hz > 0 else 0.0
        deadline = time.monotonic() + timeout
        for i, frame in enumerate(frames):
            t0 = time.monotonic()
            player.publish(frame)
            if paced:  # wait until the node has taken this frame (integrated or dropped), like a bag player
                while time.monotonic() < min(deadline, t0 + 10.0) and _handled(node) < i + 1:
                    time.sleep(0.005)
            time.sleep(max(0.0, period - (time.monotonic() - t0)))
        while time.monotonic() < deadline and (node.queue or _handled(node) < len(frames) or node.teacher_pending) \
                and time.monotonic() < t0 + 10.0:  # (fusion mode: the teacher worker has fused the last frames)
            time.sleep(0.05)
        # one more labelling pass after the last frame, then wait for its cloud
        n_before = len(clouds)
        node.update_event.set()
        while time.monotonic() < deadline and len(clouds) <= n_before:
            time.sleep(0.05)
        if not client.wait_for_service(timeout_sec=10.0):
            raise RuntimeError("~/query service not available")
        answers = []
        response = call_service(player_node, client, TextQuery.Request(texts=list(texts), threshold=float(threshold),
                                                                      max_points=int(max_points)), 30.0)
        if response is None:
            raise RuntimeError("~/query did not answer within 30 s")
        for i, text in enumerate(texts):
            if not response.success:
                break
            c, lo, hi = response.centroids[i], response.bbox_min[i], response.bbox_max[i]
            answers.append(dict(text=text, count=int(response.counts[i]), best_score=float(response.best_scores[i]),
                                centroid=[c.x, c.y, c.z], bbox_min=[lo.x, lo.y, lo.z], bbox_max=[hi.x, hi.y, hi.z],
                                objects=[object_dict(o) for o in response.objects if o.text_index == i]))
        fields = [f.name for f in clouds[-1].fields] if clouds else []
        return dict(frames=len(frames), integrated=node.n_frames, points=len(node.map), labelled_fields=fields,
                    queries=answers, success=bool(response.success), message=response.message,
                    stats=node.stats())
