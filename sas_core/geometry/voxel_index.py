"""Voxel key -> slot index of the voxel map: a hash of occupied blocks, a dense slot table per block.

Layout (nvblox / voxblox). Voxel keys are block-major (:func:`sas_core.geometry.voxel_map.block_keys`):
``key >> local_bits`` is the key of the voxel's 8^3 block, ``key & (2^local_bits - 1)`` the voxel's
place inside it (x, y, z order). The index keeps

* an open-addressing hash (linear probing, Fibonacci hashing, load <= 1/2, backward-shift deletion)
  from block key to block id;
* per block id a dense table of ``2^local_bits`` int32 slots (-1: no voxel), its key and its voxel
  count; ids of emptied blocks are reused (a free stack), so the tables stop growing once the map
  stops growing.

Costs. Finding a voxel is one hash probe (skipped when consecutive keys share a block, as the
points of a depth frame mostly do) plus one table read; inserting or removing a voxel is O(1), a
new block O(1) amortised. A frame of P points touching M voxels costs O(P + M), whatever the map's
size (the sorted-array index it replaces paid an O(N) insert for every frame that added voxels).
Key order (what ``VoxelMap.slots()`` and exports give) is rebuilt on demand: the occupied blocks
sorted by key (cached until a block is created or freed), then each block's table in order, O(N).

Memory: ``4 * 2^local_bits`` bytes per occupied block (2 KB for 8^3 blocks: 28 B a voxel at 72
voxels a block, 2 KB a voxel for isolated voxels), 12 B per hash entry (at most 4 a block).

The kernels are numba (compiled on first use, cached on disk). Not thread-safe: the map's owner
serialises calls (as it does for every map mutation)."""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["BlockIndex"]

_EMPTY = -1
_GOLDEN = 0x9E3779B97F4A7C15


