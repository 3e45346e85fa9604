"""3D Gaussian splats: INRIA PLY I/O, segmented splats, the CPU splatting renderer, 2D evaluation."""

import math

import numpy as np
import pytest

from sas_core.data.gaussians import (SH_C0, GaussianScene, LabelledViews, SyntheticGaussianConfig,
                                     frames_from_normals, load_views, matrix_to_quaternion, quaternion_to_matrix,
                                     read_gaussians, save_views, segmented_gaussians, synthetic_gaussians,
                                     synthetic_views, write_gaussians)
from sas_core.geometry.splatting import (NO_LABEL, SplatConfig, eval_sh, project_gaussians, render,
                                         render_labels)
from sas_core.types import CameraIntrinsics


def random_gaussians(n=50, degree=3, seed=0, labels=False):
    rng = np.random.default_rng(seed)
    r = {0: 0, 1: 3, 2: 8, 3: 15}[degree]
    return GaussianScene(rng.normal(size=(n, 3)), rng.normal(size=(n, 3)), rng.normal(size=(n, r, 3)),
                         rng.normal(size=n), rng.normal(size=(n, 3)) - 3, rng.normal(size=(n, 4)),
                         labels=rng.integers(0, 20, n) if labels else None,
                         scores=rng.random(n) if labels else None)


def header_properties(path):
    props = []
    with open(path, "rb") as f:
        for line in f:
            line = line.decode("ascii").strip()
            if line == "end_header":
                return props
            if line.startswith("property"):
                props.append(line.split()[-1])
    raise AssertionError("no end_header")


# ------------------------------------------------------------------------------------------------
# PLY files


def test_splat_ply_round_trip_keeps_every_field(tmp_path):
    g = random_gaussians(40, degree=3, labels=True)
    g.extra["instance"] = np.arange(40, dtype=np.int32)
    path = tmp_path / "scene.ply"
    write_gaussians(path, g)
    back = read_gaussians(path)
    for name in ("positions", "sh_dc", "sh_rest", "opacity", "scales", "rotations", "scores"):
        np.testing.assert_array_equal(getattr(back, name), getattr(g, name).astype(np.float32), err_msg=name)
    np.testing.assert_array_equal(back.labels, g.labels)
    np.testing.assert_array_equal(back.extra["instance"], g.extra["instance"])
    assert back.sh_degree == 3
    # the INRIA layout and order, then label / score / extras
    props = header_properties(path)
    expected = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(45)]
                + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3", "label", "score",
                   "instance"])
    assert props == expected


def test_f_rest_is_channel_major_as_3dgs_writes_it(tmp_path):
    from plyfile import PlyData

    g = random_gaussians(5, degree=1)
    write_gaussians(tmp_path / "a.ply", g)
    v = PlyData.read(str(tmp_path / "a.ply"))["vertex"].data
    # f_rest_0..2: the 3 degree-1 coefficients of red; f_rest_3..5 green; f_rest_6..8 blue
    np.testing.assert_array_equal(v["f_rest_1"], g.sh_rest[:, 1, 0])
    np.testing.assert_array_equal(v["f_rest_3"], g.sh_rest[:, 0, 1])
    np.testing.assert_array_equal(v["f_rest_8"], g.sh_rest[:, 2, 2])


def test_degree_zero_splat_and_no_labels(tmp_path):
    g = random_gaussians(7, degree=0)
    write_gaussians(tmp_path / "a.ply", g)
    back = read_gaussians(tmp_path / "a.ply")
    assert back.sh_rest.shape == (7, 0, 3) and back.labels is None and back.scores is None and back.extra == {}


def test_segmented_splat_shows_label_colours_and_reads_back(tmp_path):
    from sas_core.viz import label_colors

    g = random_gaussians(30, degree=3)
    labels = np.arange(30) % 20
    scores = np.linspace(0, 1, 30)
    seg = segmented_gaussians(g, labels, scores)
    write_gaussians(tmp_path / "seg.ply", seg)
    back = read_gaussians(tmp_path / "seg.ply")
    np.testing.assert_array_equal(back.labels, labels)
    np.testing.assert_allclose(back.scores, scores, rtol=1e-6)
    # a viewer's colour SH_C0 * f_dc + 0.5 is the label's palette colour; the view-dependent terms are zero
    np.testing.assert_allclose(back.base_colors() * 255, label_colors(labels), atol=1e-3)
    assert back.sh_rest.shape == g.sh_rest.shape and not back.sh_rest.any()
    # geometry and opacity untouched
    np.testing.assert_array_equal(back.positions, g.positions)
    np.testing.assert_array_equal(back.scales, g.scales)
    np.testing.assert_array_equal(back.opacity, g.opacity)
    with pytest.raises(ValueError, match="labels for"):
        segmented_gaussians(g, labels[:-1])


