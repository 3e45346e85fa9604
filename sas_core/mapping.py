"""The ROS-free mapping pipeline: one :class:`Mapper` for the live node and for `sas replay`.

Layering (one pipeline, never two)::

    sas_ros.mapping_node.MappingNode   decode messages, QoS, threads, timers, services, logging
    sas_app.commands.replay            read a bag with rosbags, write the map
            |  both drive
            v
    Mapper                              this module: frames/sweeps in, labels and queries out
            |  owns
            v
    VoxelMap (sas_core.geometry.voxel_map)  + labeller + vocabulary + class texts + query store

A :class:`Mapper` owns the :class:`~sas_core.geometry.voxel_map.VoxelMap`, the labeller
(``mode``: ``segmenter`` = a distilled 3D network, paper Sec. 3.4 inference; ``fusion`` = live
2D-teacher features fused onto the voxels with OpenScene's multi-view rule, paper Sec. 3.1;
``none``), the vocabulary, its class text embeddings and the map's reduced query store. NumPy in,
NumPy out. It holds its own lock (``threading.RLock``), so a node calls it from several threads:

* :meth:`Mapper.integrate_rgbd` / :meth:`Mapper.integrate_sweep` add a frame / LiDAR sweep;
* :meth:`Mapper.label_pass` labels what changed (the changed region + ``region_margin`` of
  context for the network; the network's features are written back only to voxels that did not
  move meanwhile), every ``full_update_every``-th pass the whole map;
* :meth:`Mapper.set_vocabulary` relabels the map in slices of ``LOCK_SLICE`` voxels with the lock
  released in between (a newer vocabulary wins over one still being applied);
  :meth:`Mapper.refit_query_basis` refits the query store in slices as well;
* :meth:`Mapper.query` answers free-text queries (per text: slots, positions, scores, count,
  best score, centroid, box);
* :meth:`Mapper.update_instances` keeps an instance id per voxel (same-label voxels connected on
  the grid, regrouped where the map changed: :mod:`sas_core.instances.online`); :meth:`Mapper.export`
  and :meth:`Mapper.save` carry them (``instance``, int32, -1 none);
* :meth:`Mapper.save` / :meth:`Mapper.load`, :meth:`Mapper.reset`, :meth:`Mapper.stats`.

Bad input raises :class:`Rejected`, a ``ValueError`` whose ``reason`` is a fixed code
(:data:`REASONS`); callers count and log by the code, never by the message text.

Live fusion (``mode: fusion``) uses :class:`sas_core.geometry.multiview.FeatureAccumulator` with
one row per map slot: every frame is tested against the centre of every voxel of the map with
OpenScene's visibility rule (in front of the camera, ``fusion_border`` pixels from the edges,
``|depth(u, v) - z| <= fusion_depth_ratio * depth(u, v)``), and a voxel's feature is the plain
mean of the teacher features over the frames where it was visible. That is what
``sas fuse`` (:func:`sas_core.geometry.multiview.fuse_views`) computes for the same points and
frames, so live fusion and ``sas fuse`` agree per voxel (to fp16 rounding) for every voxel that
existed when the first frame came; a voxel created later has the mean over the frames since.
Memory: ``capacity x dim`` float32 sums (1M voxels x 512: 2 GB) next to the fp16 features.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import numpy as np

from sas_core.config import opt
from sas_core.geometry.voxel_map import LOCK_SLICE, VoxelMap, VoxelMapConfig, rgbd_points
from sas_core.infer import PRECISIONS
from sas_core.instances.online import VoxelInstances
from sas_core.text import check_template, check_texts, check_vocabulary, clip_text, parse_vocabulary
from sas_core.types import CameraIntrinsics, Frame

__all__ = ["LIVE_TEACHERS", "MODES", "REASONS", "Mapper", "MapperConfig", "QueryAnswer", "Rejected",
           "ServiceLimits", "check_device", "strided_frame"]

#: Labelling modes.
MODES = ("segmenter", "fusion", "none")

#: Teachers of mode ``fusion``: the simulated one of the synthetic world, or the real ones of
#: :mod:`sas_core.teachers.registry` (``several`` = dense_clip + mask_clip, capability-guided).
LIVE_TEACHERS = ("simulated", "dense_clip", "mask_clip", "several")
_REGISTRY_NAMES = {"dense_clip": ("dense_clip",), "mask_clip": ("mask_clip",), "several": ("dense_clip", "mask_clip")}

#: Reason codes of :class:`Rejected` (the node counts drops by these; callers may add their own
#: decoding reasons such as ``no_camera_info`` / ``bad_image`` with the same class).
REASONS = {
    "nan_depth": "the depth image has no valid measurement",
    "size_mismatch": "image sizes disagree with each other or with the camera model",
    "no_camera_info": "no camera model for the frame",
    "bad_pose": "the pose is not a finite 4x4 matrix",
    "no_ground_truth": "fusion with the simulated teacher needs semantic images",
    "empty_cloud": "the LiDAR sweep has no finite point",
    "unknown_word": "a vocabulary name or query word the text encoder does not know",
    "bad_template": "the prompt template is not plain text with exactly one '{}'",
    "bad_vocabulary": "duplicate (case-insensitive), too many or too long class names",
    "over_limit": "a request beyond a configured limit (max_query_texts, max_text_length, max_query_points)",
    "bad_request": "a request field out of range (threshold not finite or outside [-1, 1], negative max_points)",
    "empty_query": "no query text",
    "bad_query": "the query cannot be encoded",
    "no_encoder": "this mapper has no text encoder (mode none)",
    "no_features": "the map has no features yet",
    "bad_map": "a saved map that cannot be loaded",
}


class Rejected(ValueError):
    """Input the mapper refuses; ``reason`` is one code of :data:`REASONS`.

    Attributes:
        reason: the code (``nan_depth``, ``size_mismatch``, ``unknown_word``, ...).
        words: the offending words for ``unknown_word`` / ``bad_query`` (else empty).
    """

    def __init__(self, reason: str, message: str, words: Sequence[str] = ()):
        super().__init__(message)
        self.reason = str(reason)
        self.words = tuple(words)


@dataclass
class MapperConfig:
    """One set of defaults for the mapping node (ROS parameters) and `sas replay` (flags)."""

    voxel_size: float = opt(0.05, "voxel edge in metres (one map point per voxel)")
    max_points: int = opt(1_000_000, "map capacity in voxels; older/farther voxels are evicted beyond it")
    eviction: str = opt("oldest", "eviction policy when full: oldest (least recently seen) or farthest",
                        choices=("oldest", "farthest"))
    max_radius: float = opt(0.0, "drop voxels farther than this from the sensor, metres (0 = keep all)")
    query_rank: int = opt(64, "rank of the reduced query store (see sas_core.geometry.voxel_map)")
    feature_store: str = opt("fp16", "per-voxel feature store: fp16 (full features; answers equal a full scan) or "
                                     "int8 (rank-store_rank int8 codes, ~7x smaller; see "
                                     "sas_core.geometry.feature_store)", choices=("fp16", "int8"))
    store_rank: int = opt(128, "rank of the int8 feature store (bytes per voxel = store_rank + 16)")
    pixel_stride: int = opt(2, "integrate every n-th pixel in both directions")
    min_depth: float = opt(0.1, "ignore depth at or below this (m)")
    max_depth: float = opt(8.0, "ignore depth beyond this (m)")
    mode: str = opt("segmenter", "labelling: segmenter (distilled 3D network), fusion (live 2D teachers) or none",
                    choices=MODES)
    checkpoint: str = opt("", "distilled checkpoint for mode segmenter (sas distill output)")
    device: str = opt("cpu", "torch device of the network and of live fusion (cpu, cuda, cuda:1)")
    precision: str = opt("fp32", "network arithmetic: fp32, bf16 (CPU or CUDA) or fp16 (CUDA)", choices=PRECISIONS)
    vocabulary: str = opt("scannet20", "vocabulary name (scannet20, matterport21, ...), a file with one name a "
                                       "line, or comma-separated class names")
    prompt_template: str = opt("a {} in a scene", "prompt template for class names")
    teacher: str = opt("simulated", "fusion mode teacher: simulated (synthetic world ground truth topics), "
                                    "dense_clip, mask_clip, or several (dense_clip + mask_clip, capability-guided "
                                    "fusion); CLIP / SAM weights come from the models file", choices=LIVE_TEACHERS)
    teacher_stride: int = opt(2, "fusion mode: teacher features are taken at every n-th pixel")
    # ---- live teachers (sas_core.teachers.registry names; the node runs them on their own worker)
    clip_recipe: str = opt("", "dense_clip teacher: last-block recipe (maskclip, sclip, clearclip, naclip); empty: "
                               "the models file's clip_preset, else sclip",
                           choices=("", "maskclip", "sclip", "clearclip", "naclip", "vanilla"))
    capability_table: str = opt("", "teacher several: capability table JSON (sas capability) with a row per "
                                    "teacher (dense_clip, mask_clip); classes it lacks get the teacher's mean")
    teacher_min_period: float = opt(0.0, "fusion mode: min seconds (frame stamps) between teacher frames "
                                         "(0 = every frame)")
    teacher_min_translation: float = opt(0.0, "fusion mode: a teacher frame also needs this camera motion (m) "
                                              "since the last one, or teacher_min_rotation (0 and 0 = no motion test)")
    teacher_min_rotation: float = opt(0.0, "fusion mode: ... or this camera rotation (degrees) since the last one")
    text_dim: int = opt(512, "fusion mode: dimension of the synthetic text space")
    fusion_depth_ratio: float = opt(0.25, "fusion mode: a voxel is visible when |depth - z| <= ratio * depth "
                                          "(OpenScene: 0.25)")
    fusion_border: int = opt(10, "fusion mode: full-resolution pixels ignored along every image edge "
                                 "(OpenScene: 10)")
    region_margin: float = opt(1.0, "metres of context around the changed region given to the network")
    full_update_every: int = opt(10, "every n-th labelling pass covers the whole map (0 = never)")
    query_threshold: float = opt(0.5, "default relevance threshold of a query")
    query_max_points: int = opt(5000, "default max returned points of a query")
    query_max_objects: int = opt(10, "default max objects per query text (0 in a request); 0 here = all")
    object_min_points: int = opt(20, "smallest object a query returns (voxels; smaller groups of matching "
                                     "voxels are not objects)")
    object_link_distance: float = opt(0.0, "matching voxels in neighbouring grid cells of this size (m) belong to "
                                           "one object (0 = voxel_size: touching voxels; larger values bridge gaps "
                                           "but merge objects with the floor near them)")
    instance_update_every: int = opt(1, "keep per-voxel instance ids (same-label voxels connected on the grid, "
                                        "sas_core.instances.online): regroup what changed every n-th labelling "
                                        "pass (0 = never)")
    instance_full_every: int = opt(0, "every n-th instance update regroups the whole map, which also splits "
                                      "objects cut in two (0 = never; incremental updates only merge)")


@dataclass
class ServiceLimits:
    """Bounds of every request the mapper answers (the node's service parameters; the CLI uses the
    same checks). Each error names the limit it hit."""

    max_query_texts: int = opt(32, "most texts in one query request")
    max_text_length: int = opt(200, "most characters of one query text, class name or prompt template")
    max_query_points: int = opt(200_000, "most points one query returns per text; a request's max_points above it "
                                         "is refused (0 in a request: query_max_points)")
    max_vocabulary: int = opt(1000, "most class names in one vocabulary")

    def __post_init__(self):
        for name in ("max_query_texts", "max_text_length", "max_query_points", "max_vocabulary"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass
class QueryAnswer:
    """Answer of :meth:`Mapper.query` for one text.

    Attributes:
        text: the query text.
        slots: (M,) int64 map slots, best first (at most ``max_points``).
        positions: (M, 3) float32 their positions (map frame).
        scores: (M,) float32 exact cosine scores.
        count: voxels scoring >= threshold (before ``max_points``).
        best: best score anywhere in the map (-inf for an empty map).
        centroid, bbox_min, bbox_max: (3,) float32 of ``positions`` (NaN when M = 0).
        objects: the matching voxels split into objects (:class:`sas_core.instances.Instance`,
            ``indices`` into ``positions``), best first; empty unless asked for.
        object_of: (M,) int32 index into ``objects`` of each returned voxel (-1: in none).
        instance: (M,) int32 the map's instance id of each returned voxel (:meth:`Mapper.update_instances`;
            -1: none or not grouped yet).
    """

    text: str
    slots: np.ndarray
    positions: np.ndarray
    scores: np.ndarray
    count: int
    best: float
    centroid: np.ndarray
    bbox_min: np.ndarray
    bbox_max: np.ndarray
    objects: list = field(default_factory=list)
    object_of: Optional[np.ndarray] = None
    instance: Optional[np.ndarray] = None


def check_device(device: str) -> str:
    """``device`` if torch can use it, else ValueError with one clear line (e.g. ``cuda`` on a
    machine without CUDA)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device ({exc}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {device!r} requested but CUDA is not available here ({why}); "
                             "set device to cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; use cpu or cuda[:N]")
    return device


