"""OpenScene's fused 2D feature files: read and write them (per scene, single or multi-file).

OpenScene's fusion scripts (``scripts/feature_fusion/*.py``) save, per scene, ``torch.save`` of
a dict

* ``"feat"``: (M, C) float16 fused features of the points selected by the mask, in point order;
* ``"mask_full"``: (N,) bool over *all* N points of the scene's ``.pth`` file (a torch tensor;
  some releases store a NumPy array).

C is 512 for LSeg features and 768 for OpenSeg. Naming:

* ScanNet and Matterport3D: ``<scene>_<k>.pt`` for k = 0..K-1. The training split has K = 5
  files, each for a random subset of ``n_split_points`` = 20000 points intersected with the
  visible points (so the files differ); val/test have K = 1 with every visible point
  (ScanNet's scene name drops the ``_vh_clean_2`` of its ``.pth`` file);
* nuScenes: one file ``<scene>.pt``; its ``mask_full`` marks visible points among all points.

A legacy three-key layout (``feat`` for every point of the chunk, ``mask`` = the visible ones
among them, ``mask_full`` = the chunk) is read too and converted to the two-key layout, and a
trailing singleton feature axis (``(M, C, 1)``) is dropped, as OpenScene's loader does.

Files are written atomically (temporary file in the same folder, fsync, rename). Files are read
as data with :func:`sas_core.io.load_torch_file` (no code execution; NumPy masks allowed).
:class:`sas_core.teachers.precomputed.PrecomputedTeacher` serves these files as a 3D teacher.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import numpy as np

from sas_core.io import atomic_path, load_torch_file

__all__ = [
    "KNOWN_DIMS",
    "scene_name",
    "fused_feature_paths",
    "save_fused_features",
    "load_fused_features",
    "save_scene_features",
    "load_scene_features",
]

#: Feature sizes of OpenScene's released fused features.
KNOWN_DIMS = {512: "lseg", 768: "openseg"}

_CHUNK = re.compile(r"^(?P<scene>.+)_(?P<k>\d+)\.pt$")


def scene_name(path_or_name: str) -> str:
    """Scene id of a ``.pth`` point file or a name: drops folders, ``.pth`` and ScanNet's ``_vh_clean_2``."""
    name = Path(str(path_or_name)).name
    if name.endswith(".pth"):
        name = name[: -len(".pth")]
    if name.endswith("_vh_clean_2"):
        name = name[: -len("_vh_clean_2")]
    return name


def fused_feature_paths(feature_dir, scene: str) -> List[Path]:
    """The fused-feature files of ``scene`` in ``feature_dir``: ``<scene>_<k>.pt`` sorted by k, or
    ``[<scene>.pt]`` (nuScenes naming). Empty if there are none."""
    feature_dir = Path(feature_dir)
    scene = scene_name(scene)
    chunks = []
    for p in feature_dir.glob(f"{_glob_escape(scene)}_*.pt"):
        m = _CHUNK.match(p.name)
        if m and m.group("scene") == scene:
            chunks.append((int(m.group("k")), p))
    if chunks:
        return [p for _, p in sorted(chunks)]
    single = feature_dir / f"{scene}.pt"
    return [single] if single.exists() else []


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _as_bool_tensor(mask, what: str, path):
    import torch

    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{path}: {what} is a {type(mask).__name__}, expected a tensor or array")
    return mask


