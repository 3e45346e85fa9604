"""OpenScene's preprocessed ScanNet layout: writer (for synthetic scenes) and reader.

Layout (as OpenScene's ``scripts/preprocess`` writes it and its loaders/fusion scripts read it)::

    <root>/<split>/<scene>.pth          torch.save((coords (N,3) f32, colors (N,3) f32 in [-1,1],
                                                    labels (N,) with 255 = ignore))
    <root>/2d/intrinsics.txt            4x4 intrinsics of the (resized) frames, shared
    <root>/2d/<scene>/intrinsics.txt    4x4 intrinsics of this scene (ours; read first if present)
    <root>/2d/<scene>/color/<i>.jpg     RGB frames
    <root>/2d/<scene>/depth/<i>.png     uint16 depth in millimetres (0 = invalid)
    <root>/2d/<scene>/pose/<i>.txt      4x4 camera-to-world (rows of 4 numbers)
    <root>/2d/<scene>/label/<i>.png     optional uint8 class per pixel (255 = none)
    <root>/2d/<scene>/instance/<i>.png  optional uint16 instance id + 1 (0 = none)

OpenScene keeps 3D and 2D under two roots (``scannet_3d/<split>`` and ``scannet_2d``); here both
live under one root, 2D in ``<root>/2d``. ``load_openscene_scene`` also accepts OpenScene's own
roots through ``root_2d``. Every file is written atomically.
"""

from __future__ import annotations

import io as _io
import re
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from sas_core.io import atomic_write_bytes, atomic_write_text, load_torch_file
from sas_core.geometry.camera import depth_image_to_metres
from sas_core.types import IGNORE_LABEL, CameraIntrinsics, Frame, PointCloud

DEPTH_SCALE = 1000.0
"""Depth PNG units per metre (ScanNet: millimetres)."""
SPLITS = ("train", "val", "test")


def _intrinsics_4x4(intr: CameraIntrinsics) -> np.ndarray:
    K = np.eye(4)
    K[:3, :3] = intr.K
    return K


