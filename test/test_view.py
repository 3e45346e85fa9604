"""`sas view`: loading what it shows, its queries (the Mapper's), the viewer's drawing, and a real
headless Chromium (Debian's chromium via Playwright): the page shows the synthetic map and its
vocabulary, typing a query recolours the matching object, a live node's cloud grows on screen."""

import json

import numpy as np
import pytest

from sas_app.viewer import (OfflineBackend, ViewScene, Viewer, browser_args, find_browser, load_view_scene,
                            read_trajectory)

VOCAB = None  # the synthetic scene's class names (set by the fixture)


def _browser_or_skip():
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements.txt)")
    if find_browser() is None:
        pytest.skip("no Chromium: install Debian's chromium (scripts/setup_env.sh does where apt is usable) "
                    "or set SAS_CHROMIUM")


@pytest.fixture(scope="module")
def synth():
    from sas_core.data.synthetic import SynthConfig, generate_scene

    return generate_scene(SynthConfig(seed=3, n_frames=8, with_lidar=False))


@pytest.fixture(scope="module")
def saved_map(synth, tmp_path_factory):
    """A map folder as the node's ~/save_map writes it: live fusion (simulated teacher) over 8 frames."""
    from sas_app.viewer import synthetic_room_map
    from sas_core.mapping import Mapper, MapperConfig

    folder = synthetic_room_map(tmp_path_factory.mktemp("view") / "room", seed=3, n_frames=8)
    mapper = Mapper(MapperConfig(mode="fusion", vocabulary=",".join(synth.class_names), text_dim=64))
    mapper.load(folder)
    return folder, folder / "trajectory.npy", mapper


def _backend(folder, traj=None):
    from sas_core.text import SyntheticTextEncoder

    scene = load_view_scene(folder, trajectory=traj)
    return OfflineBackend(scene, SyntheticTextEncoder(scene.class_names, dim=scene.features.shape[1]))


# ---------------------------------------------------------------------------------------- data and queries

def test_map_folder_loads_and_queries_as_the_mapper_does(saved_map, synth):
    folder, traj, mapper = saved_map
    backend = _backend(folder)  # finds its trajectory.npy
    scene = backend.scene
    data = mapper.export()
    np.testing.assert_array_equal(scene.positions, data["positions"])
    np.testing.assert_array_equal(scene.labels, data["labels"])
    assert scene.class_names == list(synth.class_names) and scene.features.shape == (len(scene), 64)
    assert scene.trajectory.shape == (len(synth.frames), 4, 4) and scene.voxel_size == pytest.approx(0.05)
    view = backend.query("a chair", 0.5)
    assert view.ok and view.objects, view.message
    # the same matches and objects as the node's ~/query (Mapper.query) over the same map
    (answer,) = mapper.query(["a chair"], threshold=0.5, max_points=200_000)
    assert view.count == answer.count
    np.testing.assert_allclose(view.relevance[np.argsort(-view.relevance)[:20]].min(), answer.scores[:20].min(),
                               atol=2e-3)
    assert len(view.objects) == len(answer.objects)
    for o, inst in zip(view.objects, answer.objects):
        np.testing.assert_allclose(o["box_center"], inst.obb_center, atol=1e-3)
        assert o["n_points"] == inst.n_points
    # the matching voxels are the chairs of the scene
    chair = list(synth.class_names).index("chair")
    hit = view.relevance >= 0.5
    assert (scene.labels[hit] == chair).mean() > 0.8
    # refused like the node refuses: unknown word, too long
    bad = backend.query("a flying saucer", 0.5)
    assert not bad.ok and "saucer" in bad.message
    assert not backend.query("x" * 500, 0.5).ok


def test_vocabulary_change_relabels_offline(saved_map):
    folder, _, _ = saved_map
    backend = _backend(folder)
    msg = backend.set_vocabulary(["chair", "table", "floor"])
    assert "3 classes" in msg and backend.scene.class_names == ["chair", "table", "floor"]
    assert set(np.unique(backend.scene.labels)) <= {0, 1, 2}
    with pytest.raises(ValueError):
        backend.set_vocabulary(["chair", "Chair"])  # duplicate (case-insensitive), as the node refuses


