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
