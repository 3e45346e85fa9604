"""The synthetic world: procedural indoor rooms rendered with Open3D ray casting.

Nothing here pretends to be real data. A scene is a closed room (floor, four walls, a ceiling)
furnished with objects of ScanNet-20 classes, each built from boxes and cylinders with a
class-typical shape (a chair is a seat, a back and four legs; a bed is a frame, a mattress, a
pillow and a headboard; ...) and per-instance variation of size and colour. Everything is
deterministic given :attr:`SynthConfig.seed`.

From the triangle mesh we derive

* a surface point cloud sampled uniformly by area, with colour, normal, class and instance;
* RGB-D frames along a smooth camera trajectory (OpenCV optical frame, camera-to-world poses):
  RGB with Lambertian shading, metric z-depth, semantic and instance images;
* optional LiDAR sweeps of a spinning multi-beam sensor moved along the same trajectory.

Shading is view-independent (a directional light plus ambient light), so the colour of a
surface point equals the colour of the pixels that see it (up to image compression).

Labels index :data:`sas_core.text.SCANNET_20`; the ceiling is :data:`IGNORE_LABEL` (255) with
instance -1. The world frame is z-up, the room spans ``[0, Lx] x [0, Ly] x [0, H]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from sas_core.config import opt
from sas_core.text import SCANNET_20
from sas_core.types import IGNORE_LABEL, CameraIntrinsics, Frame, PointCloud

CLASS_INDEX = {name: i for i, name in enumerate(SCANNET_20)}
START_STAMP = 1_700_000_000.0
"""Stamp (s) of the first camera frame; the camera runs at :data:`CAMERA_HZ`, the LiDAR at LIDAR_HZ."""
CAMERA_HZ = 15.0
LIDAR_HZ = 10.0
CAMERA_FRAME_ID = "camera_color_optical_frame"
LIDAR_FRAME_ID = "lidar"
_LIGHT = np.array([0.35, 0.55, 0.76]) / np.linalg.norm([0.35, 0.55, 0.76])
_AMBIENT = 0.55


@dataclass
class SynthConfig:
    """Settings of one synthetic scene (all defaults give a ~7x6 m room, 60 frames, LiDAR)."""

    seed: int = opt(0, "everything (room, objects, trajectory, samples) follows from it")
    n_frames: int = opt(60, "RGB-D frames along the trajectory (15 Hz)")
    width: int = opt(320, "image width in pixels (ScanNet frames as OpenScene uses them: 320x240)")
    height: int = opt(240, "image height in pixels")
    hfov_deg: float = opt(58.0, "horizontal field of view (ScanNet's depth camera: about 58 deg)")
    with_lidar: bool = opt(True, "also simulate LiDAR sweeps")
    n_lidar_sweeps: Optional[int] = opt(None, "LiDAR sweeps (None: 10 Hz over the camera's duration)")
    lidar_beams: int = opt(16, "vertical beams (rings)")
    lidar_fov_deg: float = opt(30.0, "vertical field of view, symmetric (+-15 deg)")
    lidar_azimuth_steps: int = opt(1024, "rays per beam and revolution")
    points_per_m2: float = opt(600.0, "surface sampling density (~100k-200k points per room)")
    room_min: tuple = opt((6.0, 5.0), "smallest room footprint (m)")
    room_max: tuple = opt((9.0, 7.0), "largest room footprint (m)")
    name: Optional[str] = opt(None, "scene name; None: 'synth_<seed:05d>'")
    absent_classes: tuple = opt((), "object classes left out of the room (their placements are skipped; not wall "
                                    "or floor): rooms holding a subset of the classes, for scene-level labels",
                                cli=False, ros=False)
    sensor: str = opt("none", "RGB-D sensor model of the frames (sas_core.data.sensor_model presets): depth noise, "
                              "quantisation, holes, colour noise, pose drift; none: perfect frames",
                      choices=("none", "kinect", "realsense"))


@dataclass
class LidarSweep:
    """One LiDAR revolution.

    Attributes:
        stamp: seconds.
        points: (M, 3) float32 in the sensor frame (x forward, y left, z up).
        intensity: (M,) float32 in [0, 255] (albedo x cosine of incidence).
        ring: (M,) uint16 beam index, 0 = lowest beam.
        pose: (4, 4) float64 sensor-to-world.
        labels: (M,) int64 class (255 = ceiling / none).
        instances: (M,) int64 instance id (-1 = none).
    """

    stamp: float
    points: np.ndarray
    intensity: np.ndarray
    ring: np.ndarray
    pose: np.ndarray
    labels: np.ndarray
    instances: np.ndarray = None
    frame_id: str = LIDAR_FRAME_ID


@dataclass
class SyntheticScene:
    """A generated room: mesh with per-triangle ground truth, surface samples, frames, sweeps.

    Attributes:
        name: scene name.
        class_names: the vocabulary the labels index (:data:`SCANNET_20`).
        vertices: (V, 3) float32 world coordinates (m).
        triangles: (T, 3) int32 vertex indices (counter-clockwise seen from the outside).
        triangle_labels: (T,) int64 class per triangle (255 = ceiling).
        triangle_instances: (T,) int64 instance per triangle (-1 = ceiling).
        triangle_colors: (T, 3) float32 albedo in [0, 1].
        triangle_normals: (T, 3) float32 unit normals (pointing out of objects / into the room).
        instance_labels: (I,) int64 class of instance id i.
        points: surface samples (PointCloud with colors, normals, labels, instances).
        frames: rendered RGB-D frames (with semantic and instance images).
        lidar: LiDAR sweeps (empty when disabled).
        intrinsics: the camera of ``frames``.
        room_size: (Lx, Ly, H) metres.
        config: the SynthConfig that made it.
    """

    name: str
    class_names: tuple
    vertices: np.ndarray
    triangles: np.ndarray
    triangle_labels: np.ndarray
    triangle_instances: np.ndarray
    triangle_colors: np.ndarray
    triangle_normals: np.ndarray
    instance_labels: np.ndarray
    points: PointCloud
    frames: list
    lidar: list
    intrinsics: CameraIntrinsics
    room_size: tuple
    config: SynthConfig = field(default_factory=SynthConfig)
    _raycaster: object = field(default=None, repr=False, compare=False)

    def raycasting_scene(self):
        """An Open3D ``RaycastingScene`` of the mesh (built once, cached)."""
        if self._raycaster is None:
            self._raycaster = _make_raycaster(self.vertices, self.triangles)
        return self._raycaster

    def present_classes(self) -> list[str]:
        """Names of the classes with at least one surface point."""
        labels = np.unique(self.points.labels)
        return [self.class_names[i] for i in labels if i != IGNORE_LABEL]

    def camera_pose(self, stamp: float) -> np.ndarray:
        """(4, 4) camera-to-world pose of the trajectory at time ``stamp`` (s)."""
        return _camera_pose(self.room_size, self.config, stamp)


# ----------------------------------------------------------------------------------------------
# Primitives and mesh assembly

_PRIMS: dict = {}


def _primitive(kind: str):
    """Unit primitive as (vertices, triangles, normals): 'box' spans [-.5,.5]^3, 'cyl' r=.5 h=1."""
    if kind not in _PRIMS:
        import open3d as o3d

        if kind == "box":
            mesh = o3d.geometry.TriangleMesh.create_box(1.0, 1.0, 1.0)
            mesh.translate((-0.5, -0.5, -0.5))
        else:
            mesh = o3d.geometry.TriangleMesh.create_cylinder(radius=0.5, height=1.0, resolution=16, split=1)
        v = np.asarray(mesh.vertices, dtype=np.float64)
        t = np.asarray(mesh.triangles, dtype=np.int64)
        n = np.cross(v[t[:, 1]] - v[t[:, 0]], v[t[:, 2]] - v[t[:, 0]])
        n /= np.linalg.norm(n, axis=1, keepdims=True)
        inward = (n * v[t].mean(axis=1)).sum(axis=1) < 0  # convex, centred: outward means n.c > 0
        t[inward] = t[inward][:, ::-1]
        n[inward] *= -1
        _PRIMS[kind] = (v, t, n)
    return _PRIMS[kind]


@dataclass
class _Part:
    kind: str  # "box" | "cyl" | "quad"
    center: tuple
    size: tuple
    color: tuple
    skip_bottom: bool = False  # drop faces pointing down (resting on the floor: never seen)
    skip_back: bool = False  # drop faces pointing -y (against a wall: never seen)


class _MeshBuilder:
    """Collects triangles with colour, class and instance, then merges them into arrays."""

    def __init__(self):
        self.v, self.t, self.c, self.lab, self.inst = [], [], [], [], []
        self.n_vertices = 0
        self.instance_labels: list[int] = []

    def new_instance(self, label: int) -> int:
        self.instance_labels.append(int(label))
        return len(self.instance_labels) - 1

    def add_triangles(self, vertices, triangles, color, label, instance):
        self.v.append(np.asarray(vertices, np.float64))
        self.t.append(np.asarray(triangles, np.int64) + self.n_vertices)
        self.n_vertices += len(vertices)
        m = len(triangles)
        self.c.append(np.broadcast_to(np.asarray(color, np.float64), (m, 3)))
        self.lab.append(np.full(m, label, np.int64))
        self.inst.append(np.full(m, instance, np.int64))

    def add_parts(self, parts: Sequence[_Part], label: int, instance: int, yaw: float, offset):
        """Add object parts given in the object frame, rotated by ``yaw`` and moved by ``offset``."""
        cz, sz = math.cos(yaw), math.sin(yaw)
        R = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
        for p in parts:
            v, t, n = _primitive(p.kind)
            keep = np.ones(len(t), bool)
            if p.skip_bottom:
                keep &= n[:, 2] > -0.9
            if p.skip_back:
                keep &= n[:, 1] > -0.9
            local = v * np.asarray(p.size) + np.asarray(p.center)
            self.add_triangles(_rotate(local, R) + np.asarray(offset), t[keep], p.color, label, instance)

    def add_quad(self, corners, color, label, instance):
        """A one-sided rectangle; corners counter-clockwise seen from the side it faces."""
        self.add_triangles(np.asarray(corners), [[0, 1, 2], [0, 2, 3]], color, label, instance)

    def build(self):
        vertices = np.concatenate(self.v).astype(np.float32)
        triangles = np.concatenate(self.t).astype(np.int32)
        colors = np.concatenate(self.c).astype(np.float32)
        labels = np.concatenate(self.lab)
        instances = np.concatenate(self.inst)
        v = vertices.astype(np.float64)
        n = np.cross(v[triangles[:, 1]] - v[triangles[:, 0]], v[triangles[:, 2]] - v[triangles[:, 0]])
        area2 = np.linalg.norm(n, axis=1)
        keep = area2 > 1e-12
        n = (n[keep] / area2[keep, None]).astype(np.float32)
        return (vertices, triangles[keep], labels[keep], instances[keep], colors[keep], n,
                np.asarray(self.instance_labels, np.int64))


def _box(center, size, color, bottom=False, back=False) -> _Part:
    return _Part("box", tuple(center), tuple(size), tuple(color), skip_bottom=bottom, skip_back=back)


def _cyl(center, radius, height, color, bottom=False) -> _Part:
    return _Part("cyl", tuple(center), (2 * radius, 2 * radius, height), tuple(color), skip_bottom=bottom)


def _jitter(rng, color, amount=0.06):
    return tuple(np.clip(np.asarray(color) + rng.uniform(-amount, amount, 3), 0.02, 0.98))


_WOODS = [(0.55, 0.36, 0.2), (0.42, 0.27, 0.15), (0.7, 0.52, 0.33), (0.3, 0.2, 0.12), (0.8, 0.68, 0.5)]
_FABRICS = [(0.45, 0.47, 0.5), (0.2, 0.3, 0.5), (0.35, 0.5, 0.35), (0.6, 0.52, 0.4), (0.55, 0.2, 0.2)]
_PAINTS = [(0.92, 0.92, 0.9), (0.85, 0.88, 0.92), (0.35, 0.38, 0.42), (0.75, 0.2, 0.15), (0.95, 0.95, 0.95)]


def _pick(rng, palette):
    return _jitter(rng, palette[int(rng.integers(len(palette)))])


# ----------------------------------------------------------------------------------------------
# Object builders. Object frame: x right, y forward (the front faces +y, the back is at -y),
# z up from the floor (z = 0). Each returns (parts, (width_x, depth_y, height)).

def _chair(rng):
    w, d, seat_h = rng.uniform(0.42, 0.52), rng.uniform(0.42, 0.5), rng.uniform(0.43, 0.48)
    back_h, leg = rng.uniform(0.35, 0.5), rng.uniform(0.02, 0.03)
    frame, seat = _pick(rng, _WOODS), _pick(rng, _FABRICS + _WOODS)
    parts = [_box((0, 0, seat_h - 0.025), (w, d, 0.05), seat),
             _box((0, -d / 2 + 0.025, seat_h + back_h / 2), (w, 0.05, back_h), seat)]
    for sx in (-1, 1):
        for sy in (-1, 1):
            parts.append(_box((sx * (w / 2 - leg), sy * (d / 2 - leg), (seat_h - 0.05) / 2),
                              (2 * leg, 2 * leg, seat_h - 0.05), frame, bottom=True))
    return parts, (w, d, seat_h + back_h)


def _table(rng, w=None, d=None):
    w = w or rng.uniform(1.2, 1.8)
    d = d or rng.uniform(0.8, 1.0)
    h, top = rng.uniform(0.72, 0.76), rng.uniform(0.03, 0.05)
    wood = _pick(rng, _WOODS)
    parts = [_box((0, 0, h - top / 2), (w, d, top), wood)]
    round_legs = rng.random() < 0.5
    for sx in (-1, 1):
        for sy in (-1, 1):
            c = (sx * (w / 2 - 0.08), sy * (d / 2 - 0.08), (h - top) / 2)
            parts.append(_cyl(c, 0.03, h - top, wood, bottom=True) if round_legs
                         else _box(c, (0.06, 0.06, h - top), wood, bottom=True))
    return parts, (w, d, h)


def _sofa(rng):
    w, d = rng.uniform(1.8, 2.4), rng.uniform(0.85, 0.95)
    fabric = _pick(rng, _FABRICS)
    cushion = _jitter(rng, fabric, 0.04)
    arm_w, seat_h, back_h, arm_h = 0.2, 0.42, rng.uniform(0.8, 0.9), rng.uniform(0.58, 0.65)
    parts = [_box((0, 0.05, 0.15), (w - 2 * arm_w, d - 0.1, 0.3), fabric, bottom=True),
             _box((0, 0.08, 0.36), (w - 2 * arm_w - 0.02, d - 0.3, 0.12), cushion),
             _box((0, -d / 2 + 0.1, back_h / 2), (w - 2 * arm_w, 0.2, back_h), fabric, bottom=True, back=True)]
    for sx in (-1, 1):
        parts.append(_box((sx * (w / 2 - arm_w / 2), 0, arm_h / 2), (arm_w, d, arm_h), fabric, bottom=True))
    return parts, (w, d, back_h)


def _bed(rng):
    w, d = rng.uniform(1.4, 1.8), rng.uniform(2.0, 2.15)
    frame, sheet = _pick(rng, _WOODS), _jitter(rng, (0.92, 0.92, 0.95), 0.05)
    blanket = _pick(rng, _FABRICS)
    head_h = rng.uniform(0.9, 1.1)
    parts = [_box((0, 0.02, 0.15), (w, d - 0.04, 0.3), frame, bottom=True),
             _box((0, 0.05, 0.4), (w - 0.06, d - 0.16, 0.2), sheet),
             _box((0, 0.35, 0.515), (w - 0.04, d - 0.8, 0.03), blanket),
             _box((0, -d / 2 + 0.03, head_h / 2), (w + 0.04, 0.06, head_h), frame, bottom=True, back=True)]
    pw = (w - 0.3) / 2 if w > 1.5 else w - 0.3
    xs = (-(pw / 2 + 0.05), pw / 2 + 0.05) if w > 1.5 else (0.0,)
    for x in xs:
        parts.append(_box((x, -d / 2 + 0.35, 0.55), (pw, 0.35, 0.1), sheet))
    return parts, (w + 0.04, d, head_h)


def _cabinet(rng):
    w, d, h = rng.uniform(0.6, 1.2), rng.uniform(0.4, 0.55), rng.uniform(0.75, 1.2)
    body, knob = _pick(rng, _WOODS + _PAINTS), (0.75, 0.75, 0.72)
    parts = [_box((0, 0, h / 2), (w, d, h), body, bottom=True, back=True)]
    n_doors = 2 if w > 0.8 else 1
    dw = (w - 0.04) / n_doors
    for i in range(n_doors):
        x = -w / 2 + 0.02 + dw * (i + 0.5)
        parts.append(_box((x, d / 2 + 0.01, h / 2), (dw - 0.02, 0.02, h - 0.08), _jitter(rng, body, 0.05)))
        knob_x = x + (dw / 2 - 0.06) * (1 if (n_doors == 1 or i == 0) else -1)
        parts.append(_cyl((knob_x, d / 2 + 0.03, h * 0.6), 0.015, 0.02, knob))
    return parts, (w, d + 0.04, h)


def _bookshelf(rng):
    w, d, h = rng.uniform(0.8, 1.2), rng.uniform(0.3, 0.4), rng.uniform(1.6, 2.0)
    wood = _pick(rng, _WOODS)
    t = 0.03
    n_shelves = int(rng.integers(4, 6))
    parts = [_box((0, -d / 2 + 0.01, h / 2), (w, 0.02, h), wood, back=True),
             _box((-w / 2 + t / 2, 0, h / 2), (t, d, h), wood, bottom=True),
             _box((w / 2 - t / 2, 0, h / 2), (t, d, h), wood, bottom=True),
             _box((0, 0, h - t / 2), (w - 2 * t, d, t), wood)]
    gap = (h - t) / n_shelves
    for k in range(n_shelves):
        z0 = k * gap + 0.05
        parts.append(_box((0, 0, z0 - t / 2 + 0.0), (w - 2 * t, d, t), wood, bottom=(k == 0)))
        # a row of books standing on the shelf
        x = -w / 2 + t + 0.01
        while True:
            bw = rng.uniform(0.025, 0.06)
            if x + bw > w / 2 - t - 0.01 or rng.random() < 0.05:
                break
            bh = min(rng.uniform(0.15, 0.28), gap - t - 0.04)
            bd = rng.uniform(0.15, d - 0.05)
            parts.append(_box((x + bw / 2, -d / 2 + 0.02 + bd / 2, z0 + bh / 2),
                              (bw * 0.95, bd, bh), tuple(rng.uniform(0.1, 0.9, 3)), bottom=True, back=True))
            x += bw
    return parts, (w, d, h)


def _desk(rng):
    w, d, h = rng.uniform(1.1, 1.5), rng.uniform(0.55, 0.7), rng.uniform(0.72, 0.76)
    color = _pick(rng, _WOODS + _PAINTS[:3])
    top = 0.03
    ped_w = 0.4
    parts = [_box((0, 0, h - top / 2), (w, d, top), color),
             _box((w / 2 - ped_w / 2, 0, (h - top) / 2), (ped_w, d - 0.02, h - top), color, bottom=True, back=True),
             _box((-w / 2 + 0.02, 0, (h - top) / 2), (0.04, d - 0.02, h - top), color, bottom=True),
             _box((0, -d / 2 + 0.03, (h - top) / 2 + 0.2), (w - 0.1, 0.02, h - top - 0.4), color, back=True)]
    for k in range(3):  # drawer fronts on the pedestal
        parts.append(_box((w / 2 - ped_w / 2, d / 2 - 0.005, 0.12 + k * 0.22),
                          (ped_w - 0.04, 0.02, 0.18), _jitter(rng, color, 0.08)))
    return parts, (w, d, h)


def _door(rng):
    w, h = rng.uniform(0.8, 0.95), rng.uniform(2.0, 2.1)
    color = _pick(rng, _WOODS + _PAINTS)
    parts = [_box((0, 0.025, h / 2), (w, 0.05, h), color, bottom=True, back=True),
             _box((0, 0.02, h + 0.04), (w + 0.12, 0.04, 0.08), _jitter(rng, color, 0.1), back=True)]
    for sx in (-1, 1):
        parts.append(_box((sx * (w / 2 + 0.03), 0.02, h / 2), (0.06, 0.04, h), _jitter(rng, color, 0.1),
                          bottom=True, back=True))
    parts.append(_cyl((w / 2 - 0.08, 0.07, 1.0), 0.02, 0.05, (0.8, 0.78, 0.6)))
    return parts, (w + 0.12, 0.1, h + 0.08)


def _window(rng):
    w, h = rng.uniform(1.0, 1.6), rng.uniform(1.1, 1.4)
    frame = _pick(rng, _PAINTS[:2] + _WOODS[:1])
    glass = _jitter(rng, (0.6, 0.75, 0.88), 0.05)
    t = 0.06
    parts = [_box((0, 0.01, h / 2), (w - 2 * t, 0.02, h - 2 * t), glass, back=True)]
    for sz in (-1, 1):
        parts.append(_box((0, 0.03, h / 2 + sz * (h / 2 - t / 2)), (w, 0.06, t), frame, back=True))
        parts.append(_box((sz * (w / 2 - t / 2), 0.03, h / 2), (t, 0.06, h - 2 * t), frame, back=True))
    parts.append(_box((0, 0.03, h / 2), (0.04, 0.05, h - 2 * t), frame, back=True))
    parts.append(_box((0, 0.06, -0.02), (w + 0.1, 0.12, 0.04), frame, back=True))  # sill
    return parts, (w + 0.1, 0.12, h + 0.04)


def _picture(rng):
    w, h = rng.uniform(0.4, 1.0), rng.uniform(0.3, 0.8)
    frame = _pick(rng, _WOODS + [(0.1, 0.1, 0.1), (0.85, 0.75, 0.4)])
    canvas = tuple(rng.uniform(0.15, 0.9, 3))
    parts = [_box((0, 0.01, h / 2), (w - 0.06, 0.02, h - 0.06), canvas, back=True),
             _box((0, 0.015, h * rng.uniform(0.3, 0.7)), (w * rng.uniform(0.2, 0.6), 0.02, h * 0.25),
                  tuple(rng.uniform(0.1, 0.9, 3)), back=True)]
    for sz in (-1, 1):
        parts.append(_box((0, 0.015, h / 2 + sz * (h / 2 - 0.015)), (w, 0.03, 0.03), frame, back=True))
        parts.append(_box((sz * (w / 2 - 0.015), 0.015, h / 2), (0.03, 0.03, h - 0.06), frame, back=True))
    return parts, (w, 0.03, h)


def _counter(rng):
    w, d, h = rng.uniform(1.5, 2.4), rng.uniform(0.6, 0.65), rng.uniform(0.88, 0.92)
    base, top = _pick(rng, _PAINTS + _WOODS), _jitter(rng, (0.3, 0.3, 0.32), 0.15)
    parts = [_box((0, -0.02, (h - 0.04) / 2), (w, d - 0.04, h - 0.04), base, bottom=True, back=True),
             _box((0, 0, h - 0.02), (w + 0.02, d, 0.04), top, back=True),
             _box((0, d / 2 - 0.07, 0.05), (w - 0.02, 0.02, 0.1), _jitter(rng, base, 0.1))]
    return parts, (w + 0.02, d, h)


def _curtain(rng, h=2.3):
    w = rng.uniform(0.4, 0.7)
    color = _pick(rng, _FABRICS + [(0.9, 0.85, 0.7), (0.7, 0.2, 0.3)])
    n = int(rng.integers(4, 7))
    fw = w / n
    # folds of alternating depth, each closed against the wall (so the wall behind is hidden)
    parts = [_box((-w / 2 + fw * (i + 0.5), (0.05 + 0.03 * (i % 2)) / 2, h / 2), (fw, 0.05 + 0.03 * (i % 2), h),
                  _jitter(rng, color, 0.03), back=True) for i in range(n)]
    return parts, (w, 0.08, h)


def _refrigerator(rng):
    w, d, h = rng.uniform(0.6, 0.8), rng.uniform(0.65, 0.75), rng.uniform(1.7, 1.95)
    body = _pick(rng, [(0.92, 0.92, 0.92), (0.75, 0.76, 0.78), (0.2, 0.2, 0.22)])
    split = h * rng.uniform(0.3, 0.4)
    parts = [_box((0, -0.025, h / 2), (w, d - 0.05, h), body, bottom=True, back=True),
             _box((0, d / 2 - 0.025, split / 2), (w - 0.01, 0.05, split - 0.02), _jitter(rng, body, 0.03)),
             _box((0, d / 2 - 0.025, (h + split) / 2), (w - 0.01, 0.05, h - split - 0.02), _jitter(rng, body, 0.03))]
    for z0, z1 in ((0.15, split - 0.1), (split + 0.1, split + 0.6)):
        parts.append(_box((w / 2 - 0.07, d / 2 + 0.02, (z0 + z1) / 2), (0.03, 0.04, z1 - z0), (0.6, 0.6, 0.62)))
    return parts, (w, d + 0.04, h)


def _toilet(rng):
    white = _jitter(rng, (0.95, 0.95, 0.95), 0.03)
    r, bowl_h = rng.uniform(0.18, 0.21), rng.uniform(0.38, 0.42)
    tank_w = rng.uniform(0.38, 0.45)
    d = 0.18 + 2 * r + 0.05
    parts = [_cyl((0, -d / 2 + 0.18 + r, bowl_h / 2), r, bowl_h, white, bottom=True),
             _box((0, -d / 2 + 0.09, bowl_h + 0.2), (tank_w, 0.18, 0.4), white, back=True),
             _box((0, -d / 2 + 0.09, bowl_h + 0.05), (0.2, 0.12, 0.1), white),
             _cyl((0, -d / 2 + 0.18 + r, bowl_h + 0.015), r + 0.01, 0.03, _jitter(rng, white, 0.04))]
    return parts, (tank_w, d, bowl_h + 0.4)


def _sink(rng):
    white = _jitter(rng, (0.93, 0.93, 0.95), 0.03)
    w, d = rng.uniform(0.5, 0.65), rng.uniform(0.42, 0.5)
    h = rng.uniform(0.82, 0.88)
    t = 0.03
    parts = [_cyl((0, -d / 2 + 0.12, (h - 0.15) / 2), 0.08, h - 0.15, white, bottom=True),
             _box((0, 0, h - 0.15 + t / 2), (w, d, t), white)]  # basin bottom
    parts += [_box((0, sy * (d / 2 - t / 2), h - 0.075), (w, t, 0.15), white) for sy in (-1, 1)]
    parts += [_box((sx * (w / 2 - t / 2), 0, h - 0.075), (t, d - 2 * t, 0.15), white) for sx in (-1, 1)]
    parts.append(_cyl((0, -d / 2 + 0.04, h + 0.08), 0.015, 0.16, (0.75, 0.75, 0.78)))  # tap
    return parts, (w, d, h + 0.16)


def _bathtub(rng):
    w, d, h = rng.uniform(1.5, 1.75), rng.uniform(0.7, 0.8), rng.uniform(0.5, 0.6)
    white = _jitter(rng, (0.95, 0.95, 0.97), 0.02)
    t = 0.08
    parts = [_box((0, 0, 0.1), (w, d, 0.2), white, bottom=True)]
    parts += [_box((0, sy * (d / 2 - t / 2), h / 2), (w, t, h), white, bottom=True, back=(sy < 0))
              for sy in (-1, 1)]
    parts += [_box((sx * (w / 2 - t / 2), 0, h / 2), (t, d - 2 * t, h), white, bottom=True) for sx in (-1, 1)]
    return parts, (w, d, h)


def _shower_curtain(rng, w=None):
    w = w or rng.uniform(1.4, 1.7)
    color = _jitter(rng, [(0.85, 0.9, 0.95), (0.9, 0.85, 0.75), (0.7, 0.8, 0.75)][int(rng.integers(3))], 0.05)
    n = 6
    fw = w / n
    parts = [_box((-w / 2 + fw * (i + 0.5), 0.02 * (i % 2), 0.0), (fw, 0.015, 1.4), color) for i in range(n)]
    parts.append(_cyl((0, 0.01, 0.72), 0.01, 0.04, (0.7, 0.7, 0.72)))
    # parts are centred at z = 0: the caller lifts the curtain so it hangs above the tub rim
    return parts, (w, 0.05, 1.4)


def _otherfurniture(rng):
    kind = int(rng.integers(3))
    color = _pick(rng, _WOODS + _FABRICS)
    if kind == 0:  # ottoman / pouf
        r, h = rng.uniform(0.22, 0.32), rng.uniform(0.38, 0.45)
        return [_cyl((0, 0, h / 2), r, h, color, bottom=True)], (2 * r, 2 * r, h)
    if kind == 1:  # side table on a central pole
        r, h = rng.uniform(0.22, 0.3), rng.uniform(0.5, 0.65)
        return ([_cyl((0, 0, h - 0.015), r, 0.03, color), _cyl((0, 0, (h - 0.03) / 2), 0.03, h - 0.03, color),
                 _cyl((0, 0, 0.015), 0.18, 0.03, color, bottom=True)], (2 * r, 2 * r, h))
    # bench: a padded seat on four legs (kept low: loose items must stay below the camera path)
    w, d, h = rng.uniform(0.9, 1.3), rng.uniform(0.35, 0.45), rng.uniform(0.42, 0.48)
    pad = _pick(rng, _FABRICS)
    parts = [_box((0, 0, h - 0.05), (w, d, 0.1), pad)]
    parts += [_box((sx * (w / 2 - 0.04), sy * (d / 2 - 0.04), (h - 0.1) / 2), (0.05, 0.05, h - 0.1), color,
                   bottom=True) for sx in (-1, 1) for sy in (-1, 1)]
    return parts, (w, d, h)


BUILDERS: dict[str, Callable] = {
    "cabinet": _cabinet, "bed": _bed, "chair": _chair, "sofa": _sofa, "table": _table, "door": _door,
    "window": _window, "bookshelf": _bookshelf, "picture": _picture, "counter": _counter, "desk": _desk,
    "curtain": _curtain, "refrigerator": _refrigerator, "shower curtain": _shower_curtain, "toilet": _toilet,
    "sink": _sink, "bathtub": _bathtub, "otherfurniture": _otherfurniture,
}
"""Object classes (SCANNET_20 names) with a builder; wall and floor come from the room shell."""
WALL_MOUNTED = frozenset({"door", "window", "picture", "curtain"})
"""Classes mounted on a wall; their builders put the back at y = 0 (the others are centred)."""


# ----------------------------------------------------------------------------------------------
# Room layout

class _Room:
    """Places objects without overlap (3-D axis-aligned boxes with a margin)."""

    def __init__(self, rng, size, builder: _MeshBuilder, absent=()):
        self.rng, self.builder = rng, builder
        self.Lx, self.Ly, self.H = size
        self.boxes: list[np.ndarray] = []  # (6,) xmin ymin zmin xmax ymax zmax
        self.absent = frozenset(absent)  # classes never placed (SynthConfig.absent_classes)

    def wall_frame(self, wall: int):
        """(origin xy, tangent xy, inward normal xy, length) of wall 0..3 (y=0, x=Lx, y=Ly, x=0)."""
        Lx, Ly = self.Lx, self.Ly
        return [((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), Lx), ((Lx, 0.0), (0.0, 1.0), (-1.0, 0.0), Ly),
                ((0.0, Ly), (1.0, 0.0), (0.0, -1.0), Lx), ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), Ly)][wall]

    @staticmethod
    def yaw_for(normal) -> float:
        """Yaw that turns the object's +y (front) to ``normal``."""
        return math.atan2(-normal[0], normal[1])

    def aabb(self, center, size, yaw, z0, margin=0.0):
        w, d, h = size
        c, s = abs(math.cos(yaw)), abs(math.sin(yaw))
        ex, ey = (w * c + d * s) / 2 + margin, (w * s + d * c) / 2 + margin
        return np.array([center[0] - ex, center[1] - ey, z0, center[0] + ex, center[1] + ey, z0 + h])

    def free(self, box) -> bool:
        if box[0] < -1e-6 or box[1] < -1e-6 or box[3] > self.Lx + 1e-6 or box[4] > self.Ly + 1e-6:
            return False
        if box[5] > self.H - 0.05:
            return False
        for b in self.boxes:
            if (box[0] < b[3] and b[0] < box[3] and box[1] < b[4] and b[1] < box[4]
                    and box[2] < b[5] and b[2] < box[5]):
                return False
        return True

    def place(self, name, parts, size, center_xy, yaw, z0=0.0, margin=0.05, extra_boxes=()):
        """Add the object if its box (plus ``extra_boxes`` kept free) overlaps nothing."""
        if name in self.absent:
            return None
        box = self.aabb(center_xy, size, yaw, z0, margin)
        boxes = [box] + list(extra_boxes)
        if not all(self.free(b) for b in boxes):
            return None
        # the margin is kept between objects, not against walls
        self.boxes.extend(boxes)
        inst = self.builder.new_instance(CLASS_INDEX[name])
        self.builder.add_parts(parts, CLASS_INDEX[name], inst, yaw, (center_xy[0], center_xy[1], z0))
        return center_xy, yaw

    def against_wall(self, name, tries=40, wall=None, along=None, z0=None, gap=0.003, parts_size=None,
                     clearance=0.0, margin=0.04):
        """Put an object of class ``name`` with its back against a wall.

        Returns (box centre xy, yaw, wall index, position along the wall, size) or None.
        Wall-mounted builders (door, window, picture, curtain) have their back at y = 0, the
        others are centred on the origin.
        """
        if name in self.absent:
            return None
        parts, size = parts_size or BUILDERS[name](self.rng)
        back_at_zero = name in WALL_MOUNTED
        w, d, h = size
        for _ in range(tries):
            k = int(self.rng.integers(4)) if wall is None else wall
            origin, tangent, normal, length = self.wall_frame(k)
            if length < w + 0.3:
                continue
            s = float(self.rng.uniform(w / 2 + 0.15, length - w / 2 - 0.15)) if along is None else along
            c = np.array(origin) + s * np.array(tangent) + (d / 2 + gap) * np.array(normal)
            yaw = self.yaw_for(normal)
            bottom = 0.0 if z0 is None else z0
            # margin 0 against the wall side is handled by shrinking the box on the wall side
            box = self.aabb(c, size, yaw, bottom, margin)
            box = self._clip_to_room(box)
            extra = []
            if clearance > 0:  # keep the floor in front free (doors)
                fc = np.array(origin) + s * np.array(tangent) + (d + clearance / 2) * np.array(normal)
                extra.append(self._clip_to_room(self.aabb(fc, (w, clearance, 2.2), yaw, 0.0, 0.0)))
            if all(self.free(b) for b in [box] + extra):
                self.boxes.extend([box] + extra)
                inst = self.builder.new_instance(CLASS_INDEX[name])
                origin_xy = c - (d / 2) * np.array(normal) if back_at_zero else c
                self.builder.add_parts(parts, CLASS_INDEX[name], inst, yaw, (origin_xy[0], origin_xy[1], bottom))
                return c, yaw, k, s, size
        return None

    def _clip_to_room(self, box):
        box = box.copy()
        box[0], box[1] = max(box[0], 0.0), max(box[1], 0.0)
        box[3], box[4] = min(box[3], self.Lx), min(box[4], self.Ly)
        return box


