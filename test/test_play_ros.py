"""`sas play`: a bag published into a live mapping node with the bag's timing (real rclpy, loopback)."""

import json

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytestmark = pytest.mark.ros

from conftest import wait_until  # noqa: E402
from sas_app import cli  # noqa: E402


@pytest.fixture(scope="module")
def synth_bag(tmp_path_factory):
    out = tmp_path_factory.mktemp("play") / "world"
    assert cli.main(["synth", "--out", str(out), "--width", "64", "--height", "48", "--points-per-m2", "300",
                     "--frames", "8"]) == 0
    return out / "bags" / "synth_00000_mcap"


def test_schedule_follows_the_bag_clock():
    from sas_ros.player import schedule

    t = [1_000_000_000, 1_500_000_000, 3_000_000_000]
    assert schedule(t, 1.0) == pytest.approx([0.0, 0.5, 2.0])
    assert schedule(t, 4.0) == pytest.approx([0.0, 0.125, 0.5])
    assert schedule(t, 2.0, first_ns=500_000_000) == pytest.approx([0.25, 0.5, 1.25])
    assert schedule([], 2.0) == []
    with pytest.raises(ValueError, match="rate"):
        schedule(t, 0.0)


def test_message_class_resolves_ros2_and_ros1_names():
    from sensor_msgs.msg import Image

    from sas_ros.player import message_class

    assert message_class("sensor_msgs/msg/Image") is Image
    assert message_class("sensor_msgs/Image") is Image
    with pytest.raises(ImportError):
        message_class("no_such_pkg/msg/Thing")
    with pytest.raises(ValueError):
        message_class("os.system/msg/x; rm")


def test_play_into_a_live_node(synth_bag):
    """Every frame of the bag reaches the node (reliable inputs: none dropped), in order, with the
    bag's own stamps; a second run with --topics plays only those topics."""
    from sas_core.data.bag_streams import index_bag
    from sas_ros.live_demo import running_node
    from sas_ros.player import BagPlayer

    index = index_bag(synth_bag)
    n_images = index.topics["/camera/color/image_raw"].count
    params = dict(mode="none", pose_source="pose", update_period=0.3, reliable_inputs=True, use_lidar=False)
    with running_node("sas_play_test", params, "sas_play_helper") as (node, helper):
        player = BagPlayer(helper, synth_bag, rate=4.0)
        try:
            read = ["/camera/color/image_raw", "/camera/depth/image_raw", "/camera/color/camera_info", "/camera/pose"]
            assert player.wait_for_subscribers(10.0, read)
            stats = player.play()
        finally:
            player.close()
        assert stats.published["/camera/color/image_raw"] == n_images and not stats.skipped
        # at rate 4 the bag's span takes a quarter of it (the schedule is the bag's clock)
        assert stats.wall_s >= 0.9 * (index.end - index.start) / 4.0
        assert wait_until(lambda: node.n_frames == n_images, 20.0), (node.n_frames, node.stats())
        assert not any(node.drops.values())

        only = BagPlayer(helper, synth_bag, rate=50.0, topics=["/camera/pose"])
        try:
            assert [t for t, _, _ in only.topics()] == ["/camera/pose"]
            assert only.play().published == {"/camera/pose": index.topics["/camera/pose"].count}
        finally:
            only.close()


def test_reliable_replay_waits_for_a_late_pose_and_drops_a_gap_at_once(synth_bag):
    """With reliable_inputs a frame waits reliable_pose_wait for its pose, not pose_wait: a reliable
    sample lost on the way comes back only with the writer's next heartbeat (CI once dropped a
    frame whose pose came after pose_wait). Here every pose comes a second after its images, past
    pose_wait, and one pose is left out: its frame, with poses on both sides, is dropped at once
    (reliable_pose_wait is a minute), the others are all mapped."""
    import time

    from sas_core.data.bag_streams import index_bag
    from sas_ros.live_demo import running_node
    from sas_ros.player import BagPlayer

    index = index_bag(synth_bag)
    n = index.topics["/camera/color/image_raw"].count
    images = ["/camera/color/image_raw", "/camera/depth/image_raw", "/camera/color/camera_info"]
    params = dict(mode="none", pose_source="pose", update_period=0.3, reliable_inputs=True, use_lidar=False,
                  pose_wait=0.1, reliable_pose_wait=60.0)
    with running_node("sas_late_pose_test", params, "sas_late_pose_helper") as (node, helper):
        players = [BagPlayer(helper, synth_bag, rate=4.0, topics=images),
                   BagPlayer(helper, synth_bag, rate=50.0, topics=["/camera/pose"], duration=0.1),  # 0, 1/15 s
                   BagPlayer(helper, synth_bag, rate=50.0, topics=["/camera/pose"], start=0.15)]  # from 3/15 s
        try:
            for player in players:
                assert player.wait_for_subscribers(10.0, list(player.publishers))
            players[0].play()
            time.sleep(1.0)  # the poses are late: past pose_wait, the first frame still waits
            assert node.n_frames == 0 and not any(node.drops.values()), node.drops
            assert players[1].play().published == {"/camera/pose": 2}
            assert players[2].play().published == {"/camera/pose": n - 3}  # the pose at 2/15 s left out
        finally:
            for player in players:
                player.close()
        assert wait_until(lambda: node.n_frames + sum(node.drops.values()) == n, 20.0), (node.n_frames, node.drops)
        assert node.n_frames == n - 1 and node.drops == {"no_pose": 1}


def test_play_refuses_what_it_cannot_do(synth_bag, tmp_path, capsys):
    rc = cli.main(["play", str(tmp_path / "none.mcap")])
    assert rc == 1 and "does not exist" in capsys.readouterr().err
    rc = cli.main(["play", str(synth_bag), "--remap", "camera/pose:=/x"])
    assert rc == 1 and "absolute topic names" in capsys.readouterr().err
    rc = cli.main(["play", str(synth_bag), "--topics", "/not/there", "--wait-subscribers", "0"])
    assert rc == 1 and "not in the bag" in capsys.readouterr().err
    rc = cli.main(["play", str(synth_bag), "--rate", "0", "--wait-subscribers", "0"])
    assert rc == 1 and "rate" in capsys.readouterr().err


def test_play_cli_prints_the_node_remappings_and_a_summary(synth_bag, capsys):
    rc = cli.main(["play", str(synth_bag), "--rate", "100", "--wait-subscribers", "0", "--json",
                   "--remap", "/camera/pose:=/robot/pose"])
    captured = capsys.readouterr()
    assert rc == 0
    out = json.loads(captured.out)
    assert out["total"] == sum(out["published"].values()) > 0
    assert "-r color/image_raw:=/camera/color/image_raw" in captured.err
    assert "-r pose:=/camera/pose" in captured.err
    assert np.isclose(out["bag_s"], 7 / 15, atol=0.05)
