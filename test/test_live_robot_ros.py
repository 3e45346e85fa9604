"""The live node as on a robot, over loopback: poses only from /tf + /tf_static (the node's own
listener into sas_core's TransformBuffer), compressed colour, frames before their TF, lossless
replay with reliable_inputs, a clean SIGINT, and live fusion with a tiny real dense CLIP teacher."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("tf2_msgs.msg", reason="tf2_msgs is built by scripts/setup_env.sh")
pytestmark = pytest.mark.ros

from conftest import Spun, wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OPTICAL = "camera_color_optical_frame"


def _yaw(deg, t=(0.0, 0.0, 0.0)):
    a = np.radians(deg)
    T = np.eye(4)
    T[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    T[:3, 3] = t
    return T


class RobotTree:
    """map -> odom -> base_link -> camera_link -> camera_color_optical_frame (REP 105 / 103).

    map -> odom: a constant drift (dynamic, two samples around the whole stream); odom -> base_link:
    dynamic, one sample per image stamp, chosen so the whole chain gives the scene's camera pose;
    base_link -> camera_link and camera_link -> optical: static (/tf_static)."""

    def __init__(self):
        self.map_odom = _yaw(7.0, (0.4, -0.3, 0.0))
        self.base_link = _yaw(-20.0, (0.15, 0.02, 1.1))  # base_link -> camera_link
        self.link_optical = np.eye(4)  # REP 103: optical z = link x, optical x = -link y, optical y = -link z
        self.link_optical[:3, :3] = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float)
        self.link_optical[:3, 3] = (0.0, 0.015, 0.0)
        self.base_optical = self.base_link @ self.link_optical

    def odom_base(self, camera_pose):
        return np.linalg.inv(self.map_odom) @ camera_pose @ np.linalg.inv(self.base_optical)


def _ts(conv, parent, child, stamp, T):
    from geometry_msgs.msg import TransformStamped

    return TransformStamped(header=conv.make_header(parent, stamp), child_frame_id=child,
                            transform=conv.matrix_to_transform_msg(T))


class Robot:
    """A MappingNode + a helper that plays a camera the way a robot's drivers do (own context)."""

    def __init__(self, name, params, static_first=True, compressed=True):
        from rclpy.parameter import Parameter
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image
        from std_msgs.msg import String
        from tf2_msgs.msg import TFMessage

        from sas_ros import conversions as conv
        from sas_ros.live_demo import remap_args
        from sas_ros.mapping_node import MappingNode
        from sas_ros.poses import tf_qos

        self.conv, self.tree, self.name = conv, RobotTree(), name
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.helper = rclpy.create_node(f"{name}_robot", context=self.context)
        dynamic, static = tf_qos()
        self.pub_tf = self.helper.create_publisher(TFMessage, "/tf", dynamic)
        self.pub_static = self.helper.create_publisher(TFMessage, "/tf_static", static)
        self.compressed = compressed
        self.pub_color = self.helper.create_publisher(CompressedImage if compressed else Image,
                                                      "/camera/color/image_raw" + ("/compressed" if compressed else ""), 10)
        self.pub_depth = self.helper.create_publisher(Image, "/camera/depth/image_raw", 10)
        self.pub_info = self.helper.create_publisher(CameraInfo, "/camera/color/camera_info", 10)
        self._CompressedImage, self._TFMessage = CompressedImage, TFMessage
        if static_first:  # latched: published before the node exists, it must still get it
            self.publish_static()
        base = dict(mode="none", pose_source="tf", tf_backend="sas", color_transport="compressed" if compressed else "raw",
                    reliable_inputs=True, update_period=0.3, stats_period=0.3, log_throttle=0.0, reliable_pose_wait=2.0,
                    voxel_size=0.03)
        base.update(params)
        self.node = MappingNode(name, context=self.context, cli_args=remap_args(),
                                parameter_overrides=[Parameter(k, value=v) for k, v in base.items()])
        self.stats = []
        self.helper.create_subscription(String, f"/{name}/stats", lambda m: self.stats.append(json.loads(m.data)), 10)
        self.spun = Spun(self.context, self.node, self.helper)
        pubs = [self.pub_color, self.pub_depth, self.pub_info, self.pub_tf]
        assert wait_until(lambda: all(p.get_subscription_count() > 0 for p in pubs), 15.0), "node did not subscribe"

    def publish_static(self):
        c, t = self.conv, self.tree
        self.pub_static.publish(self._TFMessage(transforms=[
            _ts(c, "base_link", "camera_link", 0.0, t.base_link),
            _ts(c, "camera_link", OPTICAL, 0.0, t.link_optical)]))

    def publish_tf(self, stamp, camera_pose, first_last=None):
        c, t = self.conv, self.tree
        transforms = [_ts(c, "odom", "base_link", stamp, t.odom_base(camera_pose))]
        if first_last is not None:  # the slow map -> odom link: one sample before, one after the stream
            transforms += [_ts(c, "map", "odom", s, t.map_odom) for s in first_last]
        self.pub_tf.publish(self._TFMessage(transforms=transforms))

    def publish_images(self, frame, stamp=None, frame_id=OPTICAL):
        from sas_core.data.image_codec import compress_color

        c = self.conv
        stamp = frame.stamp if stamp is None else stamp
        self.pub_info.publish(c.intrinsics_to_camera_info(frame.intrinsics, frame_id, stamp))
        self.pub_depth.publish(c.numpy_to_image(frame.depth, "16UC1", frame_id, stamp))
        if self.compressed:
            fields = compress_color(frame.color, "jpeg", "rgb8", 90)
            msg = self._CompressedImage(header=c.make_header(frame_id, stamp), format=fields["format"])
            msg.data = fields["data"].tobytes()
            self.pub_color.publish(msg)
        else:
            self.pub_color.publish(c.numpy_to_image(frame.color, "rgb8", frame_id, stamp))

    def wait_for_tf(self, stamp, timeout=10.0):
        """Wait until the node can look up the camera pose at ``stamp`` (an event, not a sleep)."""
        from sas_ros.poses import PoseUnavailable

        def known():
            try:
                self.node.poses.lookup(OPTICAL, stamp)
                return True
            except PoseUnavailable:
                return False

        return wait_until(known, timeout)

    def handled(self):
        return self.node.n_frames + sum(self.node.drops.values())

    def close(self):
        self.spun.close()


