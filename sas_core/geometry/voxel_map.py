"""Incremental voxel point map with bounded memory and a feature store designed for text queries.

Geometry. Each occupied voxel (edge ``voxel_size``) holds one point: the running mean of the
points that fell into it, their mean colour, an observation count and the index of the last
integration that touched it. Voxel keys are the three integer voxel coordinates packed into one
int64 *block-major* (:func:`block_keys`: the 8^3-voxel block first, as nvblox / voxblox group
voxels, then the voxel inside it); a sorted key array plus ``np.searchsorted`` maps keys to slots,
so integrating a frame is a few vectorised sorts and merges (no per-point Python), and a block's
voxels are one contiguous run of the index: a box (:meth:`VoxelMap.box_slots`, ``query(...,
region=)``, the segmenter's context :meth:`VoxelMap.region_slots`) reads only the blocks it
overlaps (a sorted array of the occupied blocks' keys, one binary search per block). Per-voxel data live in slot arrays that
grow geometrically up to ``max_points`` and never beyond: when the map is full, the eviction
policy frees slots (``oldest``: least recently observed voxels first; ``farthest``: farthest from
the sensor first), always freeing a little more than needed (``evict_fraction``) so eviction does
not run on every frame. An optional ``max_radius`` drops voxels far from the robot. Memory is
therefore flat once the map stops growing.

Features and labels. Per voxel: a D-dim fp16 feature (the network's output, or the multi-view
mean of 2D-teacher features in fusion mode, see :mod:`sas_core.mapping`), a label (255 = none)
and a score for the current vocabulary. :meth:`VoxelMap.save` writes one map unit (below),
:meth:`VoxelMap.load` reads it back.

Saved maps. A map is one folder ``<name>/`` written as a unit (:func:`sas_core.io.atomic_dir`:
a temporary sibling ``.<name>.tmp-<pid>-<random>``, every file fsynced, renamed into place, the
parent fsynced; an existing map is swapped atomically only with ``overwrite``) holding
``map.npz`` (every array, fp16 features; no pickle), ``map.ply`` (the labelled points, for
viewers) and ``manifest.json`` (:data:`MAP_FORMAT`, format and package versions, counts, voxel
size, vocabulary and the sha256 and size of each file). Loading checks the manifest and every
hash first, so a reader sees one complete version or a clear error, never a mix.

Query design. A free-text query is a cosine score ``f . t`` per voxel. Scanning 1M x 512 fp16
features is ~1 GB of memory traffic (~100 ms here), too slow for interactive queries. So the map
also keeps a *reduced* store: an orthonormal basis ``B`` (D x r, r = ``query_rank``, default 64)
spanning the current vocabulary's text embeddings and the leading principal directions of the
stored features, per-voxel coefficients ``c = B^T f`` (N x r float32, contiguous) and the norm
of the residual ``rho = |f - B c|``. A query computes ``t_r = B^T t`` and ``tau = |t - B t_r|``;
then ``f . t = c . t_r + (f - B c) . t`` and, because ``f - B c`` is orthogonal to ``B``,
``|(f - B c) . t| <= rho * tau``. One contiguous float32 GEMV over the N x r coefficients (256 MB
for 1M x 64 instead of 1 GB) gives every voxel's score within a guaranteed interval; only voxels
whose interval straddles the threshold (or could hold the best score, or are returned with a loose
bound) are rescored exactly from the full fp16 features. Counts, best scores and every returned
score therefore equal a full scan; for vocabulary words ``tau`` is ~0 and nothing is rescored.
When more voxels match than ``max_points``, the returned ones are those with the best guaranteed
lower bounds (``exact_topk=True`` returns the exact top set at the price of more rescoring).
The basis is refitted in the background as the map grows (up to a 200k-voxel fit) and when the
vocabulary changes, in steps (:meth:`VoxelMap.start_refit` / :meth:`VoxelMap.refit_step`): the new
basis and coefficients are built next to the old ones, which keep answering queries exactly until
the last step swaps them in, so a caller can release its lock between steps.

Measured (``sas bench node``, 1M voxels x 512, threshold 0.5, 5000 points returned, on a 2-core
machine under a load average of ~13): vocabulary word 36 ms CPU / 133 ms wall vs a torch fp16 scan
358 ms wall (2.7x); free text with an attribute word 64 ms CPU / 188 ms wall (1.5x).

Building scale (``feature_store="int8"``, :mod:`sas_core.geometry.feature_store`). The fp16
features and the reduced store above are replaced by the rank-r coefficients in the same basis,
int8 with a per-voxel scale, plus two error terms and the tail norm (r + 16 bytes a voxel: 144 B at
r = 128, against 1280 B): an int8 GEMV over the 32 vocabulary columns plus exact rescoring of the
candidates with the rest is an exact full scan of that store, and each score is within a stated bound
of the original feature's (see that module; ``sas bench map-scale`` measures recall and precision
against the original features, and the memory model by component).

Saving without stalling. :meth:`VoxelMap.start_snapshot` copies the map in ``LOCK_SLICE``-slot
slices (the owner's lock released in between) and recopies what changed meanwhile; the result is
the map as it was when the last slice returned, written with no lock held (``Mapper.save``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np

from sas_core.types import IGNORE_LABEL

#: Original features the int8 store keeps for basis refits (a reservoir sample, fp16).
_RESERVOIR = 8192
#: Columns of the int8 codes kept apart as the "head" that a query scans first (the basis starts
#: with the vocabulary's directions), and the bound on the tail's part above which a query scans
#: both parts instead.
_HEAD = 32
_HEAD_MARGIN = 0.1

#: Voxels per slice when a long pass over the map (relabelling after a vocabulary change, a
#: query-basis refit) is cut into pieces so that a caller can release its lock in between
#: (~60-70 ms a slice with 512-d features on a 2-core machine).
LOCK_SLICE = 32768

_BITS = 21
_OFFSET = 1 << (_BITS - 1)
_MASK = (1 << _BITS) - 1


@dataclass
class VoxelMapConfig:
    """Configuration of :class:`VoxelMap`."""

    voxel_size: float = 0.05          # voxel edge in metres (one point per voxel)
    max_points: int = 1_000_000       # capacity in voxels; the eviction policy keeps the map below it
    eviction: str = "oldest"          # "oldest" (least recently observed) or "farthest" (from the sensor)
    evict_fraction: float = 0.05      # free this fraction of capacity beyond what is needed when evicting
    max_radius: float = 0.0           # drop voxels farther than this from the sensor (0 = keep all)
    feature_dim: int = 0              # per-voxel feature size (0 = no features until the first set_features)
    query_rank: int = 64              # rank r of the reduced query store
    initial_capacity: int = 65536     # slot arrays start this big and double up to max_points
    feature_store: str = "fp16"       # "fp16" (full features + reduced query store) or "int8" (compact)
    store_rank: int = 128             # rank r of the int8 store (see sas_core.geometry.feature_store)


#: Voxels are grouped in blocks of BLOCK^3 (nvblox / voxblox style). The map's key index is sorted
#: block-major (block coordinates, then the voxel inside its block), so a block's voxels are one
#: contiguous run of the index and a box query reads only the blocks it overlaps.
BLOCK_BITS = 3
BLOCK = 1 << BLOCK_BITS
_LOCAL = 3 * BLOCK_BITS
_BB = _BITS - BLOCK_BITS
_BMASK = (1 << _BB) - 1
_LMASK = BLOCK - 1
FEATURE_STORES = ("fp16", "int8")


def pack_keys(coords: np.ndarray) -> np.ndarray:
    """(N, 3) integer voxel coordinates in [-2^20, 2^20) -> (N,) int64 keys (order-preserving in x, y, z)."""
    c = coords.astype(np.int64) + _OFFSET
    return (c[:, 0] << (2 * _BITS)) | (c[:, 1] << _BITS) | c[:, 2]


def unpack_keys(keys: np.ndarray) -> np.ndarray:
    """(N,) int64 keys -> (N, 3) int64 voxel coordinates."""
    return np.stack([(keys >> (2 * _BITS)) & _MASK, (keys >> _BITS) & _MASK, keys & _MASK], axis=1) - _OFFSET


def block_keys(coords: np.ndarray) -> np.ndarray:
    """(N, 3) integer voxel coordinates in [-2^20, 2^20) -> (N,) int64 block-major keys: the block
    ``floor(c / BLOCK)`` in the high bits (x, y, z order), the voxel inside its block in the low
    ``3 * BLOCK_BITS`` bits. ``key >> 3 * BLOCK_BITS`` is the block's key."""
    c = coords.astype(np.int64) + _OFFSET
    b, l_ = c >> BLOCK_BITS, c & _LMASK
    return ((b[:, 0] << (2 * _BB + _LOCAL)) | (b[:, 1] << (_BB + _LOCAL)) | (b[:, 2] << _LOCAL)
            | (l_[:, 0] << (2 * BLOCK_BITS)) | (l_[:, 1] << BLOCK_BITS) | l_[:, 2])


