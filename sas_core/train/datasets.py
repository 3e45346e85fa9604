"""Training data for 3D distillation: scenes, fused 2D targets, superpoints, voxels and batches.

A training scene (:class:`SceneData`) is a point cloud with, per point, an optional fused 2D
feature (the distillation target; ``mask`` says which points have one), a superpoint id and
optionally a ground-truth label (for validation only). Sources:

* :func:`scene_from_arrays` / :func:`synthetic_scene_data`: in memory (the synthetic world).
* :class:`OpenSceneScenes`: the OpenScene layout used for ScanNet, Matterport3D and nuScenes,
  ``<root>/<split>/<scene>.pth`` (coords, colors in [-1, 1], labels with 255) and fused feature
  files ``<feature_root>/<scene>*.pt`` ({"feat": (M, C) fp16, "mask_full": (N,) bool}), loaded
  lazily. Superpoints are computed once per scene and cached next to the scene file;
  ``superpoints="points"`` makes every point its own superpoint (nuScenes, as the paper does).

:class:`VoxelDataset` turns a scene into a training sample for one epoch: OpenScene-style
augmentation (``sas_core.geometry.voxelize.voxelize_augmented``: elastic distortion, rotation,
scaling, flips; seeded by (seed, epoch, scene) so a resumed run sees exactly the same samples), voxelisation (one
representative point per voxel carries the voxel's target, superpoint and label, as OpenScene's
loader does) and :func:`collate` batches samples into a sparse tensor with a batch index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from sas_core.config import opt
from sas_core.types import IGNORE_LABEL


@dataclass
class SceneData:
    """One training / validation scene.

    Attributes:
        name: unique scene name (keys the TESD history and the superpoint cache).
        positions: (N, 3) float32 metres.
        features: (M, C) float16 fused 2D features of the points where ``mask`` is True, in
            point order (OpenScene's ``feat`` / ``mask_full`` convention); None for unsupervised
            (validation-only) scenes.
        mask: (N,) bool, points that have a 2D feature.
        superpoints: (N,) int64 superpoint id per point.
        labels: optional (N,) int64 ground truth (255 = ignore), used for validation only.
        colors: optional (N, 3) float32 in [0, 1].
        classes: optional scene-level label list, the names of the classes present
            (:mod:`sas_core.train.scene_labels`, 3DSS-VLG); None: unrestricted.
        masks: optional :class:`sas_core.train.masks.SceneMasks`, 2D masks back-projected onto the
            points (the mask-level loss, MaskField / XMask3D).
    """

    name: str
    positions: np.ndarray
    features: Optional[np.ndarray]
    mask: Optional[np.ndarray]
    superpoints: np.ndarray
    labels: Optional[np.ndarray] = None
    colors: Optional[np.ndarray] = None
    classes: Optional[tuple] = None
    masks: Optional[object] = None

    def __post_init__(self):
        self.positions = np.ascontiguousarray(self.positions, dtype=np.float32).reshape(-1, 3)
        n = len(self.positions)
        if n == 0:
            raise ValueError(f"scene {self.name!r} has no points")
        if not np.isfinite(self.positions).all():
            raise ValueError(f"scene {self.name!r} has non-finite point coordinates")
        self.superpoints = np.asarray(self.superpoints, dtype=np.int64).reshape(-1)
        if len(self.superpoints) != n:
            raise ValueError(f"scene {self.name!r}: {len(self.superpoints)} superpoint ids for {n} points")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
            if len(self.labels) != n:
                raise ValueError(f"scene {self.name!r}: {len(self.labels)} labels for {n} points")
        if self.features is not None:
            if self.mask is None:
                self.mask = np.ones(n, dtype=bool)
            self.mask = np.asarray(self.mask, dtype=bool).reshape(-1)
            if len(self.mask) != n:
                raise ValueError(f"scene {self.name!r}: feature mask has {len(self.mask)} rows for {n} points")
            feats = np.asarray(self.features)
            if feats.ndim != 2 or len(feats) != int(self.mask.sum()):
                raise ValueError(f"scene {self.name!r}: features {feats.shape} do not match the "
                                 f"{int(self.mask.sum())} masked points")
            self.features = feats
        if self.classes is not None:
            self.classes = tuple(str(c) for c in self.classes)
        if self.masks is not None and self.masks.n_points != n:
            raise ValueError(f"scene {self.name!r}: masks are over {self.masks.n_points} points, the scene has {n}")

    @property
    def n_points(self) -> int:
        return len(self.positions)

    @property
    def feature_dim(self) -> int:
        return 0 if self.features is None else int(self.features.shape[1])

    def feature_rows(self) -> np.ndarray:
        """(N,) int64 row of every point in ``features`` (-1 where it has none)."""
        rows = np.full(self.n_points, -1, dtype=np.int64)
        if self.mask is not None:
            rows[self.mask] = np.arange(int(self.mask.sum()))
        return rows


def scene_from_arrays(name: str, positions, features=None, mask=None, superpoints=None, labels=None,
                      colors=None, classes=None, masks=None) -> SceneData:
    """Build a :class:`SceneData`; ``features`` may be full (N, C) (rows outside ``mask`` dropped)
    or compact (mask.sum(), C); ``superpoints=None`` makes every point its own superpoint;
    ``classes``: the scene-level label list; ``masks``: :class:`~sas_core.train.masks.SceneMasks`."""
    positions = np.asarray(positions, dtype=np.float32).reshape(-1, 3)
    n = len(positions)
    if features is not None:
        features = _to_numpy(features)
        mask = np.ones(n, dtype=bool) if mask is None else _to_numpy(mask).astype(bool).reshape(-1)
        if len(features) == n and int(mask.sum()) != n:
            features = features[mask]
        features = features.astype(np.float16)
    sp = np.arange(n, dtype=np.int64) if superpoints is None else _to_numpy(superpoints)
    return SceneData(name, positions, features, mask, sp, None if labels is None else _to_numpy(labels), colors,
                     classes, masks)


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def compute_superpoints(positions: np.ndarray, normals: Optional[np.ndarray] = None, mode: str = "graph",
                        scene_path=None, mesh_triangles=None, **kwargs) -> np.ndarray:
    """(N,) int64 superpoints of a scene (sas_core.geometry.superpoints, ScanNet's segmentator).

    ``mode``: "graph" (Felzenszwalb on normals) or "points" (every point its own superpoint, as SAS
    does on nuScenes). With ``scene_path`` the result is cached next to that file
    (:func:`sas_core.geometry.superpoints.cached_superpoints`). ``kwargs`` are
    :class:`~sas_core.geometry.superpoints.SuperpointConfig` fields.
    """
    n = len(positions)
    if mode == "points":
        return np.arange(n, dtype=np.int64)
    if mode != "graph":
        raise ValueError(f"superpoint mode must be 'graph' or 'points', got {mode!r}")
    from sas_core.geometry.superpoints import SuperpointConfig, cached_superpoints, superpoints_from_config

    cfg = SuperpointConfig(method="graph", **kwargs)
    pts = np.asarray(positions, dtype=np.float32)
    if scene_path is not None:
        return cached_superpoints(scene_path, pts, cfg, normals=normals, mesh_triangles=mesh_triangles)
    return np.asarray(superpoints_from_config(pts, cfg, normals=normals, mesh_triangles=mesh_triangles), dtype=np.int64)


def mesh_point_superpoints(vertices, triangles, point_triangles, **kwargs) -> np.ndarray:
    """(N,) superpoints of surface samples from the superpoints of the mesh they were sampled on.

    As the paper (and ScanNet) does, the segmentation runs on the mesh (vertex normals from the
    triangles); each sample takes the superpoint of the first vertex of its triangle
    ``point_triangles`` (N,). ``kwargs``: :class:`~sas_core.geometry.superpoints.SuperpointConfig` fields.
    """
    from sas_core.geometry.superpoints import SuperpointConfig, superpoints_from_config

    cfg = SuperpointConfig(method="graph", **kwargs)
    tri = np.asarray(triangles, dtype=np.int64)
    sp_v = np.asarray(superpoints_from_config(np.asarray(vertices, dtype=np.float32), cfg, mesh_triangles=tri))
    return sp_v[tri[np.asarray(point_triangles, dtype=np.int64), 0]].astype(np.int64)


def synthetic_scene_data(scene, fused=None, mask=None, superpoint_mode: str = "mesh", name: Optional[str] = None,
                         **superpoint_kwargs) -> SceneData:
    """A :class:`SceneData` from a :class:`sas_core.data.synthetic.SyntheticScene`'s surface points.

    ``fused``: (N, C) fused 2D features of ``scene.points`` (or None for evaluation-only scenes);
    ``mask``: (N,) bool where they are valid (None: all). ``superpoint_mode``: "mesh" (segment the
    room's mesh, as the paper does with ScanNet meshes; needs the points' ``extra["triangle"]``),
    "graph" (kNN graph of the points) or "points".
    """
    pc = scene.points
    if superpoint_mode == "mesh":
        if "triangle" not in pc.extra:
            raise ValueError("mesh superpoints need the triangle of every point (points.extra['triangle'])")
        sp = mesh_point_superpoints(scene.vertices, scene.triangles, pc.extra["triangle"], **superpoint_kwargs)
    else:
        sp = compute_superpoints(pc.positions, pc.normals, superpoint_mode, **superpoint_kwargs)
    return scene_from_arrays(name or scene.name, pc.positions, fused, mask, sp, pc.labels, pc.colors)


class OpenSceneScenes:
    """Scenes of one split of a dataset in the OpenScene layout, loaded lazily.

    Args:
        root: dataset folder with ``<split>/<scene>.pth`` 3D files.
        split: "train", "val", ...
        feature_root: folder of fused 2D feature files ``<scene>.pt`` or ``<scene>_<k>.pt``
            (OpenScene writes several random view samples per scene; ``feature_sample`` picks one
            by index, modulo their number); None for evaluation-only loading.
        superpoints: "graph" (computed once, cached next to each scene file) or "points" (nuScenes).
        scene_labels: optional {scene: class names} (:func:`sas_core.train.scene_labels.load_scene_labels`)
            set as each scene's ``classes``.
        masks: load ``<feature_root>/<scene>.masks.npz`` (:mod:`sas_core.train.masks`) as each
            scene's ``masks``; a scene without the file is an error.
    """

    def __init__(self, root, split: str = "train", feature_root=None, superpoints: str = "graph",
                 feature_sample: int = 0, scene_labels: Optional[dict] = None, masks: bool = False):
        self.root = Path(root)
        folder = self.root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"no {split!r} split in {self.root} (expected {folder}/<scene>.pth files)")
        self.files = sorted(folder.glob("*.pth"))
        if not self.files:
            raise FileNotFoundError(f"{folder} has no <scene>.pth files")
        self.feature_root = Path(feature_root) if feature_root else None
        if self.feature_root is not None and not self.feature_root.is_dir():
            raise FileNotFoundError(f"fused feature folder {self.feature_root} does not exist (run `sas fuse`)")
        self.superpoints = superpoints
        self.feature_sample = int(feature_sample)
        self.names = [f.stem for f in self.files]
        self.scene_labels = dict(scene_labels or {})
        self.masks = bool(masks)
        if self.masks and self.feature_root is None:
            raise ValueError("masks are stored next to the fused features: give a feature folder")

    def __len__(self) -> int:
        return len(self.files)

    def feature_file(self, name: str) -> Path:
        from sas_core.data.fused_features import fused_feature_paths

        samples = fused_feature_paths(self.feature_root, name)
        if not samples:
            raise FileNotFoundError(f"no fused features for scene {name!r} in {self.feature_root} (run `sas fuse`)")
        return Path(samples[self.feature_sample % len(samples)])

    def __getitem__(self, i: int) -> SceneData:
        from sas_core.data.openscene import read_pth

        path = self.files[i]
        coords, colors, labels = read_pth(path)  # data only, never code
        if np.all(labels == IGNORE_LABEL):
            labels = None  # an unlabelled scene (test split)
        name = path.stem
        feats = mask = None
        if self.feature_root is not None:
            from sas_core.data import fused_features

            feat, mask_full = fused_features.load_fused_features(self.feature_file(name))
            feats, mask = _to_numpy(feat), _to_numpy(mask_full).astype(bool)
            if len(mask) != len(coords):
                raise ValueError(f"fused features of {name!r} have a mask of {len(mask)} points, the scene "
                                 f"has {len(coords)}")
        sp = compute_superpoints(coords, None, self.superpoints, scene_path=path)
        scene_masks = None
        if self.masks:
            from sas_core.train.masks import SceneMasks, mask_file

            f = mask_file(self.feature_root, name)
            if not f.is_file():
                raise FileNotFoundError(f"no masks for scene {name!r}: {f} (write them with `sas fuse --save-masks`)")
            scene_masks = SceneMasks.load(f)
        return SceneData(name, coords, feats, mask, sp, labels, (colors + 1.0) / 2.0,
                         self.scene_labels.get(name), scene_masks)


# ------------------------------------------------------------------------------------------------
# voxel samples and batches


@dataclass
class DataConfig:
    """Voxelisation and augmentation of training samples."""

    voxel_size: float = opt(0.02, "metres (paper: 2 cm indoor, 5 cm outdoor)")
    augment: bool = opt(True, "OpenScene's augmentation (elastic, rotation, scale, flips) while training")
    augmentation: Optional[object] = opt(None, "sas_core.geometry.voxelize.AugmentConfig (None: OpenScene defaults)",
                                         cli=False, ros=False)
    in_channels: int = opt(3, "input feature channels")
    input_color: bool = opt(False, "input RGB in [-1, 1] instead of all ones (OpenScene's option; SAS: ones)")


@dataclass
class VoxelSample:
    """A voxelised scene (numpy): coords (M, 3) int32, first (M,) int64 representative point of
    each voxel, inverse (N,) int64 voxel of each point."""

    scene_index: int
    name: str
    coords: np.ndarray
    first: np.ndarray
    inverse: np.ndarray


class VoxelDataset:
    """Voxelised, augmented samples of a sequence of scenes for a given epoch.

    ``scenes``: a list of :class:`SceneData` or an :class:`OpenSceneScenes`. Samples are
    deterministic functions of (seed, epoch, index).
    """

    def __init__(self, scenes, config: Optional[DataConfig] = None, seed: int = 0, cache: bool = True):
        self.scenes = scenes
        self.config = config or DataConfig()
        if self.config.voxel_size <= 0:
            raise ValueError(f"voxel_size must be positive, got {self.config.voxel_size}")
        self.seed = int(seed)
        self._cache = {} if cache else None

    def __len__(self) -> int:
        return len(self.scenes)

    def scene(self, i: int) -> SceneData:
        if self._cache is None:
            return self.scenes[i]
        if i not in self._cache:
            self._cache[i] = self.scenes[i]
        return self._cache[i]

    def sample(self, i: int, epoch: int = 0, augment: Optional[bool] = None) -> VoxelSample:
        """Voxelise scene ``i`` for ``epoch`` (augmented unless ``augment`` is False)."""
        from sas_core.geometry.voxelize import voxelize_augmented

        cfg = self.config
        scene = self.scene(i)
        rng = np.random.default_rng([self.seed, int(epoch), int(i)])
        coords, inverse, first, _ = voxelize_augmented(scene.positions, cfg.voxel_size, cfg.augmentation, rng,
                                                       augment=cfg.augment if augment is None else augment)
        return VoxelSample(i, scene.name, np.asarray(coords, dtype=np.int32), np.asarray(first, dtype=np.int64),
                           np.asarray(inverse, dtype=np.int64))


@dataclass
class Batch:
    """A batch of voxelised scenes (torch tensors; M voxels in total, B scenes).

    coords (M, 4) int32 [batch, x, y, z]; feats (M, in_channels) float32 (ones);
    target (M, C) float32 2D features (zeros where ``supervised`` is False); supervised (M,) bool;
    superpoints (M,) int64 ids made unique across the batch; labels (M,) int64 (255 = none);
    offsets (B + 1,) voxel ranges of the scenes; names, scene_index: per scene;
    first / inverse: per scene, (M_b,) representative point of each voxel and (N_b,) voxel of
    each point (indices local to the scene).
    """

    coords: "object"
    feats: "object"
    target: "object"
    supervised: "object"
    superpoints: "object"
    labels: "object"
    offsets: "object"
    names: List[str] = field(default_factory=list)
    scene_index: List[int] = field(default_factory=list)
    first: list = field(default_factory=list)
    inverse: list = field(default_factory=list)

    def to(self, device) -> "Batch":
        for name in ("coords", "feats", "target", "supervised", "superpoints", "labels"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @property
    def n_voxels(self) -> int:
        return int(self.coords.shape[0])


def collate(samples: Sequence[VoxelSample], scenes: Sequence[SceneData], in_channels: int = 3,
            feature_dim: Optional[int] = None, input_color: bool = False) -> Batch:
    """Stack voxel samples (with their scenes) into a :class:`Batch`.

    Network input per voxel: all ones (geometry only), or with ``input_color`` the colour of its
    representative point mapped to [-1, 1]."""
    import torch

    if not samples:
        raise ValueError("cannot collate an empty batch")
    dims = {s.feature_dim for s in scenes if s.features is not None}
    if len(dims) > 1:
        raise ValueError(f"scenes in one batch have different feature sizes {sorted(dims)}")
    c = feature_dim or (dims.pop() if dims else 0)
    coords, targets, sup, sps, labels, offsets, inputs = [], [], [], [], [], [0], []
    sp_base = 0
    for b, (smp, scene) in enumerate(zip(samples, scenes)):
        m = len(smp.coords)
        coords.append(np.concatenate([np.full((m, 1), b, np.int32), smp.coords], axis=1))
        tgt = np.zeros((m, c), dtype=np.float32)
        has = np.zeros(m, dtype=bool)
        if scene.features is not None and c:
            rows = scene.feature_rows()[smp.first]
            has = rows >= 0
            tgt[has] = scene.features[rows[has]].astype(np.float32)
        targets.append(tgt)
        sup.append(has)
        _, sp = np.unique(scene.superpoints[smp.first], return_inverse=True)
        sps.append(sp.reshape(-1) + sp_base)
        sp_base += int(sp.max()) + 1 if m else 0
        labels.append(scene.labels[smp.first] if scene.labels is not None else np.full(m, IGNORE_LABEL, np.int64))
        if input_color:
            if scene.colors is None:
                raise ValueError(f"scene {scene.name!r} has no colours, but the network takes colour input")
            inputs.append(np.asarray(scene.colors, dtype=np.float32)[smp.first] * 2.0 - 1.0)
        offsets.append(offsets[-1] + m)
    n = offsets[-1]
    return Batch(
        coords=torch.from_numpy(np.concatenate(coords)),
        feats=torch.from_numpy(np.concatenate(inputs)) if input_color else torch.ones((n, in_channels), dtype=torch.float32),
        target=torch.from_numpy(np.concatenate(targets)),
        supervised=torch.from_numpy(np.concatenate(sup)),
        superpoints=torch.from_numpy(np.concatenate(sps).astype(np.int64)),
        labels=torch.from_numpy(np.concatenate(labels).astype(np.int64)),
        offsets=torch.tensor(offsets, dtype=torch.int64),
        names=[s.name for s in samples],
        scene_index=[s.scene_index for s in samples],
        first=[torch.from_numpy(s.first) for s in samples],
        inverse=[torch.from_numpy(s.inverse) for s in samples],
    )


def epoch_batches(n_scenes: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1,
                  shuffle: bool = True) -> List[List[int]]:
    """Scene indices of every batch of one epoch for process ``rank`` of ``world_size``.

    Scenes are assigned to processes statically (scene i -> rank i % world_size) so each process
    keeps the TESD history of its own scenes; within a process the order is shuffled per epoch
    with a generator seeded by (seed, epoch, rank). All processes get the same number of batches
    (shards shorter than the longest one repeat scenes), as DDP needs.
    """
    if n_scenes < world_size:
        raise ValueError(f"{n_scenes} training scenes for {world_size} processes; need at least one each")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shard = np.arange(rank, n_scenes, world_size)
    longest = len(range(0, n_scenes, world_size))
    if shuffle:
        shard = np.random.default_rng([seed, epoch, rank]).permutation(shard)
    if len(shard) < longest:
        shard = np.concatenate([shard, shard[: longest - len(shard)]])
    return [shard[i:i + batch_size].tolist() for i in range(0, longest, batch_size)]

