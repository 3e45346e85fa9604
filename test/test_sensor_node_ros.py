"""The live mapping node on a noisy sensor stream (sas_core.data.sensor_model, Kinect preset): depth
noise, quantisation, holes and a drifting reported pose still give a map on the room's surfaces."""

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytestmark = pytest.mark.ros

from test_mapping_node_ros import Live, _gt_labels  # noqa: E402  (the same node harness, not a copy)


def test_node_maps_a_noisy_kinect_stream(tmp_path):
    import open3d as o3d

    from sas_core.data import msg_codec as mc
    from sas_core.data.synthetic import SynthConfig, generate_scene

    scene = generate_scene(SynthConfig(seed=3, n_frames=10, with_lidar=False, sensor="kinect"))
    drift = max(np.linalg.norm(f.pose[:3, 3] - scene.camera_pose(f.stamp)[:3, 3]) for f in scene.frames)
    holes = np.mean([(f.depth == 0).mean() for f in scene.frames])
    assert drift > 1e-3 and holes > 0.01, (drift, holes)  # the stream is really noisy
    live = Live({"map_dir": str(tmp_path / "maps")}, "sas_map_noisy")
    try:
        arr = mc.pointcloud2_to_array(live.stream(scene.frames))
        assert len(arr) > 5000
        xyz = mc.cloud_xyz(arr)
        dist = scene.raycasting_scene().compute_distance(o3d.core.Tensor(xyz.astype(np.float32))).numpy()
        assert np.mean(dist < 0.05) > 0.9, np.quantile(dist, [0.5, 0.9, 0.99])  # most points on a surface
        gt = _gt_labels(scene, xyz, max_dist=0.08)
        labelled = (gt != 255) & (arr["label"] != 255)
        accuracy = (arr["label"][labelled] == gt[labelled]).mean()
        assert labelled.mean() > 0.5 and accuracy > 0.6, (labelled.mean(), accuracy)
    finally:
        live.close()
