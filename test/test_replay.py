"""`sas replay BAG`: a synthetic bag through the offline pipeline, map and OpenScene export."""

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    from sas_core.data.rosbag_io import write_bag
    from sas_core.data.synthetic import SynthConfig, generate_scene

    scene = generate_scene(SynthConfig(seed=1, n_frames=6, n_lidar_sweeps=2))
    path = write_bag(scene, tmp_path_factory.mktemp("bags") / "synth_bag", storage="sqlite3")
    return scene, path


def test_replay_writes_map_and_export(bag, tmp_path, capsys):
    from scipy.spatial import cKDTree

    from sas_app.cli import main
    from sas_core.data.openscene import load_openscene_scene
    from sas_core.io import read_ply

    scene, path = bag
    rc = main(["replay", str(path), "--out", str(tmp_path / "out"), "--export", str(tmp_path / "os"),
               "--name", "robot0"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == 6 and summary["sweeps"] == 2 and not summary["labelled"]
    ply = read_ply(tmp_path / "out" / "robot0" / "map.ply")
    assert len(ply["x"]) > 2000
    # the map lies on the scene's surfaces
    d, _ = cKDTree(scene.points.positions).query(ply["positions"])
    assert np.median(d) < 0.05
    with np.load(tmp_path / "out" / "robot0" / "map.npz") as z:
        assert z["positions"].shape == (len(ply["x"]), 3) and z["counts"].min() >= 1
    cloud, frames = load_openscene_scene(tmp_path / "os", "robot0")
    frames = list(frames)
    assert len(frames) == 6 and len(cloud) == len(ply["x"])
    np.testing.assert_allclose(frames[2].pose, scene.frames[2].pose, atol=1e-6)
    assert np.abs(frames[2].depth - scene.frames[2].depth).max() < 2e-3  # mm PNG


def test_replay_errors(bag, tmp_path, capsys):
    from sas_app.cli import main

    _, path = bag
    assert main(["replay", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["replay", str(path), "--checkpoint", str(tmp_path / "missing.ckpt")]) == 1
    assert "sas distill" in capsys.readouterr().err


def test_replay_with_checkpoint_labels_the_map(bag, tmp_path, capsys):
    """A tiny randomly initialised distilled-model checkpoint labels every voxel of the replayed map."""
    from sas_app.cli import main
    from sas_core.nn import build_model, save_checkpoint
    from sas_core.text import SCANNET_20, SyntheticTextEncoder

    _, path = bag
    ckpt = tmp_path / "tiny.ckpt"
    save_checkpoint(ckpt, build_model("MinkUNet14A", in_channels=3, out_channels=32),
                    {"text_encoder": SyntheticTextEncoder(dim=32).config(), "voxel_size": 0.05})
    assert main(["replay", str(path), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), "--no-lidar",
                 "--pixel-stride", "4", "--frame-step", "3", "--voxel-size", "0.15"]) == 0
    assert json.loads(capsys.readouterr().out)["labelled"] is True
    with np.load(tmp_path / "o" / "synth_bag" / "map.npz") as z:
        assert z["features"].shape == (len(z["positions"]), 32) and z["features"].dtype == np.float16
        assert z["labels"].min() >= 0 and z["labels"].max() < len(SCANNET_20)
        norms = np.linalg.norm(z["features"].astype(np.float32), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=2e-3)
        assert list(z["class_names"]) == list(SCANNET_20)
