"""sas_ros.conversions: rclpy messages <-> NumPy, cross-checked with CDR (de)serialisation and rosbags."""

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytestmark = pytest.mark.ros


def _roundtrip_cdr(msg):
    """Serialise with rclpy, deserialise with rosbags (a second, independent implementation)."""
    from rclpy.serialization import serialize_message
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    return ts.deserialize_cdr(serialize_message(msg), type(msg).__module__.split(".")[0] + "/msg/" + type(msg).__name__)


def test_pointfield_constants_match_codec():
    from sensor_msgs.msg import PointField

    from sas_core.data import msg_codec as mc

    assert [PointField.INT8, PointField.UINT8, PointField.INT16, PointField.UINT16, PointField.INT32,
            PointField.UINT32, PointField.FLOAT32, PointField.FLOAT64] == list(range(1, 9))
    for code, dt in mc.POINTFIELD_DTYPES.items():
        assert dt.itemsize == {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 8: 8}[code]


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "mono8", "16UC1", "32FC1"])
def test_image_messages(encoding):
    from sas_ros import conversions as conv

    rng = np.random.default_rng(0)
    shape = (6, 9, 3) if encoding in ("rgb8", "bgr8") else (6, 9)
    array = {"16UC1": rng.integers(0, 65535, shape).astype(np.uint16),
             "32FC1": rng.random(shape).astype(np.float32)}.get(encoding, rng.integers(0, 256, shape).astype(np.uint8))
    msg = conv.numpy_to_image(array, encoding, "cam", 12.5)
    assert msg.header.frame_id == "cam" and conv.stamp_seconds(msg.header.stamp) == 12.5
    np.testing.assert_array_equal(conv.image_to_numpy(msg), array)
    np.testing.assert_array_equal(conv.image_to_numpy(_roundtrip_cdr(msg)), array)  # rosbags sees the same


def test_cloud_messages_identical_across_implementations():
    from sas_core.data import msg_codec as mc
    from sas_ros import conversions as conv

    rng = np.random.default_rng(1)
    n = 257
    dtype = np.dtype([("x", "f4"), ("y", "f4"), ("z", "f4"), ("rgb", "f4"), ("label", "u4"), ("score", "f4"),
                      ("ring", "u2"), ("t", "f8"), ("i8", "i1"), ("u8", "u1"), ("i16", "i2"), ("i32", "i4"),
                      ("normal", "f4", (3,))])
    arr = np.zeros(n, dtype)
    for name in dtype.names:
        arr[name] = rng.integers(0, 100, size=arr[name].shape)
    arr["x"][5] = np.nan
    arr["rgb"] = mc.pack_rgb(rng.integers(0, 256, (n, 3)).astype(np.uint8))
    msg = conv.array_to_cloud(arr, "map", 3.0)
    assert msg.is_dense is False and msg.width == n and msg.height == 1
    assert [f.count for f in msg.fields][-1] == 3
    ours = conv.cloud_to_array(msg)
    theirs = mc.pointcloud2_to_array(_roundtrip_cdr(msg))  # rosbags-deserialised message, codec path
    for name in dtype.names:
        np.testing.assert_array_equal(ours[name], arr[name])
        np.testing.assert_array_equal(theirs[name], arr[name])
    assert len(conv.cloud_to_array(msg, remove_nans=True)) == n - 1
    direct = mc.pointcloud2_to_array(msg)  # the codec on the rclpy message itself
    for name in dtype.names:
        np.testing.assert_array_equal(direct[name], ours[name])


def test_cloud_decoding_matches_sensor_msgs_py():
    """The reference cross-check: runs on a full ROS install, reported as a skip elsewhere."""
    pc2 = pytest.importorskip("sensor_msgs_py.point_cloud2", reason="sensor_msgs_py has no PyPI wheel")
    from sas_core.data import msg_codec as mc
    from sas_ros import conversions as conv

    rng = np.random.default_rng(2)
    arr = np.zeros(33, np.dtype([("x", "f4"), ("y", "f4"), ("z", "f4"), ("intensity", "f4"), ("ring", "u2")]))
    for name in arr.dtype.names:
        arr[name] = rng.integers(0, 100, size=33)
    arr["z"][3] = np.nan
    msg = conv.array_to_cloud(arr, "lidar", 1.0)
    ref = pc2.read_points(msg, skip_nans=False)  # pragma: no cover
    ours = mc.pointcloud2_to_array(msg)  # pragma: no cover
    for name in arr.dtype.names:  # pragma: no cover
        np.testing.assert_array_equal(np.asarray(ref[name]), ours[name])


