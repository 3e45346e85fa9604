"""Robot-style bags (test/bag_corpus.py) through `sas replay`, `sas bag-info` and the export."""

import json

import numpy as np
import pytest

from bag_corpus import LAYOUTS, Writer, corpus, realsense  # noqa: F401  (corpus is a fixture)

GOOD = [k for k, v in LAYOUTS.items() if "error" not in v[4] and k != "bad_messages"]
GOOD += [f"{k}_mcap" for k in GOOD if "mcap" in LAYOUTS[k][3]]
BAD = [k for k, v in LAYOUTS.items() if "error" in v[4]]


def _on_surface(scene, positions, tol=0.05) -> float:
    from scipy.spatial import cKDTree

    d, _ = cKDTree(scene.points.positions).query(positions)
    return float((d <= tol).mean())


def _replay(path, tmp_path, capsys, *extra):
    from sas_app.cli import main

    rc = main(["replay", str(path), "--out", str(tmp_path / "out"), "--name", "robot", *extra])
    out = capsys.readouterr()
    return rc, (json.loads(out.out) if rc == 0 else None), out.err


@pytest.mark.parametrize("key", GOOD)
def test_replay_maps_the_ground_truth_surface_and_exports(corpus, key, tmp_path, capsys):
    from sas_core.data.openscene import load_openscene_scene

    case = corpus[key]
    expect = case.expect
    rc, summary, err = _replay(case.path, tmp_path, capsys, "--export", str(tmp_path / "os"))
    assert rc == 0, err
    assert summary["skipped"] == expect["skipped"]
    assert "used" in err and "skipped" in err  # the one-line human summary
    with np.load(tmp_path / "out" / "robot" / "map.npz") as z:
        positions = z["positions"]
    assert len(positions) > 500
    assert _on_surface(case.scene, positions) >= 0.95
    cloud, frames = load_openscene_scene(tmp_path / "os", "robot")
    frames = list(frames)
    np.testing.assert_allclose(cloud.positions, positions, atol=1e-5)  # the export round-trips
    if case.kind == "lidar":
        assert summary["sweeps"] == expect["sweeps_used"] and summary["sweeps_seen"] == expect["sweeps_seen"]
        assert summary["frames"] == 0 and frames == []
        assert summary["streams"]["lidar"] == expect["lidar"]
        return
    assert summary["frames"] == expect["frames_used"] and summary["frames_seen"] == expect["frames_seen"]
    streams = summary["streams"]
    assert (streams["color"], streams["depth"], streams["register_depth"]) == \
        (expect["color"], expect["depth"], expect["register"])
    assert len(frames) == expect["frames_used"] == len(case.poses)
    for got, stamp in zip(frames, sorted(case.poses)):  # poses through the TF chain = the true camera poses
        np.testing.assert_allclose(got.pose, case.poses[stamp], atol=2e-3)
    assert frames[0].color.shape == (60, 80, 3)
    assert (frames[0].depth > 0).mean() > 0.3


