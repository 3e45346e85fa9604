"""Saved maps: one atomic, checked unit; names confined under a root; crashes never leave a broken
or mixed map; leftovers of killed saves are cleaned."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from sas_core.geometry.voxel_map import VoxelMap, VoxelMapConfig, read_map_manifest
from sas_core.io import TEMP_PATTERN, atomic_dir, clean_temp_dirs, confined_path


def _map(n: int, seed: int = 0) -> VoxelMap:
    rng = np.random.default_rng(seed)
    m = VoxelMap(VoxelMapConfig(voxel_size=0.1))
    m.integrate(rng.random((n, 3)).astype(np.float32) * 10, np.full((n, 3), 100, np.uint8))
    f = rng.standard_normal((len(m), 16)).astype(np.float32)
    m.set_features(m.slots(), f / np.linalg.norm(f, axis=1, keepdims=True))
    return m


def test_a_map_is_one_folder_with_a_checked_manifest(tmp_path):
    m = _map(500)
    folder = m.save(tmp_path / "run.1", class_names=["chair", "table"])
    assert folder == tmp_path / "run.1"  # the name keeps its suffix
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "map.npz", "map.ply"]
    man = read_map_manifest(folder)
    assert man["format"] == "sas-voxel-map" and man["format_version"] == 1 and man["package_version"]
    assert man["n_voxels"] == len(m) and man["voxel_size"] == pytest.approx(0.1) and man["feature_dim"] == 16
    assert man["vocabulary"] == ["chair", "table"] and set(man["files"]) == {"map.npz", "map.ply"}
    back, names = VoxelMap.load(folder, m.config)
    assert names == ["chair", "table"] and len(back) == len(m)
    m.save(tmp_path / "run.2")
    assert (tmp_path / "run.1").is_dir() and (tmp_path / "run.2").is_dir()  # run.1 and run.2 stay apart
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_tampered_or_truncated_files_are_refused(tmp_path):
    folder = _map(300).save(tmp_path / "m")
    npz = folder / "map.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        VoxelMap.load(folder, VoxelMapConfig(voxel_size=0.1))
    npz.write_bytes(bytes(data[:100]))
    with pytest.raises(ValueError, match="bytes"):
        VoxelMap.load(folder, VoxelMapConfig(voxel_size=0.1))
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        VoxelMap.load(folder, VoxelMapConfig(voxel_size=0.1))
    (folder / "manifest.json").write_text(json.dumps(dict(format="sas-voxel-map", format_version=99, files={})))
    with pytest.raises(ValueError, match="format version"):
        VoxelMap.load(folder, VoxelMapConfig(voxel_size=0.1))
    (folder / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest"):
        VoxelMap.load(folder, VoxelMapConfig(voxel_size=0.1))


def test_existing_maps_are_kept_unless_overwrite(tmp_path):
    a, b = _map(200, seed=1), _map(400, seed=2)
    a.save(tmp_path / "m", class_names=["a"])
    with pytest.raises(FileExistsError, match="overwrite"):
        b.save(tmp_path / "m", class_names=["b"])
    assert read_map_manifest(tmp_path / "m")["vocabulary"] == ["a"]
    b.save(tmp_path / "m", class_names=["b"], overwrite=True)
    back, names = VoxelMap.load(tmp_path / "m", VoxelMapConfig(voxel_size=0.1))
    assert names == ["b"] and len(back) == len(b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the old version is gone
    # a failing writer leaves nothing behind and the previous map intact
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "m", overwrite=True) as tmp:
            (tmp / "half").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and read_map_manifest(tmp_path / "m")


def test_names_are_confined_under_the_root(tmp_path):
    root = tmp_path / "maps"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    assert confined_path(root, "run.1") == root.resolve() / "run.1"
    assert confined_path(root, "site/run") == root.resolve() / "site" / "run"
    for bad, why in [("", "empty"), ("/etc/passwd", "absolute"), (str(outside / "x"), "absolute"),
                     ("../x", r"\.\."), ("a/../../x", r"\.\."), ("~/x", "absolute"), (".hidden", "'.'"),
                     (".m.tmp-1-abcdefgh", "'.'"), ("a\0b", "NUL"), ("x" * 300, "255")]:
        with pytest.raises(ValueError, match=why):
            confined_path(root, bad)
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="symlink"):
        confined_path(root, "link/x")
    (root / "file_link").symlink_to(outside / "y")
    with pytest.raises(ValueError, match="symlink"):
        confined_path(root, "file_link")
    (root / "inner").mkdir()
    (root / "inner_link").symlink_to(root / "inner", target_is_directory=True)
    assert confined_path(root, "inner_link/x")  # a link that stays inside is fine
    assert not list(outside.iterdir())


def test_leftover_temporaries_of_dead_processes_are_cleaned(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / "site").mkdir()
    stale = [tmp_path / f".m.tmp-{pid}-abcdefgh", tmp_path / "site" / f".x.tmp-{pid}-0123abcd"]
    for p in stale:
        p.mkdir()
        (p / "map.npz").write_bytes(b"x" * 100)
    mine = tmp_path / f".m.tmp-{os.getpid()}-zzzzzzzz"  # a save in progress of a live process
    mine.mkdir()
    keep = [tmp_path / "m.tmp-1-abcdefgh", tmp_path / ".notes", tmp_path / "site" / "map"]
    for p in keep:
        p.mkdir()
    assert sorted(clean_temp_dirs(tmp_path)) == sorted(stale)
    assert all(not p.exists() for p in stale) and mine.exists() and all(p.exists() for p in keep)
    assert TEMP_PATTERN.match(mine.name)


_SAVER = textwrap.dedent('''
    import sys
    import numpy as np
    from sas_core.geometry.voxel_map import VoxelMap, VoxelMapConfig

    root, start = sys.argv[1], int(sys.argv[2])
    for i in range(start, start + 10000):
        n = 3000 + 97 * (i % 50)
        m = VoxelMap(VoxelMapConfig(voxel_size=0.1))
        g = np.stack(np.unravel_index(np.arange(n), (100, 100, 100)), 1).astype(np.float32) * 0.1 + 0.05
        m.integrate(g, np.full((n, 3), i % 256, np.uint8))
        f = np.zeros((len(m), 64), np.float32)
        f[:, i % 64] = 1.0
        m.set_features(m.slots(), f)
        m.save(root + "/robot", class_names=[f"v{i}"], overwrite=True)
        print(i, flush=True)
''')


def _check_consistent(folder) -> int:
    """The map loads, and every part of it belongs to one and the same save."""
    back, names = VoxelMap.load(folder, VoxelMapConfig(voxel_size=0.1))
    i = int(names[0][1:])
    d = back.export()
    assert len(back) == 3000 + 97 * (i % 50) == read_map_manifest(folder)["n_voxels"]
    assert (d["colors"] == i % 256).all()
    assert (np.argmax(d["features"], axis=1) == i % 64).all() and (d["features"].max(1) == 1).all()
    from sas_core.io import read_ply

    ply = read_ply(folder / "map.ply")
    assert len(ply["x"]) == len(back) and (ply["red"] == i % 256).all()
    return i


def test_kill_9_during_saves_never_leaves_a_broken_or_mixed_map(tmp_path):
    """A process saving in a loop is SIGKILLed again and again (mid-save most of the time): the map
    always loads as one complete version, newer after each run; the next start cleans the debris."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    rng = np.random.default_rng(0)
    last, kills, start, mid_save = -1, 0, 0, 0
    while kills < 5 or (mid_save == 0 and kills < 30):  # until one kill at least hit a save in progress
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path), str(start)], stdout=subprocess.PIPE,
                                text=True, env=env)
        try:
            first = proc.stdout.readline()  # one save done: the map exists from here on
            assert first.strip(), "the saver died before its first save"
            time.sleep(float(rng.uniform(0.0, 0.4)))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        kills += 1
        i = _check_consistent(tmp_path / "robot")
        assert i > last, (i, last)
        last, start = i, i + 1
        mid_save += bool(clean_temp_dirs(tmp_path))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["robot"]
    assert mid_save >= 1, f"no kill out of {kills} hit a save in progress"


def test_sas_segment_reads_a_saved_map_folder(tmp_path):
    """`sas segment` / `sas query` read point clouds with load_point_cloud: a map folder (what
    `sas replay` and ~/save_map write) is read through its checked PLY."""
    from sas_core.infer import load_point_cloud

    m = _map(400)
    folder = m.save(tmp_path / "replayed")
    cloud = load_point_cloud(folder)
    np.testing.assert_array_equal(cloud.positions, m.export()["positions"])
    np.testing.assert_allclose(cloud.colors, 100 / 255, atol=1e-6)
    ply = folder / "map.ply"
    ply.write_bytes(ply.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="sha256"):
        load_point_cloud(folder)
