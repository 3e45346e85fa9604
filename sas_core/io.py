"""Atomic file writing and PLY point-cloud / mesh files.

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


# NumPy dtype -> PLY type name of the properties write_ply writes.
_PLY_TYPES = {np.dtype("float32"): "float", np.dtype("float64"): "double", np.dtype("uint8"): "uchar",
              np.dtype("int32"): "int", np.dtype("uint32"): "uint", np.dtype("int16"): "short",
              np.dtype("uint16"): "ushort", np.dtype("int8"): "char"}


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
    """Read the vertex table (and triangles) of a PLY file: point clouds and meshes such as ScanNet's
    ``_vh_clean_2.ply`` (vertex + face elements), binary little/big endian or ASCII, via ``plyfile``.

    Returns a dict of (N,) arrays by vertex property name (``x``, ``red``, ``label``, ...), plus
    ``positions`` (N, 3) and, when the file has a face element, ``faces`` (F, 3) int64 vertex
    indices of its triangles (polygons are fanned into triangles).

    Memory stays bounded by the file size: the element counts of the header are checked against
    the bytes that follow it before anything is allocated (``plyfile`` itself allocates
    count x row size up front, 12 GB for a 100-byte file claiming a billion vertices). Every
    malformed file raises ValueError naming the file.
    """
    from plyfile import PlyData, PlyParseError

    path = Path(path)
    try:
        with open(path, "rb") as f:
            header = PlyData._parse_header(f)  # header only (plyfile has no public header reader)
            data_bytes = os.fstat(f.fileno()).st_size - f.tell()
    except PlyParseError as exc:
        raise ValueError(f"{path}: not a PLY file or a broken header ({exc})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a PLY file (the header is not text)") from None
    names = [e.name for e in header.elements]
    if "vertex" not in names:
        raise ValueError(f"{path}: PLY file has no vertex element (elements: {', '.join(names) or 'none'})")
    _check_ply_sizes(path, header, data_bytes)
    try:
        ply = PlyData.read(str(path), mmap=False)
        vertex = ply["vertex"].data
        out = {name: np.array(vertex[name]) for name in vertex.dtype.names}
        faces = _ply_triangles(ply["face"]) if "face" in names else None
    except (PlyParseError, ValueError, KeyError, IndexError) as exc:
        raise ValueError(f"{path}: malformed PLY data ({exc})") from None
    missing = [k for k in ("x", "y", "z") if k not in out]
    if missing:
        raise ValueError(f"{path}: PLY vertices have no {'/'.join(missing)} coordinate")
    out["positions"] = np.stack([out["x"], out["y"], out["z"]], axis=1).astype(np.float32, copy=False)
    if faces is not None:
        if len(faces) and (faces.min() < 0 or faces.max() >= len(out["positions"])):
            raise ValueError(f"{path}: PLY faces index vertices outside 0..{len(out['positions']) - 1}")
        out["faces"] = faces
    return out


def _check_ply_sizes(path, header, data_bytes: int) -> None:
    """Refuse element counts the file's remaining bytes cannot hold (before plyfile allocates)."""
    need = 0
    for element in header.elements:
        row = 0
        for prop in element.properties:
            if hasattr(prop, "len_dtype"):  # list property: at least its length field per row
                row += 1 if header.text else np.dtype(prop.len_dtype).itemsize
            else:
                row += 1 if header.text else np.dtype(prop.val_dtype).itemsize
        need += int(element.count) * max(row, 1)
        if need > data_bytes:
            raise ValueError(f"{path}: PLY header declares {element.count} {element.name} rows, more than the "
                             f"file's {data_bytes} bytes of data can hold (truncated or corrupt file)")


def _ply_triangles(face) -> np.ndarray:
    """(F, 3) int64 triangles of a PLY face element (``vertex_indices`` or ``vertex_index``)."""
    names = face.data.dtype.names
    key = next((k for k in ("vertex_indices", "vertex_index") if k in names), None)
    if key is None:
        raise ValueError(f"face element has no vertex_indices list (properties: {', '.join(names)})")
    polys = face.data[key]
    if len(polys) == 0:
        return np.zeros((0, 3), np.int64)
    lengths = np.fromiter((len(p) for p in polys), np.int64, count=len(polys))
    if (lengths == 3).all():
        return np.stack(polys).astype(np.int64)
    if (lengths < 3).any():
        raise ValueError("a PLY face has fewer than 3 vertices")
    tris = [np.stack([np.full(n - 2, poly[0]), poly[1:n - 1], poly[2:n]], 1) for poly, n in zip(polys, lengths)]
    return np.concatenate(tris).astype(np.int64)
