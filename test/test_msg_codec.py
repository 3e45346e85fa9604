"""sas_core.data.msg_codec: NumPy <-> message fields, on plain objects and rosbags message classes."""

from types import SimpleNamespace as NS

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sas_core.data import msg_codec as mc


def _image(**fields):
    return NS(**fields)


# ------------------------------------------------------------------ images

@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "mono8", "16UC1", "32FC1", "rgba8"])
def test_image_roundtrip(encoding):
    rng = np.random.default_rng(1)
    shape = {"rgb8": (5, 7, 3), "bgr8": (5, 7, 3), "rgba8": (5, 7, 4), "mono8": (5, 7)}.get(encoding, (5, 7))
    if encoding == "16UC1":
        array = rng.integers(0, 65535, shape, dtype=np.uint16)
    elif encoding == "32FC1":
        array = rng.random(shape, dtype=np.float32) * 5
    else:
        array = rng.integers(0, 256, shape, dtype=np.uint8)
    fields = mc.image_fields(array, encoding)
    assert fields["data"].dtype == np.uint8 and fields["data"].ndim == 1
    assert fields["step"] * fields["height"] == fields["data"].size
    out = mc.image_to_numpy(_image(**fields))
    expected = array[:, :, :3] if encoding == "rgba8" else array
    assert out.dtype == expected.dtype
    np.testing.assert_array_equal(out, expected)


def test_bgr8_bytes_are_swapped():
    rgb = np.zeros((1, 2, 3), np.uint8)
    rgb[0, 0] = [10, 20, 30]
    fields = mc.image_fields(rgb, "bgr8")
    assert fields["data"][:3].tolist() == [30, 20, 10]
    out = mc.image_to_numpy(_image(height=1, width=2, encoding="bgr8", is_bigendian=0, step=6,
                                   data=bytes([1, 2, 3, 4, 5, 6])))
    assert out[0, 0].tolist() == [3, 2, 1] and out[0, 1].tolist() == [6, 5, 4]


def test_image_step_padding_and_bigendian():
    depth = np.array([[1000, 2], [65535, 0]], dtype=np.uint16)
    rows = [np.concatenate([depth[r].astype(">u2").view(np.uint8), [99, 99, 99]]) for r in range(2)]
    msg = _image(height=2, width=2, encoding="16UC1", is_bigendian=1, step=7,
                 data=np.concatenate(rows).astype(np.uint8).tobytes())
    np.testing.assert_array_equal(mc.image_to_numpy(msg), depth)
    metres = mc.depth_to_metres(msg)
    assert metres.dtype == np.float32
    np.testing.assert_allclose(metres, depth / 1000.0, rtol=1e-6)

    f = np.array([[1.5, np.nan, -1.0, np.inf]], np.float32)
    msg = _image(height=1, width=4, encoding="32FC1", is_bigendian=1, step=20,
                 data=np.concatenate([f.astype(">f4").view(np.uint8).ravel(), np.zeros(4, np.uint8)]))
    np.testing.assert_array_equal(mc.depth_to_metres(msg), [[1.5, 0, 0, 0]])


def test_image_bad_input():
    with pytest.raises(ValueError, match="unsupported image encoding"):
        mc.image_to_numpy(_image(height=1, width=1, encoding="yuv422", step=2, data=b"ab"))
    with pytest.raises(ValueError, match="bytes"):
        mc.image_to_numpy(_image(height=4, width=4, encoding="rgb8", step=12, data=b"\0" * 20))
    with pytest.raises(ValueError, match="step"):
        mc.image_to_numpy(_image(height=1, width=4, encoding="rgb8", step=4, data=b"\0" * 12))
    with pytest.raises(ValueError, match="16UC1|32FC1"):
        mc.depth_to_metres(_image(height=1, width=1, encoding="mono8", step=1, data=b"\0"))
    with pytest.raises(ValueError, match="shape"):
        mc.image_fields(np.zeros((3, 3), np.uint8), "rgb8")


def test_16uc1_from_metres():
    depth = np.array([[1.2344, np.nan], [0.0, 70.0]], np.float32)
    fields = mc.image_fields(depth, "16UC1")
    out = mc.image_to_numpy(_image(**fields))
    assert out.tolist() == [[1234, 0], [0, 65535]]