@pytest.fixture(scope="module")
def scene():
    from sas_core.data.synthetic import SynthConfig, generate_scene

    return generate_scene(SynthConfig(seed=3, n_frames=8, with_lidar=False))


def _on_surface(scene, positions, tol=0.05):
    from scipy.spatial import cKDTree

    d, _ = cKDTree(scene.points.positions).query(positions)
    return float((d <= tol).mean())


def test_poses_only_from_tf_with_compressed_colour_map_lies_on_the_ground_truth(scene):
    """No pose topic: every pose is map <- optical frame through a four-link tree (static links
    latched before the node started); colour is JPEG; every other frame comes before its TF."""
    frames = scene.frames
    robot = Robot("sas_tf_test", {})
    try:
        assert robot.node.poses.source.startswith("TF (/tf + /tf_static")
        span = (frames[0].stamp - 1.0, frames[-1].stamp + 1.0)
        for i, f in enumerate(frames):
            before = robot.handled()
            if i % 2:  # images first, their TF 0.3 s later: the frame waits for it (reliable_pose_wait)
                robot.publish_images(f)
                time.sleep(0.3)
                robot.publish_tf(f.stamp, f.pose, span if i == 1 else None)
            else:
                robot.publish_tf(f.stamp, f.pose, span if i == 0 else None)
                assert robot.wait_for_tf(f.stamp)  # this half: the TF is in before the images
                robot.publish_images(f)
            assert wait_until(lambda: robot.handled() > before, 10.0), robot.node.drops
        node = robot.node
        assert node.n_frames == len(frames) and not node.drops, node.drops
        # the node's lookup is the ground-truth camera pose (the chain reproduces it exactly)
        T = node.poses.lookup(OPTICAL, frames[3].stamp)
        np.testing.assert_allclose(T, frames[3].pose, atol=1e-6)
        with node.lock:
            positions = node.map.positions[node.map.slots()].copy()
            colors = node.map.colors[node.map.slots()].copy()
        assert len(positions) > 5000
        assert _on_surface(scene, positions) >= 0.95
        assert colors.std() > 0.02  # decoded JPEG colours (0..1), not a constant
        frames_info = node.poses.tf_buffer.frames()
        assert frames_info["camera_link"]["static"] and frames_info[OPTICAL]["static"]
        assert not frames_info["base_link"]["static"] and frames_info["base_link"]["count"] == len(frames)
        assert wait_until(lambda: robot.stats and robot.stats[-1]["frames"] == len(frames)
                          and robot.stats[-1]["tf_transforms"] == len(frames) + 6, 5.0), robot.stats[-1:]
        # (one odom -> base_link per frame, map -> odom twice with frames 0 and 1, two static links)

        # bad TF is counted, never a crash: a frame never connected to the map, a loop, a stamp older
        # than the data; each dropped frame is counted by its reason
        c = robot.conv
        robot.pub_tf.publish(robot._TFMessage(transforms=[_ts(c, "elsewhere", "lost_optical", frames[0].stamp,
                                                              np.eye(4))]))
        robot.pub_tf.publish(robot._TFMessage(transforms=[_ts(c, "loop_b", "loop_a", frames[0].stamp, np.eye(4)),
                                                          _ts(c, "loop_a", "loop_b", frames[0].stamp, np.eye(4))]))
        node.cfg.reliable_pose_wait = 0.3
        for frame_id, reason in (("lost_optical", "disconnected"), ("loop_a", "loop")):
            assert wait_until(lambda: node.poses.tf_buffer._known(frame_id), 5.0)
            before = node.drops.get(reason, 0)
            robot.publish_images(frames[0], stamp=frames[0].stamp, frame_id=frame_id)
            assert wait_until(lambda: node.drops.get(reason, 0) > before, 10.0), node.drops
        before = node.drops.get("extrapolation", 0)
        robot.publish_images(frames[0], stamp=frames[0].stamp - 0.5)  # before the first odom -> base sample
        assert wait_until(lambda: node.drops.get("extrapolation", 0) > before, 10.0), node.drops
        corrupt = robot._CompressedImage(header=c.make_header(OPTICAL, frames[2].stamp), format="rgb8; jpeg compressed bgr8")
        corrupt.data = b"\xff\xd8\xff not a jpeg"
        robot.pub_info.publish(c.intrinsics_to_camera_info(frames[2].intrinsics, OPTICAL, frames[2].stamp))
        robot.pub_depth.publish(c.numpy_to_image(frames[2].depth, "16UC1", OPTICAL, frames[2].stamp))
        robot.pub_color.publish(corrupt)
        assert wait_until(lambda: node.drops.get("bad_image", 0) >= 1, 10.0), node.drops
        assert node.n_frames == len(frames)
    finally:
        robot.close()


