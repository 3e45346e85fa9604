"""Stream discovery, RGB-D pairing and the pose rules of sas_core.data.bag_streams (no bag needed)."""

import numpy as np
import pytest

from sas_core.data import bag_streams as bs


def _index(topics):
    """A BagIndex from {topic: (msgtype, frame_id, encoding, size)}."""
    out = {}
    for name, (msgtype, frame, enc, size) in topics.items():
        info = bs.TopicInfo(name, msgtype, 10, frame_id=frame, encoding=enc, size=size)
        if msgtype == bs.IMAGE:
            info.is_depth = enc in ("16UC1", "32FC1", "mono16")
        elif msgtype == bs.COMPRESSED:
            info.is_depth = "compressedDepth" in enc or enc.startswith(("16UC1", "32FC1"))
        out[name] = info
    return bs.BagIndex(None, out, 0.0, 1.0)


C, D = "camera_color_optical_frame", "camera_depth_optical_frame"
REALSENSE = {
    "/camera/camera/color/image_raw": (bs.IMAGE, C, "rgb8", (480, 640)),
    "/camera/camera/color/image_raw/compressed": (bs.COMPRESSED, C, "rgb8; jpeg compressed bgr8", None),
    "/camera/camera/color/camera_info": (bs.INFO, C, None, (480, 640)),
    "/camera/camera/depth/image_rect_raw": (bs.IMAGE, D, "16UC1", (480, 848)),
    "/camera/camera/depth/image_rect_raw/compressedDepth": (bs.COMPRESSED, D, "16UC1; compressedDepth png", None),
    "/camera/camera/depth/camera_info": (bs.INFO, D, None, (480, 848)),
    "/camera/camera/infra1/image_rect_raw": (bs.IMAGE, "camera_infra1_optical_frame", "mono8", (480, 848)),
    "/camera/camera/depth/color/points": (bs.CLOUD, D, None, None),
}


def test_realsense_without_align_picks_raw_streams_and_registers():
    ch = bs.choose_topics(_index(REALSENSE), bs.StreamOptions())
    assert ch.color == "/camera/camera/color/image_raw"  # raw beats its /compressed twin; infra1 is no colour
    assert ch.depth == "/camera/camera/depth/image_rect_raw"
    assert ch.color_info == "/camera/camera/color/camera_info" and ch.depth_info == "/camera/camera/depth/camera_info"
    assert ch.register and "differs" in ch.reasons["register_depth"]
    assert ch.lidar is None  # the camera's own depth cloud is not a LiDAR


def test_aligned_depth_wins_and_transports_are_chosen_when_alone():
    topics = dict(REALSENSE)
    topics["/camera/camera/aligned_depth_to_color/image_raw"] = (bs.IMAGE, C, "16UC1", (480, 640))
    topics["/camera/camera/aligned_depth_to_color/camera_info"] = (bs.INFO, C, None, (480, 640))
    ch = bs.choose_topics(_index(topics), bs.StreamOptions())
    assert ch.depth == "/camera/camera/aligned_depth_to_color/image_raw" and not ch.register
    only_compressed = {k: v for k, v in REALSENSE.items() if not k.endswith(("image_raw", "image_rect_raw"))}
    ch = bs.choose_topics(_index(only_compressed), bs.StreamOptions())
    assert ch.color == "/camera/camera/color/image_raw/compressed"
    assert ch.depth == "/camera/camera/depth/image_rect_raw/compressedDepth"
    assert ch.color_info == "/camera/camera/color/camera_info"  # beside the image, not beside the transport


def test_ambiguity_lists_candidates_and_overrides_settle_it():
    topics = {"/front/color/image_raw": (bs.IMAGE, "front", "rgb8", (60, 80)),
              "/back/color/image_raw": (bs.IMAGE, "back", "rgb8", (60, 80)),
              "/front/depth/image_raw": (bs.IMAGE, "front", "16UC1", (60, 80)),
              "/front/color/camera_info": (bs.INFO, "front", None, (60, 80)),
              "/velodyne_points": (bs.CLOUD, "velodyne", None, None),
              "/ouster/points": (bs.CLOUD, "os_lidar", None, None)}
    with pytest.raises(bs.StreamError, match="/back/color/image_raw, /front/color/image_raw.*--color-topic"):
        bs.choose_topics(_index(topics), bs.StreamOptions())
    with pytest.raises(bs.StreamError, match="LiDAR.*--no-lidar"):
        bs.choose_topics(_index(topics), bs.StreamOptions(color_topic="/front/color/image_raw"))
    ch = bs.choose_topics(_index(topics), bs.StreamOptions(color_topic="/front/color/image_raw",
                                                           lidar_topic="/ouster/points"))
    assert (ch.color, ch.depth, ch.lidar) == ("/front/color/image_raw", "/front/depth/image_raw", "/ouster/points")
    ch = bs.choose_topics(_index(topics), bs.StreamOptions(color_topic="/front/color/image_raw", use_lidar=False))
    assert ch.lidar is None
    with pytest.raises(bs.StreamError, match="no topic /x"):
        bs.choose_topics(_index(topics), bs.StreamOptions(info_topic="/x"))
    with pytest.raises(bs.StreamError, match="is a sensor_msgs/msg/PointCloud2"):
        bs.choose_topics(_index(topics), bs.StreamOptions(color_topic="/ouster/points"))