def test_plain_point_cloud_is_not_a_splat(tmp_path):
    from sas_core.io import write_ply

    write_ply(tmp_path / "cloud.ply", np.zeros((4, 3)), colors=np.zeros((4, 3)))
    with pytest.raises(ValueError, match="not a 3D Gaussian splat PLY.*scale_0"):
        read_gaussians(tmp_path / "cloud.ply")
    with pytest.raises(FileNotFoundError):
        read_gaussians(tmp_path / "missing.ply")


def test_odd_sh_count_and_bad_values_are_refused(tmp_path):
    from sas_core.io import write_ply

    g = random_gaussians(3, degree=0)
    cols = {f"f_dc_{i}": g.sh_dc[:, i] for i in range(3)}
    cols.update({"f_rest_0": g.sh_dc[:, 0], "f_rest_1": g.sh_dc[:, 1], "opacity": g.opacity})
    cols.update({f"scale_{i}": g.scales[:, i] for i in range(3)})
    cols.update({f"rot_{i}": g.rotations[:, i] for i in range(4)})
    write_ply(tmp_path / "odd.ply", g.positions, **cols)
    with pytest.raises(ValueError, match="f_rest"):
        read_gaussians(tmp_path / "odd.ply")
    cols.pop("f_rest_0"), cols.pop("f_rest_1")
    cols["opacity"] = np.array([0.0, np.nan, 1.0], np.float32)
    write_ply(tmp_path / "nan.ply", g.positions, **cols)
    with pytest.raises(ValueError, match="nan.ply.*non-finite"):
        read_gaussians(tmp_path / "nan.ply")


def test_truncated_splat_file_is_refused_before_allocating(tmp_path):
    g = random_gaussians(10, degree=3)
    write_gaussians(tmp_path / "a.ply", g)
    data = (tmp_path / "a.ply").read_bytes()
    (tmp_path / "b.ply").write_bytes(data.replace(b"element vertex 10", b"element vertex 999999999"))
    with pytest.raises(ValueError, match="more than the file"):
        read_gaussians(tmp_path / "b.ply")


# ------------------------------------------------------------------------------------------------
# rotations