def _matrix_text(M: np.ndarray) -> str:
    return "\n".join(" ".join(repr(float(x)) for x in row) for row in np.asarray(M, np.float64)) + "\n"


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = _io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpg_bytes(rgb: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = _io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def depth_to_png_array(depth: np.ndarray) -> np.ndarray:
    """(H,W) metres (0/NaN invalid) -> (H,W) uint16 millimetres (0 invalid, saturates at 65.535 m)."""
    depth = np.asarray(depth, np.float64)
    mm = np.where(np.isfinite(depth) & (depth > 0), np.round(depth * DEPTH_SCALE), 0.0)
    return np.clip(mm, 0, 65535).astype(np.uint16)


def write_pth(path, positions, colors01, labels) -> None:
    """Write one OpenScene ``.pth``: (coords f32, colors f32 in [-1,1], labels int64 with 255)."""
    import torch

    coords = np.ascontiguousarray(positions, np.float32).reshape(-1, 3)
    colors = np.ascontiguousarray(np.asarray(colors01, np.float32).reshape(-1, 3) * 2.0 - 1.0, np.float32)
    labels = np.ascontiguousarray(labels, np.int64).reshape(-1)
    if not (len(coords) == len(colors) == len(labels)):
        raise ValueError(f"pth rows differ: coords {len(coords)}, colors {len(colors)}, labels {len(labels)}")
    buf = _io.BytesIO()
    torch.save((coords, colors, labels), buf)
    atomic_write_bytes(path, buf.getvalue())


def write_openscene_scene(scene, root, split: str = "train", jpeg_quality: int = 95,
                          with_labels: bool = True, progress: bool = False) -> dict:
    """Write ``scene`` (a SyntheticScene, or anything with .name, .points, .frames, .intrinsics).

    Returns a dict of the paths written: ``pth``, ``dir_2d``, ``intrinsics``, ``n_frames``.
    """
    root = Path(root)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", scene.name):
        raise ValueError(f"scene name {scene.name!r} must be a plain file name")
    pts = scene.points
    if pts is None or len(pts) == 0:
        raise ValueError(f"scene {scene.name} has no points")
    labels = pts.labels if pts.labels is not None else np.full(len(pts), IGNORE_LABEL, np.int64)
    colors = pts.colors if pts.colors is not None else np.full((len(pts), 3), 0.5, np.float32)
    pth = root / split / f"{scene.name}.pth"
    write_pth(pth, pts.positions, colors, labels)

    dir_2d = root / "2d" / scene.name
    K = _intrinsics_4x4(scene.intrinsics)
    atomic_write_text(dir_2d / "intrinsics.txt", _matrix_text(K))
    shared = root / "2d" / "intrinsics.txt"
    if not shared.exists():
        # OpenScene reads this one shared file; a scene with another camera relies on its own copy
        atomic_write_text(shared, _matrix_text(K))
    frames = scene.frames
    if progress:
        from tqdm import tqdm

        frames = tqdm(frames, desc=f"write {scene.name} (OpenScene)", unit="frame", leave=False)
    for i, f in enumerate(frames):
        atomic_write_bytes(dir_2d / "color" / f"{i}.jpg", _jpg_bytes(f.color, jpeg_quality))
        atomic_write_bytes(dir_2d / "depth" / f"{i}.png", _png_bytes(depth_to_png_array(f.depth)))
        atomic_write_text(dir_2d / "pose" / f"{i}.txt", _matrix_text(f.pose))
        if with_labels and f.semantic is not None:
            sem = np.where((f.semantic >= 0) & (f.semantic < 255), f.semantic, 255).astype(np.uint8)
            atomic_write_bytes(dir_2d / "label" / f"{i}.png", _png_bytes(sem))
        if with_labels and f.instance is not None:
            inst = np.clip(f.instance + 1, 0, 65535).astype(np.uint16)
            atomic_write_bytes(dir_2d / "instance" / f"{i}.png", _png_bytes(inst))
    return {"pth": pth, "dir_2d": dir_2d, "intrinsics": dir_2d / "intrinsics.txt", "n_frames": len(scene.frames)}


# ----------------------------------------------------------------------------------------------
# Reading

def read_pth(path):
    """Load an OpenScene ``.pth`` -> (coords (N,3) f32, colors (N,3) f32 in [-1,1], labels (N,) i64).

    The file is ``(coords, colors[, labels])`` (OpenScene) or a dict with ``coords``/``positions``,
    ``colors``, ``labels``; read as data (:func:`sas_core.io.load_torch_file`: NumPy arrays and
    tensors, never code). Labels -100 (some OpenScene files) and others outside [0, 255) become 255;
    missing labels are all 255.
    """
    path = Path(path)
    data = load_torch_file(path, what="OpenScene point file")
    if isinstance(data, dict):
        coords = data.get("coords", data.get("positions"))
        if coords is None:
            raise ValueError(f"{path}: a dict point file needs 'coords' (or 'positions'), has {sorted(map(str, data))}")
        if data.get("colors") is None:
            raise ValueError(f"{path}: a dict point file needs 'colors'")
        data = (coords, data["colors"], data.get("labels"))
    if not isinstance(data, (tuple, list)) or len(data) < 2:
        raise ValueError(f"{path}: expected a tuple (coords, colors[, labels]), got {type(data).__name__}")
    arrays = [None if a is None else a.numpy() if hasattr(a, "numpy") else np.asarray(a) for a in data[:3]]
    if arrays[0] is None or arrays[1] is None:
        raise ValueError(f"{path}: coords and colors are required")
    coords = arrays[0].astype(np.float32).reshape(-1, 3) if arrays[0].size % 3 == 0 else None
    if coords is None or arrays[0].ndim != 2:
        raise ValueError(f"{path}: coords must be (N, 3), got {arrays[0].shape}")
    colors = arrays[1].astype(np.float32)
    if colors.shape != coords.shape:
        raise ValueError(f"{path}: colors {colors.shape} do not match coords {coords.shape}")
    if len(arrays) > 2 and arrays[2] is not None and arrays[2].size:
        raw = arrays[2].reshape(-1)
        if len(raw) != len(coords):
            raise ValueError(f"{path}: {len(raw)} labels for {len(coords)} points")
        labels = np.round(raw).astype(np.int64)
        labels[(labels < 0) | (labels > 255)] = IGNORE_LABEL
    else:
        labels = np.full(len(coords), IGNORE_LABEL, np.int64)
    if not np.all(np.isfinite(coords)):
        raise ValueError(f"{path}: coords contain NaN or inf")
    return coords, colors, labels


def _find_pth(root: Path, name: str, split: Optional[str]) -> Path:
    if split:
        splits = [split]
    elif root.is_dir():
        others = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in SPLITS + ("2d",))
        splits = list(SPLITS) + others
    else:
        splits = []
    tried = []
    for s in splits:
        for fname in (f"{name}.pth", f"{name}_vh_clean_2.pth"):
            p = root / s / fname
            tried.append(p)
            if p.is_file():
                return p
    if not root.is_dir():
        raise FileNotFoundError(f"OpenScene root not found: {root}")
    shown = ", ".join(map(str, tried[:4]))
    raise FileNotFoundError(f"no point file for scene {name!r} under {root} (tried {shown}, ...)")


