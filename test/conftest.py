"""Shared fixtures. Tests run on CPU with tiny randomly initialised models."""

import os
import random

import numpy as np
import pytest

# Each pytest process gets its own ROS domain so concurrent runs never see each other.
os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Deterministic seeds; one torch thread (the tiny sparse convolutions of the tests run 10-50x
    slower with two threads on a loaded 2-core machine, and some libraries reset the count)."""
    random.seed(0)
    np.random.seed(0)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def wait_until(cond, timeout: float, poll: float = 0.01) -> bool:
    """Poll ``cond()`` until it is true (True) or ``timeout`` seconds pass (False). Callers assert
    the result, so a wait that times out fails the test instead of passing silently."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll)
    return False


class Spun:
    """Nodes spun by a MultiThreadedExecutor in a background thread, in their own rclpy context;
    :meth:`close` stops the executor and joins its thread before the nodes go, so no callback
    is taken on a destroyed entity (rclpy then prints "exception was never retrieved")."""

    def __init__(self, context, *nodes, threads: int = 4):
        import threading

        from rclpy.executors import MultiThreadedExecutor

        self.context, self.nodes = context, list(nodes)
        self.executor = MultiThreadedExecutor(num_threads=threads, context=context)
        for node in self.nodes:
            self.executor.add_node(node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self) -> None:
        import rclpy

        self.executor.shutdown(timeout_sec=10.0)
        self.thread.join(timeout=10.0)
        for node in self.nodes:
            node.destroy_node()
        rclpy.shutdown(context=self.context)


def tiny_openscene(root, dim: int = 16):
    """Two 300-point training rooms (labels 0-2 by x) with fused features equal to each point's class
    text vector, and one validation room, in the OpenScene layout under ``root`` (train/, val/, feat/).
    Returns (class text embeddings, [positions of each training room])."""
    import torch

    from sas_core.data import fused_features
    from sas_core.text import SCANNET_20, SyntheticTextEncoder, class_embeddings

    rng = np.random.default_rng(0)
    text = class_embeddings(SyntheticTextEncoder(SCANNET_20, dim=dim), SCANNET_20)
    for split in ("train", "val"):
        (root / split).mkdir()
    (root / "feat").mkdir()
    rooms = []
    for s in range(2):
        p = rng.uniform(0, 4, (300, 3)).astype(np.float32)
        lab = np.minimum((p[:, 0] / 4 * 3).astype(np.int64), 2)
        torch.save((p, rng.uniform(-1, 1, (300, 3)).astype(np.float32), lab), root / "train" / f"room{s}.pth")
        fused_features.save_fused_features(root / "feat" / f"room{s}_0.pt", text[lab].half(),
                                           torch.ones(300, dtype=torch.bool))
        rooms.append(p)
    torch.save((p, rng.uniform(-1, 1, (300, 3)).astype(np.float32), lab), root / "val" / "room9.pth")
    return text, rooms
