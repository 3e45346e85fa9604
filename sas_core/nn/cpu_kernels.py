"""Fused, cache-tiled gather-GEMM-scatter for sparse convolution on CPU (numba).

Why hand-written: torch offers the three steps of a sparse convolution only as separate passes
over memory (``index_select`` -> ``mm`` -> ``index_add_``), each of which streams the whole
(pairs x channels) intermediate through DRAM; on the 100k-voxel U-Net the gathers and scatters
took a fifth of the forward, the GEMMs over 100k-row operands ran at ~70% of the rate they reach
on cache-sized blocks, and ``index_add_`` ran on one core. No library we can install provides a fused sparse
convolution for CPU (spconv's CPU path is the same three passes; MinkowskiEngine does not build
here).

The kernel map is regrouped once into *output tiles* of ``tile`` rows: for tile ``t`` and offset
``k`` the pairs ``ptr[t*kv + k] : ptr[t*kv + k + 1]`` of ``src`` (input rows) and ``dst`` (output
rows inside the tile). One parallel loop over tiles then, per tile, starts the tile from the
centre offset's GEMM (submanifold maps) or zeros, and for every other offset gathers the tile's
input rows into a small buffer, multiplies it with ``W[k]`` (BLAS through ``np.dot``) and adds
the product onto the tile's rows. Tile, gather and product buffers stay in L2, every output row
is written by one thread only (no atomics), and each offset's GEMM is cache-sized.

The backward pass uses the same kernel for ``grad_x`` (the map read backwards, with the
transposed weights) and a tiled kernel for ``grad_W`` (per-thread partial sums of
``x[src]^T grad_out[dst]``, reduced at the end).

numba and its BLAS (SciPy's) are imported on first use; :func:`available` says whether they can be.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Tuple

import numpy as np
import torch

__all__ = ["available", "tiled_pairs", "conv_forward", "conv_backward", "DEFAULT_TILE"]

#: Output rows per tile (tile + gather + product buffers of ~0.4-1.3 MB at 96-128 channels: L2-sized).
DEFAULT_TILE = 512


@functools.lru_cache(maxsize=None)
def _kernels():
    """Compile-on-first-use numba kernels, or None when numba cannot be imported."""
    from sas_core.numba_support import import_numba, launch_threads

    numba = import_numba()
    if numba is None:  # pragma: no cover - numba is in the pinned environment
        return None
    from numba import njit, prange

    launch_threads()  # before the first torch.get_num_threads() we follow (see numba_support)

    @njit(parallel=True, cache=True, nogil=True)
    def conv(x, w, ptr, src, dst, identity, tile, out):  # pragma: no cover - compiled by numba
        n_out = out.shape[0]
        kv = w.shape[0]
        cin = x.shape[1]
        cout = out.shape[1]
        n_tiles = (n_out + tile - 1) // tile
        for t in prange(n_tiles):
            a = t * tile
            b = min(a + tile, n_out)
            acc = out[a:b]
            if identity >= 0:
                np.dot(x[a:b], w[identity], acc)
            else:
                acc[:, :] = 0
            g = np.empty((tile, cin), x.dtype)
            y = np.empty((tile, cout), x.dtype)
            for k in range(kv):
                s = ptr[t * kv + k]
                m = ptr[t * kv + k + 1] - s
                if m == 0:
                    continue
                for r in range(m):
                    g[r, :] = x[src[s + r], :]
                np.dot(g[:m], w[k], y[:m])
                for r in range(m):
                    row = dst[s + r] - a
                    for j in range(cout):
                        acc[row, j] += y[r, j]

    @njit(parallel=True, cache=True, nogil=True)
    def wgrad(x, go, ptr, src, dst, identity, tile, n_chunks, partial):  # pragma: no cover - numba
        n_out = go.shape[0]
        kv = partial.shape[1]
        cin = x.shape[1]
        cout = go.shape[1]
        n_tiles = (n_out + tile - 1) // tile
        for c in prange(n_chunks):
            g = np.empty((tile, cin), x.dtype)
            h = np.empty((tile, cout), x.dtype)
            tmp = np.empty((cin, cout), x.dtype)
            acc = partial[c]
            for t in range(c * n_tiles // n_chunks, (c + 1) * n_tiles // n_chunks):
                a = t * tile
                b = min(a + tile, n_out)
                if identity >= 0:
                    np.dot(x[a:b].T, go[a:b], tmp)
                    acc[identity] += tmp
                for k in range(kv):
                    s = ptr[t * kv + k]
                    m = ptr[t * kv + k + 1] - s
                    if m == 0:
                        continue
                    for r in range(m):
                        g[r, :] = x[src[s + r], :]
                        h[r, :] = go[dst[s + r], :]
                    np.dot(g[:m].T, h[:m], tmp)
                    acc[k] += tmp

    @njit(cache=True, nogil=True)
    def tile_sort(src_all, dst_all, lens, tile, n_tiles):  # pragma: no cover - compiled by numba
        # stable counting sort of the pairs (offset-major) by (tile of dst, offset)
        kv = lens.shape[0]
        ptr = np.zeros(n_tiles * kv + 1, np.int64)
        p = 0
        for k in range(kv):
            for _ in range(lens[k]):
                ptr[(dst_all[p] // tile) * kv + k + 1] += 1
                p += 1
        for i in range(n_tiles * kv):
            ptr[i + 1] += ptr[i]
        cursor = ptr[:-1].copy()
        src = np.empty(src_all.shape[0], np.int32)
        dst = np.empty(src_all.shape[0], np.int32)
        p = 0
        for k in range(kv):
            for _ in range(lens[k]):
                key = (dst_all[p] // tile) * kv + k
                q = cursor[key]
                cursor[key] = q + 1
                src[q] = src_all[p]
                dst[q] = dst_all[p]
                p += 1
        return ptr, src, dst

    return numba, conv, wgrad, tile_sort


def available() -> bool:
    """Whether the fused CPU kernels can run (numba importable)."""
    return _kernels() is not None


def tiled_pairs(pairs, kernel_volume: int, n_out: int, tile: int, reverse: bool = False
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Regroup per-offset ``pairs[k] = (in_idx, out_idx)`` by (output tile, offset).

    Args:
        reverse: group by the *input* rows instead (the map read backwards, for ``grad_x``).
    Returns:
        ptr (n_tiles*kv + 1,) int64, src (P,) int32 rows read, dst (P,) int32 rows written;
        inside one (tile, offset) group the pairs keep their order (``dst`` ascending for maps
        built from a sorted neighbour search).
    """
    n_tiles = (n_out + tile - 1) // tile
    lens = np.zeros(kernel_volume, np.int64)
    srcs, dsts = [], []
    for k, p in enumerate(pairs):
        if p is not None:
            i, o = (p[1], p[0]) if reverse else p
            srcs.append(i)
            dsts.append(o)
            lens[k] = i.numel()
    if not srcs:
        z = np.zeros(0, np.int32)
        return np.zeros(n_tiles * kernel_volume + 1, np.int64), z, z
    tile_sort = _kernels()[3]
    return tile_sort(torch.cat(srcs).numpy(), torch.cat(dsts).numpy(), lens, tile, n_tiles)