@pytest.mark.parametrize("key", ["realsense", "tum", "lidar", "unregistered"])
def test_bag_info_describes_the_bag(corpus, key, capsys):
    from sas_app.cli import main

    case = corpus[key]
    assert main(["bag-info", str(case.path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    topics = {t["topic"]: t for t in info["topics"]}
    replay, tf = info["replay"], info["tf"]
    if key == "lidar":
        assert replay["lidar"] == "/ouster/points" and replay["color"] is None
        assert topics["/ouster/points"]["frame_id"] == "os_lidar"
        assert topics["/ouster/points"]["rate_hz"] == pytest.approx(2.5, rel=0.01)
        assert tf["os_lidar"]["parent"] == "os_sensor" and tf["os_lidar"]["static"]
        assert tf["base_link"]["rate_hz"] == pytest.approx(50.0, rel=0.02)
    else:
        assert replay["color"] == case.expect["color"] and replay["depth"] == case.expect["depth"]
        assert topics[replay["color"]]["rate_hz"] == pytest.approx(2.5, rel=0.01)
        assert replay["reasons"]["camera_pose"].startswith("sensor frame")
    if key == "realsense":
        assert topics["/camera/camera/color/image_raw"]["encoding"] == "rgb8"
        assert topics["/camera/camera/aligned_depth_to_color/image_raw"]["encoding"] == "16UC1"
        assert {c: (f["parent"], f["static"]) for c, f in tf.items()} == {
            "odom": ("map", False), "base_link": ("odom", False), "camera_link": ("base_link", True),
            "camera_color_optical_frame": ("camera_link", True), "camera_depth_optical_frame": ("camera_link", True)}
        assert tf["odom"]["rate_hz"] == pytest.approx(20.0, rel=0.02)
        assert tf["base_link"]["rate_hz"] == pytest.approx(100.0, rel=0.02)
        assert "image_rect_raw" in replay["reasons"]["depth"]  # the unaligned depth, not chosen, is named
    if key == "tum":
        assert "world" in replay["camera_pose"] and tf["kinect"]["parent"] == "world"
        assert topics["/camera/depth/image"]["encoding"] == "32FC1"
    if key == "unregistered":
        assert replay["register_depth"] is True and replay["depth_info"] == "/camera/camera/depth/camera_info"
    # the text form names the same things
    assert main(["bag-info", str(case.path)]) == 0
    text = capsys.readouterr().out
    assert "TF tree" in text and "sas replay would use:" in text
    assert (replay["lidar"] or replay["color"]) in text


@pytest.mark.parametrize("key", BAD)
def test_bad_trees_and_sizes_are_clear_errors(corpus, key, tmp_path, capsys):
    rc, _, err = _replay(corpus[key].path, tmp_path, capsys)
    assert rc == 1
    assert "no usable RGB-D frame" in err and corpus[key].expect["error"] in err
    assert err.count("\n") <= 3  # one clear line (plus the progress bar), no traceback
    assert "Traceback" not in err


@pytest.mark.parametrize("key,words", [("tf_loop", "has a loop"), ("disconnected", "hangs under 'rig'")])
def test_bag_info_warns_about_broken_trees(corpus, key, words, capsys):
    from sas_app.cli import main

    assert main(["bag-info", str(corpus[key].path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert words in info["replay"]["reasons"]["camera_pose"]
    assert main(["bag-info", str(corpus[key].path)]) == 0
    text = capsys.readouterr().out
    assert ("in a loop (no root): camera_color_optical_frame, mount, rig" in text) == (key == "tf_loop")


def test_bad_messages_are_counted_skips(corpus, tmp_path, capsys):
    case = corpus["bad_messages"]
    rc, summary, err = _replay(case.path, tmp_path, capsys)
    assert rc == 0, err
    assert summary["frames"] == case.expect["frames_used"] and summary["frames_seen"] == 6
    assert summary["skipped"] == case.expect["skipped"] and summary["other"] == case.expect["other"]
    problems = {(p["topic"], p["index"], p["reason"]) for p in summary["problems"]}
    assert problems == {("/camera/color/image_raw/compressed", 1, "corrupt_image"),
                        ("/camera/depth/image_raw/compressedDepth", 2, "no_depth_header"),
                        ("/camera/color/camera_info", 3, "bad_camera_info"),
                        ("/camera/color/image_raw/compressed", 4, "nan_depth")}  # the mapper's own refusal
    with np.load(tmp_path / "out" / "robot" / "map.npz") as z:
        assert _on_surface(case.scene, z["positions"]) >= 0.95


def test_replay_takes_the_bag_file_and_checks_arguments_first(corpus, tmp_path, capsys):
    case = corpus["realsense_mcap"]
    mcap = next(case.path.glob("*.mcap"))
    rc, summary, err = _replay(mcap, tmp_path, capsys)
    assert rc == 0 and summary["frames"] == 8, err
    db3 = next(corpus["jpeg"].path.glob("*.db3"))
    rc, summary, err = _replay(db3, tmp_path, capsys, "--no-lidar")
    assert rc == 0 and summary["frames"] == 10, err
    rc, _, err = _replay(case.path, tmp_path, capsys, "--color-topic", "/nope/image_raw")
    assert rc == 1 and "no topic /nope/image_raw" in err
    rc, _, err = _replay(case.path, tmp_path, capsys, "--depth-topic", "/camera/camera/color/camera_info")
    assert rc == 1 and "CameraInfo" in err and "expected" in err
    rc, _, err = _replay(case.path, tmp_path, capsys, "--map-frame", "earth")
    assert rc == 1 and "'earth' is not in the bag's TF tree" in err
    rc, _, err = _replay(tmp_path / "nothing", tmp_path, capsys)
    assert rc == 1 and "does not exist" in err
    # an explicit depth topic: the unaligned one, registered through TF
    rc, summary, err = _replay(case.path, tmp_path, capsys, "--depth-topic", "/camera/camera/depth/image_rect_raw")
    assert rc == 0, err
    assert summary["streams"]["register_depth"] and summary["streams"]["depth_info"].endswith("depth/camera_info")
    with np.load(tmp_path / "out" / "robot" / "map.npz") as z:
        assert _on_surface(case.scene, z["positions"]) >= 0.95


def test_odometry_gives_the_edge_tf_lacks(corpus, tmp_path, capsys):
    """/odom (nav_msgs/Odometry) carries odom -> base_link, which the bag's TF does not: found by
    itself, and as --pose-topic."""
    case = corpus["odometry"]
    for extra in ((), ("--pose-topic", "/odom")):
        rc, summary, err = _replay(case.path, tmp_path, capsys, "--export", str(tmp_path / f"os{len(extra)}"),
                                   *extra)
        assert rc == 0 and summary["frames"] == 10, err
        assert "/odom" in summary["streams"]["reasons"]["camera_pose"]
        from sas_core.data.openscene import load_openscene_scene

        _, frames = load_openscene_scene(tmp_path / f"os{len(extra)}", "robot")
        for got, stamp in zip(frames, sorted(case.poses)):
            np.testing.assert_allclose(got.pose, case.poses[stamp], atol=2e-3)


def test_two_cameras_are_an_ambiguity_that_lists_them(corpus, tmp_path, capsys):
    """Two equally good colour streams: an error naming both; --color-topic (and its depth) settles it."""
    scene = corpus["realsense"].scene
    w = Writer()
    realsense(scene, w, raw_depth=False, tf_from_frame=0, n=3)
    for e in list(w.events):
        if e[2].startswith("/camera/camera/color/"):
            w.events.append((e[0], e[1], e[2].replace("/camera/camera/", "/right/"), e[3], e[4]))
    path = w.write(tmp_path / "two", "sqlite3")
    rc, _, err = _replay(path, tmp_path, capsys)
    assert rc == 1 and "/camera/camera/color/image_raw" in err and "/right/color/image_raw" in err
    assert "--color-topic" in err
    rc, summary, err = _replay(path, tmp_path, capsys, "--color-topic", "/camera/camera/color/image_raw")
    assert rc == 0 and summary["frames"] == 3, err


def test_bag_info_of_our_synthetic_layout(tmp_path, capsys):
    """No TF at all: the poses come from the PoseStamped topic beside each sensor."""
    from sas_app.cli import main
    from sas_core.data.rosbag_io import write_bag
    from sas_core.data.synthetic import SynthConfig, generate_scene

    scene = generate_scene(SynthConfig(seed=3, n_frames=3, width=64, height=48, n_lidar_sweeps=2,
                                       lidar_azimuth_steps=128, points_per_m2=20))
    path = write_bag(scene, tmp_path / "synth", storage="mcap")
    assert main(["bag-info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tf"] == {} and info["messages"] == 3 * 4 + 2 * 2
    replay = info["replay"]
    assert (replay["color"], replay["depth"], replay["lidar"]) == (
        "/camera/color/image_raw", "/camera/depth/image_raw", "/lidar/points")
    assert "/camera/pose beside the sensor" in replay["reasons"]["camera_pose"]
    assert "/lidar/pose beside the sensor" in replay["reasons"]["lidar_pose"]
    assert main(["bag-info", str(path)]) == 0
    assert "TF tree: none" in capsys.readouterr().out