@functools.lru_cache(maxsize=None)
def _kernels():
    from sas_core.numba_support import import_numba, launch_threads

    numba = import_numba()
    if numba is None:  # pragma: no cover - numba is in the pinned environment
        raise ImportError("the voxel map's block index needs numba (pip install numba)")
    from numba import njit, prange

    launch_threads()
    golden = np.uint64(_GOLDEN)

    @njit(inline="always")
    def home(key, shift):  # pragma: no cover - compiled by numba
        return np.int64((np.uint64(key) * golden) >> np.uint64(shift))

    @njit(inline="always")
    def find(hk, hv, shift, key):  # pragma: no cover
        mask = hk.shape[0] - 1
        i = home(key, shift)
        while True:
            k = hk[i]
            if k == key:
                return hv[i]
            if k == _EMPTY:
                return -1
            i = (i + 1) & mask

    @njit(cache=True, nogil=True)
    def rehash(hk, hv, nk, nv, shift):  # pragma: no cover
        mask = nk.shape[0] - 1
        for j in range(hk.shape[0]):
            k = hk[j]
            if k != _EMPTY:
                i = home(k, shift)
                while nk[i] != _EMPTY:
                    i = (i + 1) & mask
                nk[i] = k
                nv[i] = hv[j]

    @njit(cache=True, nogil=True)
    def assign(keys, lbits, start, hk, hv, shift, count, free, nfree, next_id, pb, newkeys, newids, nnew):
        """Block id of every key from ``start`` on (``pb``), creating missing blocks (ids from the
        free stack, then ``next_id`` on; recorded in newkeys / newids). Stops early (returns the
        index reached) when the hash would exceed half full."""
        mask = hk.shape[0] - 1
        last_key = np.int64(-1)
        last_id = np.int32(-1)
        for t in range(start, keys.shape[0]):
            bk = keys[t] >> lbits
            if bk == last_key:
                pb[t] = last_id
                continue
            i = home(bk, shift)
            bid = np.int32(-1)
            while True:
                k = hk[i]
                if k == bk:
                    bid = hv[i]
                    break
                if k == _EMPTY:
                    break
                i = (i + 1) & mask
            if bid < 0:
                if 2 * (count + 1) > hk.shape[0]:
                    return t, count, nfree, next_id, nnew
                if nfree > 0:
                    nfree -= 1
                    bid = free[nfree]
                else:
                    bid = next_id
                    next_id += 1
                hk[i] = bk
                hv[i] = bid
                count += 1
                newkeys[nnew] = bk
                newids[nnew] = bid
                nnew += 1
            pb[t] = bid
            last_key = bk
            last_id = bid
        return keys.shape[0], count, nfree, next_id, nnew

    @njit(cache=True, nogil=True)
    def dedup(keys, lbits, pb, table, pts, cols, use_cols, pu, ub, ul, uslot, npts, psum, csum):
        """Distinct voxels of a frame's points in first-seen order, their current slots (-1: new),
        point counts and float64 sums of positions / colours. Marks each distinct voxel's table
        cell with -(u + 2) meanwhile: the caller restores (or fills) every cell ``(ub, ul)``."""
        lmask = (np.int64(1) << lbits) - 1
        m = 0
        for t in range(keys.shape[0]):
            b = pb[t]
            loc = keys[t] & lmask
            v = table[b, loc]
            if v >= -1:
                u = m
                m += 1
                ub[u] = b
                ul[u] = loc
                uslot[u] = v
                table[b, loc] = -(u + 2)
                npts[u] = 0
                for a in range(3):
                    psum[u, a] = 0.0
                    csum[u, a] = 0.0
            else:
                u = -v - 2
            pu[t] = u
            npts[u] += 1
            for a in range(3):
                psum[u, a] += np.float64(pts[t, a])
            if use_cols:
                for a in range(3):
                    csum[u, a] += np.float64(cols[t, a])
        return m

    @njit(inline="always")
    def lookup_range(keys, lbits, hk, hv, shift, table, out, lo, hi):  # pragma: no cover
        lmask = (np.int64(1) << lbits) - 1
        last_key = np.int64(-1)
        b = np.int32(-1)
        for t in range(lo, hi):  # consecutive keys mostly share a block: one probe per block
            bk = keys[t] >> lbits
            if bk != last_key:
                b = find(hk, hv, shift, bk)
                last_key = bk
            out[t] = -1 if b < 0 else table[b, keys[t] & lmask]

    # two kernels, not one function compiled twice: numba's disk cache keys on the Python function
    @njit(parallel=True, cache=True, nogil=True)
    def lookup(keys, lbits, hk, hv, shift, table, out, chunk):  # pragma: no cover
        n = keys.shape[0]
        for c in prange((n + chunk - 1) // chunk):
            lookup_range(keys, lbits, hk, hv, shift, table, out, c * chunk, min(n, (c + 1) * chunk))

    @njit(cache=True, nogil=True)
    def lookup_serial(keys, lbits, hk, hv, shift, table, out, chunk):  # pragma: no cover
        lookup_range(keys, lbits, hk, hv, shift, table, out, 0, keys.shape[0])

    @njit(inline="always")
    def hdelete(hk, hv, shift, i):  # pragma: no cover
        """Empty hash cell i, shifting later entries of its probe run back (no tombstones)."""
        mask = hk.shape[0] - 1
        j = i
        while True:
            j = (j + 1) & mask
            k = hk[j]
            if k == _EMPTY:
                break
            if ((j - home(k, shift)) & mask) >= ((j - i) & mask):
                hk[i] = k
                hv[i] = hv[j]
                i = j
        hk[i] = _EMPTY

    @njit(inline="always")
    def hslot(hk, shift, bk):  # pragma: no cover
        """Hash cell of block key bk, -1 when absent."""
        mask = hk.shape[0] - 1
        i = home(bk, shift)
        while True:
            k = hk[i]
            if k == bk:
                return i
            if k == _EMPTY:
                return -1
            i = (i + 1) & mask

    @njit(cache=True, nogil=True)
    def unlink(keys, lbits, hk, hv, shift, table, bcount, bkey, free, nfree):  # pragma: no cover
        """Remove voxels (their keys; absent ones are skipped); free blocks that become empty.
        Returns (nfree, blocks freed)."""
        lmask = (np.int64(1) << lbits) - 1
        freed = 0
        for t in range(keys.shape[0]):
            i = hslot(hk, shift, keys[t] >> lbits)
            if i < 0:
                continue
            b = hv[i]
            loc = keys[t] & lmask
            if table[b, loc] < 0:
                continue
            table[b, loc] = -1
            bcount[b] -= 1
            if bcount[b] == 0:  # the block is empty: out of the hash, its id reused
                free[nfree] = b
                nfree += 1
                freed += 1
                bkey[b] = -1
                hdelete(hk, hv, shift, i)
        return nfree, freed

    @njit(cache=True, nogil=True)
    def drop_empty(bids, hk, hv, shift, bcount, bkey, free, nfree):  # pragma: no cover
        """Free the blocks among ``bids`` (distinct) that hold no voxel. Returns (nfree, freed)."""
        freed = 0
        for t in range(bids.shape[0]):
            b = bids[t]
            if bcount[b] != 0 or bkey[b] < 0:
                continue
            i = hslot(hk, shift, bkey[b])
            free[nfree] = b
            nfree += 1
            freed += 1
            bkey[b] = -1
            if i >= 0:
                hdelete(hk, hv, shift, i)
        return nfree, freed

    @njit(parallel=True, cache=True, nogil=True)
    def gather(bids, offs, table, out):  # pragma: no cover
        """Slots of blocks ``bids`` (in that order, each block's table in order) into ``out``."""
        w = table.shape[1]
        for a in prange(bids.shape[0]):
            b = bids[a]
            k = offs[a]
            for loc in range(w):
                s = table[b, loc]
                if s >= 0:
                    out[k] = s
                    k += 1

    return dict(rehash=rehash, assign=assign, dedup=dedup, lookup=lookup, lookup_serial=lookup_serial, unlink=unlink, drop_empty=drop_empty,
                gather=gather)


class BlockIndex:
    """Block-major voxel key -> slot (module docstring). ``local_bits``: bits of a key that place
    the voxel inside its block (9 for 8^3 blocks)."""

    def __init__(self, local_bits: int = 9, initial_blocks: int = 64):
        self.lbits = int(local_bits)
        self.width = 1 << self.lbits
        self._k = _kernels()
        self.table = np.full((max(8, int(initial_blocks)), self.width), -1, np.int32)
        self.bkey = np.full(len(self.table), -1, np.int64)   # block key of each id (-1: free)
        self.bcount = np.zeros(len(self.table), np.int32)    # voxels of each block
        self.free = np.zeros(len(self.table), np.int32)      # stack of free ids below next_id
        self.nfree = 0
        self.next_id = 0
        self.count = 0                                       # blocks in the hash (occupied)
        self._set_hash(max(16, 1 << int(np.ceil(np.log2(4 * len(self.table))))))
        self._sorted = None                                  # occupied block ids in key order (cache)

    # ------------------------------------------------------------------ storage
    def _set_hash(self, size: int) -> None:
        hk = np.full(size, _EMPTY, np.int64)
        hv = np.full(size, -1, np.int32)
        shift = 64 - int(size).bit_length() + 1
        if getattr(self, "hk", None) is not None and self.count:
            self._k["rehash"](self.hk, self.hv, hk, hv, shift)
        self.hk, self.hv, self.shift = hk, hv, shift

    def _grow_blocks(self, needed: int) -> None:
        cap = len(self.table)
        if needed <= cap:
            return
        new = max(needed, cap + cap // 2)
        table = np.empty((new, self.width), np.int32)
        table[:cap] = self.table
        table[cap:] = -1
        self.table = table
        for name, fill in (("bkey", -1), ("bcount", 0), ("free", 0)):
            old = getattr(self, name)
            arr = np.full(new, fill, old.dtype)
            arr[:cap] = old
            setattr(self, name, arr)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.table, self.bkey, self.bcount, self.free, self.hk, self.hv)))

    @property
    def n_blocks(self) -> int:
        """Blocks holding at least one voxel."""
        return self.count

    # ------------------------------------------------------------------ blocks
    def block_ids(self, keys: np.ndarray) -> np.ndarray:
        """(P,) int32 block id of each voxel key, creating the blocks that do not exist (empty)."""
        keys = np.ascontiguousarray(keys, np.int64)
        pb = np.empty(len(keys), np.int32)
        newkeys = np.empty(len(keys), np.int64)
        newids = np.empty(len(keys), np.int32)
        t, nnew = 0, 0
        while True:
            t, self.count, self.nfree, self.next_id, nnew = self._k["assign"](
                keys, self.lbits, t, self.hk, self.hv, self.shift, self.count, self.free, self.nfree,
                self.next_id, pb, newkeys, newids, nnew)
            if t == len(keys):
                break
            self._set_hash(2 * len(self.hk))
        if nnew:
            self._grow_blocks(self.next_id)
            self.bkey[newids[:nnew]] = newkeys[:nnew]
            self._sorted = None
        return pb

    def drop_if_empty(self, bids: np.ndarray) -> None:
        """Free the blocks among ``bids`` that hold no voxel (blocks :meth:`block_ids` created for
        voxels that were not inserted after all)."""
        bids = np.unique(np.asarray(bids, np.int32))
        self.nfree, freed = self._k["drop_empty"](bids, self.hk, self.hv, self.shift, self.bcount, self.bkey,
                                                  self.free, self.nfree)
        if freed:
            self.count -= freed
            self._sorted = None

    def sorted_blocks(self) -> np.ndarray:
        """(B,) int32 ids of the occupied blocks in key order (cached until a block is created or freed)."""
        if self._sorted is None:
            ids = np.flatnonzero(self.bkey[:self.next_id] >= 0).astype(np.int32)
            self._sorted = ids[np.argsort(self.bkey[ids], kind="stable")]
        return self._sorted

    def block_keys_sorted(self) -> np.ndarray:
        """(B,) int64 keys of the occupied blocks, sorted."""
        return self.bkey[self.sorted_blocks()]

    # ------------------------------------------------------------------ voxels
    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """(P,) int64 slot of each voxel key, -1 where absent."""
        keys = np.ascontiguousarray(keys, np.int64)
        out = np.empty(len(keys), np.int32)
        if len(keys):  # one thread below a million keys (a parallel launch waits for every thread)
            big = len(keys) >= 1 << 20
            self._k["lookup" if big else "lookup_serial"](keys, self.lbits, self.hk, self.hv, self.shift, self.table,
                                                          out, 1 << 16 if big else len(keys))
        return out.astype(np.int64)

    def frame(self, keys: np.ndarray, pts: np.ndarray, cols):
        """The distinct voxels of a frame's point keys (``dedup`` kernel): returns ``(pb, pu, ub, ul,
        uslot, npts, psum, csum)``; cells ``(ub, ul)`` are marked (and the new voxels counted in
        their blocks) until :meth:`settle`. Voxels may be removed meanwhile, none inserted."""
        keys = np.ascontiguousarray(keys, np.int64)
        n = len(keys)
        pb = self.block_ids(keys)
        pu = np.empty(n, np.int32)
        ub, ul, uslot = np.empty(n, np.int32), np.empty(n, np.int64), np.empty(n, np.int64)
        npts = np.empty(n, np.int64)
        psum, csum = np.empty((n, 3), np.float64), np.empty((n, 3), np.float64)
        use_cols = cols is not None
        c = np.ascontiguousarray(cols, np.float32) if use_cols else np.zeros((1, 3), np.float32)
        m = self._k["dedup"](keys, self.lbits, pb, self.table, np.ascontiguousarray(pts, np.float32), c, use_cols,
                             pu, ub, ul, uslot, npts, psum, csum)
        new = uslot[:m] < 0
        if new.any():  # counted now: a block with voxels on the way is never freed meanwhile
            np.add.at(self.bcount, ub[:m][new], 1)
        return pb, pu, ub[:m], ul[:m], uslot[:m], npts[:m], psum[:m], csum[:m] if use_cols else None

    def settle(self, ub: np.ndarray, ul: np.ndarray, slots: np.ndarray, new: np.ndarray) -> None:
        """End of a frame (:meth:`frame`): cells ``(ub, ul)`` get ``slots`` (-1: not inserted);
        ``new`` marks the voxels that were not in the index before."""
        self.table[ub, ul] = slots
        out = new & (slots < 0)
        if out.any():
            np.subtract.at(self.bcount, ub[out], 1)
            self.drop_if_empty(ub[out])

    def insert(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Insert voxels (distinct keys, not present) at ``slots``."""
        keys = np.ascontiguousarray(keys, np.int64)
        if len(keys) == 0:
            return
        pb = self.block_ids(keys)
        self.table[pb, keys & (self.width - 1)] = slots
        np.add.at(self.bcount, pb, 1)

    def remove(self, keys: np.ndarray) -> None:
        """Remove voxels (distinct keys, present)."""
        keys = np.ascontiguousarray(keys, np.int64)
        if len(keys) == 0:
            return
        self.nfree, freed = self._k["unlink"](keys, self.lbits, self.hk, self.hv, self.shift, self.table,
                                              self.bcount, self.bkey, self.free, self.nfree)
        if freed:
            self.count -= freed
            self._sorted = None

    def slots_of_blocks(self, bids: np.ndarray, out=None) -> np.ndarray:
        """Slots of the blocks ``bids`` (int32 ids), block after block, each in key order."""
        bids = np.ascontiguousarray(bids, np.int32)
        cnt = self.bcount[bids].astype(np.int64)
        offs = np.zeros(len(bids) + 1, np.int64)
        np.cumsum(cnt, out=offs[1:])
        if out is None:
            out = np.empty(int(offs[-1]), np.int64)
        if len(bids):
            self._k["gather"](bids, offs, self.table, out)
        return out[: int(offs[-1])]

    def ordered(self, out=None) -> np.ndarray:
        """All slots in key order (``out``: an int64 buffer of at least the voxel count to fill)."""
        return self.slots_of_blocks(self.sorted_blocks(), out)
