"""sas_core.data.msg_codec at its edges: the cases the mutation run (`make mutate`) found unchecked.

Each test pins one behaviour a plausible regression would change: buffer-size bounds, defaults of
missing fields, ROS 1 field names, unit conversions, channel orders and the carry of a stamp."""

from types import SimpleNamespace as NS

import numpy as np
import pytest

from sas_core.data import msg_codec as mc
from sas_core.types import CameraIntrinsics


# ------------------------------------------------------------------ images

def test_last_row_needs_no_padding_but_every_byte_of_it():
    """A 3x2 rgb8 image with step 8 (2 bytes of row padding): the last row needs 6 bytes, not 8."""
    rows = [bytes(range(10 * r, 10 * r + 6)) + b"\xee\xee" for r in range(3)]
    data = b"".join(rows)[:-2]  # the last row without its padding: 22 bytes
    img = mc.image_to_numpy(NS(encoding="rgb8", height=3, width=2, step=8, data=data))
    assert img.shape == (3, 2, 3)
    np.testing.assert_array_equal(img[2].reshape(-1), np.arange(20, 26))
    with pytest.raises(ValueError, match="21 bytes.*need 22"):
        mc.image_to_numpy(NS(encoding="rgb8", height=3, width=2, step=8, data=data[:-1]))


def test_dict_message_with_defaults():
    """Messages as dicts (rosbags' plain form); a missing step is the row size, a missing
    is_bigendian is little-endian."""
    values = np.array([[1, 258], [513, 65535]], dtype="<u2")
    img = mc.image_to_numpy({"encoding": "16UC1", "height": 2, "width": 2, "data": values.tobytes()})
    np.testing.assert_array_equal(img, values)
    big = mc.image_to_numpy({"encoding": "16UC1", "height": 2, "width": 2, "is_bigendian": True,
                             "data": values.astype(">u2").tobytes()})
    np.testing.assert_array_equal(big, values)
    assert img.dtype == np.uint16 and img.dtype.byteorder in ("=", "<", "|")


def test_empty_images_keep_their_shape():
    assert mc.image_to_numpy(NS(encoding="rgb8", height=0, width=4, step=12, data=b"")).shape == (0, 4, 3)
    assert mc.image_to_numpy(NS(encoding="bgra8", height=2, width=0, step=0, data=b"")).shape == (2, 0, 3)
    assert mc.image_to_numpy(NS(encoding="mono16", height=0, width=5, step=10, data=b"")).shape == (0, 5)


def test_bgra_decodes_to_rgb_and_encodes_with_alpha():
    bgra = np.array([[[10, 20, 30, 40]]], np.uint8)
    rgb = mc.image_to_numpy(NS(encoding="bgra8", height=1, width=1, step=4, data=bgra.tobytes()))
    np.testing.assert_array_equal(rgb[0, 0], [30, 20, 10])
    fields = mc.image_fields(np.array([[[30, 20, 10, 40]]], np.uint8), "bgra8")
    np.testing.assert_array_equal(fields["data"], [10, 20, 30, 40])


def test_image_fields_squeezes_a_single_channel_and_checks_channels():
    a = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    f = mc.image_fields(a, "mono8")
    assert (f["height"], f["width"], f["step"]) == (2, 3, 3)
    np.testing.assert_array_equal(f["data"], np.arange(6))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        mc.image_fields(np.zeros((2, 3, 2), np.uint8), "rgb8")
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        mc.image_fields(np.zeros((2, 3, 2), np.uint8), "mono8")


def test_metres_to_16uc1_rounds_and_marks_invalid_zero():
    depth = np.array([[0.5, 0.0004, 0.0006, -1.0], [np.nan, np.inf, 0.0, 70.0]], np.float32)
    f = mc.image_fields(depth, "16UC1")
    mm = np.frombuffer(f["data"].tobytes(), dtype=np.uint16).reshape(2, 4)
    np.testing.assert_array_equal(mm, [[500, 0, 1, 0], [0, 0, 0, 65535]])


# ------------------------------------------------------------------ clouds

def test_pointfield_defaults_count_one_and_little_endian():
    fields = [NS(name="x", offset=0, datatype=mc.FLOAT32), NS(name="i", offset=4, datatype=mc.UINT16)]
    dt = mc.pointcloud2_dtype(fields, 8)
    assert dt["x"] == np.dtype("<f4") and dt["i"] == np.dtype("<u2") and dt["x"].shape == ()
    assert mc.pointcloud2_dtype(fields, 8, is_bigendian=True)["x"] == np.dtype(">f4")


def test_make_cloud_array_columns_and_bounds():
    pos = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    arr = mc.make_cloud_array(pos, labels=np.array([0, np.iinfo(np.uint32).max]), scores=[0.25, 1.5])
    np.testing.assert_array_equal(np.stack([arr["x"], arr["y"], arr["z"]], 1), pos)
    assert arr.dtype["x"] == np.float32 and arr.dtype["score"] == np.float32
    np.testing.assert_array_equal(arr["score"], [0.25, 1.5])
    assert arr["label"][1] == np.iinfo(np.uint32).max
    for bad in ([-1, 0], [0, np.iinfo(np.uint32).max + 1]):
        with pytest.raises(ValueError, match="uint32"):
            mc.make_cloud_array(pos, labels=np.array(bad, np.int64))
    np.testing.assert_array_equal(mc.cloud_xyz(arr), pos.astype(np.float32))
    assert mc.cloud_xyz(arr).dtype == np.float32


