"""Atomic file writing and PLY point-cloud files.

Every file the library writes goes through :func:`atomic_path` / :func:`atomic_write_bytes`: the
data is written to a temporary file in the destination folder, flushed to disk, then renamed over
the destination, so a crash or a full disk never leaves a half-written file behind (the previous
version, if any, survives).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path, suffix: Optional[str] = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``.

    ``suffix`` defaults to the destination's suffix, so writers that infer the format from the
    file name (``np.savez`` adds ``.npz``, Open3D looks at ``.ply``) keep working.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix if suffix is not None else path.suffix,
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# PLY properties we write, in order: (name, numpy dtype, PLY type name).
_PLY_TYPES = {np.dtype("float32"): "float", np.dtype("float64"): "double", np.dtype("uint8"): "uchar",
              np.dtype("int32"): "int", np.dtype("uint32"): "uint", np.dtype("int16"): "short",
              np.dtype("uint16"): "ushort", np.dtype("int8"): "char"}
_PLY_NAMES = {v: k for k, v in _PLY_TYPES.items()}


def write_ply(path, positions, colors=None, normals=None, labels=None, scores=None, **extra) -> None:
    """Write a binary little-endian PLY point cloud atomically.

    Args:
        positions: (N, 3) float coordinates.
        colors: optional (N, 3) uint8, or float in [0, 1] (converted to uint8).
        normals: optional (N, 3) float.
        labels: optional (N,) integer class ids (``label`` int32, so -1 survives).
        scores: optional (N,) float relevance scores (``score`` float32).
        extra: more (N,) scalar properties, written with their own dtype.
    """
    positions = np.asarray(positions, dtype=np.float32).reshape(-1, 3)
    n = len(positions)
    columns = [("x", positions[:, 0]), ("y", positions[:, 1]), ("z", positions[:, 2])]
    if normals is not None:
        normals = np.asarray(normals, dtype=np.float32).reshape(n, 3)
        columns += [("nx", normals[:, 0]), ("ny", normals[:, 1]), ("nz", normals[:, 2])]
    if colors is not None:
        colors = np.asarray(colors)
        if colors.dtype != np.uint8:
            colors = np.clip(np.round(colors.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
        colors = colors.reshape(n, 3)
        columns += [("red", colors[:, 0]), ("green", colors[:, 1]), ("blue", colors[:, 2])]
    if labels is not None:
        columns.append(("label", np.asarray(labels).astype(np.int32).reshape(n)))
    if scores is not None:
        columns.append(("score", np.asarray(scores, dtype=np.float32).reshape(n)))
    for name, values in extra.items():
        values = np.asarray(values).reshape(n)
        if values.dtype not in _PLY_TYPES:
            values = values.astype(np.float32)
        columns.append((name, values))
    dtype = np.dtype([(name, values.dtype.newbyteorder("<")) for name, values in columns])
    table = np.empty(n, dtype=dtype)
    for name, values in columns:
        table[name] = values
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property {_PLY_TYPES[values.dtype.newbyteorder('=')]} {name}" for name, values in columns]
    header.append("end_header")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(("\n".join(header) + "\n").encode("ascii"))
            f.write(table.tobytes())


def read_ply(path) -> dict:
    """Read a binary little-endian PLY vertex table written by :func:`write_ply` (or similar).

    Returns a dict of (N,) arrays by property name, plus ``positions`` (N, 3).
    """
    path = Path(path)
    with open(path, "rb") as f:
        if f.readline().strip() != b"ply":
            raise ValueError(f"{path} is not a PLY file")
        fmt, n, props = None, None, []
        while True:
            line = f.readline()
            if not line:
                raise ValueError(f"{path}: PLY header has no end_header")
            words = line.decode("ascii", "replace").split()
            if not words:
                continue
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                if words[1] != "vertex":
                    break
                n = int(words[2])
            elif words[0] == "property" and n is not None:
                if words[1] == "list" or words[1] not in _PLY_NAMES:
                    raise ValueError(f"{path}: unsupported PLY property {' '.join(words[1:])}")
                props.append((words[2], _PLY_NAMES[words[1]].newbyteorder("<")))
            elif words[0] == "end_header":
                break
        if fmt != "binary_little_endian" or n is None:
            raise ValueError(f"{path}: only binary_little_endian vertex PLY is supported (got {fmt})")
        table = np.frombuffer(f.read(np.dtype(props).itemsize * n), dtype=np.dtype(props), count=n)
    out = {name: np.array(table[name]) for name, _ in props}
    out["positions"] = np.stack([out["x"], out["y"], out["z"]], axis=1)
    return out