def test_reliable_inputs_lose_no_frame_at_20_hz():
    """40 frames published at 20 Hz without waiting for the node (faster than it integrates on a
    loaded 2-core machine): with reliable_inputs every frame is integrated, none dropped."""
    from sas_core.data.synthetic import SynthConfig, generate_scene

    scene = generate_scene(SynthConfig(seed=4, n_frames=40, with_lidar=False))
    robot = Robot("sas_lossless_test", dict(input_queue=2, voxel_size=0.05), compressed=False)
    try:
        span = (scene.frames[0].stamp - 1.0, scene.frames[-1].stamp + 1.0)
        robot.publish_tf(scene.frames[0].stamp, scene.frames[0].pose, span)
        for f in scene.frames:  # TF for every stamp first, as a bag player would have it
            robot.publish_tf(f.stamp, f.pose)
        assert robot.wait_for_tf(scene.frames[-1].stamp)
        t0 = time.monotonic()
        for i, f in enumerate(scene.frames):
            robot.publish_images(f)
            time.sleep(max(0.0, t0 + (i + 1) / 20.0 - time.monotonic()))
        assert wait_until(lambda: robot.handled() >= 40, 60.0), (robot.node.n_frames, robot.node.drops)
        assert robot.node.n_frames == 40 and not robot.node.drops, (robot.node.n_frames, robot.node.drops)
    finally:
        robot.close()