def test_xyz_cloud_fields():
    from sas_ros import conversions as conv

    msg = conv.xyz_cloud(np.ones((4, 3)), "map", colors=np.full((4, 3), 255, np.uint8), labels=np.arange(4),
                         scores=np.linspace(0, 1, 4))
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == [
        ("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1), ("rgb", 12, 7, 1), ("label", 16, 6, 1), ("score", 20, 7, 1)]
    assert msg.point_step == 24 and msg.row_step == 96 and len(msg.data) == 96


def test_camera_info_and_poses():
    from geometry_msgs.msg import PoseStamped, TransformStamped
    from nav_msgs.msg import Odometry
    from scipy.spatial.transform import Rotation

    from sas_core.types import CameraIntrinsics
    from sas_ros import conversions as conv

    intr = CameraIntrinsics(525.0, 520.0, 319.5, 239.5, 640, 480)
    info = conv.intrinsics_to_camera_info(intr, "cam")
    assert conv.camera_info_to_intrinsics(info) == intr
    assert conv.camera_info_to_intrinsics(_roundtrip_cdr(info)) == intr
    from sensor_msgs.msg import CameraInfo

    with pytest.raises(ValueError, match="not calibrated"):
        conv.camera_info_to_intrinsics(CameraInfo(width=640, height=480))
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler("xyz", [0.3, -0.2, 1.1]).as_matrix()
    T[:3, 3] = [1.0, -2.0, 0.5]
    pose = PoseStamped(pose=conv.matrix_to_pose_msg(T))
    np.testing.assert_allclose(conv.pose_msg_to_matrix(pose), T, atol=1e-12)
    odom = Odometry()
    odom.pose.pose = conv.matrix_to_pose_msg(T)
    np.testing.assert_allclose(conv.pose_msg_to_matrix(odom), T, atol=1e-12)
    tf = TransformStamped(transform=conv.matrix_to_transform_msg(T))
    np.testing.assert_allclose(conv.pose_msg_to_matrix(tf), T, atol=1e-12)
    np.testing.assert_allclose(conv.pose_msg_to_matrix(_roundtrip_cdr(pose)), T, atol=1e-12)


def test_approximate_sync_fallback():
    from types import SimpleNamespace as NS

    from sas_ros.sync import ApproximateSync

    def msg(t, tag):
        sec = int(t)
        return NS(header=NS(stamp=NS(sec=sec, nanosec=int(round((t - sec) * 1e9)))), tag=tag)

    out = []
    sync = ApproximateSync(2, lambda a, b: out.append((a.tag, b.tag)), queue_size=5, slop=0.02)
    sync.add(0, msg(10.000, "c0"))
    sync.add(0, msg(10.066, "c1"))
    sync.add(1, msg(10.070, "d1"))   # pairs with c1 (4 ms), not c0
    sync.add(1, msg(10.200, "d2"))   # no colour near it
    sync.add(0, msg(10.133, "c2"))   # 67 ms from d2: outside the slop
    sync.add(0, msg(10.205, "c3"))   # pairs with d2
    assert out == [("c1", "d1"), ("c3", "d2")]
    assert sync.matched == 2 and [len(q) for q in sync.queues] == [2, 0]  # c0 and c2 wait for partners
    # out of order across topics (as a multi-threaded executor delivers a fast replay): c0's depth
    # comes after later pairs and still pairs with it
    sync.add(1, msg(10.001, "d0"))
    assert out[-1] == ("c0", "d0") and sync.matched == 3
    # a full queue drops its oldest message, counted
    for k in range(6):
        sync.add(0, msg(20.0 + k, f"x{k}"))
    assert sync.unmatched == 2 and len(sync.queues[0]) == 5


def test_pose_buffer_tolerance():
    from sas_ros.poses import PoseBuffer, PoseUnavailable

    b = PoseBuffer()
    for i in range(10):
        T = np.eye(4)
        T[0, 3] = i
        b.add(100.0 + i * 0.1, T)
    assert b.lookup(100.51, 0.02)[0, 3] == 5
    assert b.lookup(100.44, 0.05)[0, 3] == 4
    with pytest.raises(PoseUnavailable, match="within"):
        b.lookup(100.55, 0.02)
    with pytest.raises(PoseUnavailable, match="within"):
        b.lookup(200.0, 0.05)
    with pytest.raises(PoseUnavailable, match="no pose"):
        PoseBuffer().lookup(1.0, 1.0)


def test_pose_buffer_says_when_waiting_cannot_help():
    """Poses of one stream come in order: a stamp with poses on both sides and none near it is a
    gap (no retry); before the first pose (a bag loop restarting) or after the last one (the pose
    not here yet) waiting may help."""
    from sas_ros.poses import PoseBuffer, PoseUnavailable

    b = PoseBuffer()
    for t in (10.0, 10.1, 10.4, 10.5):
        b.add(t, np.eye(4))
    for stamp, retry in ((10.25, False), (10.6, True), (11.0, True), (9.0, True), (10.44, False)):
        with pytest.raises(PoseUnavailable) as err:
            b.lookup(stamp, 0.03)
        assert err.value.retry is retry, stamp
        assert ("a gap in the poses" in str(err.value)) is not retry
    # just after the last pose, within the tolerance of a pose still to come: wait
    with pytest.raises(PoseUnavailable) as err:
        b.lookup(10.54, 0.03)
    assert err.value.retry