def test_ply_and_pth_with_a_checkpoint(tmp_path, synth):
    torch = pytest.importorskip("torch")
    from sas_core.data.openscene import write_pth
    from sas_core.infer import Segmenter
    from sas_core.io import write_ply
    from sas_core.nn import build_model, save_checkpoint
    from sas_core.text import SyntheticTextEncoder

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pth"
    enc = SyntheticTextEncoder(dim=16)
    save_checkpoint(ckpt, build_model("MinkUNet14A", 3, 16), {"voxel_size": 0.05, "text_encoder": enc.config()})
    seg = Segmenter.from_checkpoint(ckpt)
    pts = synth.points.positions[::20]
    # an OpenScene .pth next to its 2d/<scene>/pose folder: labelled by the checkpoint, trajectory found
    pth = tmp_path / "data" / "train" / "room.pth"
    write_pth(pth, pts, synth.points.colors[::20] * 2 - 1, synth.points.labels[::20])
    (tmp_path / "data" / "2d" / "room" / "pose").mkdir(parents=True)
    for i, f in enumerate(synth.frames[:3]):
        np.savetxt(tmp_path / "data" / "2d" / "room" / "pose" / f"{i * 20}.txt", f.pose)
    scene = load_view_scene(pth, segmenter=seg, vocabulary=["chair", "table", "floor"])
    assert scene.features.shape == (len(pts), 16) and scene.class_names == ["chair", "table", "floor"]
    assert scene.trajectory.shape == (3, 4, 4)
    np.testing.assert_allclose(scene.trajectory[2], synth.frames[2].pose, atol=1e-6)
    backend = OfflineBackend(scene, seg.text_encoder)
    view = backend.query("a chair", -1.0)
    expected = seg.relevance(scene.features, "a chair")  # sas query's relevance
    np.testing.assert_allclose(view.relevance, expected, atol=2e-3)
    # a labelled PLY as sas segment writes it: labels and scores read back, names from --vocabulary
    ply = tmp_path / "seg.ply"
    inst = np.where(scene.labels == 0, np.arange(len(pts)) % 3, -1).astype(np.int32)
    write_ply(ply, pts, colors=(synth.points.colors[::20] * 255).astype(np.uint8), labels=scene.labels,
              scores=scene.scores, instance=inst)
    back = load_view_scene(ply, vocabulary=["chair", "table", "floor"])
    np.testing.assert_array_equal(back.labels, scene.labels)
    np.testing.assert_array_equal(back.instance, inst)
    np.testing.assert_allclose(back.scores, scene.scores, atol=1e-6)
    assert back.features is None and not OfflineBackend(back).can_query
    assert "--checkpoint" in OfflineBackend(back).reason


def test_cli_backend_of_a_cloud_with_a_checkpoint(tmp_path, synth, monkeypatch):
    """`sas view cloud.npy --checkpoint C`: features and labels from the checkpoint (vocabulary as sas
    segment's default), queries by its text encoder; without one the viewer says why it cannot query."""
    pytest.importorskip("torch")
    from sas_app.cli import build_parser
    from sas_app.commands.view import offline_backend
    from sas_core.nn import build_model, save_checkpoint
    from sas_core.text import SCANNET_20, SyntheticTextEncoder

    monkeypatch.delenv("SAS_MODELS", raising=False)  # no models file gives a default checkpoint
    monkeypatch.delenv("SAS_MODELS_DIR", raising=False)
    ckpt = tmp_path / "tiny.pth"
    save_checkpoint(ckpt, build_model("MinkUNet14A", 3, 16), {"voxel_size": 0.05,
                                                              "text_encoder": SyntheticTextEncoder(dim=16).config()})
    cloud = tmp_path / "cloud.npy"
    np.save(cloud, np.c_[synth.points.positions[::40], synth.points.colors[::40]].astype(np.float32))
    parser = build_parser(lazy=False)
    backend = offline_backend(parser.parse_args(["view", str(cloud), "--checkpoint", str(ckpt)]))
    assert backend.can_query and backend.scene.class_names == list(SCANNET_20) and backend.scene.synthetic
    assert backend.scene.labels.shape == (len(backend.scene),)
    assert backend.query("a chair", 0.0).ok
    plain = offline_backend(parser.parse_args(["view", str(cloud)]))
    assert not plain.can_query and "--checkpoint" in plain.reason
    assert plain.scene.labels is None and plain.scene.class_names == []


