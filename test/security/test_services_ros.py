"""Hostile and careless requests to a live mapping node over loopback: each gets a clear refusal
naming the limit, and the node keeps serving (a good request is answered right after); saves stay
inside map_dir; a node killed with SIGKILL comes back with its autosaved map."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytestmark = pytest.mark.ros

from conftest import wait_until  # noqa: E402
from test_mapping_node_ros import Live  # noqa: E402  (the node + helper harness of the node tests)

ROOT = Path(__file__).resolve().parents[2]
LIMITS = dict(max_query_texts=4, max_text_length=100, max_query_points=1000, max_vocabulary=50)


@pytest.fixture(scope="module")
def scene():
    from sas_core.data.synthetic import SynthConfig, generate_scene

    return generate_scene(SynthConfig(seed=3, n_frames=3, with_lidar=False))


@pytest.fixture()
def live(scene, tmp_path):
    live = Live(dict(LIMITS, map_dir=str(tmp_path / "maps"), query_max_points=100), "sas_sec_test")
    try:
        for f in scene.frames[:2]:
            live.play(f)
        live.node.update_event.set()
        assert live.wait(lambda: live.node.map.feature_dim > 0 and live.node.n_updates > 0, 20.0)
        yield live
    finally:
        live.close()


def _good_query(live):
    from sas_interfaces.srv import TextQuery

    r = live.call(live.query, TextQuery.Request(texts=["chair"], threshold=0.0, max_points=10))
    assert r.success and 0 < len(r.counts) == 1, r.message
    return r


def test_every_bad_request_gets_a_clear_error_and_the_node_keeps_serving(live):
    from sas_interfaces.srv import SetVocabulary, TextQuery

    Q, V = TextQuery.Request, SetVocabulary.Request
    big = "x" * (1 << 20)
    bad = [
        (live.query, Q(texts=["chair"] * 5), "limit of 4 (max_query_texts)"),
        (live.query, Q(texts=["c" * 101]), "limit of 100 (max_text_length)"),
        (live.query, Q(texts=[big]), "limit of 100 (max_text_length)"),
        (live.query, Q(texts=["chair"], threshold=float("nan")), "finite number in [-1, 1]"),
        (live.query, Q(texts=["chair"], threshold=-2.0), "finite number in [-1, 1]"),
        (live.query, Q(texts=["chair"], threshold=float("inf")), "finite number in [-1, 1]"),
        (live.query, Q(texts=["chair"], max_points=2 ** 32 - 1), "limit of 1000 (max_query_points)"),
        (live.query, Q(texts=["chair"], max_points=1001), "limit of 1000 (max_query_points)"),
        (live.query, Q(texts=[]), "empty query text"),
        (live.query, Q(texts=["flux capacitor " + "y" * 80]), "flux"),
        (live.set_vocab, V(labels=["chair"], prompt_template="{}{}{}"), "exactly one '{}'"),
        (live.set_vocab, V(labels=["chair"], prompt_template="{:>50000000}"), "exactly one '{}'"),
        (live.set_vocab, V(labels=["chair"], prompt_template="{!r} {}"), "exactly one '{}'"),
        (live.set_vocab, V(labels=["chair"], prompt_template="t" * 101 + "{}"), "limit of 100"),
        (live.set_vocab, V(labels=["chair", "Chair", " CHAIR "]), "2 duplicate class name(s)"),
        (live.set_vocab, V(labels=[f"c{i}" for i in range(51)]), "limit of 50 (max_vocabulary)"),
        (live.set_vocab, V(labels=[big]), "limit of 100 characters (max_text_length)"),
    ]
    for client, request, expected in bad:
        r = live.call(client, request)
        assert not r.success and expected in r.message, (request, r.message[:300])
        assert len(r.message) <= 600  # a clipped echo, never the 1 MB text
        _good_query(live)
    assert len(live.node.vocabulary) == 20  # every refused vocabulary left it unchanged

    # all unknown names are reported (not only the first), each clipped
    names = ["chair"] + [f"zork{i}" for i in range(40)] + ["w" * 90]
    r = live.call(live.set_vocab, V(labels=names))
    assert not r.success and "41 name(s)" in r.message and "and 31 more" in r.message, r.message
    assert len(r.unknown) == 41 and r.unknown[0] == "zork0" and r.unknown[-1] == "w" * 60 + "..."
    assert len(r.message) <= 600
    _good_query(live)
    r = live.call(live.set_vocab, V(labels=["chair", "table"], prompt_template="a photo of a {}."))
    assert r.success, r.message
    assert live.wait(lambda: all(any(f"[{k}]" in m.msg for m in live.logs)
                                 for k in ("over_limit", "bad_request", "bad_template", "bad_vocabulary")), 5.0)
    assert not any(len(m.msg) > 2000 for m in live.logs)  # no megabyte echo in the log either


def test_an_unexpected_error_is_an_internal_error_reply_not_a_dead_node(live):
    from sas_interfaces.srv import TextQuery

    real = live.node.mapper.query
    live.node.mapper.query = lambda *a, **k: {}["boom"]  # a bug: KeyError deep inside a request
    try:
        for _ in range(2):
            r = live.call(live.query, TextQuery.Request(texts=["chair"]))
            assert not r.success and r.message == "internal error: KeyError"
    finally:
        live.node.mapper.query = real
    _good_query(live)
    # the traceback once, then one line
    assert live.wait(lambda: sum("internal error: KeyError" in m.msg for m in live.logs) == 2, 5.0)
    assert sum("Traceback" in m.msg and "KeyError" in m.msg for m in live.logs) == 1


def test_saves_are_confined_to_map_dir_and_never_overwrite_unasked(live, tmp_path):
    from sas_core.geometry.voxel_map import read_map_manifest
    from sas_interfaces.srv import LoadMap, SaveMap
    from std_srvs.srv import Trigger

    maps, outside = tmp_path / "maps", tmp_path / "outside"
    outside.mkdir()
    maps.mkdir(exist_ok=True)
    (maps / "escape").symlink_to(outside, target_is_directory=True)
    load = live.helper.create_client(LoadMap, "/sas_sec_test/load_map")
    for path, expected in [(str(outside / "m"), "absolute"), ("../outside/m", "'..'"), ("a/../../outside", "'..'"),
                           ("escape/m", "symlink"), ("escape", "symlink"), ("", "empty"), (".hidden", "'.'"),
                           ("~/m", "absolute")]:
        r = live.call(live.save, SaveMap.Request(path=path))
        assert not r.success and expected in r.message, (path, r.message)
    assert not list(outside.iterdir())  # nothing was written outside map_dir

    r = live.call(live.save, SaveMap.Request(path="run.1"))
    assert r.success, r.message
    n = len(live.node.map)
    assert (maps / "run.1" / "manifest.json").is_file() and read_map_manifest(maps / "run.1")["n_voxels"] == n
    r = live.call(live.save, SaveMap.Request(path="site/run.2"))
    assert r.success and (maps / "site" / "run.2" / "map.ply").is_file()
    r = live.call(live.save, SaveMap.Request(path="run.1"))
    assert not r.success and "exists" in r.message and "overwrite" in r.message
    r = live.call(live.save, SaveMap.Request(path="run.1", overwrite=True))
    assert r.success, r.message

    # load_map: the saved map comes back; bad names and tampered maps are refused, the map unchanged
    live.call(live.reset, Trigger.Request())
    assert len(live.node.map) == 0
    r = live.call(load, LoadMap.Request(name="run.1"))
    assert r.success and r.n_voxels == n == len(live.node.map), r.message
    _good_query(live)
    npz = maps / "site" / "run.2" / "map.npz"
    data = bytearray(npz.read_bytes())
    data[-100] ^= 0xFF
    npz.write_bytes(bytes(data))
    for name, expected in [("site/run.2", "sha256"), ("nope", "no map"), ("../outside", "'..'"), ("escape", "symlink"),
                           (str(maps / "run.1"), "absolute")]:
        r = live.call(load, LoadMap.Request(name=name))
        assert not r.success and expected in r.message and r.n_voxels == 0, (name, r.message)
        assert len(live.node.map) == n
    _good_query(live)


_CHILD = textwrap.dedent('''
    import json, sys, threading, time
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter
    from sas_core.data.synthetic import SynthConfig, generate_scene
    from sas_ros.live_demo import FramePlayer, remap_args
    from sas_ros.mapping_node import MappingNode

    params = json.loads(sys.argv[1])
    scene = generate_scene(SynthConfig(seed=3, n_frames=12, with_lidar=False))
    rclpy.init()
    node = MappingNode("sas_autosave_test", cli_args=remap_args(),
                       parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    helper = rclpy.create_node("sas_autosave_helper")
    player = FramePlayer(helper)
    ex = MultiThreadedExecutor(num_threads=4)
    ex.add_node(node)
    ex.add_node(helper)
    threading.Thread(target=ex.spin, daemon=True).start()
    assert player.wait_for_subscribers(30.0)
    for i, frame in enumerate(scene.frames):
        before = node.n_frames + sum(node.drops.values())
        player.publish(frame)
        deadline = time.monotonic() + 10
        while node.n_frames + sum(node.drops.values()) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        print(json.dumps(dict(t=time.monotonic(), frames=node.n_frames, voxels=len(node.map))), flush=True)
        time.sleep(0.4)
    print(json.dumps(dict(t=time.monotonic(), done=True, voxels=len(node.map))), flush=True)
    time.sleep(600)
''')


def test_a_node_killed_with_sigkill_comes_back_with_its_autosaved_map(tmp_path):
    """map_file + autosave_period: the node saves every period; kill -9 mid-stream; a restart with
    the same parameters loads the map, missing at most what came in the last period."""
    from rclpy.parameter import Parameter

    from sas_core.geometry.voxel_map import read_map_manifest
    from sas_ros.mapping_node import MappingNode

    period = 0.5
    params = dict(mode="none", pose_source="pose", reliable_inputs=True, map_dir=str(tmp_path / "maps"),
                  map_file="robot", autosave_period=period, stats_period=5.0)
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(params)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    margin = period + 2.0  # one period, plus slack for a save delayed on a loaded machine
    history = []
    try:
        while True:  # kill mid-stream once some frames are older than the margin
            line = proc.stdout.readline()
            assert line, "the node process died"
            history.append(json.loads(line))
            if history[-1].get("done") or history[-1]["t"] - history[0]["t"] >= margin + 1.0:
                break
        while time.monotonic() - history[0]["t"] < margin + 1.0:
            time.sleep(0.1)
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    man = read_map_manifest(tmp_path / "maps" / "robot")  # complete and consistent (hashes checked)
    # every voxel count the node reached more than one period (plus slack) before the kill must be
    # in the saved map; the saved map is one the node really had
    settled = [h["voxels"] for h in history if h["t"] < killed_at - margin]
    assert settled, history
    reached = [h["voxels"] for h in history]
    assert max(settled) <= man["n_voxels"] <= max(reached), (man["n_voxels"], history)

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = MappingNode("sas_autosave_test", context=context,
                           parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
        try:
            assert len(node.map) == man["n_voxels"] > 1000
        finally:
            node.destroy_node()
        # without autosave a missing map_file is one clear error at start
        with pytest.raises(ValueError, match="map_file 'elsewhere': no map"):
            MappingNode("sas_autosave_test2", context=context, parameter_overrides=[
                Parameter(k, value=v) for k, v in dict(params, map_file="elsewhere", autosave_period=0.0).items()])
        with pytest.raises(ValueError, match="map_file: .*'..'"):
            MappingNode("sas_autosave_test3", context=context, parameter_overrides=[
                Parameter(k, value=v) for k, v in dict(params, map_file="../x").items()])
    finally:
        rclpy.shutdown(context=context)
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["robot"]  # debris of the kill cleaned