def test_image_with_rosbags_message_class():
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    Image, Header, Time = (ts.types[n] for n in ("sensor_msgs/msg/Image", "std_msgs/msg/Header",
                                                 "builtin_interfaces/msg/Time"))
    rgb = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    f = mc.image_fields(rgb, "rgb8")
    msg = Image(header=Header(stamp=Time(sec=3, nanosec=5), frame_id="cam"), **f)
    np.testing.assert_array_equal(mc.image_to_numpy(msg), rgb)
    assert mc.stamp_to_seconds(msg.header.stamp) == pytest.approx(3.000000005)


# ------------------------------------------------------------------ point clouds

ALL_TYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.float32, np.float64]


def _cloud_msg(fields: dict):
    return NS(**{**fields, "fields": [NS(name=n, offset=o, datatype=d, count=c) for n, o, d, c in fields["fields"]]})


@pytest.mark.parametrize("bigendian", [False, True])
def test_pointcloud2_all_types_roundtrip(bigendian):
    rng = np.random.default_rng(2)
    n = 17
    dtype = np.dtype([("x", np.float32), ("y", np.float32), ("z", np.float32)]
                     + [(f"f{i}", t) for i, t in enumerate(ALL_TYPES)] + [("normal", np.float32, (3,))])
    arr = np.zeros(n, dtype)
    for name in dtype.names:
        t = dtype[name].base
        if t.kind == "f":
            arr[name] = rng.normal(size=arr[name].shape) * 100
        else:
            info = np.iinfo(t)
            arr[name] = rng.integers(info.min, info.max, size=n, dtype=t, endpoint=True)
    fields = mc.pointcloud2_fields(arr, is_bigendian=bigendian)
    assert fields["is_bigendian"] is bigendian
    codes = {name: code for name, _, code, _ in fields["fields"]}
    assert [codes[f"f{i}"] for i in range(8)] == list(range(1, 9))
    assert dict((name, c) for name, _, _, c in fields["fields"])["normal"] == 3
    assert fields["point_step"] == dtype.itemsize and fields["data"].size == n * dtype.itemsize
    out = mc.pointcloud2_to_array(_cloud_msg(fields))
    assert out.dtype.names == dtype.names
    for name in dtype.names:
        np.testing.assert_array_equal(out[name], arr[name])
    if bigendian:  # the bytes of x really are big-endian
        assert fields["data"][:4].tobytes() == arr["x"][:1].astype(">f4").tobytes()


def test_pointcloud2_padding_row_step_and_unnamed_fields():
    # x,y,z float32 at offsets 0,4,8, 4 bytes pad, intensity at 16, point_step 32; row padding of 5 bytes.
    h, w, step = 2, 3, 32
    row_step = w * step + 5
    raw = np.full(h * row_step, 0xAB, np.uint8)
    xyz = np.arange(h * w * 3, dtype=np.float32).reshape(h, w, 3)
    inten = np.arange(h * w, dtype=np.float32).reshape(h, w) * 10
    for r in range(h):
        for c in range(w):
            base = r * row_step + c * step
            raw[base: base + 12] = xyz[r, c].view(np.uint8)
            raw[base + 16: base + 20] = inten[r, c:c + 1].view(np.uint8)
    msg = NS(height=h, width=w, point_step=step, row_step=row_step, is_bigendian=False, is_dense=True,
             data=raw.tobytes(),
             fields=[NS(name="x", offset=0, datatype=7, count=1), NS(name="y", offset=4, datatype=7, count=1),
                     NS(name="z", offset=8, datatype=7, count=1), NS(name="", offset=12, datatype=7, count=1),
                     NS(name="intensity", offset=16, datatype=7, count=1)])
    out = mc.pointcloud2_to_array(msg)
    assert out.dtype.names == ("x", "y", "z", "intensity") and len(out) == 6
    np.testing.assert_array_equal(mc.cloud_xyz(out), xyz.reshape(-1, 3))
    np.testing.assert_array_equal(out["intensity"], inten.reshape(-1))


def test_pointcloud2_keeps_layout_padding():
    dtype = np.dtype({"names": ["x", "y", "z", "label"], "formats": ["<f4", "<f4", "<f4", "<u4"],
                      "offsets": [0, 4, 8, 16], "itemsize": 24})
    arr = np.zeros(3, dtype)
    arr["x"] = [1, 2, 3]
    arr["label"] = [7, 8, 9]
    f = mc.pointcloud2_fields(arr)
    assert f["point_step"] == 24 and ("label", 16, mc.UINT32, 1) in f["fields"]
    out = mc.pointcloud2_to_array(_cloud_msg(f))
    assert out["label"].tolist() == [7, 8, 9] and out["x"].tolist() == [1, 2, 3]