def strided_frame(frame: Frame, stride: int) -> Frame:
    """Every ``stride``-th pixel of a frame (colour, depth, ground truth) with the matching camera:
    pixel (v, u) of the result is pixel (v * stride, u * stride) of ``frame``."""
    t = max(1, int(stride))
    if t == 1:
        return frame
    sl = (slice(None, None, t), slice(None, None, t))
    depth = np.ascontiguousarray(frame.depth[sl])
    i = frame.intrinsics
    intr = CameraIntrinsics(i.fx / t, i.fy / t, i.cx / t, i.cy / t, depth.shape[1], depth.shape[0])
    pick = lambda a: None if a is None else np.ascontiguousarray(a[sl])  # noqa: E731
    return Frame(color=pick(frame.color), depth=depth, intrinsics=intr, pose=frame.pose, stamp=frame.stamp,
                 semantic=pick(frame.semantic), instance=pick(frame.instance), frame_id=frame.frame_id)


def _saved_instances(path, n: int) -> Optional[np.ndarray]:
    """The ``instance`` array of a saved map (None when it has none, e.g. a map saved before
    instance ids were kept, or when its length is not ``n``). Reads only that member of the
    ``map.npz`` that :meth:`VoxelMap.load` has just checked."""
    from pathlib import Path

    from sas_core.geometry.voxel_map import MAP_NPZ, map_arrays_path

    base = Path(path)
    npz = base / MAP_NPZ if base.is_dir() else map_arrays_path(base)
    with np.load(npz, allow_pickle=False) as z:
        if "instance" not in z.files:
            return None
        ids = np.asarray(z["instance"])
    if ids.ndim != 1 or len(ids) != n or ids.dtype.kind not in "iu":
        return None
    return ids.astype(np.int64)


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().float().numpy()
    return np.asarray(x, np.float32)


