"""The sensor model: each effect measured on rendered synthetic frames, against its rule."""

import dataclasses
import math

import numpy as np
import pytest

from sas_core.data.sensor_model import (
    SENSOR_PRESETS, SensorConfig, apply_frame, apply_sensor, depth_edges, depth_sigma, luminance, quantize_depth,
    sensor_config,
)
from sas_core.data.synthetic import SynthConfig, generate_scene

SMALL = dict(n_frames=6, width=96, height=72, with_lidar=False, points_per_m2=40.0)


@pytest.fixture(scope="module")
def scene():
    return generate_scene(SynthConfig(seed=5, **SMALL))


def _stack(frames, attr):
    return np.stack([np.asarray(getattr(f, attr), np.float64) for f in frames])


@pytest.mark.parametrize("model", ["kinect", "stereo"])
def test_depth_noise_std_follows_the_model_with_range(scene, model):
    cfg = SensorConfig(depth_model=model, focal_px=580.0 if model == "stereo" else None)
    true = _stack(scene.frames, "depth")
    # many noisy copies of the same frames (different sequence seeds) give per-range statistics
    noisy = np.stack([_stack(apply_sensor(scene.frames, cfg, seed=s), "depth") for s in range(8)])
    err = (noisy - true[None]).reshape(8, -1)
    z = np.broadcast_to(true.reshape(1, -1), err.shape)
    fx = scene.frames[0].intrinsics.fx
    edges = np.quantile(true[true > 0], [0.0, 0.25, 0.5, 0.75, 1.0])
    checked = 0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (z > lo) & (z <= hi)
        if sel.sum() < 2000:
            continue
        measured = float(err[sel].std())
        expected = float(np.sqrt(np.mean(depth_sigma(z[sel], cfg, fx) ** 2)))
        assert measured == pytest.approx(expected, rel=0.05), (lo, hi)
        checked += 1
    assert checked >= 3
    near, far = depth_sigma(np.array([1.0, 4.0]), cfg, fx)
    assert far > 3 * near  # grows with range
    # the Kinect formula itself (Nguyen et al. 2012): 0.0012 + 0.0019 (z - 0.4)^2
    k = SensorConfig(depth_model="kinect")
    assert depth_sigma(np.array([2.4]), k, fx)[0] == pytest.approx(0.0012 + 0.0019 * 4.0)


def test_quantised_depth_lies_on_the_disparity_lattice(scene):
    cfg = SensorConfig(disparity_step_px=1 / 8, focal_px=580.0, quant_baseline_m=0.075)
    out = apply_sensor(scene.frames[:2], cfg, seed=0)
    z = np.concatenate([f.depth[f.depth > 0].astype(np.float64) for f in out])
    k = 580.0 * 0.075 / z / (1 / 8)  # disparity in steps: integers (up to float32 rounding)
    assert np.abs(k - np.round(k)).max() < 0.01
    true = np.concatenate([f.depth[f.depth > 0].astype(np.float64) for f in scene.frames[:2]])
    step = true ** 2 * (1 / 8) / (580.0 * 0.075)  # depth step of the lattice at z
    assert np.all(np.abs(z - true) <= 0.5 * step * 1.01 + 1e-6)
    assert np.abs(z - true).max() > 0.0  # it did snap
    assert np.array_equal(quantize_depth(np.zeros(3), cfg, 100.0), np.zeros(3))


def test_holes_only_where_the_rule_says(scene):
    cfg = SensorConfig(edge_dropout=0.5, dark_dropout=0.7, dark_threshold=0.25, min_range_m=0.8, max_range_m=4.0)
    frames = scene.frames
    out = apply_sensor(frames, cfg, seed=1)
    n_edge = n_edge_hole = n_dark = n_dark_hole = 0
    for f, g in zip(frames, out):
        z = f.depth.astype(np.float64)
        edge = depth_edges(z, cfg.edge_jump)
        dark = luminance(f.color) < cfg.dark_threshold
        rng_out = (z < cfg.min_range_m) | (z > cfg.max_range_m)
        hole = (g.depth == 0) & (z > 0)
        assert not np.any(hole & ~(edge | dark | rng_out)), "a hole where no rule allows one"
        assert np.all(hole[rng_out & (z > 0)]), "out-of-range depth must be missing"
        assert np.array_equal(g.depth[~hole], f.depth[~hole])  # no noise configured: the rest is exact
        only_edge, only_dark = edge & ~dark & ~rng_out, dark & ~edge & ~rng_out
        n_edge += only_edge.sum()
        n_edge_hole += (hole & only_edge).sum()
        n_dark += only_dark.sum()
        n_dark_hole += (hole & only_dark).sum()
    assert n_edge > 200 and n_dark > 200, (n_edge, n_dark)
    assert n_edge_hole / n_edge == pytest.approx(0.5, abs=0.06)
    assert n_dark_hole / n_dark == pytest.approx(0.7, abs=0.06)


def test_colour_noise_and_exposure(scene):
    f = scene.frames[0]
    noisy = apply_frame(f, SensorConfig(color_noise=4.0), seed=0, index=0)
    mid = (f.color > 20) & (f.color < 235)  # away from clipping
    d = noisy.color.astype(np.float64) - f.color.astype(np.float64)
    assert d[mid].std() == pytest.approx(4.0, rel=0.1)
    assert abs(d[mid].mean()) < 0.2
    gains = []
    for i in range(12):
        g = apply_frame(f, SensorConfig(exposure_sigma=0.1), seed=0, index=i)
        m = f.color > 10
        ratio = g.color[m].astype(np.float64) / f.color[m]
        assert ratio.std() < 0.1  # one gain per frame (up to 8-bit rounding and clipping)
        gains.append(float(np.median(ratio)))
    assert np.std(np.log(gains)) == pytest.approx(0.1, rel=0.6)
    assert len(set(np.round(gains, 3))) > 6