def _room_shell(builder: _MeshBuilder, rng, size):
    """Floor, four walls (one instance each) and the ceiling, all facing into the room."""
    Lx, Ly, H = size
    floor_c = _pick(rng, [(0.55, 0.4, 0.28), (0.7, 0.6, 0.48), (0.5, 0.5, 0.52), (0.62, 0.5, 0.4)])
    wall_c = _pick(rng, [(0.9, 0.88, 0.82), (0.82, 0.86, 0.9), (0.88, 0.84, 0.76), (0.8, 0.85, 0.8)])
    f = builder.new_instance(CLASS_INDEX["floor"])
    builder.add_quad([(0, 0, 0), (Lx, 0, 0), (Lx, Ly, 0), (0, Ly, 0)], floor_c, CLASS_INDEX["floor"], f)
    builder.add_quad([(0, 0, H), (0, Ly, H), (Lx, Ly, H), (Lx, 0, H)], (0.95, 0.95, 0.95), IGNORE_LABEL, -1)
    corners = [(0, 0), (Lx, 0), (Lx, Ly), (0, Ly)]
    for k in range(4):
        (x0, y0), (x1, y1) = corners[k], corners[(k + 1) % 4]
        w = builder.new_instance(CLASS_INDEX["wall"])
        builder.add_quad([(x0, y0, 0), (x0, y0, H), (x1, y1, H), (x1, y1, 0)], _jitter(rng, wall_c, 0.02),
                         CLASS_INDEX["wall"], w)


