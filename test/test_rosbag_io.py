"""ROS 2 bags of the synthetic world: topics, stamps, frame ids, and a lossless read-back."""

import numpy as np
import pytest

from sas_core.data.rosbag_io import (
    CAMERA_FRAME, COLOR_TOPIC, DEPTH_TOPIC, INFO_TOPIC, LIDAR_POSE_TOPIC, LIDAR_TOPIC, POSE_TOPIC, bag_topics,
    iter_bag_frames, read_bag, typestore, write_bag,
)
from sas_core.data.synthetic import LidarSweep, SynthConfig, generate_scene
from sas_core.types import Frame

EXPECTED_TYPES = {
    COLOR_TOPIC: "sensor_msgs/msg/Image", DEPTH_TOPIC: "sensor_msgs/msg/Image",
    INFO_TOPIC: "sensor_msgs/msg/CameraInfo", POSE_TOPIC: "geometry_msgs/msg/PoseStamped",
    LIDAR_TOPIC: "sensor_msgs/msg/PointCloud2", LIDAR_POSE_TOPIC: "geometry_msgs/msg/PoseStamped",
}


@pytest.fixture(scope="module")
def scene():
    return generate_scene(SynthConfig(seed=2, n_frames=4, width=96, height=72, n_lidar_sweeps=3,
                                      lidar_azimuth_steps=256, points_per_m2=50))


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_bag_topics_stamps_and_frames(scene, tmp_path, storage):
    from rosbags.rosbag2 import Reader

    path = write_bag(scene, tmp_path / "bag", storage=storage)
    topics = bag_topics(path)
    assert {t: m for t, (m, _) in topics.items()} == EXPECTED_TYPES
    assert {t: n for t, (_, n) in topics.items()} == {
        COLOR_TOPIC: 4, DEPTH_TOPIC: 4, INFO_TOPIC: 4, POSE_TOPIC: 4, LIDAR_TOPIC: 3, LIDAR_POSE_TOPIC: 3}
    assert any(p.suffix == (".mcap" if storage == "mcap" else ".db3") for p in path.iterdir())
    store = typestore()
    frames_of = {COLOR_TOPIC: CAMERA_FRAME, DEPTH_TOPIC: CAMERA_FRAME, INFO_TOPIC: CAMERA_FRAME,
                 POSE_TOPIC: "map", LIDAR_TOPIC: "lidar", LIDAR_POSE_TOPIC: "map"}
    with Reader(path) as reader:
        for conn, t_ns, raw in reader.messages():
            msg = store.deserialize_cdr(raw, conn.msgtype)
            assert msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec == t_ns  # header = log time
            assert msg.header.frame_id == frames_of[conn.topic]
            if conn.topic == COLOR_TOPIC:
                assert msg.encoding == "rgb8" and msg.step == 96 * 3
            elif conn.topic == DEPTH_TOPIC:
                assert msg.encoding == "16UC1" and msg.step == 96 * 2
            elif conn.topic == INFO_TOPIC:
                assert msg.distortion_model == "plumb_bob" and len(msg.d) == 5 and not np.any(msg.d)
                np.testing.assert_allclose(np.asarray(msg.k).reshape(3, 3), scene.intrinsics.K)
                np.testing.assert_allclose(np.asarray(msg.p).reshape(3, 4)[:, :3], scene.intrinsics.K)
                assert (msg.width, msg.height) == (96, 72)
            elif conn.topic == LIDAR_TOPIC:
                assert [f.name for f in msg.fields] == ["x", "y", "z", "intensity", "ring"]
                assert [f.datatype for f in msg.fields] == [7, 7, 7, 7, 4]  # FLOAT32 x4, UINT16
    t0 = min(f.stamp for f in scene.frames)
    assert t0 == 1_700_000_000.0


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_bag_reads_back(scene, tmp_path, storage):
    path = write_bag(scene, tmp_path / "bag", storage=storage)
    items = list(iter_bag_frames(path))
    stamps = [i.stamp for i in items]
    assert stamps == sorted(stamps)
    frames, sweeps = read_bag(path)
    assert all(isinstance(f, Frame) for f in frames) and all(isinstance(s, LidarSweep) for s in sweeps)
    assert len(frames) == 4 and len(sweeps) == 3
    for got, ref in zip(frames, scene.frames):
        assert got.stamp == pytest.approx(ref.stamp, abs=1e-6)
        np.testing.assert_array_equal(got.color, ref.color)
        np.testing.assert_allclose(got.depth, ref.depth, atol=5.1e-4)  # millimetre depth
        np.testing.assert_allclose(got.pose, ref.pose, atol=1e-9)
        assert got.intrinsics == ref.intrinsics
        assert got.frame_id == CAMERA_FRAME
    for got, ref in zip(sweeps, scene.lidar):
        np.testing.assert_array_equal(got.points, ref.points)
        np.testing.assert_array_equal(got.ring, ref.ring)
        np.testing.assert_array_equal(got.intensity, ref.intensity)
        np.testing.assert_allclose(got.pose, ref.pose, atol=1e-9)
    assert read_bag(path, with_lidar=False)[1] == []


def test_overwrite_and_errors(scene, tmp_path):
    path = write_bag(scene, tmp_path / "bag", storage="mcap")
    write_bag(scene, path, storage="sqlite3")  # replaces the old bag atomically
    assert [p.suffix for p in path.iterdir() if p.suffix in (".mcap", ".db3")] == [".db3"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    with pytest.raises(ValueError, match="storage"):
        write_bag(scene, tmp_path / "x", storage="rosbag1")
    with pytest.raises(FileNotFoundError):
        list(iter_bag_frames(tmp_path / "missing"))
    (tmp_path / "notabag").mkdir()
    with pytest.raises(ValueError, match="metadata.yaml"):
        list(iter_bag_frames(tmp_path / "notabag"))
    with pytest.raises(ValueError, match="no topic"):
        list(iter_bag_frames(path, color_topic="/other/image"))


def test_a_named_pose_topic_must_exist(scene, tmp_path):
    """Named topics are checked before the bag is read (frames without a pose are counted skips:
    test_bag_corpus)."""
    path = write_bag(scene, tmp_path / "bag", storage="mcap")
    with pytest.raises(ValueError, match="no topic /no/pose"):
        read_bag(path, pose_topic="/no/pose")