def unblock_keys(keys: np.ndarray) -> np.ndarray:
    """(N,) block-major keys -> (N, 3) int64 voxel coordinates (inverse of :func:`block_keys`)."""
    b = keys >> _LOCAL
    bc = np.stack([(b >> (2 * _BB)) & _BMASK, (b >> _BB) & _BMASK, b & _BMASK], axis=1)
    lc = np.stack([(keys >> (2 * BLOCK_BITS)) & _LMASK, (keys >> BLOCK_BITS) & _LMASK, keys & _LMASK], axis=1)
    return (bc << BLOCK_BITS) + lc - _OFFSET


def _block_coords(bkeys: np.ndarray) -> np.ndarray:
    """(B,) block keys (``key >> 3 * BLOCK_BITS``) -> (B, 3) int64 block coordinates (voxel coords // BLOCK)."""
    return np.stack([(bkeys >> (2 * _BB)) & _BMASK, (bkeys >> _BB) & _BMASK, bkeys & _BMASK], axis=1) - \
        (_OFFSET >> BLOCK_BITS)


@dataclass
class QueryResult:
    """Answer of :meth:`VoxelMap.query` for one text.

    Attributes:
        slots: (M,) int64 matching voxel slots, best first (at most ``max_points``).
        scores: (M,) float32 exact cosine scores of ``slots``.
        count: number of voxels with score >= threshold (before ``max_points``).
        best_score: highest score anywhere in the map (-inf for an empty map).
        rescored: how many voxels needed an exact rescore (diagnostics).
    """

    slots: np.ndarray
    scores: np.ndarray
    count: int
    best_score: float
    rescored: int


@dataclass
class _PendingRefit:
    """A basis refit under way: the new basis and the store arrays encoded so far."""

    basis: np.ndarray        # (D, r) float32
    arrays: dict             # name -> (C, ...) array, like the store's (rows of the slots done and changed since)
    todo: np.ndarray         # slots with features when the refit started
    fit_n: int
    anchor_version: int
    pos: int = 0

    def grow(self, capacity: int) -> None:
        for name, old in list(self.arrays.items()):
            arr = np.zeros((capacity,) + old.shape[1:], old.dtype)
            arr[: len(old)] = old
            self.arrays[name] = arr


