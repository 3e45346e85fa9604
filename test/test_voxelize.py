"""Voxelisation and OpenScene-style augmentation."""

import numpy as np
import pytest

from sas_core.geometry.voxelize import (AugmentConfig, batch_coordinates, elastic_distortion, random_flip,
                                        rotation_matrix, voxelize, voxelize_augmented)


def test_voxelize_unique_inverse_and_first():
    rng = np.random.default_rng(0)
    pts = rng.uniform(-1, 1, (5000, 3)).astype(np.float32)
    coords, inv, first = voxelize(pts, 0.05)
    expect = np.floor(pts.astype(np.float64) / 0.05).astype(np.int64)
    assert coords.dtype == np.int32 and inv.dtype == np.int64 and first.dtype == np.int64
    assert np.array_equal(coords[inv], expect)                      # point -> its voxel
    assert len(np.unique(coords, axis=0)) == len(coords)            # unique voxels
    assert np.array_equal(coords, expect[first])                    # representative point inside
    # first is the first point of each voxel
    earliest = np.full(len(coords), len(pts))
    np.minimum.at(earliest, inv, np.arange(len(pts)))
    assert np.array_equal(first, earliest)
    assert coords.min() < 0  # negative coordinates floor, not truncate
    c2, inv2, _ = voxelize(pts, 0.02)
    assert len(c2) > len(coords) and np.array_equal(c2[inv2], np.floor(pts / np.float64(0.02)).astype(int))


@pytest.mark.parametrize("bad,match", [(np.zeros((0, 3)), "empty"), (np.zeros((4, 2)), r"\(N, 3\)"),
                                       (np.array([[0, 0, np.nan]]), "non-finite")])
def test_voxelize_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        voxelize(bad, 0.02)
    with pytest.raises(ValueError, match="voxel_size"):
        voxelize(np.zeros((3, 3)), 0.0)


def test_batch_coordinates():
    out = batch_coordinates([np.zeros((2, 3), np.int32), np.ones((3, 3), np.int32)])
    assert out.shape == (5, 4) and out.dtype == np.int32 and out[:, 0].tolist() == [0, 0, 1, 1, 1]


def test_rotation_matrix_matches_scipy():
    from scipy.spatial.transform import Rotation

    R = rotation_matrix([0, 0, 1], 0.3)
    assert np.allclose(R, Rotation.from_rotvec([0, 0, 0.3]).as_matrix())
    assert np.allclose(R @ R.T, np.eye(3))


def test_elastic_distortion_is_smooth_and_bounded():
    rng = np.random.default_rng(1)
    pts = rng.uniform(0, 3, (4000, 3))
    out = elastic_distortion(pts, 0.2, 0.4, np.random.default_rng(2))
    d = out - pts
    assert 0 < np.abs(d).max() < 0.4 * 3
    # nearby points move alike: displacement differences grow with distance
    i, j = rng.integers(0, len(pts), (2, 3000))
    dist = np.linalg.norm(pts[i] - pts[j], axis=1)
    diff = np.linalg.norm(d[i] - d[j], axis=1)
    assert diff[dist < 0.05].mean() < diff[dist > 1.0].mean()


def test_voxelize_augmented_is_reproducible_and_consistent():
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 2, (3000, 3))
    a = voxelize_augmented(pts, 0.05, rng=np.random.default_rng(7))
    b = voxelize_augmented(pts, 0.05, rng=np.random.default_rng(7))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    coords, inv, first, T = a
    assert coords.min() >= 0 and len(inv) == len(pts) and len(first) == len(coords)
    plain = voxelize_augmented(pts, 0.05, augment=False)[0]
    ref, _, _ = voxelize(pts, 0.05)
    assert np.array_equal(plain, ref - ref.min(0))
    # the scale stays within OpenScene's bounds: voxel count changes by at most ~(1.1)^2 on a volume
    assert 0.6 * len(ref) < len(coords) < 1.6 * len(ref)
    cfg = AugmentConfig(elastic_params=None, rotation_bound=(None, None, None), scale_bound=(1, 1), flip_prob=0.0)
    c, _, _, T2 = voxelize_augmented(pts, 0.05, cfg, rng=np.random.default_rng(0))
    assert np.array_equal(c, ref - ref.min(0)) and np.allclose(T2[:3, :3], np.eye(3) / 0.05)


def test_random_flip_keeps_upright_axis():
    c = np.random.default_rng(0).integers(0, 50, (100, 3))
    flipped = [random_flip(c, np.random.default_rng(s)) for s in range(20)]
    assert all(np.array_equal(f[:, 2], c[:, 2]) for f in flipped)
    assert any(not np.array_equal(f[:, 0], c[:, 0]) for f in flipped)
    assert all(f.min() >= 0 for f in flipped)
