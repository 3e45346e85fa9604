"""Atomic file writing, PLY point-cloud / mesh files, and the one safe loader of ``.pt``/``.pth`` files.

Every file the library writes goes through :func:`atomic_path` / :func:`atomic_write_bytes`: the
data is written to a temporary file in the destination folder, flushed to disk, then renamed over
the destination, so a crash or a full disk never leaves a half-written file behind (the previous
version, if any, survives).

Every ``.pt`` / ``.pth`` / ``.pth.tar`` file the library reads goes through
:func:`load_torch_file`: files are data, never code (no unpickling; one allow-list).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import tempfile
import threading
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


# ------------------------------------------------------------------------------------------------
# Folders written as one unit, confined under a root

#: Name of the temporary sibling of a folder being written: ``.<name>.tmp-<pid>-<random>``.
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-(?P<rand>[0-9a-z]{8})$")

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2(src, dst, flags)``. True when done; False when the call or the flag is not
    available here (other OS, old libc, a filesystem without it); OSError for real failures
    (FileExistsError for RENAME_NOREPLACE onto an existing path)."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(str(src)), at_fdcwd, os.fsencode(str(dst)), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def fsync_dir(path) -> None:
    """fsync a directory (its entries: a rename inside it becomes durable)."""
    fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_dir(path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder ``.<name>.tmp-<pid>-<random>`` next to ``path``; on success
    every file in it is fsynced, it is renamed onto ``path`` and the parent folder is fsynced, so
    readers see either the previous folder or the complete new one, never a mix.

    An existing ``path`` is refused (FileExistsError) unless ``overwrite``; then the two folders are
    swapped atomically (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere the old folder is moved
    aside first, leaving a moment without ``path``) and the old one is deleted. On any error the
    temporary folder is removed; one left by a killed process is removed by
    :func:`clean_temp_dirs`.
    """
    import secrets
    import shutil
    import string

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (set overwrite to replace it)")
    rand = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{rand}"
    tmp.mkdir(mode=0o777 & ~_umask())
    try:
        yield tmp
        _fsync_tree(tmp)
        old = _commit_dir(tmp, path, overwrite, aside=path.parent / f".{path.name}.tmp-{os.getpid()}-{rand[::-1]}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _commit_dir(tmp: Path, path: Path, overwrite: bool, aside: Path) -> Optional[Path]:
    """Rename ``tmp`` onto ``path`` (see atomic_dir); returns where the replaced folder now is."""
    try:
        if _renameat2(tmp, path, _RENAME_NOREPLACE):
            return None
        if not path.exists():
            os.rename(tmp, path)
            return None
    except FileExistsError:
        pass
    if not overwrite:
        raise FileExistsError(f"{path} exists (set overwrite to replace it)")
    if _renameat2(tmp, path, _RENAME_EXCHANGE):
        return tmp
    os.rename(path, aside)
    os.rename(tmp, path)
    return aside


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_temp_dirs(root) -> list:
    """Remove what :func:`atomic_dir` left under ``root`` when its process was killed: entries named
    ``.<name>.tmp-<pid>-<random>`` whose process is gone (nothing else; symlinks are not followed).
    Returns the removed paths."""
    import shutil

    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        for name in list(dirs) + files:
            m = TEMP_PATTERN.match(name)
            if m is None or _pid_alive(int(m["pid"])):
                continue
            p = Path(dirpath) / name
            if name in dirs:
                dirs.remove(name)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
    return removed


def confined_path(root, name) -> Path:
    """``root / name`` for a name (or relative path) that stays inside ``root``; ValueError otherwise.

    Refused: empty names, absolute paths, ``..`` components, NUL bytes, components starting with
    ``.`` (hidden and temporary names), and any path whose real location (symlinks resolved,
    also of the folders above it) is not inside the real ``root``. Suffixes are kept as given.
    """
    name = str(name)
    if not name.strip():
        raise ValueError("empty map name")
    if "\0" in name:
        raise ValueError("map name contains a NUL byte")
    if len(name) > 255:
        raise ValueError(f"map name of {len(name)} characters, more than 255")
    if os.path.isabs(name) or name.startswith("~"):
        raise ValueError(f"map name {name[:80]!r} is absolute: give a name or relative path under map_dir")
    parts = Path(name).parts
    if any(p == ".." for p in parts):
        raise ValueError(f"map name {name[:80]!r} contains '..': give a name or relative path under map_dir")
    if any(p.startswith(".") for p in parts):
        raise ValueError(f"map name {name[:80]!r} has a component starting with '.' (hidden/temporary names "
                         "are reserved)")
    real_root = Path(os.path.realpath(root))
    path = real_root.joinpath(*parts)
    real = Path(os.path.realpath(path))
    if real_root not in real.parents:
        raise ValueError(f"map name {name[:80]!r} leaves map_dir (through a symlink)")
    return path


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (read in chunks)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


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


# ------------------------------------------------------------------------------------------------
# .pt / .pth / .pth.tar files: data, never code

class UnsafeFileError(ValueError):
    """A ``.pt``/``.pth`` file holds a Python object outside the allow-list (it could run code)."""

    def __init__(self, path, refused: str):
        self.path = str(path)
        self.refused = refused
        super().__init__(
            f"{path}: refused to load {refused}: unpickling it could run arbitrary code, so SAS-ROS reads "
            ".pt/.pth files as data only (tensors, NumPy arrays, plain Python types). If the file comes "
            "from a source you trust (e.g. an official OpenScene/SAS release), convert it once with "
            f"`sas import-checkpoint --trust {path} OUT.pt` (a 3D checkpoint) or "
            f"`sas import-checkpoint --trust --data {path} OUT` (a point or feature file) and use OUT")


_TORCH_LOAD_LOCK = threading.Lock()  # safe_globals changes a process-wide list


def torch_safe_globals() -> list:
    """The ONE allow-list of Python globals a ``.pt``/``.pth`` file may name (beyond torch's own
    tensor/storage rebuilders and plain containers such as dict, list, tuple, OrderedDict).

    NumPy arrays, dtypes and scalars as pickled by NumPy 1.x (``numpy.core.*``) and 2.x
    (``numpy._core.*``): what OpenScene point files, fused features and release checkpoints
    (``best_iou`` as a NumPy scalar) hold. Nothing that can call arbitrary code: no
    ``argparse.Namespace``, no classes of other libraries.
    """
    import numpy

    core = getattr(numpy, "_core", None) or numpy.core  # NumPy 2.x name first
    recon, scalar = core.multiarray._reconstruct, core.multiarray.scalar
    out = [numpy.ndarray, numpy.dtype, recon, scalar,
           # the same functions under the other major version's module name (pickles name them)
           (recon, "numpy.core.multiarray._reconstruct"), (recon, "numpy._core.multiarray._reconstruct"),
           (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    dtypes = getattr(numpy, "dtypes", None)  # DType classes (NumPy >= 1.25)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in sorted(dir(dtypes)) if n.endswith("DType")]
    return out


def _refused_global(message: str) -> Optional[str]:
    import re

    m = re.search(r"GLOBAL ([\w.]+)", message)
    return m.group(1) if m else None


def load_torch_file(path, map_location="cpu", what: str = "file", mmap: bool = False):
    """Load a ``.pt`` / ``.pth`` / ``.pth.tar`` file as data: the ONE loader of such files.

    ``torch.load(weights_only=True)`` with :func:`torch_safe_globals` allowed; nothing is ever
    unpickled beyond that (the only exception is ``sas import-checkpoint --trust``, run by a user
    on a file they trust).

    Args:
        path: the file.
        map_location: as for ``torch.load``.
        what: what the file is, for error messages ("checkpoint", "OpenScene point file", ...).
        mmap: map the tensors' storage instead of reading it (cheap look at the keys of a large
            zip-format file).

    Raises:
        FileNotFoundError: no such file.
        UnsafeFileError: the file names a type outside the allow-list (a ValueError; nothing of it ran).
        ValueError: empty, truncated or not a torch file.
    """
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty {what}")
    try:
        with _TORCH_LOAD_LOCK, torch.serialization.safe_globals(torch_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        refused = _refused_global(str(e))
        if refused is not None:
            raise UnsafeFileError(path, f"the Python object {refused!r}") from None
        detail = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), _first_line(e))
        raise ValueError(f"{path}: cannot read {what}: corrupt or truncated, or not a torch file ({detail}); "
                         "nothing of it was executed") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, AttributeError, ImportError, KeyError,
            TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{path}: cannot read {what}: corrupt or truncated ({type(e).__name__}: "
                         f"{_first_line(e)})") from e


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:200] if text else ""


def plain_data(obj, where: str = "file", _depth: int = 0):
    """``obj`` rebuilt from plain types that :func:`load_torch_file` accepts.

    Tensors and NumPy arrays (numeric/bool dtypes) are kept; NumPy scalars become Python numbers;
    dicts (OrderedDict too), lists and tuples are rebuilt; ``argparse.Namespace``-like objects
    become dicts of their attributes; str, bytes,
    numbers, bool and None stay. Anything else raises ValueError naming where it was. Used by
    ``sas import-checkpoint --trust`` after it unpickled a file the user trusts.
    """
    import argparse

    import torch

    if _depth > 64:
        raise ValueError(f"{where}: nested more than 64 levels deep")
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biufc":
            raise ValueError(f"{where}: NumPy array of dtype {obj.dtype} (only numeric and bool arrays are data)")
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, (str, int, float, bool, type(None)))]
        if bad:
            raise ValueError(f"{where}: dict key of type {type(bad[0]).__name__} is not plain data")
        items = ((k, plain_data(v, f"{where}[{k!r}]", _depth + 1)) for k, v in obj.items())
        return collections.OrderedDict(items) if isinstance(obj, collections.OrderedDict) else dict(items)
    if isinstance(obj, (list, tuple)):
        items = [plain_data(v, f"{where}[{i}]", _depth + 1) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, argparse.Namespace):
        return {k: plain_data(v, f"{where}.{k}", _depth + 1) for k, v in vars(obj).items()}
    raise ValueError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} is not plain data")
