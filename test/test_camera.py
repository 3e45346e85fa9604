"""Pinhole camera model: intrinsics, projection, depth images, back-projection."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sas_core.geometry.camera import (
    backproject_depth,
    depth_image_to_metres,
    intrinsics_from_camera_info,
    intrinsics_from_matrix,
    project_points,
    scale_intrinsics,
    world_to_camera,
)
from sas_core.types import CameraIntrinsics


def rot_z(deg):
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def pose_from(R, t):
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


# ---------------------------------------------------------------------------- intrinsics

def test_intrinsics_from_3x3_and_scannet_4x4():
    K = np.array([[577.870605, 0, 319.5], [0, 577.870605, 239.5], [0, 0, 1]])
    a = intrinsics_from_matrix(K, 640, 480)
    K4 = np.eye(4)
    K4[:3, :3] = K
    b = intrinsics_from_matrix(K4, 640, 480)
    assert a == b == CameraIntrinsics(577.870605, 577.870605, 319.5, 239.5, 640, 480)
    np.testing.assert_array_equal(a.K, K)


@pytest.mark.parametrize("K", [np.diag([0.0, 500.0, 1.0]), np.diag([500.0, -1.0, 1.0]),
                               np.array([[500, 0, np.nan], [0, 500, 10], [0, 0, 1]])])
def test_bad_intrinsics_are_rejected(K):
    with pytest.raises(ValueError):
        intrinsics_from_matrix(K, 640, 480)


def test_intrinsics_from_camera_info_ros2_ros1_and_dict():
    k = [500.0, 0.0, 320.0, 0.0, 510.0, 240.0, 0.0, 0.0, 1.0]
    ros2 = SimpleNamespace(k=k, width=640, height=480, binning_x=0, binning_y=0,
                           roi=SimpleNamespace(x_offset=0, y_offset=0, width=0, height=0))
    ros1 = SimpleNamespace(K=k, width=640, height=480)
    as_dict = {"k": np.array(k), "width": 640, "height": 480}
    want = CameraIntrinsics(500.0, 510.0, 320.0, 240.0, 640, 480)
    assert intrinsics_from_camera_info(ros2) == want
    assert intrinsics_from_camera_info(ros1) == want
    assert intrinsics_from_camera_info(as_dict) == want


def test_camera_info_binning_and_roi():
    k = [500.0, 0.0, 319.5, 0.0, 500.0, 239.5, 0.0, 0.0, 1.0]
    binned = intrinsics_from_camera_info(dict(k=k, width=640, height=480, binning_x=2, binning_y=2))
    assert (binned.width, binned.height) == (320, 240)
    assert binned.fx == pytest.approx(250.0) and binned.cx == pytest.approx(159.5)
    roi = SimpleNamespace(x_offset=100, y_offset=50, width=200, height=100)
    cropped = intrinsics_from_camera_info(SimpleNamespace(k=k, width=640, height=480, roi=roi))
    assert (cropped.width, cropped.height) == (200, 100)
    assert (cropped.cx, cropped.cy, cropped.fx) == (219.5, 189.5, 500.0)


@pytest.mark.parametrize("info", [dict(k=[0.0] * 9, width=640, height=480),
                                  dict(k=[1.0] * 4, width=640, height=480),
                                  dict(width=640, height=480)])
def test_camera_info_errors(info):
    with pytest.raises(ValueError):
        intrinsics_from_camera_info(info)


def test_rescale_conventions():
    scannet = CameraIntrinsics(577.870605, 577.870605, 319.5, 239.5, 640, 480)
    for conv in ("edge", "openscene"):
        s = scale_intrinsics(scannet, 320, 240, conv)
        assert s.fx == pytest.approx(288.9353025) and s.fy == pytest.approx(288.9353025)
        assert (s.cx, s.cy, s.width, s.height) == (pytest.approx(159.5), pytest.approx(119.5), 320, 240)
    off = CameraIntrinsics(600.0, 600.0, 300.0, 200.0, 640, 480)
    edge = scale_intrinsics(off, 320, 240, "edge")
    osc = scale_intrinsics(off, 320, 240, "openscene")
    assert edge.cx == pytest.approx((300.0 + 0.5) * 0.5 - 0.5)
    assert osc.cx == pytest.approx(300.0 * 319 / 639)  # OpenScene's adjust_intrinsic
    assert osc.cy == pytest.approx(200.0 * 239 / 479)
    with pytest.raises(ValueError):
        scale_intrinsics(off, 320, 240, "bilinear")


# ---------------------------------------------------------------------------- projection

def test_projection_hand_computed_identity_pose():
    intr = CameraIntrinsics(100.0, 200.0, 50.0, 40.0, 128, 256)
    pts = np.array([[1.0, 2.0, 4.0], [0.0, 0.0, 2.0], [-0.5, 0.25, 0.5]], dtype=np.float32)
    uv, z = project_points(pts, np.eye(4), intr)
    np.testing.assert_allclose(uv, [[75.0, 140.0], [50.0, 40.0], [-50.0, 140.0]], atol=1e-5)
    np.testing.assert_allclose(z, [4.0, 2.0, 0.5])
    assert uv.dtype == np.float32 and z.dtype == np.float32


def test_projection_hand_computed_rotated_translated_pose():
    intr = CameraIntrinsics(500.0, 500.0, 320.0, 240.0, 640, 480)
    R, t = rot_z(90.0), np.array([1.0, 2.0, 3.0])
    pose = pose_from(R, t)
    cam_pts = np.array([[0.5, -0.25, 2.0], [0.0, 0.0, 1.0], [0.1, 0.1, -1.0]])
    world = cam_pts @ R.T + t
    # hand check of one world point: camera x axis is world +y, so a camera x of 0.5 is +0.5 in y
    np.testing.assert_allclose(world[0], [1.25, 2.5, 5.0])
    uv, z = project_points(world, pose, intr)
    np.testing.assert_allclose(uv[0], [320 + 500 * 0.25, 240 - 500 * 0.125], atol=1e-3)
    np.testing.assert_allclose(uv[1], [320, 240], atol=1e-3)
    np.testing.assert_allclose(z, [2.0, 1.0, -1.0], atol=1e-5)  # last one is behind the camera
    np.testing.assert_allclose(world_to_camera(pose) @ pose, np.eye(4), atol=1e-12)


def test_projection_accepts_torch_and_matches_numpy():
    rng = np.random.default_rng(0)
    intr = CameraIntrinsics(300.0, 310.0, 160.0, 120.0, 320, 240)
    pose = pose_from(rot_z(30.0), [0.3, -0.2, 0.1])
    pts = rng.normal(size=(100, 3)).astype(np.float32) + [0, 0, 5]
    uv, z = project_points(pts, pose, intr)
    uv_t, z_t = project_points(torch.from_numpy(pts), pose, intr)
    assert isinstance(uv_t, torch.Tensor) and uv_t.shape == (100, 2) and uv_t.dtype == torch.float32
    np.testing.assert_allclose(uv_t.numpy(), uv, atol=1e-3)
    np.testing.assert_allclose(z_t.numpy(), z, atol=1e-5)


@pytest.mark.parametrize("pose", [np.eye(3), np.full((4, 4), np.nan), np.ones((4, 4))])
def test_bad_pose_is_rejected(pose):
    with pytest.raises(ValueError):
        project_points(np.zeros((1, 3)), pose, CameraIntrinsics(1, 1, 0, 0, 2, 2))


# ---------------------------------------------------------------------------- depth images

def test_depth_image_to_metres_16uc1_and_32fc1():
    mm = np.array([[0, 1000, 65535], [1, 250, 4000]], dtype=np.uint16)
    m = depth_image_to_metres(mm, "16UC1")
    np.testing.assert_allclose(m, [[0.0, 1.0, 65.535], [0.001, 0.25, 4.0]], rtol=1e-6)
    assert m.dtype == np.float32
    np.testing.assert_allclose(depth_image_to_metres(mm, "16UC1", depth_scale=4000.0)[1, 2], 1.0)
    f = np.array([[np.nan, -1.0, np.inf], [0.0, 1.5, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(depth_image_to_metres(f, "32FC1"), [[0, 0, 0], [0, 1.5, 2.0]])
    with pytest.raises(ValueError):
        depth_image_to_metres(mm, "rgb8")
    with pytest.raises(ValueError):
        depth_image_to_metres(f, "16UC1")  # float data labelled as millimetres


def test_backproject_hand_computed_and_invalid_depth_dropped():
    intr = CameraIntrinsics(2.0, 4.0, 1.0, 1.0, 4, 3)
    depth = np.array([[np.nan, 0.0, -1.0, np.inf],
                      [1.0, 2.0, 9.0, 3.0],
                      [0.5, 0.0, 0.0, 0.0]], dtype=np.float32)
    pts, idx = backproject_depth(depth, intr, max_depth=5.0)
    np.testing.assert_array_equal(idx, [4, 5, 7, 8])  # 9 m is beyond max_depth
    want = [[(0 - 1) * 1.0 / 2, 0.0, 1.0],  # (u=0, v=1)
            [0.0, 0.0, 2.0],  # (u=1, v=1)
            [(3 - 1) * 3.0 / 2, 0.0, 3.0],  # (u=3, v=1)
            [(0 - 1) * 0.5 / 2, (2 - 1) * 0.5 / 4, 0.5]]  # (u=0, v=2)
    np.testing.assert_allclose(pts, want, atol=1e-6)
    # millimetre images are accepted directly
    mm = np.where(np.isfinite(depth) & (depth > 0), depth * 1000, 0).astype(np.uint16)
    pts_mm, idx_mm = backproject_depth(mm, intr)
    np.testing.assert_array_equal(idx_mm, [4, 5, 6, 7, 8])
    with pytest.raises(ValueError):
        backproject_depth(depth[:2], intr)


def test_backproject_then_project_returns_pixel_centres():
    rng = np.random.default_rng(1)
    intr = CameraIntrinsics(250.0, 260.0, 79.5, 59.5, 160, 120)
    pose = pose_from(rot_z(-40.0) @ np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]]), [1.0, -2.0, 0.7])
    depth = rng.uniform(0.5, 4.0, size=(120, 160)).astype(np.float32)
    depth[rng.random(depth.shape) < 0.2] = 0.0
    pts, idx = backproject_depth(depth, intr, pose)
    uv, z = project_points(pts, pose, intr)
    v, u = np.divmod(idx, 160)
    np.testing.assert_allclose(uv, np.stack([u, v], 1), atol=2e-3)
    np.testing.assert_allclose(z, depth.reshape(-1)[idx], rtol=1e-5)
    assert len(idx) == int((depth > 0).sum())
