"""Sparse tensors and kernel maps in pure PyTorch, following MinkowskiEngine's conventions.

A :class:`SparseTensor` holds features ``F`` (M, C) on integer coordinates ``C`` (M, 4) int32
laid out as ``[batch, x, y, z]``, together with a *tensor stride* ``s``: every coordinate of a
tensor with stride ``s`` is a multiple of ``s`` (the input has stride 1). All tensors that come
from one input share a :class:`CoordinateManager`, which owns one coordinate set per tensor
stride and caches the kernel maps between them, so the many convolutions of a U-Net level reuse
one map and the transposed convolutions of the decoder write back onto exactly the coordinate
sets of the encoder (as MinkowskiEngine does).

Kernel conventions (MinkowskiEngine): a kernel of size ``K`` has ``K**3`` offsets; offset
``(ix, iy, iz)`` (each in ``0..K-1``) has index ``k = ix + K*iy + K*K*iz``; for odd ``K`` the
offset vector is ``(i - (K-1)/2) * s_in`` (centred), for even ``K`` it is ``i * s_in``
(``0..K-1``), in units of the input tensor stride ``s_in`` (times the dilation). A strided
convolution with stride ``t`` produces the coordinates ``floor(c / (s_in*t)) * (s_in*t)``.

Neighbour look-ups use a dense index table over the bounding box of a coordinate set when it is
small enough (one gather per query, the common indoor case) and a sorted-key binary search
otherwise; both are vectorised over all points and offsets (no Python loops over points).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["SparseTensor", "CoordinateManager", "KernelMap", "kernel_offsets", "cat"]

#: Largest dense look-up table (cells) built for neighbour search; larger boxes use binary search.
DENSE_TABLE_MAX_CELLS = 1 << 25


def kernel_offsets(kernel_size: int, dilation: int = 1, device=None) -> torch.Tensor:
    """Offsets of a cubic kernel in MinkowskiEngine order.

    Returns:
        (K**3, 3) int64 tensor; row ``k = ix + K*iy + K*K*iz`` holds ``(ox, oy, oz)`` in units of
        the input tensor stride: ``i - (K-1)//2`` for odd ``K`` (centred), ``i`` for even ``K``,
        each multiplied by ``dilation``.
    """
    if kernel_size < 1:
        raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
    r = torch.arange(kernel_size, dtype=torch.int64, device=device)
    if kernel_size % 2 == 1:
        r = r - (kernel_size - 1) // 2
    iz, iy, ix = torch.meshgrid(r, r, r, indexing="ij")  # ix varies fastest when flattened
    return torch.stack([ix.reshape(-1), iy.reshape(-1), iz.reshape(-1)], dim=1) * int(dilation)


@dataclass
class KernelMap:
    """Input/output row pairs of a convolution, grouped by kernel offset.

    ``pairs[k] = (in_idx, out_idx)`` (both int64 (P_k,)) for offset ``k``; ``None`` where no pair
    exists. ``identity`` is the offset index whose map is the identity (submanifold centre), or -1.
    ``parent``/``child`` are set for non-overlapping strided maps (kernel == stride): input row
    ``j`` feeds output row ``parent[j]`` through offset ``child[j]`` (each input exactly once).
    """

    kernel_volume: int
    n_in: int
    n_out: int
    pairs: List[Optional[Tuple[torch.Tensor, torch.Tensor]]]
    identity: int = -1
    parent: Optional[torch.Tensor] = None
    child: Optional[torch.Tensor] = None
    #: structures derived from the pairs by a backend (e.g. the fused CPU kernels' tiling), cached
    derived: Dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_pairs(self) -> int:
        return sum(int(p[0].numel()) for p in self.pairs if p is not None) + (
            self.n_in if self.identity >= 0 else 0)


@dataclass
class _Lookup:
    """Index structure over one coordinate set (units of its tensor stride)."""

    lo: torch.Tensor          # (4,) int64 minimum corner (padded)
    dims: torch.Tensor        # (4,) int64 extent per axis
    mult: torch.Tensor        # (4,) int64 linear-key multipliers
    table: Optional[torch.Tensor] = None        # dense (prod(dims),) int32, -1 empty
    sorted_keys: Optional[torch.Tensor] = None  # (M,) int64
    order: Optional[torch.Tensor] = None        # (M,) int64 rows of sorted_keys


def _linear_mult(dims: torch.Tensor) -> torch.Tensor:
    mult = torch.ones(4, dtype=torch.int64, device=dims.device)
    mult[2] = dims[3]
    mult[1] = dims[3] * dims[2]
    mult[0] = dims[3] * dims[2] * dims[1]
    return mult


class CoordinateManager:
    """Coordinate sets per tensor stride and a cache of kernel maps between them.

    Args:
        coordinates: (M, 4) int [batch, x, y, z] of the first tensor (unique rows).
        tensor_stride: stride of these coordinates (their spacing; 1 for voxel indices).
    """

    #: neighbour look-ups reach at most this many strides beyond a set's bounding box
    PAD = 8

    def __init__(self, coordinates: torch.Tensor, tensor_stride: int = 1, check_unique: bool = True):
        coordinates = _as_coords(coordinates)
        self.device = coordinates.device
        self._coords: Dict[int, torch.Tensor] = {int(tensor_stride): coordinates}
        self._lookups: Dict[int, _Lookup] = {}
        self._kmaps: Dict[tuple, KernelMap] = {}
        self._down: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        if check_unique and coordinates.shape[0] > 0:
            lk = self._lookup(int(tensor_stride))
            keys = self._keys(coordinates, int(tensor_stride), lk)
            if torch.unique(keys).numel() != coordinates.shape[0]:
                raise ValueError("SparseTensor coordinates contain duplicate rows; voxelize "
                                 "(sas_core.geometry.voxelize) to unique voxels first")

    def drop_lookups(self) -> None:
        """Free the neighbour-search tables (kernel maps and coordinate sets stay cached)."""
        self._lookups.clear()

    # ------------------------------------------------------------------ coordinate sets
    def strides(self) -> List[int]:
        return sorted(self._coords)

    def coordinates(self, stride: int) -> torch.Tensor:
        """(M_s, 4) int32 coordinates of the set with tensor stride ``stride``."""
        if stride not in self._coords:
            raise KeyError(f"no coordinate set with tensor stride {stride} (have {self.strides()})")
        return self._coords[stride]

    def n(self, stride: int) -> int:
        return int(self.coordinates(stride).shape[0])

    def sort_order(self, stride: int) -> Optional[torch.Tensor]:
        """Permutation (M,) int64 that sorts the set of ``stride`` by (batch, x, y, z), or None
        when it is sorted already."""
        coords = self.coordinates(stride)
        if coords.shape[0] < 2:
            return None
        lk = self._bbox_lookup(coords, stride)
        keys = self._keys(coords, stride, lk)
        if bool((keys[1:] >= keys[:-1]).all()):
            return None
        return torch.argsort(keys)

    def stride_down(self, in_stride: int, stride: int) -> Tuple[int, torch.Tensor, torch.Tensor]:
        """Create (or fetch) the set ``floor(c / (in_stride*stride)) * (in_stride*stride)``.

        Returns:
            out_stride, parent (M_in,) int64 output row of each input row, child (M_in, 3) int64
            position of each input inside its output cell in units of ``in_stride``
            (``0..stride-1`` per axis).
        """
        key = (in_stride, stride)
        out_stride = in_stride * stride
        if key not in self._down:
            c = self.coordinates(in_stride).long()
            q = torch.div(c[:, 1:], out_stride, rounding_mode="floor") * out_stride
            child = torch.div(c[:, 1:] - q, in_stride, rounding_mode="floor")
            qc = torch.cat([c[:, :1], q], dim=1)
            if out_stride in self._coords:  # already made by another path: map onto it
                parent = self._find(self._coords[out_stride], out_stride, qc)
                if bool((parent < 0).any()):
                    raise RuntimeError(f"coordinate set of stride {out_stride} does not cover the "
                                       f"down-sampled set of stride {in_stride}")
            else:
                lk = self._bbox_lookup(qc, out_stride)
                keys = self._keys(qc, out_stride, lk)
                ukeys, parent = torch.unique(keys, return_inverse=True)
                self._coords[out_stride] = self._unkey(ukeys, out_stride, lk)
            self._down[key] = (parent, child)
        parent, child = self._down[key]
        return out_stride, parent, child

    # ------------------------------------------------------------------ look-ups
    def _bbox_lookup(self, coords: torch.Tensor, stride: int) -> _Lookup:
        c = coords.long()
        c = torch.cat([c[:, :1], torch.div(c[:, 1:], stride, rounding_mode="floor")], dim=1)
        pad = torch.tensor([0, self.PAD, self.PAD, self.PAD], dtype=torch.int64, device=c.device)
        if c.shape[0] == 0:
            lo = torch.zeros(4, dtype=torch.int64, device=c.device)
            hi = lo.clone()
        else:
            lo = c.min(0).values - pad
            hi = c.max(0).values + pad
        dims = hi - lo + 1
        total = 1
        for d in dims.tolist():
            total *= int(d)
        if total >= (1 << 62):
            raise ValueError("coordinate range too large for 64-bit voxel keys")
        return _Lookup(lo=lo, dims=dims, mult=_linear_mult(dims))

    def _keys(self, coords: torch.Tensor, stride: int, lk: _Lookup) -> torch.Tensor:
        c = coords.long()
        c = torch.cat([c[:, :1], torch.div(c[:, 1:], stride, rounding_mode="floor")], dim=1)
        return ((c - lk.lo) * lk.mult).sum(1)

    def _unkey(self, keys: torch.Tensor, stride: int, lk: _Lookup) -> torch.Tensor:
        out = torch.empty(keys.shape[0], 4, dtype=torch.int64, device=keys.device)
        rem = keys
        for d in range(4):
            out[:, d] = torch.div(rem, lk.mult[d], rounding_mode="floor")
            rem = rem - out[:, d] * lk.mult[d]
        out = out + lk.lo
        out[:, 1:] *= stride
        return out.to(torch.int32)

    def _lookup(self, stride: int) -> _Lookup:
        if stride not in self._lookups:
            coords = self.coordinates(stride)
            lk = self._bbox_lookup(coords, stride)
            keys = self._keys(coords, stride, lk)
            cells = int(torch.prod(lk.dims).item())
            if cells <= DENSE_TABLE_MAX_CELLS:
                lk.table = torch.full((cells,), -1, dtype=torch.int32, device=keys.device)
                lk.table[keys] = torch.arange(keys.shape[0], dtype=torch.int32, device=keys.device)
            else:
                lk.sorted_keys, lk.order = torch.sort(keys)
            self._lookups[stride] = lk
        return self._lookups[stride]

    def _query(self, lk: _Lookup, keys: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
        """Rows of the set holding linear ``keys`` (-1 where absent or ``valid`` is False)."""
        if lk.table is not None:
            if valid is None:
                return lk.table[keys]  # int32 rows (-1 absent)
            safe = torch.where(valid, keys, torch.zeros_like(keys))
            return torch.where(valid, lk.table[safe].long(), torch.full_like(keys, -1))
        sk = lk.sorted_keys
        if sk.numel() == 0:
            return torch.full_like(keys, -1)
        pos = torch.searchsorted(sk, keys).clamp_(max=sk.numel() - 1)
        hit = sk[pos] == keys
        if valid is not None:
            hit &= valid
        return torch.where(hit, lk.order[pos], torch.full_like(keys, -1))

    def _find(self, target: torch.Tensor, stride: int, query: torch.Tensor) -> torch.Tensor:
        """Row in the set of ``stride`` of each query coordinate (M_q, 4), -1 if absent."""
        lk = self._lookup(stride)
        c = query.long()
        c = torch.cat([c[:, :1], torch.div(c[:, 1:], stride, rounding_mode="floor")], dim=1) - lk.lo
        valid = ((c >= 0) & (c < lk.dims)).all(1)
        return self._query(lk, (c * lk.mult).sum(1), valid)

    def _neighbour_table(self, base: torch.Tensor, target_stride: int, offsets: torch.Tensor) -> List[torch.Tensor]:
        """Rows of ``base + offsets`` in the target set, one offset at a time.

        Args:
            base: (M_b, 4) query centres (multiples of target_stride).
            offsets: (K, 3) int64 spatial offsets in units of ``target_stride``.
        Returns:
            K tensors (M_b,) int64 of rows, -1 where absent.
        """
        lk = self._lookup(target_stride)
        c = base.long()
        c = torch.cat([c[:, :1], torch.div(c[:, 1:], target_stride, rounding_mode="floor")], dim=1) - lk.lo
        reach = int(offsets.abs().max().item()) if offsets.numel() else 0
        bkeys = (c * lk.mult).sum(1)
        okeys = (offsets * lk.mult[1:]).sum(1).tolist()
        inside = ((c[:, 1:] >= reach) & (c[:, 1:] < lk.dims[1:] - reach)).all(1) & (c[:, 0] >= 0) & (c[:, 0] < lk.dims[0])
        rows = []
        if reach <= self.PAD and bool(inside.all()):
            # linear keys: key(c + o) = key(c) + key(o), no wrap-around thanks to the padding
            for ok in okeys:
                rows.append(self._query(lk, bkeys + ok, None))
            return rows
        for k in range(offsets.shape[0]):  # loop over kernel offsets only
            q = c.clone()
            q[:, 1:] += offsets[k]
            valid = ((q >= 0) & (q < lk.dims)).all(1)
            rows.append(self._query(lk, (q * lk.mult).sum(1), valid))
        return rows

    # ------------------------------------------------------------------ kernel maps
    def kernel_map(self, in_stride: int, kernel_size: int, stride: int = 1, dilation: int = 1) -> Tuple[int, KernelMap]:
        """Kernel map of a convolution on the set ``in_stride``.

        stride 1 gives a submanifold map (output coordinates = input coordinates); stride > 1 a
        down-sampling map onto ``floor(c/(in_stride*stride))*(in_stride*stride)``.

        Returns:
            (out_stride, KernelMap)
        """
        key = ("conv", in_stride, kernel_size, stride, dilation)
        if key in self._kmaps:
            km = self._kmaps[key]
            return in_stride * stride, km
        kv = kernel_size ** 3
        offsets = kernel_offsets(kernel_size, dilation, device=self.device)
        n_in = self.n(in_stride)
        if stride == 1:
            pairs: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * kv
            identity = -1
            if kernel_size % 2 == 1:
                # submanifold, symmetric: offsets k and kv-1-k are opposite; search only half.
                centre = kv // 2
                identity = centre
                half = torch.arange(centre, device=self.device)
                table = self._neighbour_table(self.coordinates(in_stride), in_stride, offsets[half])
                for k in range(centre):
                    row = table[k]
                    out_idx = torch.nonzero(row >= 0).squeeze(1)
                    if out_idx.numel() == 0:
                        continue
                    in_idx = row[out_idx].long()
                    pairs[k] = (in_idx, out_idx)
                    pairs[kv - 1 - k] = (out_idx, in_idx)
            else:
                table = self._neighbour_table(self.coordinates(in_stride), in_stride, offsets)
                for k in range(kv):
                    row = table[k]
                    out_idx = torch.nonzero(row >= 0).squeeze(1)
                    if out_idx.numel():
                        pairs[k] = (row[out_idx].long(), out_idx)
            km = KernelMap(kv, n_in, n_in, pairs, identity=identity)
            self._kmaps[key] = km
            return in_stride, km
        out_stride, parent, child = self.stride_down(in_stride, stride)
        n_out = self.n(out_stride)
        if kernel_size == stride and dilation == 1:
            # non-overlapping: each input row belongs to exactly one output through one offset
            k_of = child[:, 0] + kernel_size * child[:, 1] + kernel_size * kernel_size * child[:, 2]
            order = torch.argsort(k_of * max(n_out, 1) + parent)
            counts = torch.bincount(k_of, minlength=kv).tolist()
            in_sorted = order
            out_sorted = parent[order]
            pairs = []
            start = 0
            for k in range(kv):
                n = counts[k]
                pairs.append((in_sorted[start:start + n], out_sorted[start:start + n]) if n else None)
                start += n
            km = KernelMap(kv, n_in, n_out, pairs, parent=parent, child=k_of)
        else:
            # offsets (centred for odd K, 0..K-1 for even K) around each output coordinate
            table = self._neighbour_table(self.coordinates(out_stride), in_stride, offsets)
            pairs = []
            for k in range(kv):
                row = table[k]
                out_idx = torch.nonzero(row >= 0).squeeze(1)
                pairs.append((row[out_idx].long(), out_idx) if out_idx.numel() else None)
            km = KernelMap(kv, n_in, n_out, pairs)
        self._kmaps[key] = km
        return out_stride, km

    def transposed_kernel_map(self, in_stride: int, kernel_size: int, stride: int, dilation: int = 1) -> Tuple[int, KernelMap]:
        """Kernel map of a transposed convolution from the set ``in_stride`` (coarse) onto the
        existing finer set ``in_stride // stride`` (MinkowskiEngine's default, no new coordinates).

        It is the down-sampling map from the fine set to the coarse set, read backwards: pairs
        are (coarse input row, fine output row) per offset.
        """
        if in_stride % stride != 0 or (in_stride // stride) not in self._coords:
            raise ValueError(f"transposed convolution with stride {stride} from tensor stride {in_stride}: "
                             f"no finer coordinate set of stride {in_stride // max(stride, 1)} "
                             f"(have {self.strides()})")
        fine = in_stride // stride
        key = ("convtr", in_stride, kernel_size, stride, dilation)
        if key not in self._kmaps:
            _, down = self.kernel_map(fine, kernel_size, stride, dilation)
            pairs = [None if p is None else (p[1], p[0]) for p in down.pairs]
            self._kmaps[key] = KernelMap(down.kernel_volume, down.n_out, down.n_in, pairs,
                                         parent=down.parent, child=down.child)
        return fine, self._kmaps[key]


def _as_coords(coordinates) -> torch.Tensor:
    c = torch.as_tensor(coordinates)
    if c.dim() != 2 or c.shape[1] != 4:
        raise ValueError(f"coordinates must be (M, 4) [batch, x, y, z], got shape {tuple(c.shape)}")
    if c.dtype.is_floating_point:
        if not bool(torch.all(c == torch.round(c))):
            raise ValueError("coordinates must be integers (voxel indices); voxelize points first")
    return c.to(torch.int32)


class SparseTensor:
    """Features on sparse integer coordinates.

    Args:
        features: (M, C) float tensor.
        coordinates: (M, 4) int [batch, x, y, z] (unique rows), multiples of ``tensor_stride``.
            May be omitted when ``coordinate_manager`` is given (then the manager's set of
            ``tensor_stride`` is used, in its row order).
        tensor_stride: spacing of the coordinates (1 for voxel indices).
        coordinate_manager: share the coordinate sets/kernel maps of another tensor.
    """

    __slots__ = ("F", "tensor_stride", "manager")

    def __init__(self, features: torch.Tensor, coordinates=None, tensor_stride: int = 1,
                 coordinate_manager: Optional[CoordinateManager] = None):
        if not isinstance(features, torch.Tensor) or features.dim() != 2:
            raise ValueError(f"features must be a (M, C) tensor, got {getattr(features, 'shape', type(features))}")
        self.tensor_stride = int(tensor_stride)
        if coordinate_manager is None:
            if coordinates is None:
                raise ValueError("SparseTensor needs coordinates or a coordinate_manager")
            coords = _as_coords(coordinates).to(features.device)
            if coords.shape[0] != features.shape[0]:
                raise ValueError(f"features have {features.shape[0]} rows but coordinates {coords.shape[0]}")
            coordinate_manager = CoordinateManager(coords, self.tensor_stride)
        else:
            n = coordinate_manager.n(self.tensor_stride)
            if n != features.shape[0]:
                raise ValueError(f"features have {features.shape[0]} rows but the coordinate set of "
                                 f"stride {self.tensor_stride} has {n}")
        self.F = features
        self.manager = coordinate_manager

    # aliases in the style of MinkowskiEngine
    @property
    def features(self) -> torch.Tensor:
        return self.F

    @property
    def C(self) -> torch.Tensor:
        """(M, 4) int32 coordinates [batch, x, y, z]."""
        return self.manager.coordinates(self.tensor_stride)

    coordinates = C

    @property
    def device(self):
        return self.F.device

    @property
    def dtype(self):
        return self.F.dtype

    def __len__(self) -> int:
        return int(self.F.shape[0])

    def replace_feature(self, features: torch.Tensor) -> "SparseTensor":
        """Same coordinates, new (M, C') features."""
        return SparseTensor(features, tensor_stride=self.tensor_stride, coordinate_manager=self.manager)

    def __repr__(self) -> str:
        return (f"SparseTensor(n={len(self)}, channels={self.F.shape[1]}, tensor_stride={self.tensor_stride}, "
                f"dtype={self.F.dtype}, device={self.F.device})")


def cat(*tensors: SparseTensor) -> SparseTensor:
    """Concatenate features of tensors on the same coordinate set (same manager and stride),
    in argument order (MinkowskiEngine's ``ME.cat``)."""
    if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
        tensors = tuple(tensors[0])
    first = tensors[0]
    for t in tensors[1:]:
        if t.manager is not first.manager or t.tensor_stride != first.tensor_stride:
            raise ValueError("cat needs tensors on the same coordinate set (same coordinate manager "
                             f"and tensor stride; got strides {[x.tensor_stride for x in tensors]})")
    return first.replace_feature(torch.cat([t.F for t in tensors], dim=1))
