"""Text queries against a running mapping node, for machines without ros2cli.

``sas query --ros "red mug"`` (``sas_app/commands/query.py`` calls :func:`run_cli`) and the
``sas_query_client`` entry point do the same as::

    ros2 service call /sas_mapping_node/query sas_interfaces/srv/TextQuery \\
        "{texts: ['red mug'], threshold: 0.0, max_points: 0}"
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Optional, Sequence

DEFAULT_SERVICE = "/sas_mapping_node/query"


def add_ros_arguments(parser: argparse.ArgumentParser, texts: bool = True) -> None:
    """The arguments :func:`run_cli` reads (``texts``, ``threshold``, ``max_points``, ``service``,
    ``timeout``, ``json``)."""
    if texts:
        parser.add_argument("texts", nargs="+", help="one or more texts, each scored separately")
    parser.add_argument("--threshold", type=float, default=0.0, help="min relevance (0 = node default)")
    parser.add_argument("--max-points", type=int, default=0, help="max returned points (0 = node default)")
    parser.add_argument("--max-objects", type=int, default=0, help="max objects per text (0 = node default)")
    parser.add_argument("--service", default=DEFAULT_SERVICE, help="TextQuery service name")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the service")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")


def call_query(texts: Sequence[str], threshold: float = 0.0, max_points: int = 0,
               service: str = DEFAULT_SERVICE, timeout: float = 10.0, node=None, max_objects: int = 0) -> dict:
    """Call a ``sas_interfaces/TextQuery`` service and return the answer as plain data.

    Args:
        node: an existing rclpy node spun elsewhere; default: a temporary node in its own context.
    Returns:
        dict(success, message, queries=[dict(text, count, best_score, centroid, bbox_min, bbox_max,
        points (M, 3) list, scores list, objects=[dict(score, best_score, n_points, centroid, box_center,
        box_size, box_yaw, aabb_min, aabb_max)])]).
    Raises:
        TimeoutError: the service is not available or does not answer within ``timeout``.
        ValueError: no texts or an empty text.
    """
    import numpy as np
    import rclpy

    from sas_core.data import msg_codec as codec
    from sas_interfaces.srv import TextQuery

    texts = [str(t) for t in texts]
    if not texts or any(not t.strip() for t in texts):
        raise ValueError("give one or more non-empty query texts")
    own = node is None
    context = executor = None
    if own:
        # No spin thread: the executor runs in this thread, only while we wait for the answer. A
        # daemon thread still inside the executor's C++ wait when the process exits made it abort
        # ("terminate called without an active exception", rc 134) in about 3 runs out of 10.
        from rclpy.executors import SingleThreadedExecutor

        context = rclpy.Context()
        rclpy.init(context=context)
        node = rclpy.create_node(f"sas_query_client_{int(time.time() * 1e3) % 100000}", context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
    client = None
    try:
        client = node.create_client(TextQuery, service)
        if not client.wait_for_service(timeout_sec=timeout):
            raise TimeoutError(f"service {service} not available after {timeout:.0f} s (is the mapping node running?)")
        future = client.call_async(TextQuery.Request(texts=texts, threshold=float(threshold),
                                                     max_points=int(max_points), max_objects=int(max_objects)))
        if own:
            executor.spin_until_future_complete(future, timeout_sec=timeout)
        else:  # the caller's executor spins the node
            deadline = time.monotonic() + timeout
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.005)
        if not future.done():
            raise TimeoutError(f"service {service} did not answer within {timeout:.0f} s")
        r = future.result()
        out = dict(success=bool(r.success), message=r.message, queries=[])
        if r.success:
            arr = codec.pointcloud2_to_array(r.points)
            xyz = codec.cloud_xyz(arr, remove_nans=False)
            for i, text in enumerate(texts):
                sel = arr["text_index"] == i
                c, lo, hi = r.centroids[i], r.bbox_min[i], r.bbox_max[i]
                out["queries"].append(dict(
                    text=text, count=int(r.counts[i]), best_score=float(r.best_scores[i]),
                    centroid=[c.x, c.y, c.z], bbox_min=[lo.x, lo.y, lo.z], bbox_max=[hi.x, hi.y, hi.z],
                    points=np.round(xyz[sel], 4).tolist(), scores=np.round(arr["score"][sel], 4).tolist(),
                    objects=[object_dict(o) for o in r.objects if o.text_index == i]))
        return out
    finally:
        if client is not None:
            node.destroy_client(client)
        if own:
            executor.shutdown()
            node.destroy_node()
            rclpy.shutdown(context=context)


def object_dict(o) -> dict:
    """A DetectedObject as plain data (box yaw from its quaternion about +z)."""
    import math

    xyz = lambda p: [round(float(p.x), 3), round(float(p.y), 3), round(float(p.z), 3)]  # noqa: E731
    q = o.box.orientation
    return dict(score=round(float(o.score), 4), best_score=round(float(o.best_score), 4), n_points=int(o.n_points),
                centroid=xyz(o.centroid), box_center=xyz(o.box.position), box_size=xyz(o.box_size),
                box_yaw=round(2.0 * math.atan2(float(q.z), float(q.w)), 4), aabb_min=xyz(o.aabb_min),
                aabb_max=xyz(o.aabb_max))


def format_answer(answer: dict) -> str:
    if not answer["success"]:
        return f"query failed: {answer['message']}"
    lines = []
    for q in answer["queries"]:
        fmt = lambda v: "(" + ", ".join(f"{x:.2f}" for x in v) + ")"  # noqa: E731
        lines.append(f"{q['text']!r}: {q['count']} points above threshold, best score {q['best_score']:.3f}")
        if q["points"]:
            lines.append(f"    all matches: centroid {fmt(q['centroid'])}, box {fmt(q['bbox_min'])} .. "
                         f"{fmt(q['bbox_max'])}")
        if q.get("objects"):
            lines.append(f"    {'#':>3} {'score':>6} {'voxels':>7}  {'centre (m)':<22} {'size (m)':<20} yaw")
            for k, o in enumerate(q["objects"]):
                lines.append(f"    {k:>3} {o['score']:>6.3f} {o['n_points']:>7}  {fmt(o['box_center']):<22} "
                             f"{fmt(o['box_size']):<20} {math.degrees(o['box_yaw']):.0f} deg")
    return "\n".join(lines)


def run_cli(args) -> int:
    """Run a query from parsed arguments (attributes as :func:`add_ros_arguments`; ``texts`` may also be
    ``text``). Prints the answer; returns 0 on success, 1 if the node answered with a failure."""
    texts = getattr(args, "texts", None) or getattr(args, "text", None)
    if isinstance(texts, str):
        texts = [texts]
    answer = call_query(texts or [], threshold=float(getattr(args, "threshold", 0.0) or 0.0),
                        max_points=int(getattr(args, "max_points", 0) or 0),
                        max_objects=int(getattr(args, "max_objects", 0) or 0),
                        service=getattr(args, "service", None) or DEFAULT_SERVICE,
                        timeout=float(getattr(args, "timeout", 10.0) or 10.0))
    if getattr(args, "json", False):
        print(json.dumps(answer))
    else:
        print(format_answer(answer))
    return 0 if answer["success"] else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="sas_query_client", description=__doc__.splitlines()[0])
    add_ros_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_cli(args)
    except (TimeoutError, ValueError) as exc:
        print(f"sas_query_client: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