def test_instance_colours(server):
    from sas_core.viz import label_colors

    n = 1000
    scene = ViewScene(positions=np.random.default_rng(0).random((n, 3)).astype(np.float32),
                      rgb=np.zeros((n, 3), np.uint8), instance=np.arange(n) % 5 - 1)
    viewer = Viewer(server, OfflineBackend(scene))
    try:
        viewer.color_by.value = "instance"
        idx = viewer.shown_indices()
        c = viewer.colors(idx)
        none = scene.instance[idx] < 0
        assert (c[none] == 200).all() and len(np.unique(c[~none], axis=0)) == 4
        assert not (c[~none] == 200).all(1).any()
        np.testing.assert_array_equal(c[~none], label_colors(scene.instance[idx][~none] % 251 + 4))
    finally:
        viewer.close()


def test_trajectory_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_trajectory(tmp_path / "none.npy")
    np.save(tmp_path / "bad.npy", np.zeros((3, 3)))
    with pytest.raises(ValueError, match="4, 4"):
        read_trajectory(tmp_path / "bad.npy")


# ---------------------------------------------------------------------------------------- the viewer (no browser)

@pytest.fixture
def server():
    from sas_app.viewer import start_server, stop_server

    s = start_server("127.0.0.1", 8400)
    yield s
    stop_server(s)


def test_viewer_subsets_hides_classes_and_colours(server, saved_map):
    folder, traj, _ = saved_map
    backend = _backend(folder, traj)
    viewer = Viewer(server, backend, max_points=5000)
    try:
        scene = viewer.scene
        idx = viewer.shown_indices()
        assert len(idx) == 5000 and len(np.unique(idx)) == 5000
        viewer.max_points.value = 10 ** 7
        assert len(viewer.shown_indices()) == len(scene)
        # per-class visibility: switching "floor" off removes exactly the floor points
        floor = scene.class_names.index("floor")
        names = [b.label for b in viewer._class_boxes]
        assert names == scene.class_names
        viewer._class_boxes[floor].value = False
        shown = viewer.shown_indices()
        assert len(shown) == len(scene) - int((scene.labels == floor).sum())
        assert not (scene.labels[shown] == floor).any()
        viewer._class_boxes[floor].value = True
        # colours: rgb, label (the palette), score, relevance after a query (with its colour bar)
        from sas_core.viz import label_colors

        idx = viewer.shown_indices()
        np.testing.assert_array_equal(viewer.colors(idx), scene.rgb[idx])
        viewer.color_by.value = "label"
        np.testing.assert_array_equal(viewer.colors(idx), label_colors(scene.labels[idx]))
        view = viewer.query_now("a chair")
        assert view.ok and viewer.color_by.value == "relevance" and viewer.colorbar.visible
        hot = view.relevance[idx] >= view.threshold
        c = viewer.colors(idx).astype(int)
        assert hot.any() and not np.array_equal(c[hot], scene.rgb[idx][hot])
        assert "a chair" in viewer.result.content and "#0" in viewer.result.content
        assert len(viewer._object_nodes) == 2 * len(view.objects)  # a box and a label each
        assert len(viewer._traj_nodes) >= 2
        viewer.clear_query()
        assert viewer.query_view is None and not viewer._object_nodes
        # a query from the text box goes through the worker
        n = viewer.n_draws
        viewer.submit("a table")
        from conftest import wait_until

        assert wait_until(lambda: viewer.query_view is not None and viewer.query_view.text == "a table"
                          and viewer.n_draws > n, 10)
    finally:
        viewer.close()


def test_cli_view_errors(capsys, saved_map):
    from sas_app.cli import main

    folder, _, _ = saved_map
    assert main(["view"]) == 1
    assert "give a MAP" in capsys.readouterr().err
    assert main(["view", str(folder), "--query", "chair"]) == 1
    assert "--screenshot" in capsys.readouterr().err
    assert main(["view", str(folder), "--screenshot", "x.jpg"]) == 1
    assert ".png" in capsys.readouterr().err
    assert main(["view", str(folder / "nothing")]) == 1
    assert "not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- the browser

