"""One pipeline: the live node (over loopback) and `sas replay` give the same map from the same bag;
every node parameter comes from a config dataclass field; bad device settings fail cleanly."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytestmark = pytest.mark.ros

from conftest import Spun, wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class _Node:
    """A MappingNode + a helper node in one executor (own context)."""

    def __init__(self, name, params):
        from rclpy.parameter import Parameter

        from sas_ros.live_demo import remap_args
        from sas_ros.mapping_node import MappingNode

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = MappingNode(name, context=self.context, cli_args=remap_args(),
                                parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
        self.helper = rclpy.create_node(f"{name}_helper", context=self.context)
        self.spun = Spun(self.context, self.node, self.helper)

    def close(self):
        self.spun.close()


def _bag_messages(path):
    """[(stamp, topic, msgtype, raw CDR bytes)] of a bag, as recorded."""
    from sas_core.data.rosbag_io import _open_reader

    reader = _open_reader(path)
    try:
        return [(t, c.topic, c.msgtype, bytes(raw)) for c, t, raw in reader.messages()]
    finally:
        reader.close()


def _msg_class(msgtype):
    import importlib

    pkg, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.{kind}"), name)


def test_node_and_replay_build_the_same_map(tmp_path, capsys):
    """The bag's own messages (CDR bytes, deserialised by rclpy) go to the live node; `sas replay`
    reads the same bag: same voxels, same colours, same labels and scores with the same checkpoint."""
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import PointCloud2

    from sas_app.cli import main
    from sas_core.data import msg_codec as mc
    from sas_core.data.rosbag_io import write_bag
    from sas_core.data.synthetic import SynthConfig, generate_scene
    from sas_core.nn import build_model, save_checkpoint
    from sas_core.text import SyntheticTextEncoder

    scene = generate_scene(SynthConfig(seed=2, n_frames=4, with_lidar=False))
    bag = write_bag(scene, tmp_path / "parity_bag")
    ckpt = tmp_path / "tiny.ckpt"
    save_checkpoint(ckpt, build_model("MinkUNet14A", in_channels=3, out_channels=32),
                    {"text_encoder": SyntheticTextEncoder(dim=32).config(), "voxel_size": 0.05})

    assert main(["replay", str(bag), "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--no-lidar"]) == 0
    capsys.readouterr()
    with np.load(tmp_path / "out" / "parity_bag" / "map.npz") as z:
        offline = {k: z[k] for k in ("positions", "colors", "labels", "scores")}
    assert len(offline["positions"]) > 2000 and (offline["labels"] < 20).all()

    live = _Node("sas_parity", dict(mode="segmenter", checkpoint=str(ckpt), pose_source="pose", reliable_inputs=True,
                                    input_queue=100, full_update_every=1, update_period=0.2, stats_period=1.0))
    try:
        node, helper = live.node, live.helper
        clouds = []
        helper.create_subscription(PointCloud2, "/sas_parity/labelled_cloud", clouds.append, 5)
        msgs = _bag_messages(bag)
        pubs = {topic: helper.create_publisher(_msg_class(kind), topic, 10) for _, topic, kind, _ in msgs}
        assert wait_until(lambda: all(p.get_subscription_count() > 0 for p in pubs.values()), 15.0)
        order = {"/camera/pose": 0, "/camera/color/camera_info": 1, "/camera/depth/image_raw": 2,
                 "/camera/color/image_raw": 3}
        by_stamp = {}
        for stamp, topic, kind, raw in msgs:
            by_stamp.setdefault(stamp, []).append((order[topic], topic, kind, raw))
        for i, stamp in enumerate(sorted(by_stamp)):
            for _, topic, kind, raw in sorted(by_stamp[stamp]):  # pose and camera info before the images
                pubs[topic].publish(deserialize_message(raw, _msg_class(kind)))
            assert wait_until(lambda: node.n_frames + sum(node.drops.values()) > i, 20.0), node.drops
        assert node.n_frames == len(scene.frames) and not node.drops, node.drops
        # a labelling pass that starts after the last frame, then its cloud
        u = node.n_updates
        node.update_event.set()
        assert wait_until(lambda: node.n_updates >= u + 2, 60.0)
        n = len(clouds)
        node.update_event.set()
        assert wait_until(lambda: len(clouds) > n, 60.0)
        arr = mc.pointcloud2_to_array(clouds[-1])
    finally:
        live.close()
    np.testing.assert_array_equal(mc.cloud_xyz(arr), offline["positions"])  # same voxels, same order
    np.testing.assert_array_equal(mc.unpack_rgb(arr["rgb"]), offline["colors"])
    np.testing.assert_array_equal(arr["label"].astype(np.int64), offline["labels"])
    np.testing.assert_allclose(arr["score"], offline["scores"], atol=1e-6)


def test_every_parameter_comes_from_a_config_field():
    from sas_core.mapping import MapperConfig
    from sas_ros.params import NodeConfig, parameter_fields

    live = _Node("sas_params", dict(mode="none", max_radius=12))  # an int for a float field is accepted
    try:
        node = live.node
        fields = parameter_fields()
        builtin = set(live.helper._parameters)  # what rclpy declares on every node (use_sim_time, ...)
        declared = [n for n in node._parameters if n not in builtin]
        assert set(declared) == set(fields)
        for name in declared:
            desc = node.describe_parameter(name).description
            assert desc.startswith(fields[name].help) and desc.strip(), name
        values = {n: node.get_parameter(n).value for n in declared}
        assert values["max_radius"] == 12.0 and node.mapper.config.max_radius == 12.0
        assert node.mapper.config == MapperConfig(mode="none", max_radius=12.0)
        assert node.cfg == NodeConfig()
        for n, f in fields.items():
            if n not in ("mode", "max_radius"):
                assert values[n] == f.default, n
    finally:
        live.close()


def test_bad_parameter_value_is_one_clear_error():
    from rclpy.parameter import Parameter

    from sas_ros.mapping_node import MappingNode

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        for params, pattern in (({"mode": "magic"}, "mode"), ({"pixel_stride": "two"}, "pixel_stride"),
                                ({"mode": "fusion", "vocabulary": "scanet20"}, "scanet20")):
            with pytest.raises(ValueError, match=pattern):
                MappingNode("sas_bad_params", context=context,
                            parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    finally:
        rclpy.shutdown(context=context)


def test_device_cuda_without_cuda_fails_with_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "sas_ros.mapping_node", "--ros-args", "-p", "device:=cuda",
                          "-p", "mode:=fusion"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "CUDA is not available" in text and "Traceback" not in text and "AttributeError" not in text, text
    assert len([ln for ln in text.splitlines() if ln.strip()]) == 1, text


def test_node_takes_its_checkpoint_from_the_models_file(tmp_path):
    """mode segmenter without a 'checkpoint' parameter: the models file's 'checkpoint' is used (here a
    file that does not exist, so the node stops with one line naming it)."""
    (tmp_path / "models.yaml").write_text("checkpoint: nets/office.pt\n")
    env = {k: v for k, v in os.environ.items() if k not in ("SAS_MODELS", "SAS_MODELS_DIR")}
    out = subprocess.run([sys.executable, "-m", "sas_ros.mapping_node", "--ros-args", "-p", "mode:=segmenter",
                          "-p", f"models_file:={tmp_path / 'models.yaml'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert str(tmp_path / "nets" / "office.pt") in text and "Traceback" not in text, text


def test_misspelt_parameters_are_named_with_the_closest_one():
    live = _Node("sas_param_typo", {"mode": "none", "voxel_siz": 0.1, "voxel_size": 0.08})
    try:
        assert live.node.unknown_parameters == ["voxel_siz"]
        assert live.node.mapper.config.voxel_size == pytest.approx(0.08)
    finally:
        live.close()
    live = _Node("sas_param_ok", {"mode": "none", "pose_wait": 0.2})
    try:
        assert live.node.unknown_parameters == []  # every real parameter is known, whichever part declares it
    finally:
        live.close()


def test_node_help_lists_every_parameter(capsys):
    from sas_ros.mapping_node import main
    from sas_ros.params import parameter_fields

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sas_mapping_node")
    for name, f in parameter_fields().items():
        assert f"  {name} = " in out, name


def test_a_drop_logged_after_sigint_goes_to_stderr_not_to_a_dead_rosout(capfd):
    """SIGINT shuts the context down while the workers finish: a frame they drop then is still counted
    and reported, on stderr (rcl cannot publish to /rosout without a context and says "context is invalid")."""
    from rclpy.parameter import Parameter

    from sas_ros.live_demo import remap_args
    from sas_ros.mapping_node import MappingNode

    context = rclpy.Context()
    rclpy.init(context=context)
    node = MappingNode("sas_log_after_shutdown", context=context, cli_args=remap_args(),
                       parameter_overrides=[Parameter("mode", value="fusion")])
    try:
        node._drop("no_pose", "frame at 1.0: no pose")
        rclpy.shutdown(context=context)  # what rclpy's SIGINT handler does
        node._last_warn.clear()  # not throttled
        node._drop("no_pose", "frame at 2.0: no pose")
        assert node.drops["no_pose"] == 2
        err = capfd.readouterr().err
        assert "[WARNING] [sas_log_after_shutdown]: [no_pose] frame at 2.0: no pose (dropped 2 so far)" in err
        assert "context is invalid" not in err
    finally:
        node.running = False
        node.destroy_node()
        if context.ok():
            rclpy.shutdown(context=context)