def test_pointcloud2_nans_and_is_dense():
    arr = mc.make_cloud_array(np.array([[0, 0, 0], [np.nan, 1, 1], [2, 2, 2]], np.float32))
    f = mc.pointcloud2_fields(arr)
    assert f["is_dense"] is False
    assert len(mc.pointcloud2_to_array(_cloud_msg(f))) == 3
    kept = mc.pointcloud2_to_array(_cloud_msg(f), remove_nans=True)
    assert kept["x"].tolist() == [0, 2]
    assert mc.pointcloud2_fields(kept)["is_dense"] is True
    assert mc.cloud_xyz(arr).shape == (2, 3)


def test_pointcloud2_empty_and_bad():
    arr = mc.make_cloud_array(np.zeros((0, 3)), labels=np.zeros(0, np.int64))
    f = mc.pointcloud2_fields(arr)
    out = mc.pointcloud2_to_array(_cloud_msg(f))
    assert len(out) == 0 and out.dtype.names == ("x", "y", "z", "label")
    bad = dict(f, width=5, data=np.zeros(10, np.uint8))
    with pytest.raises(ValueError, match="bytes"):
        mc.pointcloud2_to_array(_cloud_msg(bad))
    with pytest.raises(ValueError, match="datatype"):
        mc.pointcloud2_to_array(_cloud_msg(dict(f, fields=[("x", 0, 9, 1)])))
    with pytest.raises(ValueError, match="point_step"):
        mc.pointcloud2_to_array(_cloud_msg(dict(f, point_step=4)))
    with pytest.raises(ValueError, match="no z"):
        mc.cloud_xyz(np.zeros(2, [("x", "f4"), ("y", "f4")]))


def test_rgb_label_score_helpers():
    colors = np.array([[255, 0, 0], [1, 2, 3], [0, 0, 255]], np.uint8)
    packed = mc.pack_rgb(colors)
    assert packed.dtype == np.float32
    assert packed.view(np.uint32).tolist() == [0xFF0000, 0x010203, 0x0000FF]
    np.testing.assert_array_equal(mc.unpack_rgb(packed), colors)
    np.testing.assert_array_equal(mc.unpack_rgb(mc.pack_rgb(colors / 255.0)), colors)
    arr = mc.make_cloud_array(np.ones((3, 3)), colors=colors, labels=[0, 5, 255], scores=[0.1, 0.5, 1.0],
                              text_index=np.array([0, 1, 0], np.uint32))
    assert arr.dtype.names == ("x", "y", "z", "rgb", "label", "score", "text_index")
    f = mc.pointcloud2_fields(arr)
    assert [(n, d) for n, _, d, _ in f["fields"]] == [("x", 7), ("y", 7), ("z", 7), ("rgb", 7), ("label", 6),
                                                      ("score", 7), ("text_index", 6)]
    out = mc.pointcloud2_to_array(_cloud_msg(f))
    np.testing.assert_array_equal(mc.unpack_rgb(out["rgb"]), colors)
    assert out["label"].tolist() == [0, 5, 255]
    with pytest.raises(ValueError, match="uint32"):
        mc.make_cloud_array(np.ones((1, 3)), labels=[-1])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 20), types=st.lists(st.sampled_from(ALL_TYPES), min_size=1, max_size=5),
       count=st.integers(1, 3), big=st.booleans(), pad=st.integers(0, 7), seed=st.integers(0, 10))
def test_pointcloud2_roundtrip_property(n, types, count, big, pad, seed):
    names = [f"c{i}" for i in range(len(types))]
    formats = [t if (i % 2 or count == 1) else (t, (count,)) for i, t in enumerate(types)]
    packed = np.dtype(list(zip(names, formats)))
    dtype = np.dtype({"names": names, "formats": formats,
                      "offsets": [packed.fields[k][1] for k in names], "itemsize": packed.itemsize + pad})
    rng = np.random.default_rng(seed)
    arr = np.zeros(n, dtype)
    for name in names:
        arr[name] = rng.integers(-100, 100, size=arr[name].shape).astype(dtype[name].base) \
            if dtype[name].base.kind != "u" else rng.integers(0, 200, size=arr[name].shape)
    f = mc.pointcloud2_fields(arr, is_bigendian=big)
    out = mc.pointcloud2_to_array(_cloud_msg(f))
    for name in names:
        np.testing.assert_array_equal(out[name], arr[name])