def _project(client, points, width, height):
    """Pixel coordinates of world points in the client's camera (OpenCV convention: +z forward)."""
    from sas_core.data.msg_codec import quaternion_to_matrix

    cam = client.camera
    w, x, y, z = np.asarray(cam.wxyz, np.float64)
    R = quaternion_to_matrix([x, y, z, w])
    p = (np.asarray(points, np.float64) - np.asarray(cam.position)) @ R
    f = (height / 2) / np.tan(cam.fov / 2)
    return np.c_[f * p[:, 0] / p[:, 2] + width / 2, f * p[:, 1] / p[:, 2] + height / 2], p[:, 2]


def _box_corners(o):
    c, s, yaw = np.asarray(o["box_center"]), np.asarray(o["box_size"]), o["box_yaw"]
    R = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    corners = np.array([[sx, sy, sz] for sx in (-.5, .5) for sy in (-.5, .5) for sz in (-.5, .5)]) * s
    return corners @ R.T + c


@pytest.mark.slow
def test_browser_shows_the_map_legend_and_a_query(server, saved_map):
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    from sas_app.viewer import hide_notifications, open_page, wait_for_client

    folder, traj, _ = saved_map
    backend = _backend(folder)
    viewer = Viewer(server, backend)
    W, H = 900, 700
    try:
        with sync_playwright() as p:
            browser, page = open_page(p, f"http://127.0.0.1:{server.get_port()}/", W, H)
            try:
                client = wait_for_client(server, 30)
                hide_notifications(page)
                before = client.get_render(height=H, width=W, transport_format="png", timeout=60)
                drawn = before[..., 3] > 0
                assert drawn.mean() > 0.05, "the map is not drawn"
                # the legend lists the vocabulary (with the counts of the map)
                page.wait_for_selector(".sas-legend", timeout=20000)
                legend = page.locator(".sas-legend-name").all_inner_texts()
                assert legend == list(backend.scene.class_names)
                # type a query into the text box, as a person would
                box = page.locator("xpath=//label[text()='Query']/ancestor::div[contains(@class, 'mantine-Flex-root')]"
                                   "[1]//input")
                box.click()
                box.type("a chair")
                box.press("Enter")
                from conftest import wait_until

                assert wait_until(lambda: viewer.drawn_query == "a chair", 20)
                page.wait_for_timeout(500)
                after = client.get_render(height=H, width=W, transport_format="png", timeout=60)
                objects = viewer.query_view.objects
                inside = np.zeros_like(drawn)
                boxes = []
                for obj in objects:
                    uv, depth = _project(client, _box_corners(obj), W, H)
                    assert (depth > 0).all()
                    (u0, v0), (u1, v1) = (np.clip(uv.min(0), 0, [W, H]).astype(int),
                                          np.clip(uv.max(0), 0, [W, H]).astype(int))
                    boxes.append((u0, v0, u1, v1))
                    inside[v0:v1, u0:u1] = True
                u0, v0, u1, v1 = boxes[0]
                assert u1 - u0 > 3 and v1 - v0 > 3, "the best object is not in view"
                first = np.zeros_like(drawn)
                first[v0:v1, u0:u1] = True
                # the best object's pixels changed, and took the relevance colours (saturated turbo),
                # while the rest of the map faded to greys
                diff = np.abs(after[..., :3].astype(int) - before[..., :3].astype(int)).sum(-1)
                sat = lambda img: img[..., :3].max(-1).astype(int) - img[..., :3].min(-1)  # noqa: E731
                region, rest = first & drawn, ~inside & drawn
                hot_in, hot_out = (sat(after)[region] > 120).mean(), (sat(after)[rest] > 120).mean()
                assert diff[region].mean() > 60
                assert hot_in > 0.15 and hot_in > 4 * hot_out, (hot_in, hot_out)
                # the result list in the panel names the query
                assert "a chair" in page.inner_text("body")
            finally:
                browser.close()
    finally:
        viewer.close()


