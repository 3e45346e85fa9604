"""sas_interfaces builds and works over ROS 2: one node serves TextQuery, another calls it."""

import threading
import time

import pytest

rclpy = pytest.importorskip("rclpy")
pytestmark = pytest.mark.ros


def test_text_query_service_over_loopback():
    from rclpy.executors import MultiThreadedExecutor
    from sas_interfaces.srv import TextQuery

    rclpy.init()
    try:
        server = rclpy.create_node("tq_server")
        client_node = rclpy.create_node("tq_client")

        def handle(request, response):
            response.success = True
            response.message = "|".join(request.texts)
            response.best_scores = [float(len(t)) for t in request.texts]
            return response

        server.create_service(TextQuery, "tq_test/query", handle)
        client = client_node.create_client(TextQuery, "tq_test/query")
        executor = MultiThreadedExecutor()
        executor.add_node(server)
        executor.add_node(client_node)
        spin = threading.Thread(target=executor.spin, daemon=True)
        spin.start()
        assert client.wait_for_service(timeout_sec=10.0), "service not discovered over loopback"
        request = TextQuery.Request(texts=["red mug", "chair"], threshold=0.2, max_points=10)
        future = client.call_async(request)
        deadline = time.monotonic() + 10.0
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert future.done(), "no response within 10 s"
        response = future.result()
        assert response.success
        assert response.message == "red mug|chair"
        assert list(response.best_scores) == [7.0, 5.0]
        executor.shutdown()
        server.destroy_node()
        client_node.destroy_node()
    finally:
        rclpy.shutdown()
