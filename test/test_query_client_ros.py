"""`sas query --ros` (sas_ros.query_client) as a separate process against a live TextQuery service:
every run prints its answer and exits 0 (it used to abort with rc 134 in about 3 runs out of 10)."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy")
pytestmark = [pytest.mark.ros, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
RUNS = 50


def test_query_client_process_exits_cleanly_after_every_answer():
    import numpy as np
    from rclpy.executors import MultiThreadedExecutor

    from sas_interfaces.srv import TextQuery
    from sas_ros import conversions as conv

    context = rclpy.Context()
    rclpy.init(context=context)
    server = rclpy.create_node("stress_query_server", context=context)
    calls = []

    def handle(request, response):
        calls.append(list(request.texts))
        pts = np.array([[1.0, 2.0, 3.0], [1.5, 2.0, 3.0]], np.float32)
        response.points = conv.xyz_cloud(pts, "map", None, scores=np.array([0.9, 0.8], np.float32),
                                         text_index=np.zeros(2, np.uint32))
        response.best_scores, response.counts = [0.9], [2]
        response.centroids = [conv.point_msg(pts.mean(0))]
        response.bbox_min, response.bbox_max = [conv.point_msg(pts.min(0))], [conv.point_msg(pts.max(0))]
        response.success, response.message = True, "ok"
        return response

    server.create_service(TextQuery, "/stress_query/query", handle)
    executor = MultiThreadedExecutor(num_threads=2, context=context)
    executor.add_node(server)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    failures = []
    try:
        for i in range(RUNS):
            proc = subprocess.run([sys.executable, "-m", "sas_ros.query_client", "chair", "--json",
                                   "--service", "/stress_query/query", "--timeout", "20"],
                                  cwd=ROOT, capture_output=True, text=True, timeout=60, env=dict(os.environ))
            answer = None
            if proc.stdout.strip():
                answer = json.loads(proc.stdout.strip().splitlines()[-1])
            if proc.returncode != 0 or not answer or not answer["success"]:
                failures.append((i, proc.returncode, proc.stderr.strip()[-300:]))
            elif answer["queries"][0]["count"] != 2 or len(answer["queries"][0]["points"]) != 2:
                failures.append((i, "wrong answer", answer))
    finally:
        executor.shutdown()
        server.destroy_node()
        rclpy.shutdown(context=context)
    assert failures == [], failures
    assert len(calls) == RUNS
