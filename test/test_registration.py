"""Depth registration into the colour camera, against renderings where the registered depth is known."""

import numpy as np
import pytest

from sas_core.geometry.registration import register_depth
from sas_core.types import CameraIntrinsics


@pytest.fixture(scope="module")
def rig():
    """A synthetic room seen by a colour camera and by a depth camera 5 cm beside it (other lens and
    size): the depth camera's rendering, and the colour camera's own depth (the ground truth)."""
    from sas_core.data.synthetic import SynthConfig, default_intrinsics, generate_scene, render_frames

    scene = generate_scene(SynthConfig(seed=8, n_frames=1, width=96, height=72, with_lidar=False,
                                       points_per_m2=20))
    color_pose = scene.frames[0].pose
    T_color_depth = np.eye(4)
    T_color_depth[:3, :3] = np.array([[np.cos(0.03), 0, np.sin(0.03)], [0, 1, 0], [-np.sin(0.03), 0, np.cos(0.03)]])
    T_color_depth[:3, 3] = (-0.05, 0.004, 0.002)
    dintr = default_intrinsics(80, 60, hfov_deg=75.0)
    depth = render_frames(scene, [color_pose @ T_color_depth], dintr)[0].depth
    return scene.frames[0].depth, scene.intrinsics, depth, dintr, T_color_depth


def test_registered_depth_matches_the_colour_cameras_rendering(rig):
    truth, cintr, depth, dintr, T = rig
    reg = register_depth(depth, dintr, cintr, T)
    assert reg.shape == truth.shape and reg.dtype == np.float32
    hit = (reg > 0) & (truth > 0)
    assert hit.mean() > 0.3  # a coarser depth camera (0.94 deg/px vs 0.6) leaves holes, not errors
    # relative error: a sample is written at the nearest pixel centre, where the true depth differs by
    # the depth gradient over up to half a pixel (large on the floor seen at a grazing angle)
    err = np.abs(reg[hit] - truth[hit]) / truth[hit]
    assert np.median(err) < 0.005 and (err < 0.02).mean() > 0.95
    # not registering (using the depth image as if it were aligned) is far off: the test can fail
    naive = np.asarray(__import__("cv2").resize(depth, (96, 72), interpolation=0))
    both = (naive > 0) & (truth > 0)
    assert (np.abs(naive[both] - truth[both]) / truth[both] < 0.02).mean() < 0.8
    filled = register_depth(depth, dintr, cintr, T, fill_holes=True)
    assert ((filled > 0) & (truth > 0)).mean() > hit.mean() + 0.2
    both = (filled > 0) & (truth > 0)
    assert (np.abs(filled - truth)[both] / truth[both] < 0.03).mean() > 0.9


def test_z_buffer_keeps_the_nearest_depth():
    """Two depth pixels that land on the same colour pixel: the nearer surface wins, as in
    depth_image_proc's register."""
    intr = CameraIntrinsics(10.0, 10.0, 2.0, 2.0, 5, 5)
    depth = np.zeros((5, 5), np.float32)
    depth[2, 2] = 2.0  # straight ahead at 2 m
    depth[2, 3] = 1.0  # one pixel right at 1 m: x = 0.1 m
    T = np.eye(4)
    T[0, 3] = -0.1  # the colour camera sits 0.1 m to the right: both samples fall on its pixel u=2 or 3
    reg = register_depth(depth, intr, intr, T)
    # sample 1: x = 0 - 0.1 = -0.1, z=2 -> u = 10 * -0.05 + 2 = 1.5 -> floor(2.0) = 2
    # sample 2: x = 0.1 - 0.1 = 0,  z=1 -> u = 2 -> 2: the nearer one (1 m) wins
    assert reg[2, 2] == pytest.approx(1.0)
    assert (reg > 0).sum() == 1
    far = depth.copy()
    far[2, 3] = 3.0  # now the second sample is farther: x = 0.3 - 0.1 = 0.2 -> u = 10*0.2/3 + 2 = 2.67 -> 3
    reg = register_depth(far, intr, intr, T)
    assert reg[2, 2] == pytest.approx(2.0) and reg[2, 3] == pytest.approx(3.0)


def test_registration_errors():
    intr = CameraIntrinsics(10.0, 10.0, 2.0, 2.0, 5, 5)
    with pytest.raises(ValueError, match="camera info says"):
        register_depth(np.ones((4, 4)), intr, intr, np.eye(4))
    with pytest.raises(ValueError, match="4x4"):
        register_depth(np.ones((5, 5)), intr, intr, np.full((4, 4), np.nan))
    behind = np.eye(4)
    behind[2, 3] = -5.0  # everything behind the colour camera: nothing lands
    assert not register_depth(np.ones((5, 5)), intr, intr, behind).any()
