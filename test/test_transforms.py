"""The ROS-free transform buffer against hand-computed chains, interpolation and extrapolation,
and against the synthetic trajectory's ground-truth camera poses through a REP 105 tree."""

import math
from types import SimpleNamespace as NS

import numpy as np
import pytest

from sas_core.geometry.transforms import TransformBuffer, TransformError


def rot_z(deg, t=(0.0, 0.0, 0.0)):
    a = math.radians(deg)
    T = np.eye(4)
    T[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    T[:3, 3] = t
    return T


def trans(x, y, z):
    T = np.eye(4)
    T[:3, 3] = (x, y, z)
    return T


def test_chain_through_common_ancestor_by_hand():
    buf = TransformBuffer()
    buf.set_transform("map", "a", 0.0, trans(1, 0, 0), static=True)
    buf.set_transform("a", "b", 0.0, rot_z(90), static=True)
    buf.set_transform("map", "c", 0.0, trans(0, 2, 0), static=True)
    # a point at the origin of b: in a it is (0,0,0), in map (1,0,0), in c (1,-2,0)
    p = np.array([0.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(buf.lookup("map", "b") @ p, [1, 0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(buf.lookup("c", "b") @ p, [1, -2, 0, 1], atol=1e-12)
    # x axis of b is y in a (rotated 90 deg about z): (1,0,0)_b -> (0,1,0)_a -> (1,1,0)_map
    np.testing.assert_allclose(buf.lookup("map", "b") @ [1, 0, 0, 1], [1, 1, 0, 1], atol=1e-12)
    # inverse direction is the inverse matrix
    np.testing.assert_allclose(buf.lookup("b", "c") @ buf.lookup("c", "b"), np.eye(4), atol=1e-12)
    np.testing.assert_allclose(buf.lookup("b", "b"), np.eye(4))
    # leading slashes are dropped as tf2 does
    np.testing.assert_allclose(buf.lookup("/map", "/b"), buf.lookup("map", "b"))


def test_interpolation_linear_translation_and_slerp_rotation():
    buf = TransformBuffer()
    buf.set_transform("odom", "base", 10.0, rot_z(0, (0, 0, 0)))
    buf.set_transform("odom", "base", 12.0, rot_z(90, (2, 4, 0)))
    T = buf.lookup("odom", "base", 10.5)  # a quarter of the way
    np.testing.assert_allclose(T[:3, 3], [0.5, 1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(T, rot_z(22.5, (0.5, 1.0, 0.0)), atol=1e-9)
    # exact samples are returned as stored
    np.testing.assert_allclose(buf.lookup("odom", "base", 12.0), rot_z(90, (2, 4, 0)), atol=1e-12)
    # out-of-order inserts are sorted
    buf.set_transform("odom", "base", 11.0, rot_z(10, (1, 1, 1)))
    np.testing.assert_allclose(buf.lookup("odom", "base", 11.0), rot_z(10, (1, 1, 1)), atol=1e-12)
    np.testing.assert_allclose(buf.lookup("odom", "base", 11.5)[:3, 3], [1.5, 2.5, 0.5], atol=1e-12)


def test_extrapolation_is_refused_and_says_by_how_much():
    buf = TransformBuffer()
    buf.set_transform("odom", "base", 10.0, np.eye(4))
    buf.set_transform("odom", "base", 11.0, np.eye(4))
    with pytest.raises(TransformError) as err:
        buf.lookup("odom", "base", 11.25)
    assert err.value.reason == "extrapolation"
    assert "0.250 s into the future" in str(err.value) and "odom -> base" in str(err.value)
    with pytest.raises(TransformError, match="0.500 s into the past"):
        buf.lookup("base", "odom", 9.5)
    assert not buf.can_transform("odom", "base", 12.0)
    assert buf.can_transform("odom", "base", 10.7)


def test_latest_common_time_of_a_chain():
    buf = TransformBuffer()
    buf.set_transform("map", "odom", 0.0, np.eye(4), static=True)
    for t, x in ((1.0, 0.0), (2.0, 1.0), (3.0, 2.0)):
        buf.set_transform("odom", "base", t, trans(x, 0, 0))
    for t, y in ((1.0, 0.0), (2.0, 10.0)):  # this link stops at t = 2
        buf.set_transform("base", "arm", t, trans(0, y, 0))
    # latest common time is 2.0: base at x=1, arm at y=10
    np.testing.assert_allclose(buf.lookup("map", "arm")[:3, 3], [1, 10, 0])
    # only the base link: its own newest sample
    np.testing.assert_allclose(buf.lookup("map", "base")[:3, 3], [2, 0, 0])


def test_static_holds_at_all_times_and_dynamic_history_is_pruned():
    buf = TransformBuffer(cache_time=5.0)
    buf.set_transform("base", "cam", 100.0, trans(0, 0, 1), static=True)
    for t in range(20):
        buf.set_transform("odom", "base", float(t), trans(t, 0, 0))
    np.testing.assert_allclose(buf.lookup("base", "cam", -1e6)[:3, 3], [0, 0, 1])
    info = buf.frames()
    assert info["cam"]["static"] and info["cam"]["rate_hz"] is None
    assert info["base"]["first"] == 14.0 and info["base"]["last"] == 19.0  # 5 s behind the newest
    assert info["base"]["rate_hz"] == pytest.approx(1.0)
    with pytest.raises(TransformError, match="into the past"):
        buf.lookup("odom", "base", 13.0)


def test_unknown_disconnected_loop_and_invalid():
    buf = TransformBuffer()
    buf.set_transform("map", "odom", 0.0, np.eye(4), static=True)
    buf.set_transform("world", "robot2", 0.0, np.eye(4), static=True)
    with pytest.raises(TransformError) as err:
        buf.lookup("map", "camera")
    assert err.value.reason == "unknown_frame" and "'camera'" in str(err.value) and "odom" in str(err.value)
    with pytest.raises(TransformError) as err:
        buf.lookup("map", "robot2")
    assert err.value.reason == "disconnected" and "'world'" in str(err.value)
    buf.set_transform("a", "b", 0.0, np.eye(4), static=True)
    buf.set_transform("b", "c", 0.0, np.eye(4), static=True)
    buf.set_transform("c", "a", 0.0, np.eye(4), static=True)
    with pytest.raises(TransformError) as err:
        buf.lookup("map", "a")
    assert err.value.reason == "loop" and "a -> c -> b -> a" in str(err.value).replace("'", "")
    bad = np.eye(4)
    bad[0, 0] = np.nan
    for args in (("m", "m", 0.0, np.eye(4)), ("m", "x", 0.0, bad), ("m", "x", 0.0, 2 * np.eye(4)),
                 ("m", "x", float("nan"), np.eye(4)), ("", "x", 0.0, np.eye(4))):
        with pytest.raises(TransformError) as err:
            buf.set_transform(*args)
        assert err.value.reason == "invalid"
    with pytest.raises(TransformError, match="not normalised"):
        buf.set_transform_quat("m", "x", 0.0, (0, 0, 0), (0, 0, 0, 2))


def _tf_msg(entries):
    """A duck-typed tf2_msgs/TFMessage: entries of (parent, child, sec, nanosec, xyz, xyzw)."""
    out = []
    for parent, child, sec, nsec, xyz, q in entries:
        out.append(NS(header=NS(frame_id=parent, stamp=NS(sec=sec, nanosec=nsec)), child_frame_id=child,
                      transform=NS(translation=NS(x=xyz[0], y=xyz[1], z=xyz[2]),
                                   rotation=NS(x=q[0], y=q[1], z=q[2], w=q[3]))))
    return NS(transforms=out)


def test_tf_messages_with_ros_stamps():
    buf = TransformBuffer()
    s = math.sqrt(0.5)
    n = buf.add_tf_message(_tf_msg([("base_link", "camera_link", 0, 0, (0.1, 0, 0.5), (0, 0, 0, 1)),
                                    ("camera_link", "camera_optical", 0, 0, (0, 0, 0), (-0.5, 0.5, -0.5, 0.5))]),
                           static=True)
    assert n == 2
    buf.add_tf_message(_tf_msg([("odom", "base_link", 1_700_000_000, 0, (0, 0, 0), (0, 0, 0, 1))]))
    buf.add_tf_message(_tf_msg([("odom", "base_link", 1_700_000_000, 500_000_000, (1, 0, 0), (0, 0, s, s))]))
    T = buf.lookup("odom", "camera_optical", 1_700_000_000.25)
    # REP 103: the optical z axis (forward) is the body x axis; at t+0.25 the base yawed 45 deg
    forward = T[:3, :3] @ [0, 0, 1]
    np.testing.assert_allclose(forward, [s, s, 0], atol=1e-9)
    assert buf.frames()["base_link"]["rate_hz"] == pytest.approx(2.0)


def test_ground_truth_camera_poses_through_a_four_link_tree():
    """map -> odom (static offset) -> base_link (30 Hz odometry) -> camera_link (static mount) ->
    camera_color_optical_frame (static REP 103 rotation): looked up at the camera's own stamps
    (between odometry samples), the chain gives the synthetic trajectory's ground-truth pose."""
    from sas_core.data.synthetic import SynthConfig, _camera_pose

    config = SynthConfig()
    room = (6.0, 5.0, 2.8)
    T_map_odom = rot_z(30, (0.5, -0.2, 0.0))
    T_base_link = trans(0.2, 0.0, 1.1)  # camera_link in base_link
    T_link_optical = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=float)
    T_base_optical = T_base_link @ T_link_optical
    buf = TransformBuffer(cache_time=math.inf)
    buf.set_transform("map", "odom", 0.0, T_map_odom, static=True)
    buf.set_transform("base_link", "camera_link", 0.0, T_base_link, static=True)
    buf.set_transform("camera_link", "camera_color_optical_frame", 0.0, T_link_optical, static=True)
    t0 = 1_700_000_000.0
    for k in range(0, 91):  # 3 s of odometry at 30 Hz
        t = t0 + k / 30.0
        T_odom_base = np.linalg.inv(T_map_odom) @ _camera_pose(room, config, t - t0) @ np.linalg.inv(T_base_optical)
        buf.set_transform("odom", "base_link", t, T_odom_base)
    errors = []
    for k in range(0, 40):  # camera at 13 Hz, never on an odometry stamp except t0
        t = t0 + k / 13.0
        T = buf.lookup("map", "camera_color_optical_frame", t)
        gt = _camera_pose(room, config, t - t0)
        errors.append(np.linalg.norm(T[:3, 3] - gt[:3, 3]))
        angle = np.arccos(np.clip((np.trace(T[:3, :3].T @ gt[:3, :3]) - 1) / 2, -1, 1))
        assert angle < math.radians(0.5)
    assert max(errors) < 5e-3, max(errors)  # interpolation between 33 ms samples of a smooth path
    np.testing.assert_allclose(buf.lookup("map", "camera_color_optical_frame", t0), _camera_pose(room, config, 0.0),
                               atol=1e-9)