def test_rgb_packing_of_float_and_rgba_colours():
    packed = mc.pack_rgb(np.array([[1.0, 0.5, 0.0], [1.2, -0.1, 0.6]]))  # x 255, rounded, clipped
    np.testing.assert_array_equal(packed.view(np.uint32), [0xFF8000, 0xFF0099])
    rgba = np.array([[1, 2, 3, 255]], np.uint8)
    assert mc.pack_rgb(rgba).view(np.uint32)[0] == 0x010203
    u32 = np.array([0x0A0B0C, 0xFFFFFF], np.uint32)
    np.testing.assert_array_equal(mc.unpack_rgb(u32), [[10, 11, 12], [255, 255, 255]])
    np.testing.assert_array_equal(mc.unpack_rgb(u32.view(np.float32)), mc.unpack_rgb(u32))
    assert mc.unpack_rgb(u32).shape == (2, 3) and mc.unpack_rgb(u32).dtype == np.uint8
    # 8-byte packed values (an rgb field read as float64 by a careless writer) are taken by value
    np.testing.assert_array_equal(mc.unpack_rgb(np.array([0x0A0B0C], np.uint64)), [[10, 11, 12]])


# ------------------------------------------------------------------ camera info, stamps, poses

def test_camera_info_ros1_names_and_bad_sizes():
    K = [300.0, 0.0, 160.0, 0.0, 310.0, 120.0, 0.0, 0.0, 1.0]
    intr = mc.camera_info_to_intrinsics({"K": K, "width": 320, "height": 240})
    assert (intr.fx, intr.fy, intr.cx, intr.cy, intr.width, intr.height) == (300.0, 310.0, 160.0, 120.0, 320, 240)
    with pytest.raises(ValueError, match="9 entries"):
        mc.camera_info_to_intrinsics({"k": K[:8], "width": 320, "height": 240})
    with pytest.raises(ValueError, match="width must be an integer"):
        mc.camera_info_to_intrinsics({"k": K, "width": 320.5, "height": 240})
    with pytest.raises(ValueError, match="height must be >= 0"):
        mc.camera_info_to_intrinsics({"k": K, "width": 320, "height": -2})


def test_camera_info_fields_are_plumb_bob_without_distortion():
    f = mc.intrinsics_to_camera_info_fields(CameraIntrinsics(fx=300.0, fy=310.0, cx=160.0, cy=120.0,
                                                              width=320, height=240))
    assert f["d"] == [0.0] * 5 and f["r"] == np.eye(3).reshape(-1).tolist()
    assert f["k"] == [300.0, 0.0, 160.0, 0.0, 310.0, 120.0, 0.0, 0.0, 1.0]
    assert f["p"] == [300.0, 0.0, 160.0, 0.0, 0.0, 310.0, 120.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_stamps_ros1_names_defaults_and_carry():
    assert mc.stamp_to_seconds(None) == 0.0 and mc.stamp_to_seconds(3) == 3.0
    assert mc.stamp_to_seconds(NS(secs=4, nsecs=500_000_000)) == 4.5
    assert mc.stamp_to_seconds(NS(sec=5)) == 5.0 and mc.stamp_to_seconds(NS(nanosec=250_000_000)) == 0.25
    assert mc.seconds_to_stamp(1.9999999999) == (2, 0)  # rounds up to a whole second: carried
    assert mc.seconds_to_stamp(1.9999999990) == (1, 999_999_999)
    assert mc.seconds_to_stamp(-0.25) == (-1, 750_000_000)


def test_quaternions_normalise_and_keep_w_positive():
    from scipy.spatial.transform import Rotation

    q = Rotation.from_euler("xyz", [0.3, -0.2, 1.1]).as_quat()
    np.testing.assert_allclose(mc.quaternion_to_matrix(3.0 * q), Rotation.from_quat(q).as_matrix(), atol=1e-12)
    with pytest.raises(ValueError, match="norm"):
        mc.quaternion_to_matrix([0.0, 0.0, 0.0, 1e-13])
    R = Rotation.from_euler("x", 200, degrees=True).as_matrix()  # SciPy's own quaternion has w < 0
    assert Rotation.from_matrix(R).as_quat()[3] < 0
    out = mc.matrix_to_quaternion(R)
    assert out[3] > 0 and np.isclose(np.linalg.norm(out), 1.0)
    np.testing.assert_allclose(mc.quaternion_to_matrix(out), R, atol=1e-12)
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, [1.0, 2.0, 3.0]
    xyz, quat = mc.matrix_to_pose(T)
    np.testing.assert_allclose(mc.pose_to_matrix(xyz, quat), T, atol=1e-12)


def test_pose_messages_need_both_halves():
    p = NS(x=1.0, y=2.0, z=3.0)
    o = NS(x=0.0, y=0.0, z=0.0, w=1.0)
    deep = NS(pose=NS(pose=NS(pose=NS(position=p, orientation=o))))
    np.testing.assert_allclose(mc.pose_msg_to_matrix(deep)[:3, 3], [1, 2, 3])
    for half in (NS(position=p), NS(orientation=o), NS(translation=p), NS(rotation=o)):
        with pytest.raises(ValueError, match="has no pose"):
            mc.pose_msg_to_matrix(half)
    # unwrapping is bounded (4 levels; the deepest real message, PoseWithCovarianceStamped, has 2)
    too_deep = NS(pose=NS(pose=NS(pose=NS(pose=NS(position=p, orientation=o)))))
    with pytest.raises(ValueError, match="has no pose"):
        mc.pose_msg_to_matrix(too_deep)