@pytest.mark.slow
def test_cli_screenshot(saved_map, tmp_path, capsys):
    _browser_or_skip()
    from PIL import Image

    from sas_app.cli import main

    folder, traj, _ = saved_map
    out = tmp_path / "shot.png"
    assert main(["view", str(folder), "--synthetic-text", "--trajectory", str(traj), "--screenshot", str(out),
                 "--query", "a chair", "--size", "800x600", "--port", "8420"]) == 0
    line = capsys.readouterr().out
    assert "objects" in line and str(out) in line
    img = np.asarray(Image.open(out))
    assert img.shape[:2] == (600, 800)
    assert img[..., :3].std() > 10  # not a blank page


@pytest.mark.slow
def test_bench_view_measures_in_the_browser():
    _browser_or_skip()
    from sas_app.bench.view import main

    out = main(["--points", "3000", "--shown", "1000", "--seconds", "1", "--size", "640x480", "--port", "8440"])
    (run,) = out["runs"]
    assert run["points"] == 3000 and run["shown"] == 1000 and run["load_s"] > 0
    assert run["fps"] > 0 and run["fps_subsampled"] > 0  # frames were really drawn while orbiting
    json.dumps(out)


# ---------------------------------------------------------------------------------------- live (--ros)

@pytest.mark.ros
@pytest.mark.slow
def test_live_mode_shows_the_node_cloud_growing(server, synth):
    pytest.importorskip("rclpy")
    from conftest import wait_until

    from sas_app.viewer import LiveBackend
    from sas_ros.live_demo import FramePlayer, running_node
    from sas_ros.live_view import LiveMapClient

    name = f"sas_view_node_{np.random.default_rng().integers(1 << 30)}"
    params = dict(mode="fusion", pose_source="pose", update_period=0.3, reliable_inputs=True, text_dim=64,
                  vocabulary=",".join(synth.class_names))
    browser = None
    with running_node(name, params, "sas_view_player") as (node, helper):
        client = LiveMapClient(f"/{name}", timeout=20)
        viewer = None
        try:
            player = FramePlayer(helper, ground_truth=True)
            assert player.wait_for_subscribers(10)
            backend = LiveBackend(client)
            viewer = Viewer(server, backend, poll=0.2)
            use_browser = find_browser() is not None
            if use_browser:
                from playwright.sync_api import sync_playwright

                from sas_app.viewer import open_page, wait_for_client

                pw = sync_playwright().start()
                browser, page = open_page(pw, f"http://127.0.0.1:{server.get_port()}/", 800, 600)
                bclient = wait_for_client(server, 30)
            sizes, coverage = [], []
            for step in range(3):
                for f in synth.frames[step * 2:step * 2 + 2]:
                    player.publish(f)
                n = node.n_frames
                assert wait_until(lambda: node.n_frames >= 2 * (step + 1), 20), (n, node.n_frames)
                node.update_event.set()
                assert wait_until(lambda: viewer.scene is not None and len(viewer.scene) == len(node.map)
                                  and len(node.map) > (sizes[-1] if sizes else 0), 30)
                sizes.append(len(viewer.scene))
                if use_browser:
                    img = bclient.get_render(height=600, width=800, transport_format="png", timeout=60)
                    coverage.append(float((img[..., 3] > 0).mean()))
            assert sizes == sorted(sizes) and sizes[-1] > sizes[0], sizes
            assert viewer.scene.class_names == list(synth.class_names)  # from ~/label_map
            if use_browser:
                assert coverage[-1] > coverage[0], coverage  # more of the page is covered by the map
            # the text box asks the node (~/query) and draws its objects
            view = viewer.query_now("a chair")
            assert view.ok and view.points is not None and len(view.points), view.message
            assert viewer.drawn_query == "a chair"
            # ~/set_vocabulary from the vocabulary box
            viewer.vocab_box.value = "chair, table, floor"
            viewer._set_vocabulary()
            assert "3 classes" in viewer.result.content
            assert wait_until(lambda: client.latest()[2] == ["chair", "table", "floor"], 20)
            viewer.vocab_box.value = "chair, flying saucer"
            viewer._set_vocabulary()
            assert "unchanged" in viewer.result.content and "saucer" in viewer.result.content
        finally:
            if browser is not None:
                browser.close()
                pw.stop()
            if viewer is not None:
                viewer.close()
            client.close()