class Mapper:
    """Voxel map + labeller + vocabulary + queries (see the module docstring).

    Args:
        config: a :class:`MapperConfig`.
        segmenter: a ready :class:`sas_core.infer.Segmenter` (default: loaded from ``checkpoint``
            in mode ``segmenter``).
        teacher: a 2D teacher with ``features(frame) -> ((H, W, C), (H, W) valid)`` for mode
            ``fusion``, or a list of them (capability-guided fusion with ``capability_table``)
            (default: built from ``config.teacher``: the simulated teacher of the synthetic world,
            or the registry's CLIP teachers with the weights of ``models``).
        text_encoder: overrides the text encoder (default: the segmenter's, the CLIP teachers'
            one, or the synthetic text space of ``text_dim`` in mode ``fusion``).
        models: :class:`sas_core.models.ModelPaths` of the CLIP / SAM weights for the real
            teachers (default: :func:`sas_core.models.load_model_paths`: $SAS_MODELS /
            $SAS_MODELS_DIR).
        limits: the :class:`ServiceLimits` of queries and vocabularies (default: its defaults).

    Live teachers (mode ``fusion``): :meth:`integrate_rgbd` fuses the frames that
    :meth:`select_teacher_frame` picks (``teacher_min_period`` / ``teacher_min_translation`` /
    ``teacher_min_rotation``) synchronously; a node integrates with ``fuse=False`` and hands the
    picked frames (:meth:`teacher_input`) to a worker thread that calls :meth:`fuse_frame`.
    With several teachers every teacher keeps its own multi-view mean per voxel (SAS fuses each
    teacher into 3D first) and a voxel's feature is their capability-guided fusion (eq. 6-8,
    :func:`sas_core.fusion.capability_fusion`, ``tau`` 0.05) with the capability of the current
    vocabulary's classes; memory grows by ``capacity x dim x 4`` bytes per teacher.

    Raises:
        ValueError: a bad setting (mode, device without CUDA, missing checkpoint, unknown
            vocabulary name), with one clear line.
    """

    def __init__(self, config: Optional[MapperConfig] = None, *, segmenter=None, teacher=None, text_encoder=None,
                 models=None, limits: Optional[ServiceLimits] = None):
        # state first: every attribute exists before anything below can raise
        self.config = cfg = config or MapperConfig()
        self.limits = limits or ServiceLimits()
        self.lock = threading.RLock()
        self.segmenter = segmenter
        self.teachers: List[object] = list(teacher) if isinstance(teacher, (list, tuple)) else \
            ([] if teacher is None else [teacher])
        self.teacher = self.teachers[0] if self.teachers else None
        self.models = models
        self.n_teacher_frames = 0
        self._accs: List[object] = []   # one FeatureAccumulator per teacher (rows = map slots)
        self._capability_table = None   # CapabilityTable of several teachers
        self._capability = None         # (T, K) float32 capability of the current vocabulary
        self._teacher_lock = threading.Lock()  # one teacher forward at a time (and vocabulary changes)
        self._last_teacher_frame = None  # (stamp, pose) of the last frame picked for the teacher
        self.encoder = text_encoder
        self.vocabulary: List[str] = []
        self.template = str(cfg.prompt_template)
        self.class_text: Optional[np.ndarray] = None
        self.n_frames = self.n_sweeps = self.n_passes = 0
        self.n_changes = 0              # bumped by every change of the map's content (autosave compares it)
        self.instances = VoxelInstances()  # per-voxel instance ids (update_instances)
        self.n_instance_updates = 0
        self._teacher_needs_gt = False  # the built-in simulated teacher reads frame.semantic
        self.fusion_config = None
        if cfg.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
        if min(cfg.teacher_min_period, cfg.teacher_min_translation, cfg.teacher_min_rotation) < 0:
            raise ValueError("teacher_min_period, teacher_min_translation and teacher_min_rotation must be >= 0")
        if cfg.pixel_stride < 1 or cfg.teacher_stride < 1:
            raise ValueError(f"pixel_stride and teacher_stride must be >= 1, got {cfg.pixel_stride}, "
                             f"{cfg.teacher_stride}")
        try:
            check_template(self.template, self.limits.max_text_length)
        except ValueError as exc:
            raise ValueError(f"prompt_template: {exc}") from None
        if not 0 <= int(cfg.query_max_points) <= self.limits.max_query_points:
            raise ValueError(f"query_max_points {cfg.query_max_points} must be in 0..max_query_points "
                             f"{self.limits.max_query_points}")
        self.map = VoxelMap(VoxelMapConfig(voxel_size=float(cfg.voxel_size), max_points=int(cfg.max_points),
                                           eviction=str(cfg.eviction), max_radius=float(cfg.max_radius),
                                           query_rank=int(cfg.query_rank), feature_store=str(cfg.feature_store),
                                           store_rank=int(cfg.store_rank)))
        names = list(parse_vocabulary(cfg.vocabulary)) if cfg.mode != "none" or text_encoder is not None else []
        if cfg.mode == "segmenter":
            self._setup_segmenter()
        elif cfg.mode == "fusion":
            self._setup_fusion(names)
        if self.encoder is not None and names:
            self.set_vocabulary(names, self.template)

    # ------------------------------------------------------------------ set-up
    def _setup_segmenter(self) -> None:
        cfg = self.config
        if self.segmenter is None:
            check_device(cfg.device)
            if not cfg.checkpoint:
                raise ValueError("mode 'segmenter' needs a checkpoint (a sas distill checkpoint)")
            from sas_core.infer import InferenceConfig, Segmenter

            self.segmenter = Segmenter.from_checkpoint(str(cfg.checkpoint), device=str(cfg.device),
                                                       config=InferenceConfig(precision=str(cfg.precision)))
        if self.encoder is None:
            self.encoder = self.segmenter.text_encoder

    def _setup_fusion(self, names: List[str]) -> None:
        from sas_core.geometry.multiview import MultiViewFusionConfig

        cfg = self.config
        check_device(cfg.device)
        if not self.teachers and cfg.teacher != "simulated":
            self._build_real_teachers(names)
        if self.encoder is None:
            from sas_core.text import SyntheticTextEncoder

            self.encoder = SyntheticTextEncoder(names, dim=int(cfg.text_dim))
        if not self.teachers:
            if cfg.teacher not in LIVE_TEACHERS:
                raise ValueError(f"fusion mode teacher must be one of {', '.join(LIVE_TEACHERS)}, got {cfg.teacher!r}")
            from sas_core.teachers.simulated import SimulatedTeacher, SimulatedTeacherConfig

            self.teachers = [SimulatedTeacher(SimulatedTeacherConfig(name="live_sim", vocabulary=tuple(names)),
                                              self.encoder)]
            self._teacher_needs_gt = True
        self.teacher = self.teachers[0]
        if len(self.teachers) > 1:
            self._load_capability_table()
        # the border is given in full-resolution pixels; the teacher sees every teacher_stride-th
        self.fusion_config = MultiViewFusionConfig(
            depth_ratio=float(cfg.fusion_depth_ratio),
            border=int(math.ceil(int(cfg.fusion_border) / int(cfg.teacher_stride))),
            min_depth=float(cfg.min_depth), max_depth=float(cfg.max_depth))

    def _build_real_teachers(self, names: List[str]) -> None:
        """The registry's CLIP teachers of ``config.teacher`` with the weights of the models file."""
        cfg = self.config
        if cfg.teacher not in _REGISTRY_NAMES:
            raise ValueError(f"fusion mode teacher must be one of {', '.join(LIVE_TEACHERS)}, got {cfg.teacher!r}")
        from sas_core.models import DEFAULT_CLIP_MODEL, load_model_paths
        from sas_core.teachers.registry import build_teachers

        paths = self.models if self.models is not None else load_model_paths()
        wanted = _REGISTRY_NAMES[cfg.teacher]
        where = f"(models file: {paths.source or 'none configured: set models_file, $SAS_MODELS or $SAS_MODELS_DIR'})"
        if not paths.clip_weights():
            raise ValueError(f"teacher {cfg.teacher!r} needs open_clip weights: set clip_checkpoint in the models "
                             f"file {where}; `sas models` says what to download")
        if "mask_clip" in wanted and not paths.sam_checkpoint:
            raise ValueError(f"teacher {cfg.teacher!r} needs segment-anything weights: set sam_checkpoint in the "
                             f"models file {where}; `sas models` says what to download")
        built = build_teachers(wanted, names, clip_model=paths.clip_model or DEFAULT_CLIP_MODEL,
                               clip_checkpoint=paths.clip_weights(), recipe=cfg.clip_recipe or None,
                               dense_preset=paths.clip_preset,
                               sam_model=paths.sam_model_type or "vit_b", sam_checkpoint=paths.sam_checkpoint,
                               device=cfg.device)
        self.teachers = [t for t, _ in built]
        if self.encoder is None:
            self.encoder = built[0][1]  # the CLIP teachers share one text encoder (one text space)

    def _load_capability_table(self) -> None:
        from sas_core.capability.tables import CapabilityTable

        names = [t.name for t in self.teachers]
        path = self.config.capability_table
        if not path:
            raise ValueError(f"several teachers ({', '.join(names)}) are fused by capability: set capability_table "
                             "to a table written by `sas capability` with a row for each of them")
        table = CapabilityTable.load(path)
        missing = [n for n in names if n not in table.teachers]
        if missing:
            raise ValueError(f"capability table {path} has no row for teacher(s) {', '.join(missing)} "
                             f"(it has {', '.join(table.teachers)})")
        self._capability_table = table

    def _capability_for(self, names: Sequence[str]) -> Optional[np.ndarray]:
        """(T, K) capability of the teachers for class ``names``; a class the table lacks gets the
        teacher's mean over the table's classes (a neutral prior). None with one teacher."""
        table = self._capability_table
        if table is None:
            return None
        full = table.matrix(fill=None)  # (T_table, K_table), classes without evidence: the row mean
        rows = [table.teachers.index(t.name) for t in self.teachers]
        out = np.empty((len(rows), len(names)), np.float32)
        for k, name in enumerate(names):
            out[:, k] = full[rows, table.vocabulary.index(name)] if name in table.vocabulary else full[rows].mean(1)
        return out

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def needs_ground_truth(self) -> bool:
        """Whether frames must carry ``semantic`` (the simulated teacher of mode fusion)."""
        return self.mode == "fusion" and self._teacher_needs_gt

    # ------------------------------------------------------------------ integration
    def integrate_rgbd(self, frame: Frame, teacher_frame: Optional[Frame] = None, fuse: bool = True) -> int:
        """Add one RGB-D frame: every ``pixel_stride``-th pixel with ``min_depth < depth <=
        max_depth`` is back-projected (camera-to-world ``frame.pose``) into the map; in mode
        ``fusion`` (with ``fuse``) the teacher's features of ``teacher_frame`` (default ``frame``,
        which then needs ``semantic`` for the simulated teacher), taken at every
        ``teacher_stride``-th pixel, are fused onto the map's voxels when
        :meth:`select_teacher_frame` picks the frame.

        Args:
            frame: colour (H, W, 3) uint8, depth (H, W) float32 metres, intrinsics of (H, W),
                pose (4, 4) camera-to-world.
            teacher_frame: optional frame for the teacher (same stamp, any resolution).
            fuse: False: geometry only (a node runs the teacher on its own worker, see
                :meth:`teacher_input` and :meth:`fuse_frame`).
        Returns:
            the number of voxels the frame's points fell into.
        Raises:
            Rejected: ``size_mismatch``, ``bad_pose``, ``nan_depth``, ``no_ground_truth``.
        """
        cfg = self.config
        depth = np.asarray(frame.depth)
        intr = frame.intrinsics
        if depth.shape != (intr.height, intr.width) or (frame.color is not None and frame.color.shape[:2] != depth.shape):
            color_shape = None if frame.color is None else frame.color.shape[:2]
            raise Rejected("size_mismatch", f"size mismatch: color {color_shape}, depth {depth.shape}, "
                                            f"camera {intr.width}x{intr.height}")
        pose = np.asarray(frame.pose, np.float64)
        if pose.shape != (4, 4) or not np.isfinite(pose).all():
            raise Rejected("bad_pose", "the frame's pose is not a finite 4x4 matrix")
        pts, cols, _ = rgbd_points(depth, frame.color, intr, pose, int(cfg.pixel_stride), float(cfg.min_depth),
                                   float(cfg.max_depth))
        if len(pts) == 0:
            raise Rejected("nan_depth", "depth image has no valid measurement (all 0/NaN/out of range)")
        tf = self.teacher_input(frame, teacher_frame) if fuse else None
        with self.lock:
            touched = self.map.integrate(pts, cols, sensor_origin=pose[:3, 3])
            self.n_frames += 1
            self.n_changes += 1
        if tf is not None and self.select_teacher_frame(tf.stamp, tf.pose):
            self.fuse_frame(tf)
        return int(len(touched))

    def teacher_input(self, frame: Frame, teacher_frame: Optional[Frame] = None) -> Optional[Frame]:
        """The frame the teacher sees (every ``teacher_stride``-th pixel of ``teacher_frame`` or
        ``frame``); None outside mode ``fusion``. Raises Rejected ``no_ground_truth`` when the
        simulated teacher has no semantic image."""
        if self.mode != "fusion":
            return None
        tf = strided_frame(teacher_frame if teacher_frame is not None else frame, int(self.config.teacher_stride))
        if tf.semantic is None and self._teacher_needs_gt:
            raise Rejected("no_ground_truth", "fusion with the simulated teacher needs the frame's semantic "
                                              "image (the synthetic world's ground truth topics)")
        return tf

    def select_teacher_frame(self, stamp: Optional[float], pose: np.ndarray) -> bool:
        """Whether a frame goes to the teacher (and, if so, it becomes the last teacher frame):
        the first frame does; later ones need ``teacher_min_period`` seconds of stamps since the
        last teacher frame and, when ``teacher_min_translation`` or ``teacher_min_rotation`` is
        set, that much camera motion (metres / degrees) since it. A stamp going backwards (a
        bag restarting) starts over."""
        cfg = self.config
        pose = np.asarray(pose, np.float64)
        with self.lock:
            last = self._last_teacher_frame
            if last is not None and not (stamp is not None and last[0] is not None and stamp < last[0]):
                if stamp is not None and last[0] is not None and stamp - last[0] < float(cfg.teacher_min_period):
                    return False
                min_t, min_r = float(cfg.teacher_min_translation), float(cfg.teacher_min_rotation)
                if min_t > 0 or min_r > 0:
                    moved = float(np.linalg.norm(pose[:3, 3] - last[1][:3, 3]))
                    cos = (np.trace(last[1][:3, :3].T @ pose[:3, :3]) - 1.0) / 2.0
                    turned = math.degrees(math.acos(float(np.clip(cos, -1.0, 1.0))))
                    if not ((min_t > 0 and moved >= min_t) or (min_r > 0 and turned >= min_r)):
                        return False
            self._last_teacher_frame = (stamp, pose.copy())
            return True

    def fuse_frame(self, frame: Frame) -> int:
        """Run the teacher(s) on a :meth:`teacher_input` frame and fuse the features onto the map
        (:meth:`_fuse`); safe to call from a worker thread while frames are integrated. Returns
        the number of voxels that received a feature."""
        n = self._fuse(frame)
        with self.lock:
            self.n_teacher_frames += 1
        return n

    def _fuse(self, frame: Frame) -> int:
        """Fuse one teacher frame onto every voxel of the map (OpenScene rule, module docstring):
        one accumulator per teacher; several teachers are combined per voxel by capability.
        Returns the number of voxels that received a feature."""
        import torch

        from sas_core.geometry.multiview import FeatureAccumulator

        with self._teacher_lock:  # outside the map lock: the teacher is the slow part
            outputs = [t.features(frame) for t in self.teachers]
        with self.lock:
            m = self.map
            slots = m.slots()
            if len(slots) == 0:
                return 0
            while len(self._accs) < len(self.teachers):
                self._accs.append(FeatureAccumulator(m.capacity, None, config=self.fusion_config,
                                                     device=self.config.device))
            rows = None
            seen_mask = np.zeros(len(slots), bool)
            for acc, (feats, valid) in zip(self._accs, outputs):
                if acc.n_points < m.capacity:
                    acc.grow(m.capacity)
                # rows of slots that were freed and reused (eviction) start again from zero
                stale = np.flatnonzero((m.feature_counts[: acc.n_points] == 0) & (acc.counts.cpu().numpy() > 0))
                if len(stale):
                    st = torch.from_numpy(stale).to(acc.device)
                    acc.counts[st] = 0
                    if acc.sums is not None:
                        acc.sums[st] = 0
                rows = torch.from_numpy(slots).to(acc.device)
                before = acc.counts[rows].clone()
                acc.add(frame.depth, frame.pose, frame.intrinsics, feats, valid, points=m.centers(slots), index=slots)
                seen_mask |= (acc.counts[rows] > before).cpu().numpy()
            seen = slots[seen_mask]
            if len(seen):
                counts = [acc.counts[torch.from_numpy(seen).to(acc.device)] for acc in self._accs]
                if len(self._accs) == 1:
                    mean = self._accs[0].mean(seen).cpu().numpy()
                else:
                    mean = self._fused_mean(seen, counts)
                total = torch.stack([c.cpu() for c in counts]).sum(0).numpy().astype(np.float32)
                m.set_features(seen, mean, counts=total)
                self.n_changes += 1
                if self.class_text is not None:  # labels follow at once (a teacher worker may finish a frame
                    m.classify(self.class_text, seen)  # after a vocabulary change): never a stale label
                m.dirty[seen] = True  # and the next label pass sees them
            return int(len(seen))

    def _fused_mean(self, seen: np.ndarray, counts) -> np.ndarray:
        """Capability-guided fusion (SAS eq. 6-8) of the teachers' multi-view means at ``seen``."""
        from sas_core.fusion import FusionConfig, capability_fusion

        if self.class_text is None or self._capability is None:
            raise Rejected("no_features", "several teachers need a vocabulary before fusing")
        means = [acc.mean(seen).cpu() for acc in self._accs]
        return capability_fusion(means, self.class_text, self._capability, FusionConfig().tau,
                                 masks=[c.cpu() > 0 for c in counts]).numpy()

    def integrate_sweep(self, points, pose, intensity=None, colors=None, stamp: Optional[float] = None) -> int:
        """Add one LiDAR sweep.

        Args:
            points: (N, 3) sensor-frame points (non-finite rows are dropped).
            pose: (4, 4) sensor-to-map.
            intensity: optional (N,) intensities, drawn as grey levels scaled by the sweep's maximum.
            colors: optional (N, 3) uint8 RGB (wins over ``intensity``).
            stamp: seconds (informational).
        Returns:
            the number of voxels the sweep's points fell into.
        Raises:
            Rejected: ``empty_cloud``, ``bad_pose``, ``size_mismatch``.
        """
        xyz = np.asarray(points, np.float64).reshape(-1, 3)
        pose = np.asarray(pose, np.float64)
        if pose.shape != (4, 4) or not np.isfinite(pose).all():
            raise Rejected("bad_pose", "the sweep's pose is not a finite 4x4 matrix")
        for name, arr in (("intensity", intensity), ("colors", colors)):
            if arr is not None and len(arr) != len(xyz):
                raise Rejected("size_mismatch", f"{len(arr)} {name} values for {len(xyz)} points")
        finite = np.isfinite(xyz).all(1)
        if not finite.any():
            raise Rejected("empty_cloud", "the sweep has no finite point")
        world = (xyz[finite] @ pose[:3, :3].T + pose[:3, 3]).astype(np.float32)
        cols = None
        if colors is not None:
            cols = np.asarray(colors)[finite][:, :3].astype(np.uint8)
        elif intensity is not None:
            inten = np.asarray(intensity, np.float32)[finite]
            scale = max(float(np.max(inten)), 1e-6)
            g = np.clip(inten / scale * 255, 0, 255).astype(np.uint8)
            cols = np.repeat(g[:, None], 3, axis=1)
        with self.lock:
            touched = self.map.integrate(world, cols, sensor_origin=pose[:3, 3])
            self.n_sweeps += 1
            self.n_changes += 1
        return int(len(touched))

    # ------------------------------------------------------------------ labelling
    def label_pass(self, full: bool = False) -> bool:
        """Label what changed since the last pass; every ``full_update_every``-th pass (or with
        ``full``) the whole map. Mode ``segmenter``: the network runs (lock released) on the
        changed voxels plus ``region_margin`` metres of context, and its features are written back
        only to voxels that are still there and did not move to another voxel meanwhile. Mode
        ``fusion``: the fused means of the changed voxels are classified. Returns False when
        there was nothing to do."""
        cfg = self.config
        with self.lock:
            self.n_passes += 1
            every = int(cfg.full_update_every)
            full = bool(full) or (every > 0 and self.n_passes % every == 0)
            dirty = self.map.take_dirty()
            if self.mode == "fusion":
                if self.class_text is None or (len(dirty) == 0 and not full):
                    return False
                self.map.classify(self.class_text, None if full else dirty)
                self.n_changes += 1
                return True
            if self.mode != "segmenter" or (len(dirty) == 0 and not full):
                return False
            region = self.map.slots() if full else self.map.region_slots(dirty, float(cfg.region_margin))
            if len(region) == 0:
                return False
            positions = self.map.positions[region].copy()
            colors = self.map.colors[region].copy()
        feats = _numpy(self.segmenter.features(positions, colors=colors))
        vs = self.map.config.voxel_size
        with self.lock:
            keep = region < self.map.capacity  # (a reset shrinks the map)
            region, feats, positions = region[keep], feats[keep], positions[keep]
            still = self.map.valid[region] & (np.floor(self.map.positions[region] / vs) == np.floor(positions / vs)).all(1)
            self.map.set_features(region[still], feats[still])
            if self.class_text is not None:
                self.map.classify(self.class_text, region[still])
            self.n_changes += 1
        return True

    # ------------------------------------------------------------------ vocabulary
    def _class_text(self, names: Sequence[str], template: str) -> np.ndarray:
        from sas_core.text import class_embeddings

        return _numpy(class_embeddings(self.encoder, list(names), template))

    def _unknown(self, names: Sequence[str], template: str) -> List[str]:
        """Every name the encoder refuses (each encoded on its own; only after a batch failed)."""
        bad = []
        for n in names:
            try:
                self._class_text([n], template)
            except ValueError:
                bad.append(n)
        return bad

    def set_vocabulary(self, names: Union[str, Sequence[str]], template: Optional[str] = None) -> bool:
        """Switch to a vocabulary and relabel the map in ``LOCK_SLICE``-voxel slices, releasing the
        lock in between (seconds on 1M voxels); integration and queries go on meanwhile.

        Args:
            names: class names, or a vocabulary spec string (``sas_core.text.parse_vocabulary``).
            template: prompt template with ``{}`` (default: the current one).
        Returns:
            True when this vocabulary was applied to the whole map, False when a newer one took over.
        Raises:
            Rejected: ``no_encoder``, ``bad_template``, ``unknown_word`` (``.words``: the names);
            the vocabulary is unchanged then.
        """
        if self.encoder is None:
            raise Rejected("no_encoder", "this mapper has no text encoder (mode 'none')")
        if isinstance(names, str):
            try:
                names = parse_vocabulary(names)
            except (ValueError, FileNotFoundError) as exc:
                raise Rejected("unknown_word", f"vocabulary unchanged: {exc}", words=[names]) from None
        lim = self.limits
        try:
            names = check_vocabulary(names, lim.max_vocabulary, lim.max_text_length)
        except ValueError as exc:
            raise Rejected("bad_vocabulary", f"vocabulary unchanged: {exc}") from None
        template = self.template if template is None else template
        try:
            template = check_template(template, lim.max_text_length)
        except ValueError as exc:
            raise Rejected("bad_template", f"vocabulary unchanged: {exc}") from None
        if not names:
            raise Rejected("unknown_word", "vocabulary unchanged: no class names")
        try:
            text = self._class_text(names, template)
            if self.segmenter is not None and hasattr(self.segmenter, "set_vocabulary"):
                self.segmenter.set_vocabulary(list(names), [template])
        except ValueError as exc:
            bad = self._unknown(names, template) or list(getattr(exc, "words", ()))
            shown = ", ".join(repr(clip_text(n)) for n in bad[:10]) + (f" and {len(bad) - 10} more"
                                                                        if len(bad) > 10 else "")
            why = f"{len(bad)} name(s) the text encoder cannot encode: {shown}" if bad else clip_text(exc, 300)
            raise Rejected("unknown_word", f"vocabulary unchanged: {why}",
                           words=[clip_text(n) for n in bad]) from None
        capability = self._capability_for(names)
        labelled = [t for t in self.teachers if hasattr(t, "set_vocabulary") and not self._teacher_needs_gt]
        if labelled:
            with self._teacher_lock:  # the mask teacher labels its masks with the map's vocabulary
                for t in labelled:
                    t.set_vocabulary(list(names))
        with self.lock:
            self._capability = capability
            self.vocabulary, self.template, self.class_text = list(names), template, text
            self.n_changes += 1
            self.map.set_anchor(text)
            slots = self.map.slots()
        for chunk in np.array_split(slots, max(1, len(slots) // LOCK_SLICE + 1)):
            with self.lock:
                if self.class_text is not text:  # a newer vocabulary took over
                    return False
                self.map.classify(text, chunk[chunk < self.map.capacity])
        return True

    def refit_query_basis(self, rows: int = LOCK_SLICE, running: Optional[Callable[[], bool]] = None) -> bool:
        """Refit the map's query basis when it is due (no basis, new vocabulary, map doubled), in
        steps of ``rows`` voxels with the lock released in between; queries keep the old basis,
        exact, until the last step. ``running() -> False`` stops early (the refit stays pending and
        the next call continues it). Returns True when a refit finished."""
        with self.lock:
            if not self.map.refit_pending:
                if not self.map.needs_refit():
                    return False
                self.map.start_refit()
        while running is None or running():
            with self.lock:
                if self.map.refit_step(rows):
                    return True
        return False

    # ------------------------------------------------------------------ queries
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(T, D) float32 unit text embeddings; raises Rejected ``no_encoder`` / ``bad_query``."""
        if self.encoder is None:
            raise Rejected("no_encoder", "this mapper has no text encoder (mode 'none')")
        try:
            return _numpy(self.encoder.encode(list(texts)))
        except ValueError as exc:
            words = [clip_text(w) for w in getattr(exc, "words", ())]
            raise Rejected("bad_query", f"cannot encode the query: {clip_text(exc, 300)}", words=words) from None

    def check_query(self, texts: Sequence[str], threshold: Optional[float] = None,
                    max_points: Optional[int] = None) -> tuple:
        """``(texts, threshold, max_points)`` of a query after the bounds of :attr:`limits`: at most
        ``max_query_texts`` non-empty texts of at most ``max_text_length`` characters; threshold
        (None: ``query_threshold``) finite in [-1, 1]; max_points (None: ``query_max_points``)
        in 0..``max_query_points``, 0 meaning ``max_query_points``. Raises Rejected
        ``over_limit`` / ``empty_query`` / ``bad_request`` naming the limit."""
        lim = self.limits
        try:
            texts = check_texts(texts, lim.max_query_texts, lim.max_text_length)
        except ValueError as exc:
            raise Rejected("over_limit", str(exc)) from None
        if not texts or any(not t.strip() for t in texts):
            raise Rejected("empty_query", "empty query text: give one or more non-empty texts")
        threshold = self.config.query_threshold if threshold is None else threshold
        try:
            threshold = float(threshold)
        except (TypeError, ValueError):
            raise Rejected("bad_request", f"threshold {clip_text(repr(threshold))} is not a number") from None
        if not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
            raise Rejected("bad_request", f"threshold {threshold} must be a finite number in [-1, 1] "
                                          "(cosine similarity; 0 = the node default)")
        max_points = self.config.query_max_points if max_points is None else max_points
        if isinstance(max_points, bool) or not isinstance(max_points, (int, np.integer)) or max_points < 0:
            raise Rejected("bad_request", f"max_points {clip_text(repr(max_points))} must be an integer >= 0")
        if max_points > lim.max_query_points:
            raise Rejected("over_limit", f"max_points {max_points} is more than the limit of "
                                         f"{lim.max_query_points} (max_query_points)")
        return texts, threshold, int(max_points) or lim.max_query_points

    def query(self, texts: Sequence[str], threshold: Optional[float] = None,
              max_points: Optional[int] = None, max_objects: Optional[int] = None) -> List[QueryAnswer]:
        """Voxels relevant to each text: cosine score of the voxel feature with the text embedding
        ``>= threshold`` (default ``query_threshold``), at most ``max_points`` (default
        ``query_max_points``; 0 = ``max_query_points``) per text, best first (exact scores, see
        VoxelMap.query). The request is bounded first (:meth:`check_query`).

        Raises:
            Rejected: ``over_limit``, ``bad_request``, ``empty_query``, ``no_encoder``, ``bad_query``,
            ``no_features``.
        """
        texts, threshold, max_points = self.check_query(texts, threshold, max_points)
        if max_objects is None:
            max_objects = self.config.query_max_objects
        if isinstance(max_objects, bool) or not isinstance(max_objects, (int, np.integer)) or max_objects < 0:
            raise Rejected("bad_request", f"max_objects {clip_text(repr(max_objects))} must be an integer >= 0")
        emb = self.encode(texts)
        out = []
        with self.lock:
            if self.map.feature_dim == 0:
                raise Rejected("no_features", "the map has no features yet (no labelling pass has run)")
            for text, t in zip(texts, emb):
                res = self.map.query(t, threshold=threshold, max_points=max_points)
                p = self.map.positions[res.slots].copy()
                nan = np.full(3, np.nan, np.float32)
                out.append(QueryAnswer(text, res.slots, p, res.scores, int(res.count), float(res.best_score),
                                       p.mean(0) if len(p) else nan, p.min(0) if len(p) else nan,
                                       p.max(0) if len(p) else nan.copy(),
                                       instance=self.instances.ids_of(self.map, res.slots)))
        for a in out:  # outside the lock: only the copied positions are needed
            self._group_objects(a, int(max_objects))
        return out

    def _group_objects(self, answer: QueryAnswer, max_objects: int) -> None:
        """Split an answer's voxels into objects (connected on the voxel grid; SAS 4.4's object-level
        answer instead of one box over every match)."""
        from sas_core.instances import instances_for_query

        answer.object_of = np.full(len(answer.positions), -1, np.int32)
        if len(answer.positions) == 0:
            return
        answer.objects = instances_for_query(answer.positions, index=np.arange(len(answer.positions)),
                                             scores=answer.scores,
                                             voxel_size=max(self.map.config.voxel_size,
                                                            float(self.config.object_link_distance)),
                                             min_points=int(self.config.object_min_points), name=answer.text,
                                             max_instances=max_objects)
        for k, inst in enumerate(answer.objects):
            answer.object_of[inst.indices] = k

    # ------------------------------------------------------------------ state
    def export(self) -> dict:
        """The live voxels' arrays (see VoxelMap.export) plus ``instance`` (N,) int32 (-1: none or not
        grouped yet), taken under the lock."""
        with self.lock:
            data = self.map.export()
            data["instance"] = self.instances.export(self.map)
            return data

    def update_instances(self, full: bool = False) -> dict:
        """Regroup the voxels whose label or existence changed since the last call into instances
        (:class:`sas_core.instances.online.VoxelInstances`; ``full``: the whole map, which also
        splits objects cut in two). Every ``instance_full_every``-th call is a full one.

        An incremental update takes the lock for at most ``LOCK_SLICE`` changed voxels at a time
        and releases it in between (a vocabulary change relabels the whole map); a full one holds
        it throughout (seconds on 1M voxels: ``sas bench instances``). Returns the figures of
        the update (summed over its slices) plus ``ms``: the wall time with the lock held."""
        import time

        every = int(self.config.instance_full_every)
        with self.lock:
            self.n_instance_updates += 1
            full = bool(full) or (every > 0 and self.n_instance_updates % every == 0)
        total, held = None, 0.0
        while True:
            with self.lock:
                t0 = time.perf_counter()
                st = self.instances.update(self.map, full=full, max_changed=0 if full else LOCK_SLICE)
                held += time.perf_counter() - t0
            if total is None:
                total = dict(st)
            else:
                for k in ("changed", "region", "merged", "new", "left"):
                    total[k] += st[k]
                total["remaining"] = st["remaining"]
            if not st["remaining"] or not st["changed"]:
                break
        total["ms"] = round(held * 1e3, 3)
        return total

    def save(self, path, overwrite: bool = False):
        """Write the map as one map folder ``path`` (``map.npz``, ``map.ply``, ``manifest.json`` with
        the class names; atomic, see :func:`sas_core.geometry.voxel_map.write_map`). The arrays are
        copied incrementally (:class:`sas_core.geometry.voxel_map.MapSnapshot`: ``LOCK_SLICE`` slots
        per lock hold, the lock released in between, so integration and queries go on) into a
        consistent copy, which is written after the lock is released. Returns the folder.

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is False.
        """
        from sas_core.geometry.voxel_map import write_map

        with self.lock:
            snap = self.map.start_snapshot()
        while True:
            with self.lock:
                if snap.step():
                    # the ids as of the snapshot's last slice, in its key order (VoxelMap.export's)
                    instance = self.instances.ids_of(self.map, snap.key_slot)
                    names = list(self.vocabulary) or None
                    voxel_size = snap.map.config.voxel_size
                    break
        data = snap.export()
        data["instance"] = instance
        return write_map(path, data, voxel_size, names, overwrite=overwrite)

    def load(self, path) -> int:
        """Replace the map by one written by :meth:`save` (a map folder, checked against its manifest;
        voxel size must match), with its instance ids (``instance``; a map saved without them gets
        them at the next :meth:`update_instances`). The saved class
        names become the vocabulary when this mapper's text encoder knows them; otherwise the map
        is relabelled with the current vocabulary. Returns the number of voxels.

        Raises:
            Rejected: ``bad_map`` (unreadable, other voxel size, too many voxels).
        """
        try:
            vmap, names = VoxelMap.load(path, self.map.config)
        except (OSError, ValueError, KeyError) as exc:
            raise Rejected("bad_map", f"cannot load map {path}: {exc}") from None
        try:
            saved_ids = _saved_instances(path, len(vmap))
        except (OSError, ValueError, KeyError):  # replaced meanwhile: the ids are regrouped instead
            saved_ids = None
        with self.lock:
            self.map = vmap
            self.instances.reset()
            if saved_ids is not None:
                self.instances.restore(vmap, saved_ids)
            self.n_changes += 1
            for acc in self._accs:
                acc.reset()
            self._accs = []  # fused sums are not saved: a loaded voxel's feature is replaced by
            # the mean over the frames fused after the load
        if self.encoder is not None:
            try:
                self.set_vocabulary(names if names else self.vocabulary, self.template)
            except Rejected:
                if self.vocabulary:
                    self.set_vocabulary(self.vocabulary, self.template)
        return len(vmap)

    def reset(self) -> None:
        """Forget the map (and the fused sums); vocabulary and counters stay."""
        with self.lock:
            self.map.reset()
            self.instances.reset()
            self.n_changes += 1
            if self.class_text is not None:
                self.map.set_anchor(self.class_text)
            self._accs = []

    def __len__(self) -> int:
        return len(self.map)

    def stats(self) -> dict:
        """Plain-data counters: points, frames, sweeps, label passes, evicted, map bytes, mode, ..."""
        with self.lock:
            fused = sum(int(a.sums.numel() * 4) for a in self._accs if a.sums is not None)
            return dict(points=len(self.map), frames=self.n_frames, sweeps=self.n_sweeps, passes=self.n_passes,
                        teacher_frames=self.n_teacher_frames,
                        evicted=int(self.map.n_evicted),
                        map_bytes=int(self.map.memory_bytes()) + fused + self.instances.memory_bytes(),
                        feature_dim=int(self.map.feature_dim), mode=self.mode, vocabulary_size=len(self.vocabulary),
                        instances=self.instances.count(self.map))