def test_sigint_stops_the_node_cleanly(tmp_path):
    """A node mapping a stream (labelling and publishing every 50 ms) gets SIGINT: exit code 0 and
    no traceback (before: 'publisher's context is invalid' from the labelling thread)."""
    from rclpy.executors import SingleThreadedExecutor

    from sas_core.data.synthetic import SynthConfig, generate_scene
    from sas_ros.live_demo import FramePlayer, remap_args

    scene = generate_scene(SynthConfig(seed=5, n_frames=6, with_lidar=False))
    args = remap_args() + ["-r", "__node:=sas_sigint_test"]
    for k, v in dict(mode="fusion", pose_source="pose", update_period=0.05, stats_period=0.1,
                     reliable_inputs=True).items():
        args += ["-p", f"{k}:={str(v).lower() if isinstance(v, bool) else v}"]
    proc = subprocess.Popen([sys.executable, "-m", "sas_ros.mapping_node"] + args, cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    context = rclpy.Context()
    rclpy.init(context=context)
    helper = rclpy.create_node("sas_sigint_player", context=context)
    ex = SingleThreadedExecutor(context=context)
    ex.add_node(helper)
    threading.Thread(target=ex.spin, daemon=True).start()
    from std_msgs.msg import String

    stats = []
    helper.create_subscription(String, "/sas_sigint_test/stats", lambda m: stats.append(json.loads(m.data)), 10)
    try:
        player = FramePlayer(helper, ground_truth=True)
        assert player.wait_for_subscribers(60.0), "the node did not come up"
        assert wait_until(lambda: player.pub_sem.get_subscription_count() and player.pub_inst.get_subscription_count(),
                          10.0)
        deadline = time.monotonic() + 90.0  # a loaded machine may drop early frames (pose_wait): keep playing
        i = 0
        while time.monotonic() < deadline and not (stats and stats[-1]["frames"] >= 2 and stats[-1]["points"] > 0):
            f = scene.frames[i % len(scene.frames)]
            player.publish(f, stamp=f.stamp + 10.0 * (i // len(scene.frames)))
            i += 1
            time.sleep(0.2)
        assert stats and stats[-1]["frames"] >= 2, stats[-1:]
        updates = stats[-1]["updates"]  # the labelling thread is passing and publishing clouds
        assert wait_until(lambda: stats[-1]["updates"] >= updates + 3, 30.0), stats[-1:]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        ex.shutdown()
        helper.destroy_node()
        rclpy.shutdown(context=context)
    text = out + err
    assert proc.returncode == 0, text
    assert "Traceback" not in text and "context is invalid" not in text and "failed" not in text, text


def test_live_fusion_with_a_tiny_dense_clip_teacher(scene, tmp_path):
    """teacher dense_clip from the models file (a tiny random open_clip ViT of the real classes): the
    teacher worker fuses picked frames (min period by stamp) into the map; rate and latency are in
    ~/stats; the map's features are the teacher's, in its CLIP text space."""
    from sas_core.clip import TINY_CLIP_NAME, register_tiny_clip, save_tiny_clip

    register_tiny_clip()
    ckpt = save_tiny_clip(tmp_path / "clip_tiny.pt")
    (tmp_path / "models.yaml").write_text(f"clip_model: {TINY_CLIP_NAME}\nclip_checkpoint: clip_tiny.pt\n")
    frames = scene.frames
    period = 0.1  # stamps are 1/15 s apart: every other frame goes to the teacher
    robot = Robot("sas_teacher_test", dict(mode="fusion", teacher="dense_clip", models_file=str(tmp_path / "models.yaml"),
                                           teacher_min_period=period, voxel_size=0.05, update_period=0.2),
                  compressed=True)
    try:
        node = robot.node
        assert [t.name for t in node.mapper.teachers] == ["dense_clip"] and node.mapper.encoder.dim == 32
        span = (frames[0].stamp - 1.0, frames[-1].stamp + 1.0)
        for i, f in enumerate(frames):
            before = robot.handled()
            robot.publish_tf(f.stamp, f.pose, span if i == 0 else None)
            assert robot.wait_for_tf(f.stamp)
            robot.publish_images(f)
            assert wait_until(lambda: robot.handled() > before, 20.0), node.drops
        assert wait_until(lambda: node.teacher_pending == 0, 60.0)
        picked = [0]
        for i, f in enumerate(frames[1:], 1):
            if f.stamp - frames[picked[-1]].stamp >= period:
                picked.append(i)
        assert node.mapper.n_teacher_frames == len(picked) < len(frames), (node.mapper.n_teacher_frames, picked)
        n = node.n_updates
        node.update_event.set()
        assert wait_until(lambda: node.n_updates > n + 1, 30.0)
        with node.lock:
            m = node.map
            slots = m.slots()
            has = slots[m.feature_counts[slots] > 0]
            feats = m.features[has].astype(np.float32)
            labels = m.labels[has]
        assert m.feature_dim == 32 and len(has) > 0.5 * len(slots)
        norms = np.linalg.norm(feats, axis=1)  # means of unit teacher vectors over the frames that saw a voxel
        assert np.isfinite(feats).all() and (norms > 0.2).all() and (norms < 1.01).all()
        assert (labels < len(node.vocabulary)).all() and len(np.unique(labels)) >= 1
        assert wait_until(lambda: robot.stats and robot.stats[-1]["teacher_frames"] == len(picked), 10.0)
        s = robot.stats[-1]
        assert s["teacher"] == "dense_clip" and s["teacher_ms_median"] > 0 and s["teacher_latency_ms_median"] > 0
        assert s["teacher_hz"] > 0 and s["teacher_skipped"] == 0
        # a query in the CLIP text space answers
        answers = node.mapper.query(["chair"], threshold=-1.0, max_points=10)
        assert answers[0].count >= 10 and len(answers[0].slots) == 10
    finally:
        robot.close()