class VoxelMap:
    """Incremental voxel point map (see the module docstring for the design).

    Slot arrays (capacity C, of which ``len(self)`` are in use; ``self.valid`` marks them):
    ``positions`` (C, 3) f32, ``colors`` (C, 3) f32 in [0, 1], ``counts`` (C,) u32,
    ``last_seen`` (C,) i64 integration index, ``labels`` (C,) i64 (255 none), ``scores`` (C,) f32,
    ``features`` (C, D) f16 (once features exist), ``dirty`` (C,) bool (changed since last taken).
    """

    def __init__(self, config: Optional[VoxelMapConfig] = None):
        self.config = config or VoxelMapConfig()
        if self.config.voxel_size <= 0:
            raise ValueError(f"voxel_size must be positive, got {self.config.voxel_size}")
        if self.config.max_points <= 0:
            raise ValueError(f"max_points must be positive, got {self.config.max_points}")
        if self.config.eviction not in ("oldest", "farthest"):
            raise ValueError(f"eviction must be 'oldest' or 'farthest', got {self.config.eviction!r}")
        if self.config.feature_store not in FEATURE_STORES:
            raise ValueError(f"feature_store must be one of {', '.join(FEATURE_STORES)}, "
                             f"got {self.config.feature_store!r}")
        if self.config.query_rank < 1 or self.config.store_rank < 1:
            raise ValueError(f"query_rank and store_rank must be >= 1, got {self.config.query_rank}, "
                             f"{self.config.store_rank}")
        self._generation = 0
        self._snap: Optional["MapSnapshot"] = None
        self.reset()

    # ------------------------------------------------------------------ storage
    @property
    def compact(self) -> bool:
        """Whether features live in the int8 store (:mod:`sas_core.geometry.feature_store`)."""
        return self.config.feature_store == "int8"

    def reset(self) -> None:
        """Forget everything (capacity shrinks back to ``initial_capacity``)."""
        cap = int(min(self.config.initial_capacity, self.config.max_points))
        self._generation += 1                     # a snapshot under way starts again
        self._keys = np.zeros(0, np.int64)        # sorted block-major voxel keys in use (never written in place)
        self._key_slot = np.zeros(0, np.int64)    # slot of each sorted key (never written in place)
        self._bkeys = np.zeros(0, np.int64)       # sorted keys of the blocks that hold a voxel
        self._free = np.zeros(0, np.int64)        # free slots below self._top
        self._top = 0                             # slots >= _top were never used
        self.positions = np.zeros((cap, 3), np.float32)
        self.colors = np.zeros((cap, 3), np.float32)
        self.counts = np.zeros(cap, np.uint32)
        self.last_seen = np.zeros(cap, np.int64)
        self.labels = np.full(cap, IGNORE_LABEL, np.int64)
        self.scores = np.zeros(cap, np.float32)
        self.dirty = np.zeros(cap, bool)
        self.valid = np.zeros(cap, bool)
        self.feature_counts = np.zeros(cap, np.float32)
        self.features = None  # (C, D) fp16 array, or the int8 store's DecodedFeatures view
        self._codes: Optional[np.ndarray] = None    # fp16 store: (C, r) f32 reduced query coefficients
        self._resid: Optional[np.ndarray] = None    # (C,) f32 |f - B c|
        self._q: Optional[np.ndarray] = None        # int8 store: (C, h) int8 head of the quantised coefficients
        self._qscale: Optional[np.ndarray] = None   # (C,) f32 per-voxel scale
        self._qerr: Optional[np.ndarray] = None     # (C,) f32 |c - s q|
        self._qt: Optional[np.ndarray] = None       # (C, r - h) int8 tail of the codes
        self._qtn: Optional[np.ndarray] = None      # (C,) f32 |s q_tail|
        self._qtn_max = 0.0                         # running max of _qtn (never decreases)
        self._dim = 0
        self._sample: Optional[np.ndarray] = None   # int8 store: reservoir of original features (basis refits)
        self._n_sampled = 0
        self._basis: Optional[np.ndarray] = None
        self._anchor: Optional[np.ndarray] = None   # (K, D) directions the basis must contain (vocabulary)
        self._anchor_version = 0                    # bumped when the anchor changes
        self._fit_anchor = 0                        # anchor version the current basis was fitted with
        self._fit_n = 0
        self._pending: Optional[_PendingRefit] = None
        self.n_integrations = 0
        self.n_evicted = 0
        if self.config.feature_dim:
            self._alloc_features(self.config.feature_dim)

    @property
    def capacity(self) -> int:
        return len(self.positions)

    def __len__(self) -> int:
        return len(self._keys)

    def _store_names(self) -> tuple:
        """Names of the per-slot arrays of the feature store in use."""
        if self.compact:
            return ("_q", "_qt", "_qscale", "_resid", "_qerr", "_qtn")
        return ("features", "_codes", "_resid")

    def _grow(self, needed: int) -> None:
        cap = self.capacity
        if needed <= cap:
            return
        new = int(min(self.config.max_points, max(needed, 2 * cap)))
        for name in ("positions", "colors", "counts", "last_seen", "labels", "scores", "dirty", "valid",
                     "feature_counts") + self._store_names():
            old = getattr(self, name)
            if old is None or not isinstance(old, np.ndarray):
                continue
            arr = np.zeros((new,) + old.shape[1:], old.dtype)
            if name == "labels":
                arr[:] = IGNORE_LABEL
            arr[:cap] = old
            setattr(self, name, arr)
        if self._pending is not None:
            self._pending.grow(new)

    @property
    def rank(self) -> int:
        """Rank r of the basis (the reduced query store, or the int8 store)."""
        return 0 if not self._dim else int(min(self.config.store_rank if self.compact else self.config.query_rank,
                                               self._dim))

    def _alloc_features(self, dim: int) -> None:
        cap = self.capacity
        self._dim = int(dim)
        r = self.rank
        if self.compact:
            from sas_core.geometry.feature_store import DecodedFeatures

            h = min(r, _HEAD)
            self._q = np.zeros((cap, h), np.int8)         # head: the first columns (the vocabulary)
            self._qt = np.zeros((cap, r - h), np.int8)    # tail: the rest
            self._qtn = np.zeros(cap, np.float32)         # |s q_tail|: bounds the tail's part of a score
            self._qtn_max = 0.0
            self._qscale = np.zeros(cap, np.float32)
            self._qerr = np.zeros(cap, np.float32)
            self._sample = np.zeros((0, dim), np.float16)
            self._n_sampled = 0
            self.features = DecodedFeatures(self)
        else:
            self.features = np.zeros((cap, dim), np.float16)
            self._codes = np.zeros((cap, r), np.float32)
        self._resid = np.zeros(cap, np.float32)
        self._basis = None
        self._pending = None
        self._touch_all()

    @property
    def feature_dim(self) -> int:
        return self._dim if self.features is not None else 0

    def slots(self) -> np.ndarray:
        """(N,) int64 slots in use, ordered by voxel key (deterministic)."""
        return self._key_slot.copy()

    def keys_of(self, slots: np.ndarray) -> np.ndarray:
        """(M,) voxel coordinates (M, 3) int64 of ``slots`` (from the stored mean positions)."""
        return np.floor(self.positions[slots] * np.float32(1.0 / self.config.voxel_size)).astype(np.int64)

    def centers(self, slots: np.ndarray) -> np.ndarray:
        """(M, 3) float32 centres of the voxels of ``slots`` (fixed for a voxel's lifetime, unlike
        the running-mean ``positions``; live fusion tests visibility at these)."""
        slots = np.asarray(slots, np.int64)
        coords = np.floor(self.positions[slots] * np.float32(1.0 / self.config.voxel_size))
        return ((coords + 0.5) * self.config.voxel_size).astype(np.float32)

    def lookup(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) world points -> (N,) slot of the voxel containing each point, -1 where unmapped."""
        pts = np.asarray(points).reshape(-1, 3).astype(np.float32)  # same arithmetic as integrate()
        with np.errstate(invalid="ignore"):
            coords = np.floor(pts * np.float32(1.0 / self.config.voxel_size))
            # out of range / non-finite -> +-(_OFFSET - 1): a coordinate integrate never stores (it keeps
            # |c| < _OFFSET - 1), so such points find no voxel (not the voxel at the edge of the range)
            coords = np.where(np.isfinite(coords), np.clip(coords, 1 - _OFFSET, _OFFSET - 1), _OFFSET - 1)
        keys = block_keys(coords)
        if len(self._keys) == 0:
            return np.full(len(keys), -1, np.int64)
        pos = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        return np.where(self._keys[pos] == keys, self._key_slot[pos], -1)

    # ------------------------------------------------------------------ integration
    def integrate(self, points: np.ndarray, colors: Optional[np.ndarray] = None,
                  sensor_origin: Optional[np.ndarray] = None) -> np.ndarray:
        """Add world-frame points to the map.

        Args:
            points: (N, 3) float world coordinates; non-finite rows are ignored.
            colors: optional (N, 3) uint8 or float [0, 1].
            sensor_origin: (3,) sensor position, for ``max_radius`` and ``farthest`` eviction.

        Returns:
            (M,) int64 slots of the voxels this call touched (one per distinct voxel).
        """
        points = np.asarray(points)
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"points must be (N, 3), got {points.shape}")
        if colors is not None:
            colors = np.asarray(colors)
            if len(colors) != len(points):
                raise ValueError(f"{len(colors)} colours for {len(points)} points")
            colors = colors[:, :3].astype(np.float32) / (255.0 if colors.dtype == np.uint8 else 1.0)
        self.n_integrations += 1
        pts = points if points.dtype == np.float32 else points.astype(np.float32)
        coords = np.floor(pts * np.float32(1.0 / self.config.voxel_size))
        with np.errstate(invalid="ignore"):
            ok = (np.abs(coords) < _OFFSET - 1).all(axis=1)  # also drops NaN / inf rows
        if not ok.all():
            pts, coords = pts[ok], coords[ok]
            colors = colors[ok] if colors is not None else None
        if sensor_origin is not None and self.config.max_radius > 0:
            origin = np.asarray(sensor_origin, np.float32).reshape(3)
            near = np.einsum("ij,ij->i", pts - origin, pts - origin) <= self.config.max_radius ** 2
            pts, coords = pts[near], coords[near]
            colors = colors[near] if colors is not None else None
            self._drop_outside_radius(origin)
        if len(pts) == 0:
            return np.zeros(0, np.int64)
        keys = block_keys(coords)
        ukeys, inverse, npts = np.unique(keys, return_inverse=True, return_counts=True)
        inverse = inverse.reshape(-1)
        if len(ukeys) > self.config.max_points:  # one frame bigger than the whole map: keep a subset
            keep = np.random.default_rng(self.n_integrations).choice(len(ukeys), self.config.max_points,
                                                                     replace=False)
            sel = np.zeros(len(ukeys), bool)
            sel[keep] = True
            pts, coords = pts[sel[inverse]], coords[sel[inverse]]
            colors = colors[sel[inverse]] if colors is not None else None
            keys = block_keys(coords)
            ukeys, inverse, npts = np.unique(keys, return_inverse=True, return_counts=True)
            inverse = inverse.reshape(-1)
        mean_pos = np.stack([np.bincount(inverse, pts[:, i], len(ukeys)) for i in range(3)], 1) / npts[:, None]
        mean_col = None
        if colors is not None:
            mean_col = np.stack([np.bincount(inverse, colors[:, i], len(ukeys)) for i in range(3)], 1) / npts[:, None]
        slots = self._slots_for(ukeys, mean_pos, sensor_origin)
        old = self.counts[slots].astype(np.float64)
        w = (npts / (old + npts))[:, None]
        self.positions[slots] += ((mean_pos - self.positions[slots]) * w).astype(np.float32)
        if mean_col is not None:
            self.colors[slots] += ((mean_col - self.colors[slots]) * w).astype(np.float32)
        self.counts[slots] = np.minimum(old + npts, np.iinfo(np.uint32).max).astype(np.uint32)
        self.last_seen[slots] = self.n_integrations
        self.dirty[slots] = True
        self._touch(slots)
        return slots

    def _slots_for(self, ukeys: np.ndarray, mean_pos: np.ndarray, origin) -> np.ndarray:
        """Slots of sorted unique keys, allocating (and evicting) for new ones."""
        pos = np.searchsorted(self._keys, ukeys)
        found = np.zeros(len(ukeys), bool)
        if len(self._keys):
            found = self._keys[np.minimum(pos, len(self._keys) - 1)] == ukeys
        slots = np.empty(len(ukeys), np.int64)
        slots[found] = self._key_slot[pos[found]]
        self.last_seen[slots[found]] = self.n_integrations  # protect re-observed voxels from eviction
        new = ~found
        n_new = int(new.sum())
        if n_new == 0:
            return slots
        free_after = len(self._free) + (self.config.max_points - self._top)
        if n_new > free_after:
            need = n_new - free_after + int(self.config.evict_fraction * self.config.max_points)
            self._evict(need, origin, protect=slots[found])
        take_free = min(len(self._free), n_new)
        fresh = n_new - take_free
        self._grow(self._top + fresh)
        new_slots = np.concatenate([self._free[:take_free], np.arange(self._top, self._top + fresh)])
        self._free = self._free[take_free:]
        self._top += fresh
        slots[new] = new_slots
        self._reset_slots(new_slots)
        self.positions[new_slots] = mean_pos[new]
        # merge the new keys into the sorted key index (positions recomputed: eviction changed it)
        pos_new = np.searchsorted(self._keys, ukeys[new])
        self._keys = np.insert(self._keys, pos_new, ukeys[new])
        self._key_slot = np.insert(self._key_slot, pos_new, new_slots)
        nb = np.unique(ukeys[new] >> _LOCAL)
        nb = nb[~np.isin(nb, self._bkeys, assume_unique=True)]
        if len(nb):
            self._bkeys = np.insert(self._bkeys, np.searchsorted(self._bkeys, nb), nb)
        return slots

    def _reset_slots(self, s: np.ndarray) -> None:
        self.valid[s] = True
        self.counts[s] = 0
        self.colors[s] = 0
        self.labels[s] = IGNORE_LABEL
        self.scores[s] = 0
        self.feature_counts[s] = 0
        if self.features is not None:
            for name in self._store_names():
                arr = getattr(self, name)
                if isinstance(arr, np.ndarray):
                    arr[s] = 0
            if self._pending is not None:
                for arr in self._pending.arrays.values():
                    arr[s] = 0
        self._touch(s)

    def remove(self, slots: np.ndarray) -> None:
        """Free ``slots`` (their voxels leave the map)."""
        slots = np.unique(np.asarray(slots, np.int64))
        if len(slots) == 0:
            return
        drop = np.zeros(self.capacity, bool)
        drop[slots] = True
        keep = ~drop[self._key_slot]
        self._keys, self._key_slot = self._keys[keep], self._key_slot[keep]
        self._bkeys = _unique_sorted(self._keys >> _LOCAL)
        self.valid[slots] = False
        self.dirty[slots] = False
        self._free = np.concatenate([self._free, slots])
        self.n_evicted += len(slots)

    def _evict(self, n: int, origin, protect: np.ndarray) -> None:
        live = self._key_slot
        if self.config.eviction == "farthest" and origin is not None:
            d = np.einsum("ij,ij->i", self.positions[live] - origin, self.positions[live] - origin)
            order_key = -d
        else:
            order_key = self.last_seen[live].astype(np.float64)
        if len(protect):
            mask = np.zeros(self.capacity, bool)
            mask[protect] = True
            order_key = np.where(mask[live], np.inf, order_key)
        n = min(n, len(live))
        victims = live[np.argpartition(order_key, n - 1)[:n]] if n > 0 else live[:0]
        self.remove(victims)

    def _drop_outside_radius(self, origin: np.ndarray) -> None:
        live = self._key_slot
        d2 = np.einsum("ij,ij->i", self.positions[live] - origin, self.positions[live] - origin)
        far = d2 > self.config.max_radius ** 2
        if far.any():
            self.remove(live[far])

    def take_dirty(self) -> np.ndarray:
        """Slots changed since the last call (and clear the flags)."""
        s = np.flatnonzero(self.dirty & self.valid)
        self.dirty[s] = False
        return s

    def region_slots(self, slots: np.ndarray, margin: float = 1.0) -> np.ndarray:
        """All live slots inside the bounding box of ``slots`` grown by ``margin`` metres (context for
        running a network on a changed region). Reads only the blocks the box overlaps."""
        slots = np.asarray(slots, np.int64)
        if len(slots) == 0:
            return self._key_slot[:0]
        lo = self.positions[slots].min(0) - margin
        hi = self.positions[slots].max(0) + margin
        return self.box_slots(lo, hi)

    def n_blocks(self) -> int:
        """Number of BLOCK^3 voxel blocks that hold at least one voxel."""
        return len(self._bkeys)

    def box_slots(self, lo, hi) -> np.ndarray:
        """Live slots whose (mean) position lies in the box ``lo <= p <= hi`` (metres, (3,) each), in
        key order. Cost: the blocks that overlap the box (a binary search each) and their voxels."""
        lo = np.asarray(lo, np.float64).reshape(3)
        hi = np.asarray(hi, np.float64).reshape(3)
        if len(self._keys) == 0 or not np.all(lo <= hi):
            return self._key_slot[:0]
        bc = _block_coords(self._bkeys)
        # a voxel's mean position stays inside its voxel (one voxel of slack for float rounding)
        blo = np.floor((np.floor(lo / self.config.voxel_size) - 1) / BLOCK)
        bhi = np.floor((np.floor(hi / self.config.voxel_size) + 1) / BLOCK)
        sel = self._bkeys[((bc >= blo) & (bc <= bhi)).all(axis=1)]
        if len(sel) == 0:
            return self._key_slot[:0]
        start = np.searchsorted(self._keys, sel << _LOCAL)
        end = np.searchsorted(self._keys, (sel + 1) << _LOCAL)
        idx = _ranges(start, end)
        cand = self._key_slot[idx]
        p = self.positions[cand]
        return cand[((p >= lo.astype(np.float32)) & (p <= hi.astype(np.float32))).all(axis=1)]

    # ------------------------------------------------------------------ features and labels
    def set_features(self, slots: np.ndarray, features, labels: Optional[np.ndarray] = None,
                     scores: Optional[np.ndarray] = None, counts: Optional[np.ndarray] = None) -> None:
        """Overwrite the features (and optionally labels/scores) of ``slots``.

        Args:
            slots: (M,) int slots.
            features: (M, D) array or torch tensor; stored L2-normalised in fp16 (full store) or as
                int8 coefficients in the basis (int8 store; the basis is fitted on the first call).
            counts: optional (M,) observation counts behind each feature (``feature_counts``;
                default 1, e.g. the number of views a fused mean comes from).
        """
        feats = _to_numpy(features).astype(np.float32)
        slots = np.asarray(slots, np.int64)
        if feats.ndim != 2 or feats.shape[0] != len(slots):
            raise ValueError(f"{feats.shape[0] if feats.ndim else 0} feature rows for {len(slots)} slots")
        if self.features is None or self._dim != feats.shape[1]:
            self._alloc_features(feats.shape[1])
        feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        if self.compact:
            self._sample_features(feats)
            if self._basis is None:  # fitted on the reservoir (at most _RESERVOIR rows of this first batch)
                self._basis = self._fit_basis(self._sample.astype(np.float32), seed=0)
                self._fit_n = len(self._sample)
                self._fit_anchor = self._anchor_version
            self._encode8(self._basis, self._store_arrays(), slots, feats)
            if self._pending is not None:
                self._encode8(self._pending.basis, self._pending.arrays, slots, feats)
        else:
            self.features[slots] = feats.astype(np.float16)
        self.feature_counts[slots] = 1.0 if counts is None else np.maximum(np.asarray(counts, np.float32), 1.0)
        if labels is not None:
            self.labels[slots] = labels
        if scores is not None:
            self.scores[slots] = scores
        if not self.compact:
            self._update_codes(slots)
        self._touch(slots)

    def classify(self, text: np.ndarray, slots: Optional[np.ndarray] = None) -> None:
        """Labels and scores of ``slots`` (default: all with features) = argmax / max of f . text_k
        (f_hat . text_k in the int8 store, computed in the basis: ``(s q) . (B^T text_k)``).

        ``text``: (K, D) L2-normalised class embeddings. Also anchors the query basis on them.
        """
        if self.features is None:
            return
        text = np.asarray(_to_numpy(text), np.float32)
        self.set_anchor(text)
        slots = self._key_slot if slots is None else np.asarray(slots, np.int64)
        slots = slots[self.valid[slots] & (self.feature_counts[slots] > 0)]
        from sas_core.text import text_labels  # the one argmax against text embeddings

        if self.compact and self._basis is None:
            return
        text_r = text @ self._basis if self.compact else text
        for chunk in np.array_split(slots, max(1, len(slots) // 65536 + 1)):
            if self.compact:
                labels, scores = text_labels(self._project(chunk), text_r)
            else:
                labels, scores = text_labels(self.features[chunk], text)
            self.labels[chunk] = labels.numpy()
            self.scores[chunk] = scores.numpy()
        self._touch(slots)

    # ------------------------------------------------------------------ reduced query store
    def set_anchor(self, text: Optional[np.ndarray]) -> None:
        """Directions (K, D) the query basis must span exactly (the current vocabulary).

        A changed anchor makes :meth:`needs_refit` true; until the refit, queries keep using the
        old basis (still exact, only slower for the new words)."""
        if text is None:
            self._anchor = None
        else:
            text = np.asarray(text, np.float32)
            if self._anchor is None or self._anchor.shape != text.shape or not np.allclose(self._anchor, text):
                self._anchor = text.copy()
                self._anchor_version += 1

    def _fit_basis(self, X: np.ndarray, seed: int) -> np.ndarray:
        """Orthonormal (D, r) float32 basis: anchor directions + principal directions of the
        (S, D) feature sample ``X``."""
        D = self._dim
        r = self.rank
        parts = []
        if self._anchor is not None and len(self._anchor):
            q, _ = np.linalg.qr(self._anchor.T.astype(np.float64))
            parts.append(q[:, : min(r, q.shape[1])])
        have = sum(p.shape[1] for p in parts)
        if have < r and len(X):
            X = np.asarray(X, np.float32)
            if parts:
                P = parts[0].astype(np.float32)
                X = X - (X @ P) @ P.T
            # principal directions from the D x D second-moment matrix (cheap eigh, no big SVD)
            evals, evecs = np.linalg.eigh((X.T @ X).astype(np.float64))
            parts.append(evecs[:, ::-1][:, : r - have])
        if not parts:
            parts.append(np.eye(D, r))
        B, _ = np.linalg.qr(np.concatenate(parts, axis=1))
        if B.shape[1] < r:  # pad with any orthonormal complement
            extra, _ = np.linalg.qr(np.concatenate([B, np.random.default_rng(seed).normal(size=(D, r - B.shape[1]))], 1))
            B = extra[:, :r]
        return np.ascontiguousarray(B[:, :r], dtype=np.float32)

    def _fit_sample(self, live: np.ndarray, sample: int, seed: int) -> np.ndarray:
        """The features a basis is fitted on: a sample of the live voxels' fp16 features, or the
        int8 store's reservoir of original features."""
        if self.compact:
            return self._sample[:sample].astype(np.float32)
        rng = np.random.default_rng(seed)
        pick = live if len(live) <= sample else rng.choice(live, sample, replace=False)
        return self.features[np.sort(pick)].astype(np.float32)

    def start_refit(self, sample: int = 8192, seed: int = 0) -> None:
        """Begin a refit of the query basis: the new basis is fitted now (on a sample: cheap); the
        coefficients of every voxel follow in :meth:`refit_step` calls. Queries keep the old basis
        until the last step. Restarts a refit already under way. (int8 store: voxels are re-encoded
        from their stored ``f_hat``, see :mod:`sas_core.geometry.feature_store`.)"""
        if self.features is None:
            return
        live = self._key_slot[self.feature_counts[self._key_slot] > 0]
        if self.compact and (self._basis is None or not len(self._sample)):
            return
        basis = self._fit_basis(self._fit_sample(live, sample, seed), seed)
        # np.zeros (calloc: pages are zeroed lazily, as they get written), not zeros_like (fills)
        arrays = {name: np.zeros(arr.shape, arr.dtype) for name, arr in self._store_arrays().items()}
        fit_n = self._n_sampled if self.compact else len(live)
        self._pending = _PendingRefit(basis, arrays, live.copy(), fit_n, self._anchor_version)

    @property
    def refit_pending(self) -> bool:
        """Whether a refit started by :meth:`start_refit` is still under way."""
        return self._pending is not None

    def refit_step(self, rows: int = 65536) -> bool:
        """Encode up to ``rows`` voxels (0: all the rest) with the pending basis; the call that
        finishes swaps the new basis in. Returns True when no refit is pending any more."""
        p = self._pending
        if p is None:
            return True
        end = len(p.todo) if rows <= 0 else min(len(p.todo), p.pos + int(rows))
        chunk = p.todo[p.pos:end]
        chunk = chunk[self.valid[chunk] & (self.feature_counts[chunk] > 0)]
        if self.compact:
            self._reencode8(p.basis, p.arrays, chunk)
        else:
            self._encode(p.basis, p.arrays["_codes"], p.arrays["_resid"], chunk)
        p.pos = end
        if p.pos < len(p.todo):
            return False
        self._basis = p.basis
        for name, arr in p.arrays.items():
            setattr(self, name, arr)
        self._fit_n, self._fit_anchor = p.fit_n, p.anchor_version
        self._pending = None
        self._touch_all()
        return True

    def refit_basis(self, sample: int = 8192, seed: int = 0) -> None:
        """Recompute the query basis (anchor directions + principal directions of stored features) and
        every voxel's coefficients and residual in one go. O(N * D * r)."""
        self.start_refit(sample, seed)
        self.refit_step(0)

    def needs_refit(self) -> bool:
        """True when no basis exists yet, the vocabulary (anchor) changed since the fit, or the
        number of voxels with features doubled since the fit (up to a fit on 200k voxels: beyond
        that the basis is representative and a refit, O(N D r), is not worth its cost); False
        while a refit is under way. Answers stay exact either way; a fresher basis only makes them
        faster.

        int8 store: the basis is the store itself and a refit re-encodes from ``f_hat`` (lossy,
        and it cannot bring back what the store dropped), so it refits only while the map is young
        (features seen doubled since the fit, up to the 8192-row reservoir), never for a vocabulary
        change: new words are answered from ``f_hat`` within the stated bound."""
        if self.features is None or self._pending is not None:
            return False
        if self.compact:
            return self._basis is not None and self._fit_n < _RESERVOIR and \
                self._n_sampled > max(2 * self._fit_n, 256)
        if self._basis is None or self._fit_anchor != self._anchor_version:
            return True
        n_feat = int(np.count_nonzero(self.feature_counts[self._key_slot] > 0))
        return n_feat > max(2 * self._fit_n, 1000) and self._fit_n < 200_000

    def maybe_refit(self) -> bool:
        """Refit the basis in one go if :meth:`needs_refit`."""
        if self.needs_refit():
            self.refit_basis()
            return True
        return False

    def _update_codes(self, slots: np.ndarray) -> None:
        if self._basis is not None:
            self._encode(self._basis, self._codes, self._resid, slots)
        if self._pending is not None:
            self._encode(self._pending.basis, self._pending.arrays["_codes"], self._pending.arrays["_resid"], slots)

    def _encode(self, basis: np.ndarray, codes: np.ndarray, resid: np.ndarray, slots: np.ndarray) -> None:
        for chunk in np.array_split(slots, max(1, len(slots) // 65536 + 1)):
            f = self.features[chunk].astype(np.float32)
            c = f @ basis
            codes[chunk] = c
            # |f - B c|^2 = |f|^2 - |c|^2 (B orthonormal), in float64, + slack for the float32 GEMM
            r2 = np.einsum("ij,ij->i", f, f, dtype=np.float64) - np.einsum("ij,ij->i", c, c, dtype=np.float64)
            resid[chunk] = np.sqrt(np.maximum(r2, 0.0) + 1e-8)

    # ------------------------------------------------------------------ int8 store
    def _store_arrays(self) -> dict:
        """The per-slot arrays of the store (references, written in place)."""
        return {name: getattr(self, name) for name in self._store_names()
                if name != "features" and isinstance(getattr(self, name), np.ndarray)}

    def _sample_features(self, feats: np.ndarray) -> None:
        """Reservoir sample (at most ``_RESERVOIR`` rows, fp16) of the original features seen."""
        k = len(feats)
        have = len(self._sample)
        fill = max(0, min(k, _RESERVOIR - have))
        if fill > 0:
            self._sample = np.concatenate([self._sample, feats[:fill].astype(np.float16)])
        if fill < k:
            rng = np.random.default_rng(self._n_sampled)
            j = rng.integers(0, self._n_sampled + np.arange(fill, k) + 1)
            hit = j < _RESERVOIR
            self._sample[j[hit]] = feats[fill:][hit].astype(np.float16)
        self._n_sampled += k

    def _put_codes(self, arrays: dict, s: np.ndarray, q: np.ndarray, scale: np.ndarray) -> None:
        """Store the (M, r) int8 codes ``q`` of slots ``s``: head, tail and the tail's norm."""
        h = arrays["_q"].shape[1]
        arrays["_q"][s], arrays["_qt"][s], arrays["_qscale"][s] = q[:, :h], q[:, h:], scale
        tail = q[:, h:].astype(np.float32)
        qtn = np.sqrt(np.einsum("ij,ij->i", tail, tail)) * scale * np.float32(1.0 + 1e-6) + np.float32(1e-7)
        arrays["_qtn"][s] = qtn
        if len(qtn):
            self._qtn_max = max(self._qtn_max, float(qtn.max()))

    def _project(self, rows: np.ndarray, arrays: Optional[dict] = None) -> np.ndarray:
        """(M, r) float32 dequantised coefficients ``s q`` of ``rows`` (head and tail)."""
        a = arrays or self._store_arrays()
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), a["_q"].shape[1] + a["_qt"].shape[1]), np.float32)
        h = a["_q"].shape[1]
        out[:, :h] = a["_q"][rows]
        out[:, h:] = a["_qt"][rows]
        out *= a["_qscale"][rows, None]
        return out

    def _encode8(self, basis: np.ndarray, arrays: dict, slots: np.ndarray, feats: np.ndarray) -> None:
        """Encode the original unit features ``feats`` (M, D) of ``slots`` into ``arrays``."""
        from sas_core.geometry.feature_store import quantize

        for a in range(0, len(slots), 65536):
            f, s = feats[a:a + 65536], slots[a:a + 65536]
            c = f @ basis
            q, scale, qerr = quantize(c)
            r2 = np.einsum("ij,ij->i", f, f, dtype=np.float64) - np.einsum("ij,ij->i", c, c, dtype=np.float64)
            self._put_codes(arrays, s, q, scale)
            arrays["_qerr"][s] = qerr
            arrays["_resid"][s] = np.sqrt(np.maximum(r2, 0.0) + 1e-8) + 1e-5

    def _reencode8(self, basis: np.ndarray, arrays: dict, slots: np.ndarray) -> None:
        """Re-encode ``slots`` from their stored f_hat in the new ``basis`` (bounds grown by the
        triangle inequality, see :mod:`sas_core.geometry.feature_store`)."""
        from sas_core.geometry.feature_store import quantize

        for a in range(0, len(slots), 65536):
            s = slots[a:a + 65536]
            fh = self._project(s) @ self._basis.T
            e = np.sqrt(self._resid[s].astype(np.float64) ** 2 + self._qerr[s].astype(np.float64) ** 2)
            c = fh @ basis
            q, scale, qerr = quantize(c)
            d = fh - c @ basis.T
            out = np.sqrt(np.einsum("ij,ij->i", d, d, dtype=np.float64) + 1e-8)
            self._put_codes(arrays, s, q, scale)
            arrays["_qerr"][s] = (e + qerr + 1e-5).astype(np.float32)
            arrays["_resid"][s] = (e + out + 1e-5).astype(np.float32)

    def _int8_rows(self, t_r: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact stored scores ``f_hat . t`` of ``rows`` (head + tail GEMVs over those rows)."""
        from sas_core.geometry.feature_store import int8_scores

        h = self._q.shape[1]
        out = int8_scores(self._q, self._qscale, t_r[:h], rows=rows)
        if self._qt.shape[1]:
            out += int8_scores(self._qt, self._qscale, t_r[h:], rows=rows)
        return out

    def _query8(self, t_r: np.ndarray, threshold: float, max_points: int) -> QueryResult:
        """int8 store query: one scan of the head codes (the vocabulary's columns, ``_HEAD`` bytes a
        voxel) finds every voxel that can reach the threshold, ``head + |s q_tail| |t_tail|``; those,
        and those that can be the best, are rescored exactly with their tail. When the text is far
        from the head (the bound is loose) both parts are scanned in full instead."""
        from sas_core.geometry.feature_store import int8_scores, int8_threshold_scan

        top = self._top
        h = self._q.shape[1]
        valid, fc = self.valid[:top], self.feature_counts[:top]
        tt = t_r[h:]
        margin = float(np.linalg.norm(tt)) * self._qtn_max * (1 + 1e-5) + 1e-6 if len(tt) else 0.0
        if margin > _HEAD_MARGIN:  # scan everything: head and tail
            usable = valid & (fc > 0)
            if not usable.any():
                return QueryResult(np.zeros(0, np.int64), np.zeros(0, np.float32), 0, float("-inf"), 0)
            score = int8_scores(self._q[:top], self._qscale[:top], t_r[:h])
            score += int8_scores(self._qt[:top], self._qscale[:top], tt)
            score[~usable] = -np.inf
            return _ranked(None, score, threshold, max_points, top)
        head, best_h, cand = int8_threshold_scan(self._q[:top], self._qscale[:top], t_r[:h], valid, fc,
                                                 threshold - margin)
        if best_h == float("-inf"):
            return QueryResult(np.zeros(0, np.int64), np.zeros(0, np.float32), 0, float("-inf"), 0)
        if best_h - 2 * margin < threshold - margin:  # the best voxel may lie below the candidates
            cand = np.union1d(cand, np.flatnonzero(head >= best_h - 2 * margin))
        exact = head[cand]
        if len(tt) and len(cand):
            exact = exact + int8_scores(self._qt, self._qscale, tt, rows=cand)
        res = _ranked(cand, exact, threshold, max_points, len(cand))
        return res

    def stored_scores(self, text: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """(M,) float32 scores ``f . t`` of ``slots`` from the store (fp16 features, or the int8
        store's ``f_hat``), computed directly (a reference for queries)."""
        slots = np.asarray(slots, np.int64)
        t = np.asarray(_to_numpy(text), np.float32).reshape(-1)
        if self.compact:
            return self._int8_rows(self._basis.T @ t, slots)
        return np.concatenate([self.features[slots[a:a + 65536]].astype(np.float32) @ t
                               for a in range(0, len(slots), 65536)] or [np.zeros(0, np.float32)])

    def error_bound(self, text: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """(M,) upper bounds of ``|f . t - f_hat . t|`` for ``slots`` (int8 store: f the original
        feature, f_hat the stored one; full store: 0, answers are the fp16 features' own)."""
        slots = np.asarray(slots, np.int64)
        if not self.compact or self._basis is None:
            return np.zeros(len(slots), np.float32)
        from sas_core.geometry.feature_store import error_bound

        return error_bound(self._resid[slots], self._qerr[slots], self._basis, np.asarray(_to_numpy(text), np.float32))

    # ------------------------------------------------------------------ queries
    def query(self, text: np.ndarray, threshold: float = 0.0, max_points: int = 0,
              exact_rescore: bool = True, exact_topk: bool = False, region=None) -> QueryResult:
        """Voxels whose cosine score with the unit text embedding ``text`` (D,) is >= ``threshold``.

        Full store: uses the reduced store with exact rescoring of uncertain voxels (module
        docstring): ``count``, ``best_score`` and every returned score equal a full scan over the
        fp16 features, and every returned voxel truly scores >= ``threshold``. When more than
        ``max_points`` (0 = no limit) voxels match, the returned ones are those with the best
        guaranteed lower bounds, best first; they can differ from the exact top ``max_points`` only
        among voxels whose scores lie within the error band (``exact_topk=True`` rescores enough
        voxels to return the exact top set).

        int8 store: one int8 GEMV scores every voxel's stored feature exactly (a full scan of the
        store: counts, best score, the exact top ``max_points``); against the original features
        each score is within :meth:`error_bound`.

        ``region``: optional box ``(lo, hi)`` (two (3,) points, metres): only voxels inside it are
        considered (:meth:`box_slots`: only the blocks the box overlaps are read); scored exactly.
        """
        empty = QueryResult(np.zeros(0, np.int64), np.zeros(0, np.float32), 0, float("-inf"), 0)
        if self.features is None or len(self._key_slot) == 0:
            return empty
        t = np.asarray(_to_numpy(text), np.float32).reshape(-1)
        if t.shape[0] != self._dim:
            raise ValueError(f"text embedding has {t.shape[0]} dims, map features have {self._dim}")
        if region is not None:
            lo, hi = region
            cand = self.box_slots(lo, hi)
            cand = cand[self.feature_counts[cand] > 0]
            if len(cand) == 0:
                return empty
            if self.compact:
                score = self._int8_rows(self._basis.T @ t, cand)
            else:
                score = self.features[cand].astype(np.float32) @ t
            return _ranked(cand, score, threshold, max_points, len(cand))
        if self.compact:
            if self._basis is None:
                return empty
            return self._query8(self._basis.T @ t, float(threshold), int(max_points))
        if self._basis is None:
            self.refit_basis()
        t_r = self._basis.T @ t
        tau = float(np.linalg.norm(t - self._basis @ t_r)) + 1e-5  # + float rounding slack
        top = self._top
        usable = self.valid[:top] & (self.feature_counts[:top] > 0)
        if not usable.any():
            return empty
        # one contiguous float32 GEMV over the slot range (no gather), then interval bounds
        approx = self._codes[:top] @ t_r
        err = self._resid[:top] * tau + 1e-5
        lo = np.where(usable, approx - err, -np.inf)
        hi = np.where(usable, approx + err, -np.inf)
        certain_above = lo >= threshold
        need = (hi >= threshold) & ~certain_above            # straddles the threshold
        need |= hi >= lo.max()                               # could be the best score
        loose = err > 1e-4                                   # approx not already exact to 1e-4
        n_certain = int(certain_above.sum())
        cand = None
        if max_points and n_certain > max_points:
            kth_lo = np.partition(lo[certain_above], -max_points)[-max_points]
            if exact_topk:
                need |= certain_above & loose & (hi >= kth_lo)   # might be in the exact top max_points
            else:  # the max_points best guaranteed lower bounds (all surely above the threshold)
                cand = np.flatnonzero(certain_above & (lo >= kth_lo))[:max_points]
                sel = np.zeros(top, bool)
                sel[cand] = True
                need |= sel & loose
        else:
            need |= certain_above & loose
        idx = np.flatnonzero(need)
        score = approx.astype(np.float32)
        if exact_rescore and len(idx):
            score[idx] = self.features[idx].astype(np.float32) @ t
        rescored = np.zeros(top, bool)
        rescored[idx] = True
        above_mask = np.where(rescored, score >= threshold, certain_above) & usable
        above = np.flatnonzero(above_mask)
        best = float(score[idx].max()) if len(idx) else float(np.where(usable, score, -np.inf).max())
        if max_points and n_certain > max_points and not exact_topk:
            # the chosen candidates (surely above) plus rescored voxels that proved to be above
            pool = np.union1d(cand, np.flatnonzero(need & above_mask))
            order = pool[np.argsort(-score[pool], kind="stable")][:max_points]
        else:
            order = above[np.argsort(-score[above], kind="stable")][: max_points or None]
        return QueryResult(order.astype(np.int64), score[order], int(len(above)), best, int(len(idx)))

    def scan_query(self, text: np.ndarray, threshold: float = 0.0) -> np.ndarray:
        """Reference: (N,) exact scores of all live voxels (in ``slots()`` order) by a full scan (of
        the fp16 features, or of the decoded int8 store ``f_hat`` in float32)."""
        live = self._key_slot
        t = np.asarray(text, np.float32)
        if self.compact:
            return np.concatenate([self.features.float32(live[a:a + 65536]) @ t
                                   for a in range(0, len(live), 65536)] or [np.zeros(0, np.float32)])
        return self.features[live].astype(np.float32) @ t

    # ------------------------------------------------------------------ export and snapshots
    def _export_sources(self) -> dict:
        """Per-slot arrays that :meth:`export` reads (by name)."""
        src = {name: getattr(self, name) for name in _EXPORT_SLOT_ARRAYS}
        if self.features is not None:
            src.update({k: v for k, v in self._store_arrays().items() if k != "_qtn"} if self.compact
                       else {"features": self.features})
        return src

    def export(self) -> dict:
        """Arrays of the live voxels in key order: positions (N,3) f32, colors (N,3) u8, labels (N,) i64,
        scores (N,) f32, counts (N,) u32, coords (N,3) i32 voxel coordinates, feature_counts (N,) f32,
        features (N,D) f16 or None. The int8 store gives ``features`` None and its own arrays
        instead: codes (N,r) i8, code_scale / code_resid / code_qerr (N,) f32, code_basis (D,r) f32."""
        return _export_arrays(self._export_sources(), self._keys, self._key_slot, self._basis if self.compact else None)

    def start_snapshot(self) -> "MapSnapshot":
        """Begin an incremental, consistent copy of the map for saving (call under the caller's lock;
        then :meth:`MapSnapshot.step` under the lock until it returns True, releasing the lock in
        between; then :meth:`MapSnapshot.export` and write without the lock). Replaces a snapshot
        under way."""
        self._snap = MapSnapshot(self)
        return self._snap

    def _touch(self, slots) -> None:
        """Mark ``slots`` changed for a snapshot under way (no cost without one)."""
        snap = self._snap
        if snap is not None and snap.touched is not None:
            s = np.asarray(slots, np.int64)
            snap.touched[s[s < len(snap.touched)]] = True

    def _touch_all(self) -> None:
        snap = getattr(self, "_snap", None)
        if snap is not None and snap.touched is not None:
            snap.touched[:] = True

    @classmethod
    def load(cls, path, config: Optional[VoxelMapConfig] = None) -> tuple:
        """Read a map that :meth:`save` wrote (a map folder, checked against its manifest; a bare
        ``.npz`` of the older two-file format is still read). Returns ``(map, class_names or None)``.

        ``config`` (default VoxelMapConfig()) gives capacity, eviction and query rank; its voxel
        size must equal the saved one. Colours come back at the saved 8-bit precision; eviction
        ages start again from zero. No pickle is ever read (``allow_pickle=False``).

        Raises:
            ValueError: a bad manifest or hash, other voxel size, more voxels than ``max_points``,
                inconsistent arrays.
            FileNotFoundError: no such map.
        """
        npz = map_arrays_path(path)
        config = config or VoxelMapConfig()
        import zipfile
        import zlib

        try:
            with np.load(npz, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # a corrupt (legacy) file
            raise ValueError(f"{npz}: cannot read the map arrays ({type(exc).__name__}: {exc})") from None
        for key in ("positions", "colors", "labels", "scores", "counts", "voxel_size"):
            if key not in data:
                raise ValueError(f"{npz}: not a saved voxel map (no {key!r} array)")
        vs = float(data["voxel_size"])
        if not np.isclose(vs, config.voxel_size, rtol=1e-6):
            raise ValueError(f"{npz} has voxel size {vs} m, this map {config.voxel_size} m")
        pos = np.asarray(data["positions"], np.float32)
        n = len(pos)
        if n > config.max_points:
            raise ValueError(f"{npz} has {n} voxels, more than max_points {config.max_points}")
        coords = data.get("coords")
        if coords is None:
            coords = np.floor(pos * np.float32(1.0 / config.voxel_size))
        keys = block_keys(np.asarray(coords, np.int64))
        order = np.argsort(keys, kind="stable")
        if n and np.any(np.diff(keys[order]) == 0):
            raise ValueError(f"{npz}: two voxels share one voxel key")
        for key in ("colors", "labels", "scores", "counts"):
            if len(data[key]) != n:
                raise ValueError(f"{npz}: {key} has {len(data[key])} rows for {n} positions")
        m = cls(config)
        m._grow(n)
        m._keys, m._key_slot, m._top = keys[order], np.arange(n, dtype=np.int64)[order], n
        m._bkeys = _unique_sorted(m._keys >> _LOCAL)
        m.valid[:n] = True
        m.positions[:n] = pos
        colors = np.asarray(data["colors"])
        m.colors[:n] = colors.astype(np.float32) / (255.0 if colors.dtype == np.uint8 else 1.0)
        m.labels[:n] = data["labels"]
        m.scores[:n] = data["scores"]
        m.counts[:n] = data["counts"]
        fc = data.get("feature_counts")
        if "codes" in data and n:  # a map saved from the int8 store
            codes, basis = np.asarray(data["codes"]), np.asarray(data.get("code_basis"), np.float32)
            if codes.ndim != 2 or len(codes) != n or codes.dtype != np.int8 or basis.ndim != 2 or \
                    basis.shape[1] != codes.shape[1] or any(len(data.get(k, ())) != n for k in _CODE_ARRAYS):
                raise ValueError(f"{npz}: inconsistent int8 feature store arrays (codes {codes.shape})")
            m.feature_counts[:n] = fc if fc is not None else 1.0
            if m.compact and min(m.config.store_rank, basis.shape[0]) == codes.shape[1]:
                m._alloc_features(basis.shape[0])
                m._basis = np.ascontiguousarray(basis)
                for name, key in zip(("_resid", "_qerr"), _CODE_ARRAYS[1:]):
                    getattr(m, name)[:n] = data[key]
                for a in range(0, n, 65536):
                    rows = np.arange(a, min(n, a + 65536))
                    m._put_codes(m._store_arrays(), rows, codes[rows], np.asarray(data["code_scale"][rows], np.float32))
                m._fit_n = _RESERVOIR  # the originals are gone: no refit from a sample
            else:  # decode f_hat into the configured store (lossless for fp16, re-encoded for int8)
                has = np.flatnonzero(m.feature_counts[:n] > 0)
                for a in range(0, len(has), 65536):
                    rows = has[a:a + 65536]
                    fh = (codes[rows].astype(np.float32) * np.asarray(data["code_scale"])[rows, None]) @ basis.T
                    m.set_features(rows, fh, counts=m.feature_counts[rows])
        elif "features" in data and n:
            feats = np.asarray(data["features"])
            if feats.ndim != 2 or len(feats) != n:
                raise ValueError(f"{npz}: features are {feats.shape} for {n} positions")
            m.feature_counts[:n] = fc if fc is not None else (np.abs(feats).sum(1) > 0)
            if m.compact:
                has = np.flatnonzero(m.feature_counts[:n] > 0)
                for a in range(0, len(has), 65536):
                    rows = has[a:a + 65536]
                    m.set_features(rows, feats[rows], counts=m.feature_counts[rows])
            else:
                m._alloc_features(feats.shape[1])
                m.features[:n] = feats.astype(np.float16)
        names = [str(x) for x in data["class_names"]] if "class_names" in data else None
        return m, names

    def save(self, path, class_names=None, overwrite: bool = False):
        """Write this map as one unit, the folder ``path`` (see the module docstring; the name is
        kept as given, suffixes included). Returns the folder. Raises FileExistsError when it
        exists and ``overwrite`` is False."""
        return write_map(path, self.export(), self.config.voxel_size, class_names, overwrite=overwrite)

    def memory_bytes(self) -> int:
        """Bytes held by the slot arrays, the feature store and the key index."""
        return int(sum(self.memory_model().values()))

    def memory_model(self) -> dict:
        """Bytes by component: ``geometry`` (positions, colours, counts, ages, flags), ``labels``
        (labels, scores), ``features`` (the fp16 features, or the int8 codes + scales + error
        terms + basis + refit sample), ``query_store`` (the fp16 store's reduced coefficients and
        residuals), ``index`` (sorted keys, their slots, block keys, free list), ``refit`` (a refit
        under way)."""
        nb = lambda *arrs: int(sum(a.nbytes for a in arrs if isinstance(a, np.ndarray)))  # noqa: E731
        out = dict(geometry=nb(self.positions, self.colors, self.counts, self.last_seen, self.dirty, self.valid,
                               self.feature_counts),
                   labels=nb(self.labels, self.scores),
                   index=nb(self._keys, self._key_slot, self._bkeys, self._free))
        if self.compact:
            out["features"] = nb(self._q, self._qt, self._qtn, self._qscale, self._resid, self._qerr, self._basis,
                                 self._sample)
            out["query_store"] = 0
        else:
            out["features"] = nb(self.features)
            out["query_store"] = nb(self._codes, self._resid, self._basis)
        out["refit"] = 0 if self._pending is None else nb(self._pending.todo, *self._pending.arrays.values())
        return out


#: Per-slot arrays every export holds (besides the feature store's).
_EXPORT_SLOT_ARRAYS = ("positions", "colors", "labels", "scores", "counts", "feature_counts")
#: The int8 store's per-voxel arrays in a saved map (besides ``codes`` and ``code_basis``).
_CODE_ARRAYS = ("code_scale", "code_resid", "code_qerr")


def _export_arrays(src: dict, keys: np.ndarray, key_slot: np.ndarray, basis: Optional[np.ndarray],
                   take=None) -> dict:
    """The export dict (:meth:`VoxelMap.export`) from per-slot arrays ``src`` gathered at ``key_slot``
    (``take(array, slots)`` gathers; default plain indexing)."""
    take = take or (lambda arr, s: arr[s])
    s = key_slot
    out = dict(positions=take(src["positions"], s),
               colors=np.clip(np.round(take(src["colors"], s) * 255), 0, 255).astype(np.uint8),
               labels=take(src["labels"], s), scores=take(src["scores"], s), counts=take(src["counts"], s),
               coords=unblock_keys(keys).astype(np.int32), feature_counts=take(src["feature_counts"], s),
               features=take(src["features"], s) if "features" in src else None)
    if "_q" in src:
        out.update(codes=np.concatenate([take(src["_q"], s), take(src["_qt"], s)], axis=1), code_scale=take(src["_qscale"], s), code_resid=take(src["_resid"], s),
                   code_qerr=take(src["_qerr"], s), code_basis=np.asarray(basis, np.float32).copy())
    return out


class MapSnapshot:
    """An incremental, consistent copy of a :class:`VoxelMap` for saving without stalling the owner.

    The per-slot arrays are copied slot range by slot range (:meth:`step`, ``LOCK_SLICE`` slots a
    call: a few ms each, under the caller's lock, released in between); every slot the map changes
    meanwhile is marked and copied again by the last step, which also takes the key index (the
    sorted key arrays are never written in place, so taking them costs nothing) and slots past the
    range copied. The copy equals the map at the moment the last step returned. :meth:`export` then
    gathers the voxels in key order without any lock."""

    def __init__(self, vmap: "VoxelMap"):
        self.map = vmap
        self.done = False
        self._start()

    def _start(self) -> None:
        m = self.map
        self.generation = m._generation
        self.n0 = m._top
        self.pos = 0
        self.touched = np.zeros(self.n0, bool)
        self.bufs = {name: np.empty((self.n0,) + arr.shape[1:], arr.dtype)
                     for name, arr in m._export_sources().items()}
        self.tails = None
        self.keys = self.key_slot = self.basis = None

    def step(self, rows: int = LOCK_SLICE) -> bool:
        """Copy the next ``rows`` slots (0: all); returns True once the copy is complete."""
        m = self.map
        if self.done:
            return True
        if m._generation != self.generation or set(self.bufs) != set(m._export_sources()):
            self._start()  # the map was reset or its feature store reallocated: start again
        src = m._export_sources()
        end = self.n0 if rows <= 0 else min(self.n0, self.pos + int(rows))
        for name, buf in self.bufs.items():
            buf[self.pos:end] = src[name][self.pos:end]
        self.touched[self.pos:end] = False
        self.pos = end
        if self.pos < self.n0:
            return False
        again = np.flatnonzero(self.touched)  # changed after their range was copied
        for name, buf in self.bufs.items():
            buf[again] = src[name][again]
        top = m._top
        self.tails = {name: src[name][self.n0:top].copy() for name in self.bufs}
        self.keys, self.key_slot = m._keys, m._key_slot
        self.basis = None if m._basis is None or not m.compact else m._basis.copy()
        self.done = True
        if m._snap is self:
            m._snap = None
        self.touched = None
        return True

    def export(self) -> dict:
        """The copied map as :meth:`VoxelMap.export` arrays (needs no lock)."""
        if not self.done:
            raise RuntimeError("snapshot not complete: call step() until it returns True")
        n0 = self.n0

        def take(arr, s):
            tail = next(t for name, t in self.tails.items() if self.bufs[name] is arr)
            out = np.empty((len(s),) + arr.shape[1:], arr.dtype)
            low = s < n0
            out[low] = arr[s[low]]
            out[~low] = tail[s[~low] - n0]
            return out

        return _export_arrays(self.bufs, self.keys, self.key_slot, self.basis, take=take)


#: ``format`` of a saved map's manifest, and the version this code reads up to: 1 (fp16 features or
#: none; still what a full-store map is written as), 2 (the int8 store's ``codes`` arrays).
MAP_FORMAT, MAP_FORMAT_VERSION = "sas-voxel-map", 2
MAP_MANIFEST, MAP_NPZ, MAP_PLY = "manifest.json", "map.npz", "map.ply"
_MANIFEST_MAX_BYTES = 64 << 20


def write_map(path, data: dict, voxel_size: float, class_names=None, overwrite: bool = False):
    """Write the arrays of :meth:`VoxelMap.export` as one map folder ``path`` (``map.npz``,
    ``map.ply``, ``manifest.json``), atomically (:func:`sas_core.io.atomic_dir`). Returns the folder.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (nothing is written).
    """
    import datetime
    import json
    from pathlib import Path

    from sas_core import __version__
    from sas_core.io import atomic_dir, sha256_file, write_ply

    path = Path(path)
    arrays = {k: v for k, v in data.items() if v is not None}
    arrays["voxel_size"] = np.float32(voxel_size)
    if class_names is not None:
        arrays["class_names"] = np.asarray(list(class_names), dtype=str)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        with open(tmp / MAP_NPZ, "wb") as f:
            np.savez(f, **arrays)
        write_ply(tmp / MAP_PLY, data["positions"], colors=data["colors"], labels=data["labels"],
                  scores=data["scores"])
        feats = data.get("features")
        if feats is None and data.get("codes") is not None:
            feats = data["code_basis"].T  # (r, D): the int8 store's feature size is the basis's D
        manifest = dict(
            format=MAP_FORMAT, format_version=2 if "codes" in arrays else 1, package="sas_core", package_version=__version__,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            n_voxels=int(len(data["positions"])), voxel_size=float(voxel_size),
            feature_dim=0 if feats is None else int(feats.shape[1]),
            vocabulary=None if class_names is None else [str(c) for c in class_names],
            files={name: dict(sha256=sha256_file(tmp / name), bytes=(tmp / name).stat().st_size)
                   for name in (MAP_NPZ, MAP_PLY)})
        (tmp / MAP_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def read_map_manifest(path) -> dict:
    """The manifest of the map folder ``path`` after checking it: format and version, and the size
    and sha256 of every file it lists. Raises ValueError (naming the map and the problem) or
    FileNotFoundError."""
    import json
    from pathlib import Path

    from sas_core.io import sha256_file

    path = Path(path)
    mpath = path / MAP_MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(f"map {path}: no {MAP_MANIFEST} (not a saved map folder)")
    if mpath.stat().st_size > _MANIFEST_MAX_BYTES:
        raise ValueError(f"map {path}: {MAP_MANIFEST} is larger than {_MANIFEST_MAX_BYTES} bytes")
    try:
        manifest = json.loads(mpath.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"map {path}: {MAP_MANIFEST} is not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MAP_FORMAT:
        raise ValueError(f"map {path}: {MAP_MANIFEST} is not a {MAP_FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= MAP_FORMAT_VERSION:
        raise ValueError(f"map {path}: format version {version!r}, this code reads 1..{MAP_FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or MAP_NPZ not in files:
        raise ValueError(f"map {path}: the manifest lists no {MAP_NPZ}")
    for name, entry in files.items():
        if not isinstance(name, str) or "/" in name or name.startswith(".") or not isinstance(entry, dict):
            raise ValueError(f"map {path}: bad file entry {str(name)[:80]!r} in the manifest")
        f = path / name
        if not f.is_file():
            raise ValueError(f"map {path}: {name} is missing")
        if f.stat().st_size != entry.get("bytes"):
            raise ValueError(f"map {path}: {name} has {f.stat().st_size} bytes, the manifest says "
                             f"{entry.get('bytes')!r} (truncated or replaced)")
        if sha256_file(f) != entry.get("sha256"):
            raise ValueError(f"map {path}: {name} does not match its sha256 in the manifest (corrupt or modified)")
    return manifest


def map_arrays_path(path):
    """The checked ``map.npz`` of the map folder ``path`` (:func:`read_map_manifest`), or, for the
    older two-file format, ``path`` itself when it is an ``.npz`` (else ``<path>.npz``: ``run.1``
    reads ``run.1.npz``, never ``run.npz``)."""
    from pathlib import Path

    base = Path(path)
    if base.is_dir():
        read_map_manifest(base)
        return base / MAP_NPZ
    npz = base if base.suffix == ".npz" else base.with_name(base.name + ".npz")  # never a swapped suffix
    if not npz.is_file():
        raise FileNotFoundError(f"map {base} not found")
    return npz


def rgbd_points(depth: np.ndarray, color: Optional[np.ndarray], intrinsics, pose: np.ndarray, stride: int = 1,
                min_depth: float = 0.0, max_depth: float = float("inf")):
    """World points of every ``stride``-th pixel of a depth image (what the map integrates).

    Args:
        depth: (H, W) float metres (0 / NaN invalid); color: optional (H, W, 3) uint8.
        intrinsics: CameraIntrinsics of the (H, W) image; pose: (4, 4) camera-to-world.
    Returns:
        points (M, 3) float32 world, colors (M, 3) uint8 or None, pixels (M, 2) int64 (v, u) of
        the full-resolution image.
    """
    s = max(1, int(stride))
    d = np.ascontiguousarray(np.asarray(depth)[::s, ::s], dtype=np.float32)
    h, w = d.shape
    with np.errstate(invalid="ignore"):
        valid = (d > min_depth) & (d <= max_depth)  # NaN compares False
    rx, ry = _ray_factors(intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy, w, h, s)
    flat = np.flatnonzero(valid)
    z = d.reshape(-1)[flat]
    x = rx[flat % w] * z
    y = ry[flat // w] * z
    R = np.asarray(pose, np.float64)
    pts = np.empty((len(z), 3), np.float32)
    for i in range(3):  # world = R [x y z]^T + t, column by column in float32
        pts[:, i] = np.float32(R[i, 0]) * x + np.float32(R[i, 1]) * y + np.float32(R[i, 2]) * z + np.float32(R[i, 3])
    cols = None
    if color is not None:
        cols = np.ascontiguousarray(np.asarray(color)[::s, ::s]).reshape(-1, 3)[flat]
    pixels = np.stack([(flat // w) * s, (flat % w) * s], 1)
    return pts, cols, pixels


@functools.lru_cache(maxsize=16)
def _ray_factors(fx, fy, cx, cy, w, h, s):
    """(W,) and (H,) float32 (u*s - cx) / fx and (v*s - cy) / fy of a subsampled pixel grid."""
    return ((np.arange(w) * s - cx) / fx).astype(np.float32), ((np.arange(h) * s - cy) / fy).astype(np.float32)


def _ranked(cand: Optional[np.ndarray], score: np.ndarray, threshold: float, max_points: int,
            rescored: int, above: Optional[np.ndarray] = None, best: Optional[float] = None) -> QueryResult:
    """QueryResult from exact scores: ``score[i]`` of slot ``cand[i]`` (``cand`` None: slot i);
    ``above`` / ``best`` when the caller's scan already found them."""
    if best is None:
        best = float(score.max()) if len(score) else float("-inf")
    if above is None:
        above = np.flatnonzero(score >= threshold)
    n = len(above)
    if max_points and n > max_points:
        above = above[np.argpartition(-score[above], max_points - 1)[:max_points]]
    order = above[np.argsort(-score[above], kind="stable")]
    slots = order if cand is None else cand[order]
    return QueryResult(slots.astype(np.int64), score[order].astype(np.float32), int(n), best, int(rescored))


def _unique_sorted(a: np.ndarray) -> np.ndarray:
    """Distinct values of the sorted array ``a`` (one pass, no sort)."""
    if len(a) == 0:
        return a.copy()
    return a[np.concatenate([[True], a[1:] != a[:-1]])]


def _ranges(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(start[i], end[i])`` for all i, vectorised."""
    n = end - start
    total = int(n.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offs = np.repeat(start - np.concatenate([[0], np.cumsum(n)[:-1]]), n)
    return np.arange(total, dtype=np.int64) + offs


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.float16", "torch.bfloat16"):
            x = x.float()
        return x.numpy()
    return np.asarray(x)
