"""Shared fixtures. Tests run on CPU with tiny randomly initialised models."""

import os
import random

import numpy as np
import pytest

# Each pytest process gets its own ROS domain so concurrent runs never see each other.
os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:
        pass