def _furnish(room: _Room):
    """Place the objects of a room: wall items, furniture against walls, a dining group."""
    rng, H = room.rng, room.H
    # door first (its swing area stays free), on a random wall
    room.against_wall("door", clearance=0.9)
    # windows with curtains on both sides
    for _ in range(int(rng.integers(1, 3))):
        parts, size = _window(rng)
        sill = float(rng.uniform(0.85, 1.0))
        placed = room.against_wall("window", parts_size=(parts, size), z0=sill)
        if placed is None:
            continue
        c, yaw, k, s, wsize = placed
        origin, tangent, normal, length = room.wall_frame(k)
        for side in (-1, 1):
            cp, csize = _curtain(rng, h=H - 0.35)
            along = s + side * (wsize[0] / 2 + csize[0] / 2 + 0.05)
            room.against_wall("curtain", wall=k, along=along, z0=0.25, parts_size=(cp, csize), tries=1, margin=0.0)
    # bathroom corner: bathtub with a shower curtain, toilet, sink
    tub = room.against_wall("bathtub")
    if tub is not None and "shower curtain" not in room.absent:
        c, yaw, k, s, tsize = tub
        origin, tangent, normal, length = room.wall_frame(k)
        parts, size = _shower_curtain(rng, w=tsize[0] - 0.1)
        pos = np.array(origin) + s * np.array(tangent) + (tsize[1] - 0.04) * np.array(normal)
        inst = room.builder.new_instance(CLASS_INDEX["shower curtain"])
        room.builder.add_parts(parts, CLASS_INDEX["shower curtain"], inst, yaw,
                               (pos[0], pos[1], tsize[2] + 0.15 + 0.7))
        room.boxes.append(room._clip_to_room(room.aabb(pos, (size[0], 0.1, 1.4), yaw, tsize[2] + 0.15, 0.04)))
    for name in ("toilet", "sink"):
        room.against_wall(name)
    for name in ("bed", "sofa", "refrigerator", "counter", "bookshelf", "cabinet", "cabinet"):
        room.against_wall(name)
    # desk with its chair in front
    desk = room.against_wall("desk")
    if desk is not None:
        c, yaw, k, s, dsize = desk
        normal = np.array(room.wall_frame(k)[2])
        parts, size = _chair(rng)
        pos = c + normal * (dsize[1] / 2 + size[1] / 2 + 0.06)
        room.place("chair", parts, size, pos, yaw + math.pi, margin=0.0)
    # pictures above whatever stands below
    for _ in range(int(rng.integers(2, 4))):
        parts, size = _picture(rng)
        room.against_wall("picture", parts_size=(parts, size), z0=float(rng.uniform(1.3, 1.7)))
    # dining group in the middle: a table and chairs facing it
    for _ in range(30):
        parts, size = _table(rng)
        center = np.array([room.Lx, room.Ly]) / 2 + rng.uniform(-0.6, 0.6, 2)
        yaw = float(rng.choice([0.0, math.pi / 2]))
        if room.place("table", parts, size, center, yaw, margin=0.1) is None:
            continue
        w, d = size[0], size[1]
        R = np.array([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
        seats = [((0.0, -d / 2 - 0.05), 0.0), ((0.0, d / 2 + 0.05), math.pi)]
        if w > 1.4:
            seats = [((sx * w / 4, sy * (d / 2 + 0.05)), 0.0 if sy < 0 else math.pi)
                     for sx in (-1, 1) for sy in (-1, 1)]
        for (lx, ly), cyaw in seats:
            if rng.random() < 0.15:
                continue
            cparts, csize = _chair(rng)
            offset = np.array([lx, ly + (-1 if ly < 0 else 1) * (csize[1] / 2 + 0.16)])
            room.place("chair", cparts, csize, center + R @ offset, yaw + cyaw + rng.uniform(-0.1, 0.1),
                       margin=0.0)
        break
    # loose items: an armchair-like chair and other furniture anywhere free
    for name, n in (("otherfurniture", 2), ("chair", 1)):
        for _ in range(n):
            for _ in range(30):
                parts, size = BUILDERS[name](rng)
                center = rng.uniform([0.5, 0.5], [room.Lx - 0.5, room.Ly - 0.5])
                if room.place(name, parts, size, center, float(rng.uniform(0, 2 * math.pi))) is not None:
                    break


# ----------------------------------------------------------------------------------------------
# Rendering

def _rotate(vectors: np.ndarray, R: np.ndarray) -> np.ndarray:
    """(N,3) vectors @ R.T, as broadcast products (a BLAS call for 3x3 is slower, and threads contend)."""
    R = np.asarray(R, np.float64)
    return vectors[:, 0:1] * R[:, 0] + vectors[:, 1:2] * R[:, 1] + vectors[:, 2:3] * R[:, 2]


def _make_raycaster(vertices, triangles):
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(np.ascontiguousarray(vertices, np.float32)),
                        o3d.core.Tensor(np.ascontiguousarray(triangles, np.uint32)))
    return scene


def _cast(raycaster, origins, directions):
    """Cast rays (N,3)+(N,3) f32; returns (t_hit (N,) f32 inf on miss, triangle id (N,) i64, -1 on miss)."""
    import open3d as o3d

    rays = np.concatenate([np.broadcast_to(origins, directions.shape), directions], axis=1).astype(np.float32)
    ans = raycaster.cast_rays(o3d.core.Tensor(rays), nthreads=0)
    t = ans["t_hit"].numpy()
    ids = ans["primitive_ids"].numpy().astype(np.int64)
    miss = ~np.isfinite(t) | (ids == o3d.t.geometry.RaycastingScene.INVALID_ID)
    ids[miss] = -1
    t = t.copy()
    t[miss] = np.inf
    return t, ids


def surface_colors(scene_like, tri_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Shaded colour (N,3) float32 in [0,1] of surface points on triangles ``tri_ids`` (all >= 0).

    Albedo (with a plank texture on the floor) times ambient + directional Lambertian light;
    view-independent, so a point and the pixels that see it share one colour.
    """
    albedo = scene_like.triangle_colors[tri_ids].astype(np.float32)
    floor = scene_like.triangle_labels[tri_ids] == CLASS_INDEX["floor"]
    if floor.any():
        p = positions[floor]
        row = np.floor(p[:, 1] / 0.16).astype(np.int64)
        plank = np.floor((p[:, 0] + 0.37 * row) / 1.2).astype(np.int64)
        h = ((row * 73856093) ^ (plank * 19349663)) % 1000 / 1000.0
        albedo[floor] *= (0.85 + 0.25 * h)[:, None].astype(np.float32)
    n = scene_like.triangle_normals[tri_ids]
    L = _LIGHT.astype(np.float32)
    light = _AMBIENT + (1.0 - _AMBIENT) * np.clip(n[:, 0] * L[0] + n[:, 1] * L[1] + n[:, 2] * L[2], 0.0, None)
    return np.clip(albedo * light[:, None], 0.0, 1.0).astype(np.float32)


_RAY_CACHE: dict = {}


def _pixel_rays(intrinsics: CameraIntrinsics) -> np.ndarray:
    """(H*W, 3) camera-frame directions with z = 1 (so the hit distance is the z-depth).

    Pixel (u, v) has its centre at integer coordinates (OpenCV / ScanNet convention).
    """
    if intrinsics not in _RAY_CACHE:
        u, v = np.meshgrid(np.arange(intrinsics.width), np.arange(intrinsics.height))
        x = (u.reshape(-1) - intrinsics.cx) / intrinsics.fx
        y = (v.reshape(-1) - intrinsics.cy) / intrinsics.fy
        if len(_RAY_CACHE) > 8:
            _RAY_CACHE.clear()
        _RAY_CACHE[intrinsics] = np.stack([x, y, np.ones_like(x)], axis=1)
    return _RAY_CACHE[intrinsics]


def _render(scene_like, raycaster, pose: np.ndarray, intrinsics: CameraIntrinsics, stamp: float = 0.0):
    """One frame: returns Frame with color, z-depth, semantic, instance."""
    H, W = intrinsics.height, intrinsics.width
    d_cam = _pixel_rays(intrinsics)
    R, o = pose[:3, :3], pose[:3, 3]
    d_world = _rotate(d_cam, R)
    t, ids = _cast(raycaster, o[None, :], d_world.astype(np.float32))
    hit = ids >= 0
    depth = np.where(hit, t, 0.0).astype(np.float32)
    color = np.zeros((H * W, 3), np.float32)
    positions = o[None, :] + d_world[hit] * t[hit, None]
    color[hit] = surface_colors(scene_like, ids[hit], positions)
    semantic = np.full(H * W, IGNORE_LABEL, np.int64)
    instance = np.full(H * W, -1, np.int64)
    semantic[hit] = scene_like.triangle_labels[ids[hit]]
    instance[hit] = scene_like.triangle_instances[ids[hit]]
    return Frame(color=np.round(color * 255).astype(np.uint8).reshape(H, W, 3), depth=depth.reshape(H, W),
                 intrinsics=intrinsics, pose=np.asarray(pose, np.float64), stamp=float(stamp),
                 semantic=semantic.reshape(H, W), instance=instance.reshape(H, W), frame_id=CAMERA_FRAME_ID)


def render_frames(scene: SyntheticScene, poses: Sequence[np.ndarray], intrinsics: CameraIntrinsics,
                  stamps: Optional[Sequence[float]] = None) -> list[Frame]:
    """Render ``scene`` from camera-to-world ``poses`` (OpenCV optical frame) with ``intrinsics``.

    Each frame is one ``cast_rays`` call over all its pixels. Returns Frames with color (H,W,3) u8,
    depth (H,W) f32 z-depth in metres (0 where no surface), semantic and instance (H,W) i64.
    """
    poses = [np.asarray(p, np.float64) for p in poses]
    for p in poses:
        if p.shape != (4, 4) or not np.all(np.isfinite(p)):
            raise ValueError(f"poses must be finite 4x4 matrices, got shape {p.shape}")
    stamps = [START_STAMP + i / CAMERA_HZ for i in range(len(poses))] if stamps is None else list(stamps)
    raycaster = scene.raycasting_scene()
    return [_render(scene, raycaster, p, intrinsics, s) for p, s in zip(poses, stamps)]


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """(4,4) camera-to-world pose of an OpenCV camera at ``eye`` looking at ``target`` (z-up world)."""
    eye, target = np.asarray(eye, np.float64), np.asarray(target, np.float64)
    f = target - eye
    f /= np.linalg.norm(f)
    r = np.cross(f, up)
    if np.linalg.norm(r) < 1e-8:
        raise ValueError("look_at: viewing direction is parallel to up")
    r /= np.linalg.norm(r)
    d = np.cross(f, r)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = r, d, f, eye
    return T


def _trajectory(room_size, config: SynthConfig, stamp: float):
    """Eye, look-at target of the camera at ``stamp``: one smooth loop around the room centre."""
    Lx, Ly, H = room_size
    duration = max(config.n_frames, 1) / CAMERA_HZ
    s = (stamp - START_STAMP) / duration
    rng = np.random.default_rng([config.seed, 7])
    phase, direction = rng.uniform(0, 2 * math.pi), rng.choice([-1.0, 1.0])
    a = 2 * math.pi * s * direction + phase
    centre = np.array([Lx / 2, Ly / 2])
    eye_xy = centre + np.array([0.27 * Lx * math.cos(a), 0.27 * Ly * math.sin(a)])
    eye = np.array([eye_xy[0], eye_xy[1], 1.4 + 0.12 * math.sin(4 * math.pi * s)])
    away = centre - eye_xy
    away /= np.linalg.norm(away)
    swing = math.radians(35) * math.sin(6 * math.pi * s + phase)
    c, si = math.cos(swing), math.sin(swing)
    look = np.array([c * away[0] - si * away[1], si * away[0] + c * away[1]])
    target_xy = eye_xy + look * 0.55 * min(Lx, Ly)
    target = np.array([target_xy[0], target_xy[1], 0.55 + 0.2 * math.sin(2 * math.pi * s)])
    return eye, target


def _camera_pose(room_size, config, stamp):
    eye, target = _trajectory(room_size, config, stamp)
    return look_at(eye, target)


def _lidar_pose(room_size, config, stamp):
    """Sensor-to-world pose: x forward (camera heading), z up, mounted 0.4 m below the camera."""
    eye, target = _trajectory(room_size, config, stamp)
    fwd = target[:2] - eye[:2]
    yaw = math.atan2(fwd[1], fwd[0])
    T = np.eye(4)
    T[:3, :3] = [[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]]
    T[:3, 3] = eye - np.array([0.0, 0.0, 0.4])
    return T


def _lidar_directions(config: SynthConfig):
    half = math.radians(config.lidar_fov_deg) / 2
    el = np.linspace(-half, half, config.lidar_beams)
    az = np.arange(config.lidar_azimuth_steps) * (2 * math.pi / config.lidar_azimuth_steps)
    E, A = np.meshgrid(el, az, indexing="ij")
    d = np.stack([np.cos(E) * np.cos(A), np.cos(E) * np.sin(A), np.sin(E)], axis=-1).reshape(-1, 3)
    ring = np.repeat(np.arange(config.lidar_beams, dtype=np.uint16), config.lidar_azimuth_steps)
    return d, ring


def render_lidar(scene: SyntheticScene, poses: Sequence[np.ndarray], stamps: Sequence[float]) -> list[LidarSweep]:
    """Ray-cast one full revolution of the multi-beam sensor per sensor-to-world pose."""
    d, ring = _lidar_directions(scene.config)
    raycaster = scene.raycasting_scene()
    sweeps = []
    for pose, stamp in zip(poses, stamps):
        R, o = pose[:3, :3], pose[:3, 3]
        dw = _rotate(d, R).astype(np.float32)
        t, ids = _cast(raycaster, o[None, :], dw)
        hit = ids >= 0
        pts_world = o[None, :] + dw[hit] * t[hit, None]
        albedo = surface_colors(scene, ids[hit], pts_world).mean(axis=1)
        cos_inc = np.abs((scene.triangle_normals[ids[hit]] * dw[hit]).sum(axis=1))
        sweeps.append(LidarSweep(
            stamp=float(stamp), points=(d[hit] * t[hit, None]).astype(np.float32),
            intensity=(255.0 * albedo * cos_inc).astype(np.float32), ring=ring[hit],
            pose=np.asarray(pose, np.float64), labels=scene.triangle_labels[ids[hit]],
            instances=scene.triangle_instances[ids[hit]]))
    return sweeps


def default_intrinsics(width: int = 320, height: int = 240, hfov_deg: float = 58.0) -> CameraIntrinsics:
    """Square-pixel pinhole camera with the principal point at the image centre."""
    f = (width / 2) / math.tan(math.radians(hfov_deg) / 2)
    return CameraIntrinsics(f, f, (width - 1) / 2, (height - 1) / 2, int(width), int(height))


# ----------------------------------------------------------------------------------------------
# Surface sampling

def sample_surface(scene_like, points_per_m2: float, rng, raycaster=None) -> PointCloud:
    """Sample the exposed surface uniformly by area.

    Each triangle gets floor(area * rho + u) points, u ~ U[0, 1). With ``raycaster`` given,
    samples no camera can see are then dropped (:func:`_enclosed`): a wall behind a picture, the
    floor under a bed, faces inside overlapping parts. A scanned mesh has no such surface either.
    """
    v = scene_like.vertices.astype(np.float64)
    tri = scene_like.triangles
    a, b, c = v[tri[:, 0]], v[tri[:, 1]], v[tri[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    counts = np.floor(area * points_per_m2 + rng.random(len(area))).astype(np.int64)
    ids = np.repeat(np.arange(len(tri)), counts)
    r1, r2 = rng.random(len(ids)), rng.random(len(ids))
    s = np.sqrt(r1)
    w0, w1, w2 = 1 - s, s * (1 - r2), s * r2
    pos = w0[:, None] * a[ids] + w1[:, None] * b[ids] + w2[:, None] * c[ids]
    if raycaster is not None:
        keep = ~_enclosed(raycaster, scene_like, pos, scene_like.triangle_normals[ids])
        pos, ids = pos[keep], ids[keep]
    pos32 = pos.astype(np.float32)
    return PointCloud(positions=pos32, colors=surface_colors(scene_like, ids, pos32),
                      normals=scene_like.triangle_normals[ids].astype(np.float32),
                      labels=scene_like.triangle_labels[ids].copy(),
                      instances=scene_like.triangle_instances[ids].copy(), extra={"triangle": ids})


def _enclosed(raycaster, scene_like, positions, normals, crevice: float = 0.003) -> np.ndarray:
    """(N,) bool: a ray leaving the surface along its normal hits a back face (the point is inside
    or behind an object), or another surface within ``crevice`` metres."""
    origins = (positions + 1e-4 * normals).astype(np.float32)
    t, ids = _cast(raycaster, origins, normals.astype(np.float32))
    hit = ids >= 0
    back = np.zeros(len(positions), bool)
    back[hit] = (scene_like.triangle_normals[ids[hit]] * normals[hit]).sum(axis=1) > 0
    return back | (hit & (t < crevice))


# ----------------------------------------------------------------------------------------------
# Public entry points

def generate_scene(config: Optional[SynthConfig] = None, progress: bool = False) -> SyntheticScene:
    """Build, sample and render one room. Deterministic: the same config gives the same bytes."""
    config = config or SynthConfig()
    if config.n_frames < 0 or config.width < 16 or config.height < 16:
        raise ValueError(f"bad synth config: n_frames={config.n_frames}, size={config.width}x{config.height}")
    if config.points_per_m2 <= 0:
        raise ValueError(f"points_per_m2 must be positive, got {config.points_per_m2}")
    rng = np.random.default_rng(config.seed)
    Lx = float(rng.uniform(config.room_min[0], config.room_max[0]))
    Ly = float(rng.uniform(config.room_min[1], config.room_max[1]))
    H = float(rng.uniform(2.6, 3.0))
    builder = _MeshBuilder()
    _room_shell(builder, rng, (Lx, Ly, H))
    absent = tuple(config.absent_classes)
    bad = [c for c in absent if c not in CLASS_INDEX or c in ("wall", "floor")]
    if bad:
        raise ValueError(f"absent_classes must be object classes of {', '.join(SCANNET_20)} (not wall/floor): {bad}")
    _furnish(_Room(rng, (Lx, Ly, H), builder, absent))
    vertices, triangles, labels, instances, colors, normals, inst_labels = builder.build()
    intr = default_intrinsics(config.width, config.height, config.hfov_deg)
    scene = SyntheticScene(
        name=config.name or f"synth_{config.seed:05d}", class_names=tuple(SCANNET_20), vertices=vertices,
        triangles=triangles, triangle_labels=labels, triangle_instances=instances, triangle_colors=colors,
        triangle_normals=normals, instance_labels=inst_labels, points=None, frames=[], lidar=[],
        intrinsics=intr, room_size=(Lx, Ly, H), config=config)
    scene.points = sample_surface(scene, config.points_per_m2, np.random.default_rng([config.seed, 1]),
                                  raycaster=scene.raycasting_scene())
    stamps = [START_STAMP + i / CAMERA_HZ for i in range(config.n_frames)]
    poses = [scene.camera_pose(s) for s in stamps]
    frames_iter = zip(poses, stamps)
    if progress:
        from tqdm import tqdm

        frames_iter = tqdm(list(frames_iter), desc=f"render {scene.name}", unit="frame", leave=False)
    raycaster = scene.raycasting_scene()
    scene.frames = [_render(scene, raycaster, p, intr, s) for p, s in frames_iter]
    if config.sensor != "none":  # what the camera reports; scene.camera_pose(stamp) stays the true pose
        from sas_core.data.sensor_model import apply_sensor

        scene.frames = apply_sensor(scene.frames, config.sensor, seed=config.seed)
    if config.with_lidar:
        n = config.n_lidar_sweeps
        if n is None:
            n = int(math.floor(config.n_frames / CAMERA_HZ * LIDAR_HZ))
        lstamps = [START_STAMP + k / LIDAR_HZ for k in range(n)]
        scene.lidar = render_lidar(scene, [_lidar_pose(scene.room_size, config, s) for s in lstamps], lstamps)
    return scene


def _probe_scene(class_name: str, rng):
    """A plain room with one object of ``class_name``; returns (scene-like, instance id, eye, target)."""
    Lx, Ly, H = 6.0, 6.0, 2.8
    builder = _MeshBuilder()
    _room_shell(builder, rng, (Lx, Ly, H))
    label = CLASS_INDEX[class_name]
    if class_name in ("wall", "floor"):
        inst = 0 if class_name == "floor" else 2  # floor instance 0; walls 1..4 (wall 1 is y=0)
        yaw = float(rng.uniform(-0.5, 0.5))
        if class_name == "wall":
            eye = np.array([3.0 + rng.uniform(-1, 1), 3.0 + rng.uniform(0, 1.5), rng.uniform(1.0, 1.6)])
            target = np.array([eye[0] + math.tan(yaw) * eye[1], 0.0, rng.uniform(0.5, 1.8)])
        else:
            eye = np.array([3.0, 3.0, rng.uniform(1.2, 1.6)])
            target = eye + np.array([math.cos(yaw * 6), math.sin(yaw * 6), -1.2])
        return builder, inst, eye, target
    parts, size = BUILDERS[class_name](rng)
    inst = builder.new_instance(label)
    w, d, h = size
    if class_name in WALL_MOUNTED or class_name == "shower curtain":
        z0 = {"door": 0.0, "window": 0.9, "picture": 1.3, "curtain": 0.3, "shower curtain": 1.4}[class_name]
        builder.add_parts(parts, label, inst, 0.0, (3.0, 0.003 if class_name != "shower curtain" else 0.5,
                                                     z0 if class_name != "shower curtain" else z0 + 0.7))
        centre = np.array([3.0, 0.0, z0 + h / 2])
        dist = max(w, h) * 0.75 / math.tan(math.radians(22)) + 0.3
        az = rng.uniform(-0.5, 0.5)
        eye = np.array([3.0 + dist * math.sin(az), min(dist * math.cos(az), 5.6), rng.uniform(1.2, 1.7)])
        return builder, inst, eye, centre
    yaw = float(rng.uniform(0, 2 * math.pi))
    builder.add_parts(parts, label, inst, yaw, (3.0, 3.0, 0.0))
    centre = np.array([3.0, 3.0, h / 2])
    radius = 0.5 * math.sqrt(w * w + d * d + h * h)
    dist = radius / math.tan(math.radians(20)) + 0.2
    az, el = rng.uniform(0, 2 * math.pi), rng.uniform(math.radians(15), math.radians(40))
    eye = centre + dist * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    eye[:2] = np.clip(eye[:2], 0.2, 5.8)
    eye[2] = min(eye[2], 2.6)
    return builder, inst, eye, centre


class _MeshView:
    """Arrays of a built mesh with the attribute names :func:`surface_colors` expects."""

    def __init__(self, built):
        (self.vertices, self.triangles, self.triangle_labels, self.triangle_instances, self.triangle_colors,
         self.triangle_normals, self.instance_labels) = built


def render_object_probes(class_name: str, n: int, seed: int = 0, width: int = 320,
                         height: int = 240) -> list[tuple[np.ndarray, np.ndarray]]:
    """Render ``n`` single objects of ``class_name`` in a plain room with ground-truth masks.

    Returns a list of (rgb (H,W,3) uint8, mask (H,W) bool) — one new instance (size, colour,
    pose, view) per image; for "wall"/"floor" the mask is that surface.
    """
    if class_name not in CLASS_INDEX:
        raise ValueError(f"unknown class {class_name!r}; known: {', '.join(SCANNET_20)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    intr = default_intrinsics(width, height)
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, CLASS_INDEX[class_name]])
        builder, inst, eye, target = _probe_scene(class_name, rng)
        mesh = _MeshView(builder.build())
        frame = _render(mesh, _make_raycaster(mesh.vertices, mesh.triangles), look_at(eye, target), intr)
        if class_name in ("wall", "floor"):
            mask = frame.semantic == CLASS_INDEX[class_name]
        else:
            mask = frame.instance == inst
        out.append((frame.color, mask))
    return out


def write_overview(scene, out_dir) -> dict:
    """Top-down PNG (labels | colours) and a labelled PLY of ``scene``; returns their paths."""
    import numpy as np

    from sas_core.io import write_ply
    from sas_core.viz import save_png, topdown_image, with_legend

    pts = scene.points
    Lx, Ly, H = scene.room_size
    bounds = np.array([[0.0, 0.0], [Lx, Ly]])
    kw = dict(resolution=0.03, max_height=H - 0.05, bounds=bounds, point_size=3)
    by_label = topdown_image(pts.positions, labels=pts.labels, **kw)
    by_color = topdown_image(pts.positions, colors=pts.colors, **kw)
    gap = np.full((by_label.shape[0], 8, 3), 255, np.uint8)
    out_dir = Path(out_dir)
    png = out_dir / f"{scene.name}_topdown.png"
    save_png(png, with_legend(np.concatenate([by_label, gap, by_color], axis=1), pts.labels, scene.class_names,
                              title="classes (left)"))
    ply = out_dir / f"{scene.name}_labels.ply"
    write_ply(ply, pts.positions, colors=pts.colors, normals=pts.normals, labels=pts.labels,
              instance=pts.instances.astype(np.int32))
    return {"topdown_png": png, "ply": ply}