def _read_matrix(path: Path, what: str) -> np.ndarray:
    try:
        M = np.loadtxt(path, dtype=np.float64)
    except OSError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not a matrix of numbers ({exc})") from exc
    if M.shape not in ((4, 4), (3, 3)):
        raise ValueError(f"{path}: {what} must be 4x4 (or 3x3), got shape {M.shape}")
    return M


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            if im.mode in ("RGBA", "P", "L") and path.suffix.lower() == ".jpg":
                im = im.convert("RGB")
            return np.array(im)
    except OSError as exc:
        raise ValueError(f"cannot decode image {path}: {exc}") from exc


def frame_indices(dir_2d) -> list[int]:
    """Sorted numeric indices of ``color/<i>.jpg`` in a scene's 2D folder."""
    color = Path(dir_2d) / "color"
    if not color.is_dir():
        raise FileNotFoundError(f"no color/ folder in {dir_2d}")
    idx = [int(p.stem) for p in color.glob("*.jpg") if p.stem.isdigit()]
    return sorted(idx)


def iter_openscene_frames(dir_2d, intrinsics_path=None, skip_invalid_poses: bool = True) -> Iterator[Frame]:
    """Yield the Frames of one scene's 2D folder in index order.

    Depth is converted to metres (0 stays invalid); ``semantic``/``instance`` are filled when
    ``label/``/``instance/`` images exist. ``stamp`` is the frame index (the layout has no times).
    Frames whose pose is not finite (ScanNet marks lost tracking with -inf) are skipped.
    """
    dir_2d = Path(dir_2d)
    if intrinsics_path is None:
        own = dir_2d / "intrinsics.txt"
        intrinsics_path = own if own.is_file() else dir_2d.parent / "intrinsics.txt"
    K = _read_matrix(Path(intrinsics_path), "intrinsics")
    for i in frame_indices(dir_2d):
        color = _read_image(dir_2d / "color" / f"{i}.jpg")
        if color.ndim != 3 or color.shape[2] != 3:
            raise ValueError(f"{dir_2d / 'color' / f'{i}.jpg'}: expected an RGB image, got shape {color.shape}")
        depth_raw = _read_image(dir_2d / "depth" / f"{i}.png")
        if depth_raw.ndim != 2:
            raise ValueError(f"{dir_2d / 'depth' / f'{i}.png'}: depth must be one channel, got {depth_raw.shape}")
        pose = _read_matrix(dir_2d / "pose" / f"{i}.txt", "pose")
        if pose.shape != (4, 4):
            raise ValueError(f"{dir_2d / 'pose' / f'{i}.txt'}: pose must be 4x4")
        if not np.all(np.isfinite(pose)):
            if skip_invalid_poses:
                continue
            raise ValueError(f"{dir_2d / 'pose' / f'{i}.txt'}: pose is not finite")
        h, w = depth_raw.shape
        if color.shape[:2] != (h, w):
            # OpenScene's frames share one size; a mismatch means a broken export
            raise ValueError(f"frame {i} of {dir_2d}: color {color.shape[:2]} and depth {(h, w)} differ in size")
        intr = CameraIntrinsics.from_matrix(K, w, h)
        semantic = instance = None
        lab = dir_2d / "label" / f"{i}.png"
        if lab.is_file():
            semantic = _read_image(lab).astype(np.int64)
        ins = dir_2d / "instance" / f"{i}.png"
        if ins.is_file():
            instance = _read_image(ins).astype(np.int64) - 1
        depth = depth_image_to_metres(depth_raw, "16UC1", DEPTH_SCALE) if depth_raw.dtype.kind in "ui" \
            else depth_raw.astype(np.float32) / DEPTH_SCALE
        yield Frame(color=color.astype(np.uint8), depth=depth,
                    intrinsics=intr, pose=pose, stamp=float(i), semantic=semantic, instance=instance,
                    frame_id="camera_color_optical_frame")


def load_openscene_scene(root, name: str, split: Optional[str] = None,
                         root_2d=None) -> tuple[PointCloud, Iterator[Frame]]:
    """Read one scene -> (PointCloud with colors in [0,1] and labels, iterator of Frames).

    ``root_2d`` defaults to ``<root>/2d`` (OpenScene's separate ``scannet_2d`` also works). The
    frame iterator is empty when the scene has no 2D folder.
    """
    root = Path(root)
    coords, colors, labels = read_pth(_find_pth(root, name, split))
    cloud = PointCloud(positions=coords, colors=np.clip((colors + 1.0) / 2.0, 0.0, 1.0).astype(np.float32),
                       labels=labels)
    dir_2d = Path(root_2d) / name if root_2d is not None else root / "2d" / name
    frames = iter_openscene_frames(dir_2d) if (dir_2d / "color").is_dir() else iter(())
    return cloud, frames


def list_scenes(root, split: str = "train") -> list[str]:
    """Names of the scenes with a ``.pth`` in ``<root>/<split>``."""
    d = Path(root) / split
    if not d.is_dir():
        raise FileNotFoundError(f"no split folder {d}")
    return sorted(p.stem for p in d.glob("*.pth"))