@functools.lru_cache(maxsize=None)
def _openblas_threads():
    """(get, set) of the thread count of SciPy's OpenBLAS (the BLAS behind numba's ``np.dot``),
    or None when it cannot be found (another SciPy build: its BLAS is left as it is)."""
    import ctypes
    import glob

    import scipy.linalg.cython_blas  # noqa: F401 - loads the library numba calls

    libs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(scipy.linalg.cython_blas.__file__))),
                        os.pardir, "scipy.libs", "libscipy_openblas*.so")
    for path in sorted(glob.glob(libs)):
        try:
            lib = ctypes.CDLL(path)
            get, set_ = lib.scipy_openblas_get_num_threads, lib.scipy_openblas_set_num_threads
        except (OSError, AttributeError):
            continue
        get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
        return get, set_
    return None


class _SingleThreadBlas:
    """OpenBLAS on one thread while any of our kernels runs: they call it from inside their own
    parallel loop, where a multi-threaded pthreads OpenBLAS oversubscribes the cores (and warns
    that it may hang when that loop is an OpenMP one). Counted, so that kernels running in
    several Python threads at once restore the user's setting only when the last one leaves."""

    _lock = threading.Lock()
    _active = 0
    _before = 1

    def __enter__(self):
        fns = _openblas_threads()
        if fns is not None:
            with self._lock:
                if _SingleThreadBlas._active == 0:
                    _SingleThreadBlas._before = fns[0]()
                    fns[1](1)
                _SingleThreadBlas._active += 1
        return self

    def __exit__(self, *exc):
        fns = _openblas_threads()
        if fns is not None:
            with self._lock:
                _SingleThreadBlas._active -= 1
                if _SingleThreadBlas._active == 0 and _SingleThreadBlas._before != 1:
                    fns[1](_SingleThreadBlas._before)
        return False


def _threads(numba) -> int:
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def conv_forward(x: torch.Tensor, weight: torch.Tensor, tiles, identity: int, n_out: int, tile: int) -> torch.Tensor:
    """``out[dst] += x[src] @ W[k]`` over a tiled map (see module docstring); float32/float64 CPU."""
    numba, conv = _kernels()[:2]
    out = torch.empty(n_out, weight.shape[-1], dtype=x.dtype)
    if n_out:
        numba.set_num_threads(_threads(numba))
        ptr, src, dst = tiles
        with _SingleThreadBlas():
            conv(_np(x), _np(weight), ptr, src, dst, identity, tile, out.numpy())
    return out


def conv_backward(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, tiles, tiles_rev,
                  identity: int, tile: int, need_x: bool, need_w: bool):
    """(grad_x, grad_W) of :func:`conv_forward`; ``tiles_rev`` is the map grouped by input rows."""
    numba, conv, wgrad = _kernels()[:3]
    numba.set_num_threads(_threads(numba))
    grad_x = grad_w = None
    go = _np(grad_out)
    with _SingleThreadBlas():
        if need_x:
            grad_x = torch.empty_like(x)
            if x.shape[0]:
                wt = weight.detach().transpose(1, 2).contiguous()
                ptr, src, dst = tiles_rev
                conv(go, wt.numpy(), ptr, src, dst, identity, tile, grad_x.numpy())
        if need_w:
            n_chunks = _threads(numba)
            partial = np.zeros((n_chunks,) + tuple(weight.shape), dtype=go.dtype)
            if grad_out.shape[0]:
                ptr, src, dst = tiles
                wgrad(_np(x), go, ptr, src, dst, identity, tile, n_chunks, partial)
            grad_w = torch.from_numpy(partial.sum(0))
    return grad_x, grad_w
