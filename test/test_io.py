"""Atomic writes and PLY round trips."""

import os

import numpy as np
import pytest

from sas_core.io import atomic_path, atomic_write_text, read_ply, write_ply


def test_ply_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(100, 3)).astype(np.float32)
    colors = rng.uniform(size=(100, 3))
    labels = rng.integers(-1, 20, size=100)
    scores = rng.uniform(size=100).astype(np.float32)
    write_ply(tmp_path / "a.ply", pos, colors=colors, labels=labels, scores=scores, instance=labels.astype(np.int32))
    back = read_ply(tmp_path / "a.ply")
    np.testing.assert_array_equal(back["positions"], pos)
    np.testing.assert_array_equal(back["red"], np.round(colors[:, 0] * 255).astype(np.uint8))
    np.testing.assert_array_equal(back["label"], labels)
    np.testing.assert_array_equal(back["score"], scores)
    np.testing.assert_array_equal(back["instance"], labels)


def test_empty_cloud_ply(tmp_path):
    write_ply(tmp_path / "e.ply", np.zeros((0, 3)))
    assert len(read_ply(tmp_path / "e.ply")["positions"]) == 0


def test_failed_write_keeps_previous_file(tmp_path):
    target = tmp_path / "keep.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["keep.txt"]  # no temporary left behind


def test_not_a_ply(tmp_path):
    (tmp_path / "x.ply").write_bytes(b"hello\n")
    with pytest.raises(ValueError, match="not a PLY"):
        read_ply(tmp_path / "x.ply")


def test_atomic_files_get_normal_permissions(tmp_path):
    atomic_write_text(tmp_path / "p.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "p.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def _scannet_like_mesh(path, n_label=True):
    """A vertex + face mesh laid out as ScanNet's ``_vh_clean_2.ply`` (written by plyfile, not by us):
    float x/y/z, uchar red/green/blue/alpha per vertex, a uchar-counted int list of vertex indices."""
    from plyfile import PlyData, PlyElement

    rng = np.random.default_rng(0)
    n = 50
    vtype = [("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"), ("alpha", "u1")]
    if n_label:
        vtype.append(("label", "u2"))
    v = np.zeros(n, vtype)
    for k in ("x", "y", "z"):
        v[k] = rng.random(n)
    for k in ("red", "green", "blue"):
        v[k] = rng.integers(0, 256, n)
    v["alpha"] = 255
    if n_label:
        v["label"] = rng.integers(0, 40, n)
    tris = rng.integers(0, n, (30, 3))
    f = np.empty(len(tris), [("vertex_indices", "i4", (3,))])
    f["vertex_indices"] = tris
    face = PlyElement.describe(f, "face", len_types={"vertex_indices": "u1"}, val_types={"vertex_indices": "i4"})
    PlyData([PlyElement.describe(v, "vertex"), face], text=False, byte_order="<").write(str(path))
    return v, tris


def test_scannet_style_mesh_ply_loads_vertices_colours_labels_and_faces(tmp_path):
    v, tris = _scannet_like_mesh(tmp_path / "scene0000_00_vh_clean_2.ply")
    d = read_ply(tmp_path / "scene0000_00_vh_clean_2.ply")
    np.testing.assert_array_equal(d["positions"], np.stack([v["x"], v["y"], v["z"]], 1))
    np.testing.assert_array_equal(d["red"], v["red"])
    np.testing.assert_array_equal(d["label"], v["label"])
    np.testing.assert_array_equal(d["faces"], tris)


def test_open3d_ascii_mesh_and_polygons(tmp_path):
    import open3d as o3d

    mesh = o3d.geometry.TriangleMesh.create_box()
    mesh.compute_vertex_normals()
    o3d.io.write_triangle_mesh(str(tmp_path / "box.ply"), mesh, write_ascii=True)
    d = read_ply(tmp_path / "box.ply")
    np.testing.assert_allclose(d["positions"], np.asarray(mesh.vertices), atol=1e-6)
    np.testing.assert_array_equal(d["faces"], np.asarray(mesh.triangles))
    # a quad is fanned into two triangles
    (tmp_path / "quad.ply").write_text("ply\nformat ascii 1.0\nelement vertex 4\nproperty float x\nproperty float y\n"
                                      "property float z\nelement face 1\nproperty list uchar int vertex_indices\n"
                                      "end_header\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n4 0 1 2 3\n")
    assert read_ply(tmp_path / "quad.ply")["faces"].tolist() == [[0, 1, 2], [0, 2, 3]]


def test_malformed_plys_are_clear_errors_with_bounded_memory(tmp_path):
    import tracemalloc

    header = "ply\nformat binary_little_endian 1.0\nelement vertex {n}\nproperty float x\nproperty float y\n" \
             "property float z\nend_header\n"
    (tmp_path / "huge.ply").write_bytes(header.format(n=10 ** 9).encode() + b"\0" * 24)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="huge.ply.*declares 1000000000 vertex rows"):
            read_ply(tmp_path / "huge.ply")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2 ** 20  # plyfile alone would allocate 12 GB here
    (tmp_path / "novert.ply").write_bytes(b"ply\nformat ascii 1.0\nelement face 0\n"
                                          b"property list uchar int vertex_indices\nend_header\n")
    with pytest.raises(ValueError, match="no vertex element"):
        read_ply(tmp_path / "novert.ply")
    (tmp_path / "noheader.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\n")
    with pytest.raises(ValueError, match="noheader.ply"):
        read_ply(tmp_path / "noheader.ply")
    (tmp_path / "badidx.ply").write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\n"
                                        "property float z\nelement face 1\nproperty list uchar int vertex_indices\n"
                                        "end_header\n0 0 0\n3 0 1 5\n")
    with pytest.raises(ValueError, match="outside 0..0"):
        read_ply(tmp_path / "badidx.ply")