def test_pointcloud2_rosbags_message():
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    PC2, PF, Header, Time = (ts.types[n] for n in ("sensor_msgs/msg/PointCloud2", "sensor_msgs/msg/PointField",
                                                   "std_msgs/msg/Header", "builtin_interfaces/msg/Time"))
    arr = mc.make_cloud_array(np.random.default_rng(0).normal(size=(9, 3)), scores=np.arange(9))
    f = mc.pointcloud2_fields(arr)
    msg = PC2(header=Header(stamp=Time(sec=0, nanosec=0), frame_id="map"), height=f["height"], width=f["width"],
              fields=[PF(name=n, offset=o, datatype=d, count=c) for n, o, d, c in f["fields"]],
              is_bigendian=f["is_bigendian"], point_step=f["point_step"], row_step=f["row_step"],
              data=f["data"], is_dense=f["is_dense"])
    out = mc.pointcloud2_to_array(msg)
    np.testing.assert_array_equal(out["score"], np.arange(9, dtype=np.float32))


# ------------------------------------------------------------------ camera info and poses

def test_camera_info():
    K = [500.0, 0, 319.5, 0, 510.0, 239.5, 0, 0, 1]
    intr = mc.camera_info_to_intrinsics(NS(k=K, width=640, height=480))
    assert (intr.fx, intr.fy, intr.cx, intr.cy, intr.width, intr.height) == (500, 510, 319.5, 239.5, 640, 480)
    assert mc.camera_info_to_intrinsics(NS(K=np.array(K), width=640, height=480)) == intr
    back = mc.camera_info_to_intrinsics(NS(**mc.intrinsics_to_camera_info_fields(intr)))
    assert back == intr
    with pytest.raises(ValueError, match="not calibrated"):
        mc.camera_info_to_intrinsics(NS(k=[0.0] * 9, width=640, height=480))
    with pytest.raises(ValueError, match="image size"):
        mc.camera_info_to_intrinsics(NS(k=K, width=0, height=0))
    with pytest.raises(ValueError, match="needs fields k"):
        mc.camera_info_to_intrinsics(NS(width=1, height=1))


def test_pose_roundtrip_and_messages():
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(3)
    for _ in range(20):
        q = Rotation.random(random_state=int(rng.integers(1 << 30))).as_quat()
        t = rng.normal(size=3)
        T = mc.pose_to_matrix(t, q)
        np.testing.assert_allclose(T[:3, :3], Rotation.from_quat(q).as_matrix(), atol=1e-12)
        xyz, q2 = mc.matrix_to_pose(T)
        np.testing.assert_allclose(xyz, t)
        np.testing.assert_allclose(mc.pose_to_matrix(xyz, q2), T, atol=1e-12)
    # unnormalised quaternion is normalised; zero is an error
    np.testing.assert_allclose(mc.pose_to_matrix([0, 0, 0], [0, 0, 0, 2.0]), np.eye(4))
    with pytest.raises(ValueError, match="norm"):
        mc.pose_to_matrix([0, 0, 0], [0, 0, 0, 0])
    # a 90 degree yaw: ROS quaternion (0, 0, sin45, cos45)
    s = np.sqrt(0.5)
    pose = NS(position=NS(x=1.0, y=2.0, z=3.0), orientation=NS(x=0.0, y=0.0, z=s, w=s))
    T = mc.pose_msg_to_matrix(NS(header=None, pose=pose))  # PoseStamped
    np.testing.assert_allclose(T @ [1, 0, 0, 1], [1, 3, 3, 1], atol=1e-12)
    odom = NS(pose=NS(pose=pose, covariance=[0.0] * 36))
    np.testing.assert_allclose(mc.pose_msg_to_matrix(odom), T)
    tf = NS(transform=NS(translation=NS(x=1.0, y=2.0, z=3.0), rotation=NS(x=0.0, y=0.0, z=s, w=s)))
    np.testing.assert_allclose(mc.pose_msg_to_matrix(tf), T)
    with pytest.raises(ValueError, match="no pose"):
        mc.pose_msg_to_matrix(NS(foo=1))


def test_stamps():
    assert mc.seconds_to_stamp(1_700_000_000.25) == (1_700_000_000, 250_000_000)
    assert mc.stamp_to_seconds(NS(sec=1, nanosec=500_000_000)) == 1.5
    assert mc.stamp_to_seconds(NS(secs=2, nsecs=0)) == 2.0
