"""3D Gaussian splatting scenes: the INRIA PLY layout, segmented splats, synthetic splat scenes.

A 3DGS scene (Kerbl et al. 2023; the PLY that the reference implementation, SuperSplat, gsplat
and most splat viewers read and write) is one ``vertex`` element, binary little-endian, with
per-Gaussian properties

* ``x, y, z``: centre (world metres); ``nx, ny, nz``: unused normals (zeros), optional;
* ``f_dc_0..2``: degree-0 spherical-harmonic (SH) colour coefficients, one per RGB channel;
  the base colour is ``SH_C0 * f_dc + 0.5``;
* ``f_rest_0..(3R-1)``: the higher SH coefficients, R = (degree + 1)^2 - 1 per channel (0, 3, 8
  or 15), stored channel-major (all R coefficients of red, then green, then blue);
* ``opacity``: logit of the opacity (activated with a sigmoid);
* ``scale_0..2``: log of the standard deviations along the Gaussian's local axes (exp);
* ``rot_0..3``: rotation quaternion (w, x, y, z), not necessarily normalised.

A *segmented* splat (SAS section 4.4: a label per Gaussian) keeps that layout so any splat viewer
shows it: the label's palette colour goes into the DC terms (``f_dc = (rgb - 0.5) / SH_C0``), the
higher terms are zeroed (the colour no longer depends on the view), and ``label`` (int32) and
``score`` (float32) properties are appended.

Files are read with :func:`sas_core.io.read_ply` (plyfile, with the header's element counts checked
against the file size before anything is allocated; data, never code) and written atomically with
:func:`sas_core.io.write_ply`.

:func:`synthetic_gaussians` turns a synthetic room into a Gaussian scene from its surface samples
(the way 3DGS initialises from a point cloud, with the orientation a trained splat of a flat
surface converges to); :func:`synthetic_views` renders views of the room with ground-truth label
images to score rendered labels against (:mod:`sas_core.eval.gaussians`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np

from sas_core.config import opt
from sas_core.types import IGNORE_LABEL, CameraIntrinsics

SH_C0 = 0.28209479177387814
"""The degree-0 real spherical harmonic, 1 / (2 sqrt(pi)): colour = SH_C0 * f_dc + 0.5."""

#: SH coefficients per channel beyond DC by degree (0..3).
SH_REST = {0: 0, 1: 3, 2: 8, 3: 15}

_REQUIRED = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
             "rot_0", "rot_1", "rot_2", "rot_3"]
_KNOWN = set(_REQUIRED) | {"nx", "ny", "nz", "label", "score", "positions", "faces"}


@dataclass
class GaussianScene:
    """3D Gaussians with their parameters as stored in the PLY (before activation).

    Attributes:
        positions: (N, 3) float32 centres (m).
        sh_dc: (N, 3) float32 degree-0 SH coefficients (``f_dc_*``).
        sh_rest: (N, R, 3) float32 higher SH coefficients, R in (0, 3, 8, 15) (``f_rest_*``).
        opacity: (N,) float32 opacity logits.
        scales: (N, 3) float32 log standard deviations along the local axes.
        rotations: (N, 4) float32 quaternions (w, x, y, z).
        normals: optional (N, 3) float32 (``nx, ny, nz``; 3DGS writes zeros).
        labels: optional (N,) int64 class per Gaussian (``label``).
        scores: optional (N,) float32 confidence of the label (``score``).
        extra: other per-Gaussian (N,) properties of the file, written back unchanged.
    """

    positions: np.ndarray
    sh_dc: np.ndarray
    sh_rest: np.ndarray
    opacity: np.ndarray
    scales: np.ndarray
    rotations: np.ndarray
    normals: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    scores: Optional[np.ndarray] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.positions = np.ascontiguousarray(self.positions, np.float32).reshape(-1, 3)
        n = len(self.positions)

        def arr(a, shape, name, dtype=np.float32):
            a = np.ascontiguousarray(a, dtype)
            try:
                return a.reshape(shape)
            except ValueError:
                raise ValueError(f"Gaussians: {name} has shape {a.shape}, expected {shape}") from None

        self.sh_dc = arr(self.sh_dc, (n, 3), "sh_dc")
        rest = np.asarray(self.sh_rest, np.float32)
        if rest.size == 0:
            rest = np.zeros((n, 0, 3), np.float32)
        if rest.ndim != 3 or rest.shape[0] != n or rest.shape[2] != 3 or rest.shape[1] not in SH_REST.values():
            raise ValueError(f"Gaussians: sh_rest has shape {rest.shape}, expected ({n}, R, 3) with R in 0/3/8/15")
        self.sh_rest = np.ascontiguousarray(rest)
        self.opacity = arr(self.opacity, (n,), "opacity")
        self.scales = arr(self.scales, (n, 3), "scales")
        self.rotations = arr(self.rotations, (n, 4), "rotations")
        if self.normals is not None:
            self.normals = arr(self.normals, (n, 3), "normals")
        if self.labels is not None:
            self.labels = arr(self.labels, (n,), "labels", np.int64)
        if self.scores is not None:
            self.scores = arr(self.scores, (n,), "scores")
        for k, v in self.extra.items():
            if np.asarray(v).shape != (n,):
                raise ValueError(f"Gaussians: property {k!r} has shape {np.asarray(v).shape}, expected ({n},)")
        for name in ("positions", "sh_dc", "sh_rest", "opacity", "scales", "rotations"):
            if not np.isfinite(getattr(self, name)).all():
                raise ValueError(f"Gaussians: {name} has non-finite values")
        if n and (np.linalg.norm(self.rotations, axis=1) < 1e-12).any():
            raise ValueError("Gaussians: a rotation quaternion is zero")

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def sh_degree(self) -> int:
        """Degree of the SH colour (0..3)."""
        return {v: k for k, v in SH_REST.items()}[self.sh_rest.shape[1]]

    def base_colors(self) -> np.ndarray:
        """(N, 3) float32 view-independent colour from the DC terms, clipped to [0, 1]."""
        return np.clip(SH_C0 * self.sh_dc + 0.5, 0.0, 1.0).astype(np.float32)

    def opacities(self) -> np.ndarray:
        """(N,) float32 opacity in (0, 1): sigmoid of the stored logit."""
        return (1.0 / (1.0 + np.exp(-self.opacity.astype(np.float64)))).astype(np.float32)

    def rotation_matrices(self) -> np.ndarray:
        """(N, 3, 3) float64 rotations of the (normalised) quaternions."""
        return quaternion_to_matrix(self.rotations)

    def covariances(self) -> np.ndarray:
        """(N, 3, 3) float64 world covariances ``R S S^T R^T`` with ``S = diag(exp(scales))``."""
        R = self.rotation_matrices()
        M = R * np.exp(self.scales.astype(np.float64))[:, None, :]
        return M @ np.swapaxes(M, 1, 2)

    def select(self, index) -> "GaussianScene":
        """The Gaussians at ``index`` (bool mask or integer indices)."""
        opt = (lambda a: None if a is None else a[index])  # noqa: E731
        return GaussianScene(self.positions[index], self.sh_dc[index], self.sh_rest[index], self.opacity[index],
                             self.scales[index], self.rotations[index], opt(self.normals), opt(self.labels),
                             opt(self.scores), {k: np.asarray(v)[index] for k, v in self.extra.items()})


# ------------------------------------------------------------------------------------------------
# rotations


def quaternion_to_matrix(q) -> np.ndarray:
    """(N, 4) quaternions (w, x, y, z), any norm > 0 -> (N, 3, 3) float64 rotation matrices."""
    q = np.asarray(q, np.float64).reshape(-1, 4)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], axis=1).reshape(-1, 3, 3)


def matrix_to_quaternion(R) -> np.ndarray:
    """(N, 3, 3) rotation matrices -> (N, 4) float64 unit quaternions (w, x, y, z), w >= 0."""
    R = np.asarray(R, np.float64).reshape(-1, 3, 3)
    m = R
    t = np.stack([1 + m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2], 1 + m[:, 0, 0] - m[:, 1, 1] - m[:, 2, 2],
                  1 - m[:, 0, 0] + m[:, 1, 1] - m[:, 2, 2], 1 - m[:, 0, 0] - m[:, 1, 1] + m[:, 2, 2]], axis=1)
    best = t.argmax(axis=1)  # the largest of 4w^2, 4x^2, 4y^2, 4z^2: numerically safe branch
    q = np.empty((len(R), 4))
    s = np.sqrt(np.maximum(t[np.arange(len(R)), best], 1e-300)) * 2  # = 4 * the largest component
    for k in range(4):
        i = best == k
        if not i.any():
            continue
        mi, si = m[i], s[i]
        if k == 0:
            q[i] = np.stack([si / 4, (mi[:, 2, 1] - mi[:, 1, 2]) / si, (mi[:, 0, 2] - mi[:, 2, 0]) / si,
                             (mi[:, 1, 0] - mi[:, 0, 1]) / si], 1)
        elif k == 1:
            q[i] = np.stack([(mi[:, 2, 1] - mi[:, 1, 2]) / si, si / 4, (mi[:, 0, 1] + mi[:, 1, 0]) / si,
                             (mi[:, 0, 2] + mi[:, 2, 0]) / si], 1)
        elif k == 2:
            q[i] = np.stack([(mi[:, 0, 2] - mi[:, 2, 0]) / si, (mi[:, 0, 1] + mi[:, 1, 0]) / si, si / 4,
                             (mi[:, 1, 2] + mi[:, 2, 1]) / si], 1)
        else:
            q[i] = np.stack([(mi[:, 1, 0] - mi[:, 0, 1]) / si, (mi[:, 0, 2] + mi[:, 2, 0]) / si,
                             (mi[:, 1, 2] + mi[:, 2, 1]) / si, si / 4], 1)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q[q[:, 0] < 0] *= -1
    return q


def frames_from_normals(normals) -> np.ndarray:
    """(N, 3) unit normals -> (N, 3, 3) right-handed rotations whose third column is the normal."""
    n = np.asarray(normals, np.float64).reshape(-1, 3)
    n = n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    helper = np.where((np.abs(n[:, 0]) < 0.9)[:, None], [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    t1 = np.cross(n, helper)
    t1 /= np.linalg.norm(t1, axis=1, keepdims=True)
    t2 = np.cross(n, t1)
    return np.stack([t1, t2, n], axis=2)


# ------------------------------------------------------------------------------------------------
# PLY files


def read_gaussians(path) -> GaussianScene:
    """Read a 3DGS PLY (the INRIA layout; see the module docstring); ValueError naming the file if
    it is not one (a plain point cloud, a missing ``scale_*``, an odd ``f_rest_*`` count, ...)."""
    from sas_core.io import read_ply

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Gaussian splat file {path} not found")
    d = read_ply(path)
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ValueError(f"{path}: not a 3D Gaussian splat PLY (no {', '.join(missing)}; the INRIA layout has "
                         f"x,y,z, f_dc_0..2, f_rest_*, opacity, scale_0..2, rot_0..3)")
    rest_keys = sorted((k for k in d if k.startswith("f_rest_")), key=lambda k: int(k[7:]) if k[7:].isdigit() else -1)
    idx = [int(k[7:]) if k[7:].isdigit() else -1 for k in rest_keys]
    if idx != list(range(len(rest_keys))) or len(rest_keys) % 3 or len(rest_keys) // 3 not in SH_REST.values():
        raise ValueError(f"{path}: {len(rest_keys)} f_rest_* properties; expected f_rest_0..f_rest_{{3R-1}} with "
                         f"R in 0/3/8/15 (SH degree 0..3)")
    n = len(d["positions"])
    r = len(rest_keys) // 3
    rest = (np.stack([d[k] for k in rest_keys], 1).astype(np.float32).reshape(n, 3, r).transpose(0, 2, 1)
            if r else np.zeros((n, 0, 3), np.float32))
    col = (lambda keys: np.stack([d[k] for k in keys], 1))  # noqa: E731
    normals = col(["nx", "ny", "nz"]) if all(k in d for k in ("nx", "ny", "nz")) else None
    extra = {k: np.asarray(v) for k, v in d.items() if k not in _KNOWN and not k.startswith("f_rest_")}
    try:
        return GaussianScene(d["positions"], col(["f_dc_0", "f_dc_1", "f_dc_2"]), rest, d["opacity"],
                             col(["scale_0", "scale_1", "scale_2"]), col(["rot_0", "rot_1", "rot_2", "rot_3"]),
                             normals, d.get("label"), d.get("score"), extra)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def write_gaussians(path, gaussians: GaussianScene) -> None:
    """Write ``gaussians`` as a binary little-endian 3DGS PLY, atomically: the INRIA property order
    (x y z nx ny nz f_dc_* f_rest_* opacity scale_* rot_*), then ``label``/``score`` when set, then
    the extra properties."""
    from sas_core.io import write_ply

    g = gaussians
    n = len(g)
    cols = {}
    for i in range(3):
        cols[f"f_dc_{i}"] = g.sh_dc[:, i]
    rest = g.sh_rest.transpose(0, 2, 1).reshape(n, -1)  # channel-major, as 3DGS writes it
    for i in range(rest.shape[1]):
        cols[f"f_rest_{i}"] = rest[:, i]
    cols["opacity"] = g.opacity
    for i in range(3):
        cols[f"scale_{i}"] = g.scales[:, i]
    for i in range(4):
        cols[f"rot_{i}"] = g.rotations[:, i]
    if g.labels is not None:
        cols["label"] = g.labels.astype(np.int32)
    if g.scores is not None:
        cols["score"] = g.scores.astype(np.float32)
    for k, v in g.extra.items():
        if k in cols or k in _KNOWN:
            raise ValueError(f"extra property {k!r} clashes with a 3DGS property")
        cols[k] = v
    normals = g.normals if g.normals is not None else np.zeros((n, 3), np.float32)
    write_ply(path, g.positions, normals=normals, **cols)


def segmented_gaussians(gaussians: GaussianScene, labels, scores=None, colors=None) -> GaussianScene:
    """A copy of ``gaussians`` that shows its labels in any splat viewer.

    Args:
        labels: (N,) class per Gaussian (values outside 0..255 are drawn grey).
        scores: optional (N,) confidence per Gaussian (``score``).
        colors: optional (N, 3) uint8 colours to show instead of the label palette
            (:func:`sas_core.viz.label_colors`).

    The colour goes into the DC terms, ``f_dc = (rgb - 0.5) / SH_C0``, and the higher SH terms are
    zeroed (kept as zeros, so the file keeps its layout); geometry and opacity are unchanged.
    """
    from sas_core.viz import label_colors

    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) != len(gaussians):
        raise ValueError(f"{len(labels)} labels for {len(gaussians)} Gaussians")
    rgb = label_colors(labels) if colors is None else np.asarray(colors, np.uint8).reshape(-1, 3)
    dc = ((rgb.astype(np.float32) / 255.0 - 0.5) / SH_C0).astype(np.float32)
    return replace(gaussians, sh_dc=dc, sh_rest=np.zeros_like(gaussians.sh_rest), labels=labels,
                   scores=None if scores is None else np.asarray(scores, np.float32).reshape(-1),
                   extra=dict(gaussians.extra))


# ------------------------------------------------------------------------------------------------
# synthetic splat scenes


@dataclass
class SyntheticGaussianConfig:
    """How :func:`synthetic_gaussians` makes a splat scene of a synthetic room."""

    points_per_m2: float = opt(200.0, "Gaussians per m^2 of surface (their own samples, not the room's points)")
    scale_factor: float = opt(0.7, "in-plane scale relative to the 3DGS initial scale (trained splats end up "
                                   "tighter; 0.7 keeps about 96 percent of the pixels covered, with sharper object borders)")
    opacity: float = opt(0.95, "opacity of every Gaussian")
    flatness: float = opt(0.05, "scale along the normal relative to the in-plane scale (flat discs)")
    sh_degree: int = opt(3, "SH degree of the file (higher terms zero: the synthetic shading is view-independent)",
                         choices=(0, 1, 2, 3))
    seed: int = opt(0, "seeds the sampling (with the room's seed)")


def nearest_neighbour_scales(positions, k: int = 3) -> np.ndarray:
    """(N,) float32 sqrt of the mean squared distance to the ``k`` nearest other centres: the scale
    3DGS initialises every Gaussian with (``distCUDA2``), i.e. the local sampling density."""
    from scipy.spatial import cKDTree

    pts = np.asarray(positions, np.float64).reshape(-1, 3)
    if len(pts) < 2:
        return np.full(len(pts), 0.01, np.float32)
    kk = min(k, len(pts) - 1)
    d, _ = cKDTree(pts).query(pts, k=kk + 1)
    d2 = (d[:, 1:] ** 2).mean(axis=1)
    return np.sqrt(np.maximum(d2, 1e-7)).astype(np.float32)


def synthetic_gaussians(scene, config: Optional[SyntheticGaussianConfig] = None):
    """A Gaussian splat scene of a :class:`sas_core.data.synthetic.SyntheticScene`.

    Centres: the room's exposed surface sampled uniformly by area at ``points_per_m2``
    (:func:`sas_core.data.synthetic.sample_surface`, with the room's hidden-surface culling); colour:
    the surface's shaded colour in the DC terms; scale: the 3DGS initial scale (root mean squared
    distance to the 3 nearest centres) times ``scale_factor`` in the surface plane and ``flatness``
    times that along the normal (flat discs, the shape a trained splat of a flat surface takes);
    rotation: the local
    frame whose third axis is the surface normal; opacity ``opacity``.

    Returns (GaussianScene, ground-truth class per Gaussian (N,) int64, 255 = ceiling).
    """
    from sas_core.data.synthetic import sample_surface

    cfg = config or SyntheticGaussianConfig()
    if cfg.points_per_m2 <= 0:
        raise ValueError(f"points_per_m2 must be positive, got {cfg.points_per_m2}")
    if cfg.scale_factor <= 0:
        raise ValueError(f"scale_factor must be positive, got {cfg.scale_factor}")
    if not 0.0 < cfg.opacity < 1.0:
        raise ValueError(f"opacity must be in (0, 1), got {cfg.opacity}")
    if cfg.sh_degree not in SH_REST:
        raise ValueError(f"sh_degree must be 0..3, got {cfg.sh_degree}")
    rng = np.random.default_rng([int(scene.config.seed), 17, int(cfg.seed)])
    pc = sample_surface(scene, cfg.points_per_m2, rng, raycaster=scene.raycasting_scene())
    n = len(pc)
    sigma = cfg.scale_factor * nearest_neighbour_scales(pc.positions)
    scales = np.log(np.stack([sigma, sigma, np.maximum(sigma * cfg.flatness, 1e-5)], 1)).astype(np.float32)
    rotations = matrix_to_quaternion(frames_from_normals(pc.normals)).astype(np.float32)
    dc = ((pc.colors.astype(np.float32) - 0.5) / SH_C0).astype(np.float32)
    logit = math.log(cfg.opacity / (1.0 - cfg.opacity))
    g = GaussianScene(pc.positions, dc, np.zeros((n, SH_REST[cfg.sh_degree], 3), np.float32),
                      np.full(n, logit, np.float32), scales, rotations)
    return g, np.asarray(pc.labels, np.int64)


# ------------------------------------------------------------------------------------------------
# views with ground-truth label images


@dataclass
class LabelledViews:
    """Camera views with ground-truth label images (the 2D evaluation of SAS Table 5).

    Attributes:
        poses: (V, 4, 4) float64 camera-to-world (OpenCV optical frame: x right, y down, z forward).
        intrinsics: the camera of every view (pixel centres at integer coordinates).
        labels: (V, H, W) int64 class per pixel (255 = not evaluated).
        colors: optional (V, H, W, 3) uint8 images.
    """

    poses: np.ndarray
    intrinsics: CameraIntrinsics
    labels: np.ndarray
    colors: Optional[np.ndarray] = None

    def __post_init__(self):
        self.poses = np.asarray(self.poses, np.float64).reshape(-1, 4, 4)
        self.labels = np.asarray(self.labels).astype(np.int64)
        v, h, w = len(self.poses), self.intrinsics.height, self.intrinsics.width
        if self.labels.shape != (v, h, w):
            raise ValueError(f"label images have shape {self.labels.shape}, expected ({v}, {h}, {w})")
        if not np.isfinite(self.poses).all():
            raise ValueError("view poses must be finite")
        if self.colors is not None:
            self.colors = np.asarray(self.colors, np.uint8)
            if self.colors.shape != (v, h, w, 3):
                raise ValueError(f"images have shape {self.colors.shape}, expected ({v}, {h}, {w}, 3)")

    def __len__(self) -> int:
        return len(self.poses)


def save_views(path, views: LabelledViews) -> None:
    """Write ``views`` as an .npz (``poses``, ``intrinsics`` = fx fy cx cy width height,
    ``labels``, optional ``colors``), atomically."""
    from sas_core.io import atomic_path

    i = views.intrinsics
    arrays = dict(poses=views.poses, intrinsics=np.array([i.fx, i.fy, i.cx, i.cy, i.width, i.height], np.float64),
                  labels=views.labels.astype(np.int32 if views.labels.max(initial=0) > 255 else np.uint8))
    if views.colors is not None:
        arrays["colors"] = views.colors
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def load_views(path) -> LabelledViews:
    """Read a views .npz written by :func:`save_views` (no pickles); ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"views file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("poses", "intrinsics", "labels") if k not in z.files]
            if missing:
                raise ValueError(f"no {', '.join(missing)} array (has {', '.join(sorted(z.files))})")
            intr = np.asarray(z["intrinsics"], np.float64).reshape(-1)
            if intr.shape != (6,):
                raise ValueError("intrinsics must be fx fy cx cy width height")
            cam = CameraIntrinsics(float(intr[0]), float(intr[1]), float(intr[2]), float(intr[3]), int(intr[4]),
                                   int(intr[5]))
            return LabelledViews(z["poses"], cam, z["labels"], z["colors"] if "colors" in z.files else None)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not a views file ({exc})") from None


def synthetic_views(scene, n_views: int = 8, offset: float = 0.5) -> LabelledViews:
    """``n_views`` views of a synthetic room along its camera trajectory, with ground-truth labels.

    The views are spread evenly over the trajectory's duration, shifted by ``offset`` of a step
    from its RGB-D frames (0.5: half-way between two recorded frames, so these are novel views,
    not the frames the teachers saw). Ceiling and empty pixels are 255 (not evaluated).
    """
    from sas_core.data.synthetic import CAMERA_HZ, START_STAMP, render_frames

    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    duration = max(scene.config.n_frames, 1) / CAMERA_HZ
    stamps = [START_STAMP + (i + offset) * duration / n_views for i in range(n_views)]
    frames = render_frames(scene, [scene.camera_pose(s) for s in stamps], scene.intrinsics, stamps)
    labels = np.stack([f.semantic for f in frames])
    labels[labels < 0] = IGNORE_LABEL
    return LabelledViews(np.stack([f.pose for f in frames]), scene.intrinsics, labels,
                         np.stack([f.color for f in frames]))
