"""Compact per-voxel feature store for building-scale maps (``feature_store="int8"`` of the voxel map).

Why. The full store keeps a D-dim fp16 feature per voxel (1 KB at D = 512) plus a rank-r float32
query store (256 B at r = 64): ~1.2 GB per million voxels. A building at 5 cm holds ~10M voxels.

What. The compact store keeps, per voxel, only the coefficients of its feature in the map's
orthonormal basis ``B`` (D x r, the same basis as the full store's reduced query store: the
vocabulary's text embeddings + the leading principal directions of the features), quantised to
int8 with one float32 scale per voxel, plus two float32 error terms::

    c = B^T f,   s = max|c| / 127,   q = round(c / s)  (int8),   f_hat = s B q
    rho  = |f - B c|          (the part of f outside the basis, exactly orthogonal to B)
    qerr = |c - s q|          (the quantisation error inside the basis)

The codes are kept in two arrays: the first 32 columns (the "head": the basis starts with the
vocabulary's directions) and the rest (the "tail"), with the tail's norm ``|s q_tail|`` (float32).
A query reads the head only and rescores exactly, with the tail, every voxel whose bound
``head + |s q_tail| |t_tail|`` reaches the threshold (and those that could hold the best score); a
text far from the head (bound > 0.1) scans both parts. The head is read only in the groups of 256
slots whose bound (:class:`GroupBounds`: the box of the group's head coefficients) reaches the
threshold or the best score, which gives the same candidates as reading every voxel; with more sure
matches than ``max_points``, only those that can be among the returned ones are rescored (the rest
are counted). ``r + 16`` bytes a voxel (144 B at r = 128, against 1280 B), + 1 B for the group bounds.

Guarantee. Queries, labels and scores are computed on the stored feature ``f_hat`` and are
*exactly* a full scan of the store: ``f_hat . t = s q . (B^T t)`` is what the int8 kernels compute,
for every voxel that bounds cannot rule out (the bounds only skip voxels that provably score below
the threshold, or cannot be returned; nothing approximate beyond float32 rounding, covered by a
1e-4 slack on every comparison). Against the
original feature ``f`` (what the full fp16 store kept), for a unit text ``t`` with ``t_r = B^T t``
and ``tau = |t - B t_r|``::

    |f . t - f_hat . t| <= rho * tau + qerr * |t_r|          (:func:`error_bound`)

since ``f - f_hat = (f - B c) + B (c - s q)`` with the first term orthogonal to ``B``. For the
vocabulary's words ``tau`` ~ 0, so only the quantisation term is left (~1e-3). A refit of the
basis re-encodes voxels from ``f_hat`` (the original is gone); their bounds grow by the triangle
inequality (``rho' = E + |f_hat - B' c'|``, ``qerr' = E + |c' - s' q'|``, ``E = |f - f_hat| <=
sqrt(rho^2 + qerr^2)``), so the bound stays valid. ``sas bench map-scale`` measures recall and
precision at the threshold against the fp16 store.

The kernels are numba (parallel, compiled on first use; a NumPy fallback where numba is missing).
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

__all__ = ["quantize", "int8_scores", "int8_threshold_scan", "int8_group_candidates", "int8_project", "error_bound",
           "GroupBounds", "DecodedFeatures"]

#: rows per NumPy block where a block-wise float32 conversion is needed
CHUNK = 65536
#: score of rows without a feature in :func:`int8_threshold_scan` (below any threshold, finite)
_NONE = -3.0e38


def quantize(c: np.ndarray):
    """(N, r) float32 coefficients -> q (N, r) int8, scale (N,) float32, qerr (N,) float32 with
    ``|c - scale q| <= qerr`` (float rounding slack included)."""
    c = np.asarray(c, np.float32)
    amax = np.abs(c).max(axis=1) if c.shape[1] else np.zeros(len(c), np.float32)
    scale = (amax / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(c / safe[:, None]), -127, 127).astype(np.int8)
    d = c - q.astype(np.float32) * scale[:, None]
    qerr = np.sqrt(np.einsum("ij,ij->i", d, d, dtype=np.float64) + 1e-12).astype(np.float32) + np.float32(1e-6)
    return q, scale, qerr


@functools.lru_cache(maxsize=None)
def _kernels():
    from sas_core.numba_support import import_numba, launch_threads

    numba = import_numba()
    if numba is None:  # pragma: no cover - numba is in the pinned environment
        return None
    from numba import njit, prange

    launch_threads()

    @njit(parallel=True, cache=True, nogil=True, fastmath=True)
    def scores_all(q, scale, t, out):  # pragma: no cover - compiled by numba
        n, r = q.shape
        for i in prange(n):
            acc = np.float32(0.0)
            for j in range(r):
                acc += np.float32(q[i, j]) * t[j]
            out[i] = acc * scale[i]

    @njit(inline="always")
    def dot_row(q, i, t):  # pragma: no cover - the one per-row dot product of every kernel
        acc = np.float32(0.0)
        for j in range(q.shape[1]):
            acc += np.float32(q[i, j]) * t[j]
        return acc

    @njit(parallel=True, cache=True, nogil=True, fastmath=True)
    def scores_rows(q, scale, t, rows, out):  # pragma: no cover - compiled by numba
        for k in prange(rows.shape[0]):
            out[k] = dot_row(q, rows[k], t) * scale[rows[k]]

    # serial twins for small work: a parallel launch waits for every thread (slow on a loaded machine)
    @njit(cache=True, nogil=True, fastmath=True)
    def scores_rows_serial(q, scale, t, rows, out):  # pragma: no cover
        for k in range(rows.shape[0]):
            out[k] = dot_row(q, rows[k], t) * scale[rows[k]]

    # after the GEMV: unusable rows get the finite sentinel _NONE; per-block best score and count
    @njit(parallel=True, cache=True, nogil=True)
    def scan_blocks(out, valid, fcount, thr, block, bmax, bcount):  # pragma: no cover
        n = out.shape[0]
        none = np.float32(_NONE)
        for b in prange(bmax.shape[0]):
            m = none
            c = 0
            for i in range(b * block, min(n, (b + 1) * block)):
                v = out[i] if (valid[i] and fcount[i] > 0) else none
                out[i] = v
                if v > m:
                    m = v
                if v >= thr:
                    c += 1
            bmax[b] = m
            bcount[b] = c

    @njit(parallel=True, cache=True, nogil=True)
    def collect(out, thr, block, bstart, idx):  # pragma: no cover
        n = out.shape[0]
        for b in prange(bstart.shape[0] - 1):
            k = bstart[b]
            if bstart[b + 1] == k:
                continue
            for i in range(b * block, min(n, (b + 1) * block)):
                if out[i] >= thr:
                    idx[k] = i
                    k += 1

    # per-group (GROUP consecutive slots) box of the dequantised head coefficients, valid rows only
    @njit(parallel=True, cache=True, nogil=True)
    def group_box(q, scale, valid, gids, group, top, gmax, gmin):  # pragma: no cover
        h = q.shape[1]
        for a in prange(gids.shape[0]):
            g = gids[a]
            for j in range(h):
                gmax[g, j] = np.float32(-np.inf)
                gmin[g, j] = np.float32(np.inf)
            for i in range(g * group, min(top, (g + 1) * group)):
                if valid[i]:
                    s = scale[i]
                    for j in range(h):
                        v = np.float32(q[i, j]) * s
                        if v > gmax[g, j]:
                            gmax[g, j] = v
                        if v < gmin[g, j]:
                            gmin[g, j] = v

    # upper bound of every group's head scores for the text t: sum_j max(t_j cmax_j, t_j cmin_j)
    # (small kernels run serial: a parallel launch waits for every thread, slow on a loaded machine)
    @njit(cache=True, nogil=True)
    def group_upper(gmax, gmin, t, out):  # pragma: no cover
        h = gmax.shape[1]
        for g in range(gmax.shape[0]):
            if gmax[g, 0] < gmin[g, 0]:  # no valid row
                out[g] = -np.inf
                continue
            acc = 0.0
            for j in range(h):
                a = np.float64(t[j])
                acc += max(a * gmax[g, j], a * gmin[g, j])
            out[g] = acc

    # head scores of the rows of groups gids (buffer hbuf, group rows per group), best and count
    @njit(inline="always")
    def scan_group(q, scale, t, valid, fcount, gids, group, top, thr, hbuf, gbest, gcount, a):  # pragma: no cover
        none = np.float32(_NONE)
        g = gids[a]
        m = none
        c = 0
        base = a * group
        for i in range(g * group, (g + 1) * group):
            v = none
            if i < top and valid[i] and fcount[i] > 0:
                v = dot_row(q, i, t) * scale[i]
            hbuf[base + i - g * group] = v
            if v > m:
                m = v
            if v >= thr:
                c += 1
        gbest[a] = m
        gcount[a] = c

    # two kernels, not one function compiled twice: numba's disk cache keys on the Python function
    @njit(parallel=True, cache=True, nogil=True, fastmath=True)
    def group_scan(q, scale, t, valid, fcount, gids, group, top, thr, hbuf, gbest, gcount):  # pragma: no cover
        for a in prange(gids.shape[0]):
            scan_group(q, scale, t, valid, fcount, gids, group, top, thr, hbuf, gbest, gcount, a)

    @njit(cache=True, nogil=True, fastmath=True)
    def group_scan_serial(q, scale, t, valid, fcount, gids, group, top, thr, hbuf, gbest, gcount):  # pragma: no cover
        for a in range(gids.shape[0]):
            scan_group(q, scale, t, valid, fcount, gids, group, top, thr, hbuf, gbest, gcount, a)

    @njit(cache=True, nogil=True)
    def group_collect(hbuf, gids, group, thr, offs, rows, vals):  # pragma: no cover
        for a in range(gids.shape[0]):
            k = offs[a]
            if offs[a + 1] == k:
                continue
            g = gids[a]
            for r in range(group):
                v = hbuf[a * group + r]
                if v >= thr:
                    rows[k] = g * group + r
                    vals[k] = v
                    k += 1

    return dict(scores_all=scores_all, scores_rows=scores_rows, scan_blocks=scan_blocks, collect=collect,
                scores_rows_serial=scores_rows_serial, group_box=group_box, group_upper=group_upper,
                group_scan=group_scan, group_scan_serial=group_scan_serial, group_collect=group_collect)


#: Work (rows x columns) below which a kernel runs on one thread.
_SERIAL_WORK = 1 << 22


#: Slots per group of the int8 store's per-group bounds (:class:`GroupBounds`).
GROUP = 256
#: Slack added to every bound comparison (float32 rounding of scores and bounds is far below it).
_SLACK = 1e-4


class GroupBounds:
    """Per group of ``GROUP`` consecutive slots, the box ``[cmin_j, cmax_j]`` of the dequantised
    head coefficients ``s q_j`` of its valid rows (2 x head float32 a group: 1 B a slot at head 32).

    For a text with head coefficients ``t``, every row of group g scores at most
    ``U_g = sum_j max(t_j cmax_j, t_j cmin_j)`` on the head, so a query reads only the groups whose
    ``U_g`` can reach its threshold (or the best score): a full scan's answer from a fraction of the
    store. New voxels are given slots in key order (block after block), so a group covers a few
    neighbouring blocks and its box is tight where the map holds one kind of surface. Groups are
    recomputed lazily (marked stale when codes are written or rows reset)."""

    def __init__(self, capacity: int, head: int):
        g = (capacity + GROUP - 1) // GROUP
        self.cmax = np.full((g, head), -np.inf, np.float32)
        self.cmin = np.full((g, head), np.inf, np.float32)
        self.stale = np.ones(g, bool)

    @property
    def nbytes(self) -> int:
        return int(self.cmax.nbytes + self.cmin.nbytes + self.stale.nbytes)

    def grow(self, capacity: int) -> None:
        g = (capacity + GROUP - 1) // GROUP
        old = len(self.stale)
        if g <= old:
            return
        for name, fill in (("cmax", -np.inf), ("cmin", np.inf)):
            arr = np.full((g, self.cmax.shape[1]), fill, np.float32)
            arr[:old] = getattr(self, name)
            setattr(self, name, arr)
        stale = np.ones(g, bool)
        stale[:old] = self.stale
        self.stale = stale

    def mark(self, rows=None) -> None:
        """Mark the groups of ``rows`` (None: all) stale."""
        if rows is None:
            self.stale[:] = True
        else:
            self.stale[np.asarray(rows, np.int64) // GROUP] = True

    def refresh(self, q, scale, valid, top: int) -> None:
        gids = np.flatnonzero(self.stale[: (top + GROUP - 1) // GROUP])
        if len(gids):
            _kernels()["group_box"](q, scale, valid, gids, GROUP, top, self.cmax, self.cmin)
            self.stale[gids] = False


def int8_group_candidates(q, scale, t_h, valid, fcount, bounds: GroupBounds, top: int, threshold: float,
                          spread: float):
    """Rows that a full scan of the head codes would pick: every usable row whose head score is
    ``>= threshold`` or ``>= best - spread`` (best: the highest head score of any usable row).
    Reads only the groups whose bound reaches that (:class:`GroupBounds`; slack ``_SLACK`` on every
    comparison, so the set may hold a few more rows, never fewer). Returns ``(rows (increasing),
    their head scores (float32, within float rounding of :func:`int8_scores`'), best head score or
    -inf, groups read, groups)``."""
    k = _kernels()
    t_h = np.ascontiguousarray(t_h, np.float32)
    bounds.refresh(q, scale, valid, top)
    ng = (top + GROUP - 1) // GROUP
    upper = np.empty(ng, np.float64)
    k["group_upper"](bounds.cmax[:ng], bounds.cmin[:ng], t_h, upper)
    thr = threshold - _SLACK
    scanned, bufs, best = [], [], float("-inf")
    todo = np.flatnonzero(upper >= thr - _SLACK)
    rest = np.flatnonzero((upper < thr - _SLACK) & (upper > float("-inf")))
    ranked = False
    batch = 64
    while True:
        if len(todo):
            gids = np.ascontiguousarray(np.sort(todo), np.int64)
            hbuf = np.empty(len(gids) * GROUP, np.float32)
            gbest = np.empty(len(gids), np.float32)
            gcount = np.empty(len(gids), np.int64)
            scan = k["group_scan_serial" if len(hbuf) * q.shape[1] < _SERIAL_WORK else "group_scan"]
            scan(q, scale, t_h, valid, fcount, gids, GROUP, top, np.float32(-np.inf), hbuf, gbest, gcount)
            scanned.append(gids)
            bufs.append(hbuf)
            gb = float(gbest.max())
            if gb > _NONE:
                best = max(best, gb)
        # groups left that may hold a row within spread of the best (or the best itself)
        low = best - spread - 2 * _SLACK
        if not len(rest) or float(upper[rest].max()) < low:
            break
        if best > float("-inf"):
            near = upper[rest] >= low
            todo, rest = rest[near], rest[~near]
        else:  # nothing usable read yet: the best bounds first, in growing batches
            if not ranked:
                rest = rest[np.argsort(-upper[rest], kind="stable")]
                ranked = True
            todo, rest = rest[:batch], rest[batch:]
            batch *= 2
    cut = min(thr, best - spread - _SLACK)
    rows, vals = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for gids, hbuf in zip(scanned, bufs):
        cnt = (hbuf >= np.float32(cut)).reshape(len(gids), GROUP).sum(1)
        offs = np.zeros(len(gids) + 1, np.int64)
        np.cumsum(cnt, out=offs[1:])
        out, val = np.empty(int(offs[-1]), np.int64), np.empty(int(offs[-1]), np.float32)
        k["group_collect"](hbuf, gids, GROUP, np.float32(cut), offs, out, val)
        rows.append(out)
        vals.append(val)
    rows, vals = np.concatenate(rows), np.concatenate(vals)
    order = np.argsort(rows, kind="stable")
    return rows[order], vals[order], best, int(sum(len(g) for g in scanned)), ng


def int8_threshold_scan(q, scale, t_r, valid, fcount, threshold: float, block: int = 16384):
    """One pass over the store: ``(score (N,) float32, best score (-inf: no usable row), rows
    scoring >= threshold in increasing order)``; usable = ``valid & (fcount > 0)``; unusable rows
    score ``_NONE`` (-3e38)."""
    t_r = np.ascontiguousarray(t_r, np.float32)
    n = len(q)
    k = _kernels()
    if k is None or not q.flags.c_contiguous:  # pragma: no cover - fallback without numba
        out = int8_scores(q, scale, t_r)
        out[~(valid & (fcount > 0))] = _NONE
        best = float(out.max()) if n else _NONE
        return out, (best if best > _NONE else float("-inf")), np.flatnonzero(out >= threshold)
    nb = (n + block - 1) // block
    out = np.empty(n, np.float32)
    bmax = np.full(nb, _NONE, np.float32)
    bcount = np.zeros(nb, np.int64)
    k["scores_all"](q, scale, t_r, out)
    k["scan_blocks"](out, valid, fcount, np.float32(threshold), block, bmax, bcount)
    bstart = np.concatenate([[0], np.cumsum(bcount)]).astype(np.int64)
    idx = np.empty(int(bstart[-1]), np.int64)
    k["collect"](out, np.float32(threshold), block, bstart, idx)
    best = float(bmax.max()) if nb else _NONE
    return out, (best if best > _NONE else float("-inf")), idx


def int8_scores(q: np.ndarray, scale: np.ndarray, t_r: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
    """``scale[i] * (q[i] . t_r)`` for every row of ``q`` (or for ``rows``): (N,) float32.

    One int8 GEMV (numba, all cores): ~40 ms for 10M x 128 on 2 cores."""
    t_r = np.ascontiguousarray(t_r, np.float32)
    k = _kernels()
    if rows is None:
        out = np.empty(len(q), np.float32)
        if k is not None and q.flags.c_contiguous:
            k["scores_all"](q, scale, t_r, out)
        else:  # pragma: no cover - fallback without numba
            for a in range(0, len(q), CHUNK):
                out[a:a + CHUNK] = (q[a:a + CHUNK].astype(np.float32) @ t_r) * scale[a:a + CHUNK]
        return out
    rows = np.ascontiguousarray(rows, np.int64)
    out = np.empty(len(rows), np.float32)
    if k is not None and q.flags.c_contiguous:
        k["scores_rows_serial" if len(rows) * q.shape[1] < _SERIAL_WORK else "scores_rows"](q, scale, t_r, rows, out)
    else:  # pragma: no cover
        for a in range(0, len(rows), CHUNK):
            r = rows[a:a + CHUNK]
            out[a:a + CHUNK] = (q[r].astype(np.float32) @ t_r) * scale[r]
    return out


def int8_project(q: np.ndarray, scale: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(M, r) float32 dequantised coefficients ``scale q`` of ``rows``."""
    return q[rows].astype(np.float32) * scale[rows, None]


def error_bound(rho: np.ndarray, qerr: np.ndarray, basis: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Upper bound of ``|f . t - f_hat . t|`` per voxel (module docstring) for the unit text ``t``."""
    t = np.asarray(text, np.float32).reshape(-1)
    t_r = basis.T @ t
    tau = float(np.linalg.norm(t - basis @ t_r)) + 1e-5
    return rho * np.float32(tau) + qerr * np.float32(np.linalg.norm(t_r) + 1e-5)


class DecodedFeatures:
    """``map.features`` of a voxel map with the int8 store: indexing gives the stored features
    ``f_hat`` (rows, D) as float16, like the full store's array; assigning encodes (as
    ``set_features`` does, without touching counts). Shape (capacity, D)."""

    dtype = np.dtype(np.float16)
    ndim = 2

    def __init__(self, vmap):
        self._m = vmap

    @property
    def shape(self) -> tuple:
        return (self._m.capacity, self._m._dim)

    def __len__(self) -> int:
        return self._m.capacity

    @property
    def nbytes(self) -> int:
        """Bytes of the int8 store (codes, scales, error terms)."""
        m = self._m
        return int(sum(a.nbytes for a in (m._q, m._qt, m._qtn, m._qscale, m._resid, m._qerr) if a is not None))

    def _rows(self, idx) -> tuple:
        if isinstance(idx, tuple):
            raise IndexError("int8 store features take one index (rows)")
        if isinstance(idx, (int, np.integer)):
            return np.array([int(idx) % self._m.capacity]), True
        rows = np.arange(self._m.capacity)[idx] if isinstance(idx, slice) else np.asarray(idx)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return rows.astype(np.int64).reshape(-1), False

    def float32(self, rows) -> np.ndarray:
        """(M, D) float32 ``f_hat`` of ``rows`` (zeros before any basis exists)."""
        m = self._m
        rows = np.asarray(rows, np.int64)
        if m._basis is None:
            return np.zeros((len(rows), m._dim), np.float32)
        return m._project(rows) @ m._basis.T

    def __getitem__(self, idx) -> np.ndarray:
        rows, scalar = self._rows(idx)
        out = self.float32(rows).astype(np.float16)
        return out[0] if scalar else out

    def __setitem__(self, idx, value) -> None:
        rows, _ = self._rows(idx)
        value = np.broadcast_to(np.asarray(value, np.float32), (len(rows), self._m._dim))
        counts = self._m.feature_counts[rows].copy()
        self._m.set_features(rows, value)
        self._m.feature_counts[rows] = counts

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)