def test_pose_error_grows_with_time_and_rendering_uses_the_true_pose():
    cfg = SynthConfig(seed=2, n_frames=40, width=32, height=24, with_lidar=False, points_per_m2=10.0)
    clean = generate_scene(cfg)
    noisy_cfg = sensor_config("none", drift_trans_m=0.004, drift_rot_deg=0.1)
    frames = apply_sensor(clean.frames, noisy_cfg, seed=3)
    t_err = np.array([np.linalg.norm(f.pose[:3, 3] - c.pose[:3, 3]) for f, c in zip(frames, clean.frames)])
    r_err = np.array([math.degrees(math.acos(np.clip((np.trace(f.pose[:3, :3].T @ c.pose[:3, :3]) - 1) / 2, -1, 1)))
                      for f, c in zip(frames, clean.frames)])
    assert t_err[-10:].mean() > 2 * t_err[:10].mean()
    assert r_err[-10:].mean() > 2 * r_err[:10].mean()
    # a random walk: RMS translation error after k steps ~ sigma sqrt(3 k); averaged over sequences
    many = np.array([[np.linalg.norm(f.pose[:3, 3] - c.pose[:3, 3])
                      for f, c in zip(apply_sensor(clean.frames, noisy_cfg, seed=s), clean.frames)]
                     for s in range(30)])
    rms = np.sqrt((many ** 2).mean(axis=0))
    k = np.arange(1, len(rms) + 1)
    assert rms[-1] == pytest.approx(0.004 * math.sqrt(3 * k[-1]), rel=0.35)
    for f, c in zip(frames, clean.frames):
        assert np.array_equal(f.depth, c.depth) and np.array_equal(f.color, c.color)  # images unchanged
        assert np.linalg.det(f.pose[:3, :3]) == pytest.approx(1.0)
        assert np.allclose(c.pose, clean.camera_pose(c.stamp))  # the scene keeps the true trajectory
    # jitter alone does not grow
    jit = apply_sensor(clean.frames, SensorConfig(jitter_trans_m=0.01), seed=3)
    j_err = np.array([np.linalg.norm(f.pose[:3, 3] - c.pose[:3, 3]) for f, c in zip(jit, clean.frames)])
    assert j_err[-10:].mean() < 1.6 * j_err[:10].mean()


def test_none_is_bit_identical_and_presets_are_deterministic(scene):
    assert SensorConfig().is_identity and sensor_config("none").is_identity
    assert apply_sensor(scene.frames, "none") == list(scene.frames)
    assert all(a is b for a, b in zip(apply_sensor(scene.frames, "none"), scene.frames))
    base = generate_scene(SynthConfig(seed=5, sensor="none", **SMALL))
    for a, b in zip(base.frames, scene.frames):
        assert np.array_equal(a.depth, b.depth) and np.array_equal(a.color, b.color)
        assert np.array_equal(a.pose, b.pose)
    k1 = generate_scene(SynthConfig(seed=5, sensor="kinect", **SMALL))
    k2 = generate_scene(SynthConfig(seed=5, sensor="kinect", **SMALL))
    for a, b, c in zip(k1.frames, k2.frames, scene.frames):
        assert np.array_equal(a.depth, b.depth) and np.array_equal(a.color, b.color) and np.array_equal(a.pose, b.pose)
        assert not np.array_equal(a.depth, c.depth)
        assert np.array_equal(a.semantic, c.semantic) and np.array_equal(a.instance, c.instance)  # labels stay
    assert np.array_equal(k1.points.positions, scene.points.positions)
    assert np.array_equal(k1.points.labels, scene.points.labels)
    assert not np.array_equal(k1.frames[-1].pose, scene.frames[-1].pose)
    r = generate_scene(SynthConfig(seed=5, sensor="realsense", **SMALL))
    assert not np.array_equal(r.frames[0].depth, k1.frames[0].depth)


def test_config_errors_and_presets():
    assert set(SENSOR_PRESETS) == {"none", "kinect", "realsense"}
    with pytest.raises(ValueError, match="unknown sensor preset"):
        sensor_config("lidar")
    with pytest.raises(ValueError, match="probability"):
        SensorConfig(edge_dropout=1.5)
    with pytest.raises(ValueError, match="depth_model"):
        SensorConfig(depth_model="tof")
    with pytest.raises(ValueError, match=">= 0"):
        SensorConfig(color_noise=-1.0)
    for name in SENSOR_PRESETS:
        cfg = sensor_config(name)
        assert dataclasses.asdict(cfg)  # plain fields
        assert cfg.is_identity == (name == "none")


def test_sas_synth_sensor_flag(tmp_path):
    import json

    from sas_app.cli import main

    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--frames", "2", "--width", "32", "--height", "24", "--no-lidar",
                 "--no-bag", "--points-per-m2", "10", "--sensor", "kinect"]) == 0
    manifest = json.loads((out / "synth.json").read_text())
    assert manifest["sensor"] == "kinect"
    clean = generate_scene(SynthConfig(seed=0, n_frames=2, width=32, height=24, with_lidar=False, points_per_m2=10.0))
    pose = np.loadtxt(out / "openscene" / "2d" / manifest["scenes"][0]["name"] / "pose" / "1.txt")
    assert not np.allclose(pose, clean.frames[1].pose, atol=1e-7)  # the reported (drifted) pose was written
    assert np.allclose(pose, clean.frames[1].pose, atol=0.05)