def load_fused_features(path, dim: Optional[int] = None):
    """Read one OpenScene fused-feature file.

    Args:
        path: the ``.pt`` file.
        dim: expected feature size (e.g. 512 for LSeg, 768 for OpenSeg); checked if given.

    Returns:
        feat: (M, C) float16 tensor, the features of the points where ``mask_full`` is True.
        mask_full: (N,) bool tensor over all points of the scene.

    Raises FileNotFoundError for a missing file and ValueError for anything malformed.
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"fused-feature file not found: {path}")
    data = load_torch_file(path, what="fused-feature file")
    if not isinstance(data, dict) or "feat" not in data or "mask_full" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected a dict with 'feat' and 'mask_full', got {keys}")
    feat = data["feat"]
    if isinstance(feat, np.ndarray):
        feat = torch.from_numpy(feat)
    if not isinstance(feat, torch.Tensor) or not feat.is_floating_point():
        raise ValueError(f"{path}: 'feat' must be a floating-point tensor")
    if feat.dim() == 3 and feat.shape[2] == 1:
        feat = feat[..., 0]
    if feat.dim() != 2:
        raise ValueError(f"{path}: 'feat' must be (M, C), got shape {tuple(feat.shape)}")
    mask_full = _as_bool_tensor(data["mask_full"], "mask_full", path).reshape(-1).bool()
    if "mask" in data:  # legacy layout: feat covers the whole chunk, mask marks the visible rows
        if feat.shape[0] != int(mask_full.sum()):
            raise ValueError(f"{path}: legacy 'feat' has {feat.shape[0]} rows, chunk has {int(mask_full.sum())}")
        vis = _as_bool_tensor(data["mask"], "mask", path).reshape(-1)
        keep = torch.zeros(feat.shape[0], dtype=torch.bool)
        keep[vis.long() if vis.dtype != torch.bool else vis] = True
        chunk_idx = mask_full.nonzero().squeeze(1)
        mask_full = torch.zeros_like(mask_full)
        mask_full[chunk_idx[keep]] = True
        feat = feat[keep]
    if feat.shape[0] != int(mask_full.sum()):
        raise ValueError(f"{path}: 'feat' has {feat.shape[0]} rows but mask_full selects {int(mask_full.sum())}")
    if dim is not None and feat.shape[1] != dim:
        raise ValueError(f"{path}: features are {feat.shape[1]}-d, expected {dim}-d")
    return feat.to(torch.float16), mask_full


def save_fused_features(path, features, mask_full) -> Path:
    """Write one OpenScene fused-feature file atomically.

    Args:
        path: destination ``.pt``.
        features: (M, C) features of the points where ``mask_full`` is True, or (N, C) features of
            every point (then the masked rows are taken). Stored as float16.
        mask_full: (N,) bool over all points of the scene.
    """
    import torch

    mask_full = torch.as_tensor(np.asarray(mask_full) if not isinstance(mask_full, torch.Tensor) else mask_full)
    mask_full = mask_full.reshape(-1).to("cpu").bool()
    feat = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
    feat = feat.detach().to("cpu")
    if feat.dim() != 2:
        raise ValueError(f"features must be (M, C), got shape {tuple(feat.shape)}")
    m = int(mask_full.sum())
    if feat.shape[0] == mask_full.shape[0] and feat.shape[0] != m:
        feat = feat[mask_full]
    if feat.shape[0] != m:
        raise ValueError(f"features have {feat.shape[0]} rows; mask_full selects {m} of {mask_full.shape[0]}")
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"feat": feat.to(torch.float16).contiguous(), "mask_full": mask_full}, tmp)
    return path


def save_scene_features(feature_dir, scene: str, features, mask, n_files: int = 1,
                        n_split_points: Optional[int] = None, single_file: bool = False,
                        seed: int = 1457) -> List[Path]:
    """Write a scene's fused features as OpenScene does.

    Args:
        feature_dir: output folder.
        scene: scene id (or its ``.pth`` path).
        features: (N, C) fused features of every point (rows outside ``mask`` are ignored).
        mask: (N,) bool, points that received a feature.
        n_files: number of files ``<scene>_0.pt ... <scene>_{n_files-1}.pt`` (OpenScene: 5 for
            training scenes, 1 otherwise).
        n_split_points: if set, each file keeps a random subset of this many points (before
            intersecting with ``mask``), as OpenScene's training files (20000).
        single_file: write one ``<scene>.pt`` (nuScenes naming) instead.
        seed: random subsets are drawn from this seed (OpenScene uses 1457).

    Returns the written paths.
    """
    import torch

    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).reshape(-1).cpu().bool()
    n = mask.shape[0]
    if features.shape[0] != n:
        raise ValueError(f"features have {features.shape[0]} rows for {n} points")
    if n_files < 1:
        raise ValueError(f"n_files must be >= 1, got {n_files}")
    scene = scene_name(scene)
    if single_file:
        return [save_fused_features(Path(feature_dir) / f"{scene}.pt", features, mask)]
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n_files):
        chunk = mask
        if n_split_points is not None and n_split_points < n:
            pick = torch.zeros(n, dtype=torch.bool)
            pick[torch.from_numpy(rng.choice(n, n_split_points, replace=False))] = True
            chunk = mask & pick
        paths.append(save_fused_features(Path(feature_dir) / f"{scene}_{k}.pt", features, chunk))
    return paths


def load_scene_features(feature_dir, scene: str, n_points: Optional[int] = None, file: Optional[int] = None,
                        dim: Optional[int] = None):
    """A scene's fused features as a dense :class:`~sas_core.geometry.multiview.FusedFeatures`.

    Args:
        feature_dir: folder with OpenScene fused-feature files.
        scene: scene id (or its ``.pth`` path).
        n_points: the scene's point count, checked against ``mask_full``.
        file: read only ``<scene>_<file>.pt``; default: merge every file of the scene (they are
            subsets of one fusion, so where they overlap they agree; the first file wins).
        dim: expected feature size, checked.

    Returns:
        FusedFeatures with (N, C) float16 features (zero where no file has the point), mask (N,),
        counts (N,) int32 (1 where a feature exists: the files do not keep view counts).
    """
    import torch

    from sas_core.geometry.multiview import FusedFeatures

    paths = fused_feature_paths(feature_dir, scene)
    if not paths:
        raise FileNotFoundError(f"no fused features for scene {scene_name(scene)!r} in {feature_dir} "
                                f"(expected {scene_name(scene)}_0.pt ... or {scene_name(scene)}.pt)")
    if file is not None:
        want = Path(feature_dir) / f"{scene_name(scene)}_{file}.pt"
        if want not in paths:
            raise FileNotFoundError(f"fused-feature file not found: {want}")
        paths = [want]
    features = mask = None
    for p in paths:
        feat, m = load_fused_features(p, dim)
        if n_points is not None and m.shape[0] != n_points:
            raise ValueError(f"{p}: mask_full has {m.shape[0]} points, the scene has {n_points}")
        if features is None:
            features = torch.zeros(m.shape[0], feat.shape[1], dtype=torch.float16)
            mask = torch.zeros(m.shape[0], dtype=torch.bool)
        elif m.shape[0] != mask.shape[0] or feat.shape[1] != features.shape[1]:
            raise ValueError(f"{p}: does not match the other files of the scene in size")
        new = m & ~mask
        features[new] = feat[new[m]]
        mask |= m
    return FusedFeatures(features, mask, mask.to(torch.int32))



TEXT_SPACE_FILE = "text_space.json"
"""Written by ``sas fuse`` beside the feature files: which text space the features live in."""

_TEXT_SPACE_MAX_BYTES = 1 << 20


def write_text_space(feature_dir, text_encoder: dict, teacher: str) -> Path:
    """Record the text space of a folder of fused features (``text_space.json``, atomic).

    ``text_encoder`` is the teacher's text encoder ``.config()``; a folder already recording another
    text space is refused (features of two spaces in one folder cannot be distilled together)."""
    import json

    from sas_core.io import atomic_write_text

    feature_dir = Path(feature_dir)
    record = {"text_encoder": dict(text_encoder), "teacher": str(teacher)}
    have = read_text_space(feature_dir)
    if have is not None and have["text_encoder"] != record["text_encoder"]:
        raise ValueError(f"{feature_dir} holds features in another text space ({_describe(have['text_encoder'])}, "
                         f"teacher {have.get('teacher')}); write {teacher}'s features into another folder")
    feature_dir.mkdir(parents=True, exist_ok=True)
    path = feature_dir / TEXT_SPACE_FILE
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def read_text_space(feature_dir) -> Optional[dict]:
    """The record :func:`write_text_space` wrote, or None (folders from OpenScene's scripts have none)."""
    import json

    path = Path(feature_dir) / TEXT_SPACE_FILE
    if not path.is_file():
        return None
    if path.stat().st_size > _TEXT_SPACE_MAX_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes is too large for a text space record")
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a text space record ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text_encoder"), dict) \
            or "kind" not in record["text_encoder"]:
        raise ValueError(f"{path}: not a text space record (needs a text_encoder with a kind)")
    return record


def _describe(encoder: dict) -> str:
    if encoder.get("kind") == "open_clip":
        return f"open_clip {encoder.get('model')}"
    return f"{encoder.get('kind')} ({encoder.get('dim', '?')}-d)"