def test_depth_in_another_frame_without_its_info_is_an_error():
    topics = {k: v for k, v in REALSENSE.items() if k != "/camera/camera/depth/camera_info"}
    with pytest.raises(bs.StreamError, match="needs the depth CameraInfo"):
        bs.choose_topics(_index(topics), bs.StreamOptions())


def test_pairing_takes_the_nearest_depth_within_tolerance():
    p = bs._Pairer(0.02)
    for stamp, kind in [(0.0, "color"), (0.003, "depth"), (0.1, "color"), (0.108, "depth"), (0.097, "depth"),
                        (0.2, "color"), (0.26, "depth"), (0.3, "color"), (0.31, "depth")]:
        p.add(kind, stamp, 0, stamp)
    pairs = [(c[0], None if d is None else d[0]) for c, d in p.ready(final=True)]
    assert pairs == [(0.0, 0.003), (0.1, 0.097), (0.2, None), (0.3, 0.31)]
    assert p.unpaired_depth == 2  # 0.108 (lost to the nearer 0.097) and 0.26


def test_a_colour_frame_waits_until_depth_has_passed_it():
    p = bs._Pairer(0.02)
    p.add("color", 1.0, 0, "c")
    p.add("depth", 0.995, 0, "d0")
    assert list(p.ready()) == []  # a nearer depth may still come
    p.add("depth", 1.001, 1, "d1")
    assert list(p.ready()) == []
    p.add("depth", 1.05, 2, "d2")
    (c, d), = list(p.ready())
    assert d[2] == "d1"


def test_a_stopped_depth_stream_does_not_hold_colour_back():
    p = bs._Pairer(0.02, slack=1.0)
    p.add("depth", 0.0, 0, "d")
    for k in range(6):
        p.add("color", float(k), k, k)
    decided = [(c[0], d) for c, d in p.ready()]
    # colour at t is decided once the bag's clock is past t + 0.02 + 1 s: 0..3 now, 4 and 5 at the end
    assert [c for c, _ in decided] == [0.0, 1.0, 2.0, 3.0] and decided[0][1][2] == "d"
    assert [c[0] for c, _ in p.ready(final=True)] == [4.0, 5.0]


def test_pose_gaps_are_refused_not_interpolated():
    import math

    from sas_core.geometry.transforms import TransformBuffer

    buf = TransformBuffer(cache_time=math.inf)
    stamps = [0.0, 0.1, 0.2, 1.5, 1.6]
    for s in stamps:
        T = np.eye(4)
        T[0, 3] = s
        buf.set_transform("map", "base", s, T)
    buf.set_transform("base", "cam", 0.0, np.eye(4), static=True)
    tree = bs.TfTree(buf, {"base": "map", "cam": "base"}, {"cam"}, {"base": np.array(stamps)}, {"base": 5})
    track = bs.PoseTrack(tree, "map", "tf", max_gap=0.5)
    assert track.pose("cam", 0.15)[0, 3] == pytest.approx(0.15)
    assert track.pose("/cam", 1.5)[0, 3] == pytest.approx(1.5)  # a sample itself; ROS 1 names lose their '/'
    with pytest.raises(bs.PoseUnavailable, match="gap of 1.300 s") as e:
        track.pose("cam", 0.8)
    assert e.value.reason == "gap"
    with pytest.raises(bs.PoseUnavailable) as e:
        track.pose("cam", 1.7)
    assert e.value.reason == "extrapolation"
    with pytest.raises(bs.PoseUnavailable) as e:
        track.pose("elsewhere", 0.1)
    assert e.value.reason == "unknown_frame"


def test_bag_root_accepts_folders_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bs.bag_root(tmp_path / "none")
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="metadata.yaml"):
        bs.bag_root(tmp_path / "b")
    (tmp_path / "b" / "b_0.db3").write_bytes(b"")
    assert bs.bag_root(tmp_path / "b" / "b_0.db3") == tmp_path / "b" / "b_0.db3"
    (tmp_path / "b" / "metadata.yaml").write_text("x")
    assert bs.bag_root(tmp_path / "b" / "b_0.db3") == tmp_path / "b"  # split bags read whole
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a bag"):
        bs.bag_root(tmp_path / "notes.txt")
