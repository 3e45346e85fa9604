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
