"""OpenScene layout: what we write reads back (and reads like OpenScene's own files)."""

import numpy as np
import pytest

from sas_core.data.openscene import (
    iter_openscene_frames, list_scenes, load_openscene_scene, read_pth, write_openscene_scene,
)
from sas_core.data.synthetic import SynthConfig, generate_scene
from sas_core.types import IGNORE_LABEL


@pytest.fixture(scope="module")
def scene():
    return generate_scene(SynthConfig(seed=5, n_frames=3, with_lidar=False, points_per_m2=150))


@pytest.fixture(scope="module")
def root(scene, tmp_path_factory):
    root = tmp_path_factory.mktemp("openscene")
    write_openscene_scene(scene, root, split="val")
    return root


def test_layout_matches_openscene(scene, root):
    import torch

    pth = root / "val" / f"{scene.name}.pth"
    coords, colors, labels = torch.load(pth, weights_only=False)  # what OpenScene's loader does
    assert coords.dtype == np.float32 and coords.shape == (len(scene.points), 3)
    assert colors.dtype == np.float32 and colors.min() >= -1 and colors.max() <= 1
    np.testing.assert_allclose((colors + 1) * 127.5, scene.points.colors * 255, atol=1e-3)
    assert IGNORE_LABEL in labels and set(np.unique(labels)) <= set(range(20)) | {IGNORE_LABEL}
    d2 = root / "2d" / scene.name
    assert sorted(p.name for p in (d2 / "color").iterdir()) == ["0.jpg", "1.jpg", "2.jpg"]
    from PIL import Image

    with Image.open(d2 / "depth" / "1.png") as im:
        depth = np.array(im)
    assert depth.dtype == np.uint16 or depth.dtype == np.int32  # PIL reads 16-bit PNGs as I;16
    np.testing.assert_allclose(depth / 1000.0, scene.frames[1].depth, atol=5.1e-4)
    np.testing.assert_allclose(np.loadtxt(d2 / "pose" / "2.txt"), scene.frames[2].pose, atol=1e-8)
    K = np.loadtxt(root / "2d" / "intrinsics.txt")
    assert K.shape == (4, 4)
    np.testing.assert_allclose(K[:3, :3], scene.intrinsics.K)
    assert list_scenes(root, "val") == [scene.name]


def test_roundtrip(scene, root):
    cloud, frames = load_openscene_scene(root, scene.name)
    np.testing.assert_array_equal(cloud.positions, scene.points.positions)
    np.testing.assert_allclose(cloud.colors, scene.points.colors, atol=1e-6)
    np.testing.assert_array_equal(cloud.labels, scene.points.labels)
    frames = list(frames)
    assert len(frames) == 3
    for got, ref in zip(frames, scene.frames):
        assert got.intrinsics == ref.intrinsics
        np.testing.assert_allclose(got.pose, ref.pose, atol=1e-8)
        np.testing.assert_allclose(got.depth, ref.depth, atol=5.1e-4)
        assert np.abs(got.color.astype(int) - ref.color).mean() < 3  # JPEG quality 95
        np.testing.assert_array_equal(got.semantic, ref.semantic)
        np.testing.assert_array_equal(got.instance, ref.instance)


def test_pth_bytes_are_deterministic(scene, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_openscene_scene(scene, a)
    write_openscene_scene(generate_scene(scene.config), b)
    name = f"train/{scene.name}.pth"
    assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "2d" / scene.name / "color/0.jpg").read_bytes() == (b / "2d" / scene.name / "color/0.jpg").read_bytes()
    other = generate_scene(SynthConfig(seed=6, n_frames=0, with_lidar=False, points_per_m2=150, name=scene.name))
    write_openscene_scene(other, b)
    assert (a / name).read_bytes() != (b / name).read_bytes()


def test_reads_openscene_style_float_labels(tmp_path):
    import torch

    (tmp_path / "train").mkdir()
    coords = np.random.default_rng(0).random((10, 3))  # float64 as OpenScene's preprocess writes
    colors = np.zeros((10, 3)) - 1
    labels = np.array([0, 1, 2, 255, -100, 19, 3, 3, 3, 3], dtype=np.float64)
    torch.save((coords, colors, labels), tmp_path / "train" / "scene0000_00_vh_clean_2.pth")
    cloud, frames = load_openscene_scene(tmp_path, "scene0000_00")
    assert cloud.positions.dtype == np.float32 and len(cloud) == 10
    assert cloud.labels.tolist() == [0, 1, 2, 255, 255, 19, 3, 3, 3, 3]
    np.testing.assert_array_equal(cloud.colors, 0)
    assert list(frames) == []


def test_bad_files_give_clear_errors(scene, root, tmp_path):
    with pytest.raises(FileNotFoundError, match="no point file"):
        load_openscene_scene(root, "nope")
    bad = tmp_path / "train" / "broken.pth"
    bad.parent.mkdir(parents=True)
    bad.write_bytes((root / "val" / f"{scene.name}.pth").read_bytes()[:500])
    with pytest.raises(ValueError, match="cannot read"):
        read_pth(bad)
    import torch

    torch.save((np.zeros((4, 3), np.float32), np.zeros((5, 3), np.float32), np.zeros(4)), bad)
    with pytest.raises(ValueError, match="do not match"):
        read_pth(bad)
    # a broken 2D folder
    import shutil

    d2 = tmp_path / "2d" / "s"
    shutil.copytree(root / "2d" / scene.name, d2)
    (d2 / "pose" / "1.txt").write_text("1 2 3\n")
    with pytest.raises(ValueError, match="must be 4x4"):
        list(iter_openscene_frames(d2))
    (d2 / "pose" / "1.txt").write_text("-inf " * 4 + "\n" + ("-inf " * 4 + "\n") * 3)
    assert len(list(iter_openscene_frames(d2))) == 2  # ScanNet's lost-tracking frames are skipped
    (d2 / "depth" / "2.png").unlink()
    with pytest.raises(FileNotFoundError, match="2.png"):
        list(iter_openscene_frames(d2))
    (d2 / "depth" / "2.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot decode"):
        list(iter_openscene_frames(d2))


def test_bad_scene_name_refused(scene, tmp_path):
    import dataclasses

    bad = dataclasses.replace(scene, name="../evil")
    with pytest.raises(ValueError, match="plain file name"):
        write_openscene_scene(bad, tmp_path)
