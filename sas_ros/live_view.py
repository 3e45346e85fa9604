"""A running mapping node as a data source for ``sas view --ros`` (no viewer code here).

:class:`LiveMapClient` owns an rclpy context and a node of its own, spun by one executor thread:
it keeps the latest ``~/labelled_cloud`` (decoded to NumPy: positions, colours, labels, scores and
``instance`` when the node publishes it) and the vocabulary of ``~/label_map`` (transient local),
and calls ``~/query`` and ``~/set_vocabulary`` (answers as plain data, the query's through
:func:`sas_ros.query_client.call_query` on this client's node). Decoding happens in the
subscription callback; the viewer polls :meth:`LiveMapClient.latest`.
"""

from __future__ import annotations

import threading
import time
from typing import List, Optional, Sequence

import numpy as np

DEFAULT_NODE = "/sas_mapping_node"


class LiveMapClient:
    """Subscribe to a mapping node's outputs and call its services.

    Args:
        node_name: the mapping node's fully qualified name (its topics and services are
            ``<node_name>/labelled_cloud``, ``/label_map``, ``/query``, ``/set_vocabulary``).
        timeout: seconds a service call may take.
        context: an rclpy context to use (default: a new one, shut down by :meth:`close`).
    """

    def __init__(self, node_name: str = DEFAULT_NODE, timeout: float = 10.0, context=None):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import PointCloud2

        from sas_interfaces.msg import LabelMap
        from sas_interfaces.srv import SetVocabulary

        self.node_name = "/" + node_name.strip("/")
        self.timeout = float(timeout)
        self._own_context = context is None
        self.context = rclpy.Context() if context is None else context
        if self._own_context:
            rclpy.init(context=self.context)
        self.node = rclpy.create_node(f"sas_view_{int(time.time() * 1e3) % 100000}", context=self.context)
        self._lock = threading.Lock()
        self.version = 0
        self._cloud: Optional[dict] = None
        self._names: List[str] = []
        self.node.create_subscription(PointCloud2, f"{self.node_name}/labelled_cloud", self._on_cloud, 2)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                             reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(LabelMap, f"{self.node_name}/label_map", self._on_label_map, latched)
        self._vocab_client = self.node.create_client(SetVocabulary, f"{self.node_name}/set_vocabulary")
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name="sas-view-ros", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            while self.context.ok() and not self._stop.is_set():
                self.executor.spin_once(timeout_sec=0.1)
        except (ExternalShutdownException, RuntimeError):  # the context went away: close()
            pass

    # ------------------------------------------------------------------ topics
    def _on_cloud(self, msg) -> None:
        from sas_core.data import msg_codec as codec

        arr = codec.pointcloud2_to_array(msg, remove_nans=False)
        xyz = codec.cloud_xyz(arr, remove_nans=False).astype(np.float32)
        ok = np.isfinite(xyz).all(1)
        names = arr.dtype.names
        cloud = dict(positions=np.ascontiguousarray(xyz[ok]),
                     colors=(codec.unpack_rgb(arr["rgb"][ok]) if "rgb" in names
                             else np.full((int(ok.sum()), 3), 160, np.uint8)))
        for src, dst, dt in (("label", "labels", np.int64), ("score", "scores", np.float32),
                             ("instance", "instance", np.int64)):
            if src in names:
                cloud[dst] = arr[src][ok].astype(dt)
        with self._lock:
            self._cloud = cloud
            self.version += 1

    def _on_label_map(self, msg) -> None:
        with self._lock:
            self._names = [str(n) for n in msg.names]
            self.version += 1

    def latest(self):
        """``(version, cloud dict or None, class names)``; the version grows with every message."""
        with self._lock:
            return self.version, self._cloud, list(self._names)

    def wait_for_cloud(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._cloud is not None:
                return True
            time.sleep(0.05)
        return False

    # ------------------------------------------------------------------ services
    def query(self, text: str, threshold: float = 0.0, max_points: int = 0, max_objects: int = 0) -> dict:
        """``~/query`` for one text (:func:`sas_ros.query_client.call_query`'s answer)."""
        from sas_ros.query_client import call_query

        return call_query([text], threshold=float(threshold), max_points=int(max_points),
                          service=f"{self.node_name}/query", timeout=self.timeout, node=self.node,
                          max_objects=int(max_objects))

    def set_vocabulary(self, names: Sequence[str], template: str = "") -> str:
        """``~/set_vocabulary``; returns the node's message (raises ValueError when it refuses)."""
        from sas_interfaces.srv import SetVocabulary

        if not self._vocab_client.wait_for_service(timeout_sec=self.timeout):
            raise TimeoutError(f"service {self.node_name}/set_vocabulary not available after {self.timeout:.0f} s")
        future = self._vocab_client.call_async(SetVocabulary.Request(labels=[str(n) for n in names],
                                                                     prompt_template=str(template)))
        deadline = time.monotonic() + self.timeout
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.005)
        if not future.done():
            raise TimeoutError(f"{self.node_name}/set_vocabulary did not answer within {self.timeout:.0f} s")
        r = future.result()
        if not r.success:
            unknown = f" (unknown: {', '.join(r.unknown)})" if r.unknown else ""
            raise ValueError(f"{r.message}{unknown}")
        return r.message

    def close(self) -> None:
        """Stop spinning and destroy the node (and the context when it is this client's)."""
        import rclpy

        self._stop.set()
        self._thread.join(timeout=5)
        self.executor.shutdown()
        self.node.destroy_node()
        if self._own_context and self.context.ok():
            rclpy.shutdown(context=self.context)