def test_quaternion_matrix_round_trip():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(200, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q[q[:, 0] < 0] *= -1
    R = quaternion_to_matrix(q)
    np.testing.assert_allclose(R @ np.swapaxes(R, 1, 2), np.broadcast_to(np.eye(3), R.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    np.testing.assert_allclose(matrix_to_quaternion(R), q, atol=1e-10)
    # a rotation of 90 degrees about z, by hand: w = cos 45, z = sin 45
    Rz = quaternion_to_matrix([[math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)]])[0]
    np.testing.assert_allclose(Rz, [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)


def test_frames_from_normals():
    rng = np.random.default_rng(0)
    n = rng.normal(size=(100, 3))
    n[0] = [1, 0, 0]
    n[1] = [0, 0, -1]
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    R = frames_from_normals(n)
    np.testing.assert_allclose(R[:, :, 2], n, atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# renderer

CAM = CameraIntrinsics(10.0, 10.0, 4.0, 3.0, 9, 7)  # 9 x 7 pixels, centres at integers, principal point (4, 3)


def two_gaussians():
    """Near: centre (0, 0, 2) -> pixel (4, 3), sigma 0.2 m = 1 px, opacity 0.8, red, class 0.
    Far: centre (0.4, 0, 4) -> pixel (5, 3), sigma 0.4 m = 1 px, opacity 0.9, green, class 1.
    Flat along the optical axis (z scale 1e-7), so the 2D covariance is 1 px^2 + 0.3 dilation."""
    logit = (lambda p: math.log(p / (1 - p)))  # noqa: E731
    # the far one first in the file: the renderer must sort by depth
    return GaussianScene(
        positions=[[0.4, 0.0, 4.0], [0.0, 0.0, 2.0]],
        sh_dc=[[(0.0 - 0.5) / SH_C0, (1.0 - 0.5) / SH_C0, (0.0 - 0.5) / SH_C0],
               [(1.0 - 0.5) / SH_C0, (0.0 - 0.5) / SH_C0, (0.0 - 0.5) / SH_C0]],
        sh_rest=np.zeros((2, 0, 3)), opacity=[logit(0.9), logit(0.8)],
        scales=np.log([[0.4, 0.4, 1e-7], [0.2, 0.2, 1e-7]]), rotations=[[1, 0, 0, 0], [1, 0, 0, 0]],
        labels=[1, 0])


def test_two_gaussian_image_by_hand():
    r = render(two_gaussians(), np.eye(4), CAM, n_classes=2, use_numba=False)
    var = 1.3  # 1 px^2 + 0.3 px^2 dilation

    def alphas(x, y):
        a1 = 0.8 * math.exp(-0.5 * ((x - 4) ** 2 + (y - 3) ** 2) / var)
        a2 = 0.9 * math.exp(-0.5 * ((x - 5) ** 2 + (y - 3) ** 2) / var)
        # 3-sigma radius ceil(3 sqrt(1.3 + sqrt(0.1))) = 4 px; contributions under 1/255 are skipped
        a1 = a1 if a1 >= 1 / 255 and abs(x - 4) <= 4 and abs(y - 3) <= 4 else 0.0
        a2 = a2 if a2 >= 1 / 255 and abs(x - 5) <= 4 and abs(y - 3) <= 4 else 0.0
        return a1, a2

    for y in range(7):
        for x in range(9):
            a1, a2 = alphas(x, y)
            w1, w2 = a1, (1 - a1) * a2  # near first
            np.testing.assert_allclose(r.color[y, x], [w1, w2, 0.0], atol=1e-6, err_msg=f"pixel {x},{y}")
            np.testing.assert_allclose(r.alpha[y, x], 1 - (1 - a1) * (1 - a2), atol=1e-6)
            np.testing.assert_allclose(r.class_weights[y, x], [w1, w2], atol=1e-6)
            expect = NO_LABEL if w1 + w2 < 0.5 else int(w2 > w1)
            assert r.label[y, x] == expect, (x, y)
    # a few pixels by hand: at (4, 3) a1 = 0.8, a2 = 0.9 exp(-1/2.6) = 0.612641
    np.testing.assert_allclose(r.color[3, 4], [0.8, 0.2 * 0.612641, 0.0], atol=1e-5)
    assert r.label[3, 4] == 0
    # at (6, 3): a1 = 0.8 exp(-4/2.6) = 0.171769, the far one's weight 0.828231 * 0.612641 = 0.507408 wins
    np.testing.assert_allclose(r.class_weights[3, 6], [0.171769, 0.507408], atol=1e-5)
    assert r.label[3, 6] == 1
    # at (8, 3) the near one's alpha 0.0017 < 1/255 is skipped; weight 0.028 < 0.5: no label
    np.testing.assert_allclose(r.color[3, 8], [0.0, 0.9 * math.exp(-4.5 / 1.3), 0.0], atol=1e-6)
    assert r.label[3, 8] == NO_LABEL
    np.testing.assert_allclose(r.depth[3, 4], (0.8 * 2 + 0.2 * 0.612641 * 4) / (1 - 0.2 * (1 - 0.612641)),
                               atol=1e-5)


def test_numba_kernel_matches_the_reference_and_order_does_not_matter():
    from sas_core.geometry.splatting import _numba

    if _numba is None:
        pytest.skip("numba not importable")
    rng = np.random.default_rng(1)
    n = 300
    pos = np.c_[rng.uniform(-1, 1, (n, 2)), rng.uniform(1.5, 4, n)]
    g = GaussianScene(pos, rng.normal(size=(n, 3)), rng.normal(size=(n, 3, 3)) * 0.2, rng.normal(size=n) + 1,
                      np.log(rng.uniform(0.02, 0.2, (n, 3))), rng.normal(size=(n, 4)), labels=rng.integers(0, 5, n))
    cam = CameraIntrinsics(30.0, 30.0, 19.5, 14.5, 40, 30)
    pose = np.eye(4)
    a = render(g, pose, cam, n_classes=5, use_numba=True)
    b = render(g, pose, cam, n_classes=5, use_numba=False)
    np.testing.assert_allclose(a.color, b.color, atol=1e-6)
    np.testing.assert_array_equal(a.label, b.label)
    perm = rng.permutation(n)
    c = render(g.select(perm), pose, cam, n_classes=5)
    np.testing.assert_allclose(a.color, c.color, atol=1e-5)
    assert (a.alpha > 0.5).mean() > 0.3  # the test scene covers a good part of the image


def test_early_termination_drops_the_contribution_that_saturates_the_pixel():
    logit = math.log(0.999 / 0.001)  # alpha clamped to 0.99
    g = GaussianScene(positions=[[0, 0, 2.0], [0, 0, 3.0], [0, 0, 4.0]],
                      sh_dc=(np.eye(3) - 0.5) / SH_C0, sh_rest=np.zeros((3, 0, 3)), opacity=[logit] * 3,
                      scales=np.log([[1.0, 1.0, 1e-7]] * 3), rotations=[[1, 0, 0, 0]] * 3)
    r = render(g, np.eye(4), CAM, use_numba=False)
    # T: 1 -> 0.01 -> 1e-4; the third would take T to 1e-6 < 1e-4: the pixel stops without it
    np.testing.assert_allclose(r.color[3, 4], [0.99, 0.01 * 0.99, 0.0], atol=1e-9)
    np.testing.assert_allclose(r.alpha[3, 4], 1 - 1e-4, atol=1e-9)
    off = render(g, np.eye(4), CAM, use_numba=False, config=SplatConfig(transmittance_min=0.0))
    assert off.color[3, 4, 2] > 0.9e-4


def test_ewa_covariance_is_the_jacobian_of_the_projection():
    rng = np.random.default_rng(2)
    cam = CameraIntrinsics(500.0, 480.0, 320.0, 240.0, 640, 480)
    from sas_core.data.synthetic import look_at

    pose = look_at([0.3, -0.2, 1.1], [0.1, 2.0, 0.8])
    p = np.array([[0.2, 1.5, 0.9]])
    A = rng.normal(size=(3, 3)) * 0.05
    cov = A @ A.T
    proj = project_gaussians(p, cov[None], pose, cam, SplatConfig(dilation=0.0))

    def pix(x):
        w2c = np.linalg.inv(pose)
        t = w2c[:3, :3] @ x + w2c[:3, 3]
        return np.array([cam.fx * t[0] / t[2] + cam.cx, cam.fy * t[1] / t[2] + cam.cy])

    eps = 1e-6
    J = np.stack([(pix(p[0] + eps * e) - pix(p[0] - eps * e)) / (2 * eps) for e in np.eye(3)], axis=1)
    expect = J @ cov @ J.T
    a, b, c = proj.cov2d[0]
    np.testing.assert_allclose([[a, b], [b, c]], expect, rtol=1e-6)
    np.testing.assert_allclose(proj.uv[0], pix(p[0]), rtol=1e-9)
    inv = np.linalg.inv(expect)
    np.testing.assert_allclose(proj.conic[0], [inv[0, 0], inv[0, 1], inv[1, 1]], rtol=1e-6)
    # behind the near plane: culled
    assert not project_gaussians([[0, 0, -1.0]], np.eye(3)[None], np.eye(4), cam).visible[0]


def test_sh_colour_degrees():
    rng = np.random.default_rng(0)
    dc = rng.normal(size=(4, 3))
    d = rng.normal(size=(4, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    np.testing.assert_allclose(eval_sh(dc, np.zeros((4, 0, 3)), d), np.maximum(SH_C0 * dc + 0.5, 0), atol=1e-6)
    rest = np.zeros((4, 15, 3))
    rest[:, 1] = 1.0  # the z band of degree 1: + C1 * z
    np.testing.assert_allclose(eval_sh(dc, rest, d), np.maximum(SH_C0 * dc + 0.4886025 * d[:, 2:3] + 0.5, 0),
                               atol=1e-6)
    # the higher bands are zero-mean over the sphere: averaging over many directions leaves the DC colour
    dirs = rng.normal(size=(20000, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    rest = np.broadcast_to(rng.normal(size=(1, 15, 3)) * 0.05, (20000, 15, 3))
    dc1 = np.broadcast_to(np.array([[0.5, 0.5, 0.5]]), (20000, 3))
    np.testing.assert_allclose(eval_sh(dc1, rest, dirs).mean(0), SH_C0 * 0.5 + 0.5, atol=3e-3)


# ------------------------------------------------------------------------------------------------
# synthetic splat scenes and the 2D evaluation


@pytest.fixture(scope="module")
def room():
    from sas_core.data.synthetic import SynthConfig, generate_scene

    return generate_scene(SynthConfig(seed=3, n_frames=6, width=80, height=60, with_lidar=False, points_per_m2=30,
                                      room_min=(3.5, 3.0), room_max=(4.0, 3.5)))


def test_synthetic_gaussians_follow_the_surface(room):
    g, gt = synthetic_gaussians(room, SyntheticGaussianConfig(points_per_m2=60, seed=1))
    assert len(g) == len(gt) > 1000 and g.sh_degree == 3 and not g.sh_rest.any()
    np.testing.assert_allclose(g.opacities(), 0.95, atol=1e-6)
    s = np.exp(g.scales)
    assert (s[:, 2] < 0.06 * s[:, 0]).all() and np.allclose(s[:, 0], s[:, 1])  # flat discs
    # the disc normal (third axis) is the surface normal at the centre: find it by ray casting the mesh
    R = g.rotation_matrices()
    import open3d as o3d

    rc = room.raycasting_scene()
    q = rc.compute_closest_points(o3d.core.Tensor(g.positions[:200]))
    tri = q["primitive_ids"].numpy()
    np.testing.assert_allclose(np.abs((R[:200, :, 2] * room.triangle_normals[tri]).sum(1)), 1.0, atol=1e-4)
    np.testing.assert_array_equal(gt[:200], room.triangle_labels[tri])
    # another seed, other samples; same seed, same bytes
    g2, _ = synthetic_gaussians(room, SyntheticGaussianConfig(points_per_m2=60, seed=1))
    np.testing.assert_array_equal(g.positions, g2.positions)
    g3, _ = synthetic_gaussians(room, SyntheticGaussianConfig(points_per_m2=60, seed=2))
    assert len(g3) != len(g) or not np.array_equal(g3.positions, g.positions)


def test_rendered_ground_truth_labels_match_the_label_images(room):
    from sas_core.eval.gaussians import evaluate_gaussians
    from sas_core.text import SCANNET_20

    g, gt = synthetic_gaussians(room, SyntheticGaussianConfig(points_per_m2=150))
    views = synthetic_views(room, 3)
    assert views.labels.shape == (3, 60, 80) and views.colors.shape == (3, 60, 80, 3)
    res = evaluate_gaussians([(g, gt, views)], SCANNET_20)
    assert res["covered"] > 0.9 and res["miou_present"] > 0.7 and res["views"] == 3
    # rendered colours look like the ray-cast images
    r = render(g, views.poses[0], views.intrinsics)
    assert np.abs(r.color * 255 - views.colors[0]).mean() < 25
    # a labelling that shuffles the classes scores far lower
    wrong = np.where(gt == 255, 255, (gt + 1) % 20)
    assert evaluate_gaussians([(g, wrong, views)], SCANNET_20)["miou_present"] < 0.2
    lab = render_labels(g, gt, views.poses[1], views.intrinsics, 20)
    assert lab.shape == (60, 80) and lab.dtype == np.int64


def test_views_file_round_trip(tmp_path, room):
    views = synthetic_views(room, 2)
    save_views(tmp_path / "views.npz", views)
    back = load_views(tmp_path / "views.npz")
    np.testing.assert_array_equal(back.poses, views.poses)
    np.testing.assert_array_equal(back.labels, views.labels)
    np.testing.assert_array_equal(back.colors, views.colors)
    assert back.intrinsics == views.intrinsics
    np.savez(tmp_path / "bad.npz", poses=views.poses)
    with pytest.raises(ValueError, match="bad.npz.*no intrinsics, labels"):
        load_views(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="label images have shape"):
        LabelledViews(views.poses, views.intrinsics, views.labels[:, :-1])
