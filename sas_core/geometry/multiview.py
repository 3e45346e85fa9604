"""Multi-view fusion of per-pixel 2D features onto 3D points (OpenScene's rule).

Each point is projected into each frame (:func:`sas_core.geometry.camera.project_points`) and
rounded to the nearest pixel ``(u, v)`` (round half to even, as ``np.round``). It is *visible* in
the frame when

* it is in front of the camera (z > 0);
* its pixel is at least ``border`` pixels from every image edge:
  ``border <= u < W - border`` and ``border <= v < H - border`` (OpenScene's ``cut_bound``);
* the depth image has a measurement there (finite, > ``min_depth``, <= ``max_depth`` if set;
  NaN, inf, zero and negative depth are never visible), and the point agrees with it:
  ``|depth(u, v) - z| <= depth_ratio * depth(u, v)`` (OpenScene: 0.25), or, with
  ``metric_threshold`` set, ``|depth(u, v) - z| <= metric_threshold`` metres.
  Views without a depth image (OpenScene's nuScenes setting) skip this test;
* the teacher has a feature at that pixel (``valid`` is True there; pixels without a prediction
  do not count).

The fused feature of a point is the plain mean of the teacher features over the frames where it
is visible, returned in fp16 (as OpenScene stores them), with a per-point visibility mask
(visible in at least one frame) and the number of frames it was seen in.

Batch (:func:`fuse_views`) and streaming (:class:`FeatureAccumulator`) share one
implementation: running float32 sums and int32 counts per row, where a row is a point, or a voxel
(several points sharing a row through ``index``) for the live map.

Speed: on CPU, two numba kernels (when numba is importable) do the work: one pass over the
points computes the visible pixel of each point (projection, border, depth and validity tests
fused), one pass over the visible points adds their features (fp16 or fp32, converted on the
fly) into the float32 sums, in parallel over points. Nothing of size (N, C) is materialised per
frame. On other devices (CUDA) the same steps run as vectorised torch operations with
``index_add_``. ``sas bench fusion`` measures both against a straightforward implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Optional, Tuple

import numpy as np
import torch

from sas_core.config import opt
from sas_core.geometry.camera import world_to_camera
from sas_core.numba_support import import_numba, launch_threads
from sas_core.types import CameraIntrinsics

__all__ = [
    "MultiViewFusionConfig",
    "MultiViewFusion",
    "View",
    "FusedFeatures",
    "FeatureAccumulator",
    "fuse_views",
    "fuse_frames",
    "visible_points",
    "numba_available",
]


@dataclass
class MultiViewFusionConfig:
    """How 2D features are fused onto 3D points (defaults: OpenScene's ScanNet setting)."""

    depth_ratio: float = opt(0.25, "visible when |depth(u,v) - z| <= depth_ratio * depth(u,v)")
    border: int = opt(10, "pixels ignored along every image edge (OpenScene's cut_bound)")
    metric_threshold: Optional[float] = opt(None, "if set: visible when |depth(u,v) - z| <= this (metres)")
    min_depth: float = opt(0.0, "depth readings <= this are no measurement")
    max_depth: Optional[float] = opt(None, "depth readings beyond this are no measurement (sensor range)")
    out_dtype: str = opt("float16", "dtype of the fused features ('float16' as OpenScene, or 'float32')",
                         choices=("float16", "float32"))
    backend: str = opt("auto", "'auto': numba on CPU if importable, else torch; or 'numba' / 'torch'",
                       choices=("auto", "numba", "torch"))

    def __post_init__(self):
        if not (self.depth_ratio >= 0):
            raise ValueError(f"depth_ratio must be >= 0, got {self.depth_ratio}")
        if self.border < 0:
            raise ValueError(f"border must be >= 0, got {self.border}")
        if self.metric_threshold is not None and not (self.metric_threshold >= 0):
            raise ValueError(f"metric_threshold must be >= 0 metres, got {self.metric_threshold}")
        if self.max_depth is not None and not (self.max_depth > self.min_depth):
            raise ValueError(f"max_depth ({self.max_depth}) must exceed min_depth ({self.min_depth})")
        if self.out_dtype not in ("float16", "float32"):
            raise ValueError(f"out_dtype must be 'float16' or 'float32', got {self.out_dtype!r}")
        if self.backend not in ("auto", "numba", "torch"):
            raise ValueError(f"backend must be 'auto', 'numba' or 'torch', got {self.backend!r}")


#: Name used in the cross-module contract.
MultiViewFusion = MultiViewFusionConfig


class View(NamedTuple):
    """One frame to fuse.

    depth: (H, W) metres (NumPy or torch; 0/NaN = none), or None for no occlusion test.
    pose: (4, 4) camera-to-world.
    intrinsics: camera of the depth image (H x W).
    features: (Hf, Wf, C) per-pixel features (torch or NumPy, fp16/fp32). Usually Hf, Wf = H, W;
        other sizes are sampled nearest-neighbour with corners aligned (OpenScene resizes its
        2D features so).
    valid: optional (Hf, Wf) bool, False where the teacher has no feature.
    """

    depth: object
    pose: object
    intrinsics: CameraIntrinsics
    features: object
    valid: object = None


@dataclass
class FusedFeatures:
    """Fused per-point (or per-voxel) features.

    features: (N, C) torch tensor, fp16 by default; rows with ``mask`` False are zero.
    mask: (N,) bool, visible (with a teacher feature) in at least one frame.
    counts: (N,) int32, the number of frames each row was visible in (for voxels: of
        point-frame pairs).
    """

    features: torch.Tensor
    mask: torch.Tensor
    counts: torch.Tensor

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def visible_features(self) -> torch.Tensor:
        """(M, C) features of the rows with ``mask`` (OpenScene's ``feat``)."""
        return self.features[self.mask]


# --------------------------------------------------------------------------------------------
# numba kernels (CPU)
# --------------------------------------------------------------------------------------------

numba = import_numba()  # optional: without it the torch path runs everywhere
_HAVE_NUMBA = numba is not None
if _HAVE_NUMBA:
    from llvmlite import ir as _llvm_ir
    from numba import njit, prange
    from numba.core import types as _nb_types
    from numba.core.extending import intrinsic as _nb_intrinsic
    from numba.extending import overload as _nb_overload


_PREFETCH_AHEAD = 8  # points ahead whose feature and sum rows are prefetched


def numba_available() -> bool:
    """Whether the numba CPU kernels can be used."""
    return _HAVE_NUMBA


if _HAVE_NUMBA:

    @_nb_intrinsic
    def _u32_as_f32(typingctx, x):
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], _llvm_ir.FloatType())

        return _nb_types.float32(_nb_types.uint32), codegen

    @_nb_intrinsic
    def _f32_as_u32(typingctx, x):
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], _llvm_ir.IntType(32))

        return _nb_types.uint32(_nb_types.float32), codegen

    @njit(inline="always")
    def _half_bits_to_f32(h):
        # IEEE binary16 -> binary32, exact for every value (zeros, subnormals, inf, NaN):
        # shift exponent+mantissa into place and rescale by 2**112 (re-normalises subnormals).
        x = np.uint32(h)
        mag = (x & np.uint32(0x7FFF)) << np.uint32(13)
        bits = _f32_as_u32(_u32_as_f32(mag) * np.float32(5.192296858534828e33))
        if (x & np.uint32(0x7C00)) == np.uint32(0x7C00):
            bits = mag | np.uint32(0x7F800000)
        return _u32_as_f32(bits | ((x & np.uint32(0x8000)) << np.uint32(16)))

    @_nb_intrinsic
    def _prefetch(typingctx, arr, flat_index):
        """Hint the CPU to fetch ``arr.flat[flat_index]`` (C-contiguous ``arr``) into cache."""

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            i8p = _llvm_ir.IntType(8).as_pointer()
            addr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
            i32 = _llvm_ir.IntType(32)
            fnty = _llvm_ir.FunctionType(_llvm_ir.VoidType(), [i8p, i32, i32, i32])
            fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], fnty)
            # (address, read=0 / write=1, locality 3 = keep in all cache levels, data cache = 1)
            builder.call(fn, [addr, i32(0), i32(3), i32(1)])
            return context.get_dummy_value()

        return _nb_types.none(arr, _nb_types.int64), codegen

    def _as_f32(x):  # pragma: no cover - typing stub, implemented by the overload below
        raise NotImplementedError

    @_nb_overload(_as_f32, inline="always")
    def _as_f32_overload(x):
        if isinstance(x, _nb_types.Integer) and x.bitwidth == 16 and not x.signed:
            return lambda x: _half_bits_to_f32(x)
        if isinstance(x, _nb_types.Float):
            return lambda x: np.float32(x)
        return None

    @njit(parallel=True, cache=True)
    def _nb_visible(points, A, cam, depth, has_depth, thr, dlim, rowmap, colmap, wf, valid, has_valid, out):
        """out[i] = flat feature-pixel index of point i if visible, else -1.

        points (M, 3) f32; A (12,) f32 row-major world-to-camera [R | t]; cam (6,) f32
        fx, fy, cx, cy, W, H; thr (3,) f32: depth_ratio, metric_threshold, use_metric (0/1);
        dlim (3,) f32: min_depth, max_depth, border.
        """
        fx, fy, cx, cy = cam[0], cam[1], cam[2], cam[3]
        border = dlim[2]
        umax = cam[4] - np.float32(1.0) - border
        vmax = cam[5] - np.float32(1.0) - border
        ratio, metric, use_metric = thr[0], thr[1], thr[2] > 0
        dmin, dmax = dlim[0], dlim[1]
        for i in prange(points.shape[0]):  # branch-free, so that LLVM can vectorise it
            px, py, pz = points[i, 0], points[i, 1], points[i, 2]
            z = A[8] * px + A[9] * py + A[10] * pz + A[11]
            x = A[0] * px + A[1] * py + A[2] * pz + A[3]
            y = A[4] * px + A[5] * py + A[6] * pz + A[7]
            u = np.rint(x * fx / z + cx)
            v = np.rint(y * fy / z + cy)
            # NaN fails every comparison, so non-finite projections are never inside
            ok = (z > 0) & (u >= border) & (u <= umax) & (v >= border) & (v <= vmax)
            iu = np.int64(u if ok else np.float32(0.0))
            iv = np.int64(v if ok else np.float32(0.0))
            if has_depth:
                d = depth[iv, iu]
                lim = metric if use_metric else ratio * d
                # rejects NaN, zero, negative and (with a finite dmax) inf depth
                ok = ok & (d > dmin) & (d <= dmax) & (abs(d - z) <= lim)
            q = rowmap[iv] * wf + colmap[iu]
            if has_valid:
                ok = ok & (valid[q] != 0)
            out[i] = q if ok else -1

    @njit(parallel=True, cache=True)
    def _nb_add_unique_rows(sums, counts, rows, pix, feat):
        """sums[rows[k]] += feat[pix[k]] for rows without repeats (parallel over k)."""
        C = sums.shape[1]
        n = rows.shape[0]
        for k in prange(n):
            if k + _PREFETCH_AHEAD < n:  # start the row fetches of a later point (random rows)
                q2 = pix[k + _PREFETCH_AHEAD] * C
                r2 = rows[k + _PREFETCH_AHEAD] * C
                _prefetch(feat, q2)
                _prefetch(feat, q2 + 32)
                _prefetch(sums, r2)
                _prefetch(sums, r2 + 16)
            r = rows[k]
            q = pix[k]
            for c in range(C):
                sums[r, c] += _as_f32(feat[q, c])
            counts[r] += 1

    @njit(parallel=True, cache=True)
    def _nb_add_any_rows(sums, rows, pix, feat, nblocks):
        """sums[rows[k]] += feat[pix[k]], rows may repeat (parallel over channel blocks)."""
        C = sums.shape[1]
        size = (C + nblocks - 1) // nblocks
        for b in prange(nblocks):
            c0 = b * size
            c1 = min(C, c0 + size)
            for k in range(rows.shape[0]):
                r = rows[k]
                q = pix[k]
                for c in range(c0, c1):
                    sums[r, c] += _as_f32(feat[q, c])


# --------------------------------------------------------------------------------------------
# Shared per-frame steps
# --------------------------------------------------------------------------------------------

def _to_numpy_f32(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().to("cpu")
        a = a.float().numpy() if a.dtype != torch.float32 else a.numpy()
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def _feature_tensor(features) -> torch.Tensor:
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(features)
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"features must be a torch tensor or NumPy array, got {type(features).__name__}")
    if features.dim() != 3:
        raise ValueError(f"features must be (H, W, C), got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got {features.dtype}")
    return features


def _nearest_map(n_out: int, n_in: int) -> np.ndarray:
    """(n_out,) int64: nearest source index of each target index, corners aligned."""
    if n_in == n_out:
        return np.arange(n_out, dtype=np.int64)
    if n_out == 1:
        return np.zeros(1, dtype=np.int64)
    return np.rint(np.arange(n_out) * ((n_in - 1) / (n_out - 1))).astype(np.int64)


class _FrameGeometry(NamedTuple):
    A: np.ndarray  # (3, 4) f32 world-to-camera
    cam: np.ndarray  # (6,) f32 fx, fy, cx, cy, W, H
    rowmap: np.ndarray  # (H,) int64 feature row of each image row
    colmap: np.ndarray  # (W,) int64 feature column of each image column
    wf: int


def _frame_geometry(pose, intr: CameraIntrinsics, feat_hw: Tuple[int, int]) -> _FrameGeometry:
    A = world_to_camera(pose)[:3].astype(np.float32)
    cam = np.array([intr.fx, intr.fy, intr.cx, intr.cy, intr.width, intr.height], dtype=np.float32)
    hf, wf = feat_hw
    return _FrameGeometry(A, cam, _nearest_map(intr.height, hf), _nearest_map(intr.width, wf), wf)


def _check_depth(depth, intr: CameraIntrinsics):
    if depth is None:
        return None
    shape = tuple(depth.shape)
    if shape != (intr.height, intr.width):
        raise ValueError(f"depth is {shape}, intrinsics say {(intr.height, intr.width)}")
    return depth


def _visible_numba(points_np: np.ndarray, geo: _FrameGeometry, depth, valid, cfg: MultiViewFusionConfig):
    """(sel (K,) int64 point indices, pix (K,) int64 flat feature-pixel index) via numba."""
    has_depth = depth is not None
    depth_np = _to_numpy_f32(depth) if has_depth else np.zeros((1, 1), np.float32)
    has_valid = valid is not None
    if has_valid:
        valid_np = valid.detach().to("cpu").numpy() if isinstance(valid, torch.Tensor) else np.asarray(valid)
        valid_np = np.ascontiguousarray(valid_np.reshape(-1)).view(np.uint8) if valid_np.dtype == np.bool_ \
            else np.ascontiguousarray((valid_np.reshape(-1) != 0).astype(np.uint8))
    else:
        valid_np = np.zeros(1, np.uint8)
    thr = np.array([cfg.depth_ratio, cfg.metric_threshold or 0.0, cfg.metric_threshold is not None],
                   dtype=np.float32)
    dmax = np.inf if cfg.max_depth is None else cfg.max_depth
    dmax = min(dmax, float(np.finfo(np.float32).max))  # finite, so "d <= dmax" rejects inf
    dlim = np.array([max(cfg.min_depth, 0.0), dmax, cfg.border], dtype=np.float32)
    out = np.empty(points_np.shape[0], dtype=np.int64)
    _nb_visible(points_np, geo.A.reshape(-1), geo.cam, depth_np, has_depth, thr, dlim, geo.rowmap,
                geo.colmap, geo.wf, valid_np, has_valid, out)
    sel = np.flatnonzero(out >= 0)
    return sel, out[sel]


def _visible_torch(points: torch.Tensor, geo: _FrameGeometry, depth, valid, cfg: MultiViewFusionConfig):
    """The same test as :func:`_nb_visible` in torch (any device). Returns (sel, pix) int64 tensors."""
    dev = points.device
    A = torch.from_numpy(geo.A).to(dev)
    fx, fy, cx, cy, W, H = (float(v) for v in geo.cam)
    b = float(cfg.border)
    camp = torch.addmm(A[:, 3], points, A[:, :3].T)  # (M, 3) camera coordinates, fp32
    z = camp[:, 2]
    u = torch.round(camp[:, 0] * fx / z + cx)
    v = torch.round(camp[:, 1] * fy / z + cy)
    keep = (z > 0) & (u >= b) & (u <= W - 1 - b) & (v >= b) & (v <= H - 1 - b)
    sel = keep.nonzero().squeeze(1)
    iu, iv, zs = u[sel].long(), v[sel].long(), z[sel]
    if depth is not None:
        d = torch.as_tensor(depth).to(dev, torch.float32)[iv, iu]
        dmax = float("inf") if cfg.max_depth is None else cfg.max_depth
        ok = (d > max(cfg.min_depth, 0.0)) & (d <= dmax) & torch.isfinite(d)
        lim = torch.full_like(d, cfg.metric_threshold) if cfg.metric_threshold is not None else cfg.depth_ratio * d
        ok &= (d - zs).abs() <= lim
        sel, iu, iv = sel[ok], iu[ok], iv[ok]
    pix = torch.from_numpy(geo.rowmap).to(dev)[iv] * geo.wf + torch.from_numpy(geo.colmap).to(dev)[iu]
    if valid is not None:
        ok = torch.as_tensor(valid).to(dev).reshape(-1)[pix].bool()
        sel, pix = sel[ok], pix[ok]
    return sel, pix


def visible_points(points, depth, pose, intrinsics: CameraIntrinsics,
                   config: Optional[MultiViewFusionConfig] = None, valid=None,
                   feature_size: Optional[Tuple[int, int]] = None):
    """Which points are visible in one frame, and where.

    Args:
        points: (N, 3) world coordinates (NumPy or torch).
        depth: (H, W) metres, or None (no occlusion test).
        pose: (4, 4) camera-to-world. intrinsics: the (H x W) camera.
        valid: optional (Hf, Wf) bool, False where there is no feature.
        feature_size: (Hf, Wf) of the feature map (default (H, W)).

    Returns:
        index: (K,) int64 indices of the visible points (ascending).
        pixel: (K,) int64 flat index ``row * Wf + col`` of the feature pixel each one reads.
        NumPy arrays for NumPy input, torch tensors (on the points' device) for torch input.
    """
    cfg = config or MultiViewFusionConfig()
    _check_depth(depth, intrinsics)
    hw = feature_size or (intrinsics.height, intrinsics.width)
    geo = _frame_geometry(pose, intrinsics, hw)
    as_torch = isinstance(points, torch.Tensor)
    pts = points if as_torch else torch.from_numpy(np.ascontiguousarray(np.asarray(points, np.float32)))
    pts = pts.reshape(-1, 3).float().contiguous()
    if _use_numba(cfg, pts.device):
        sel, pix = _visible_numba(pts.numpy(), geo, depth, valid, cfg)
        sel, pix = torch.from_numpy(sel), torch.from_numpy(pix)
    else:
        sel, pix = _visible_torch(pts, geo, depth, valid, cfg)
    return (sel, pix) if as_torch else (sel.cpu().numpy(), pix.cpu().numpy())


def _use_numba(cfg: MultiViewFusionConfig, device: torch.device) -> bool:
    if cfg.backend == "torch" or device.type != "cpu":
        if cfg.backend == "numba" and device.type != "cpu":
            raise ValueError("the numba backend runs on CPU only")
        return False
    if cfg.backend == "numba" and not _HAVE_NUMBA:
        raise ValueError("backend 'numba' requested but numba is not importable")
    if _HAVE_NUMBA:
        launch_threads()
    return _HAVE_NUMBA


# --------------------------------------------------------------------------------------------
# Accumulator (streaming) and batch fusion
# --------------------------------------------------------------------------------------------

class FeatureAccumulator:
    """Running fusion: float32 feature sums and int32 counts per row, frames added one by one.

    A row is a point (default: row i = point i) or, with ``index``, any slot (e.g. a voxel of a
    live map, several points per slot). The mean of a row is ``sums / counts``.

    Args:
        n_points: number of rows.
        dim: feature channels C (None: taken from the first frame).
        points: optional (n_points, 3) world points tested by default in :meth:`add`.
        config: fusion rule.
        device: where sums live ("cpu" or "cuda..."; default: the points' device or CPU).

    Memory: n_points x C x 4 bytes of sums (150k points x 512 channels: 300 MB).
    """

    def __init__(self, n_points: int, dim: Optional[int] = None, points=None,
                 config: Optional[MultiViewFusionConfig] = None, device=None):
        if n_points < 0:
            raise ValueError(f"n_points must be >= 0, got {n_points}")
        self.config = config or MultiViewFusionConfig()
        if device is None:
            device = points.device if isinstance(points, torch.Tensor) else "cpu"
        self.device = torch.device(device)
        self.n_points = int(n_points)
        self.points = None
        if points is not None:
            self.points = self._points_tensor(points)
            if self.points.shape[0] != self.n_points:
                raise ValueError(f"points has {self.points.shape[0]} rows, n_points is {n_points}")
        self.dim = None
        self.sums: Optional[torch.Tensor] = None
        self.counts = torch.zeros(self.n_points, dtype=torch.int32, device=self.device)
        self.n_frames = 0
        if dim is not None:
            self._allocate(int(dim))

    def _points_tensor(self, points) -> torch.Tensor:
        if isinstance(points, torch.Tensor):
            p = points.detach().to(self.device, torch.float32)
        else:
            p = torch.from_numpy(np.asarray(points, dtype=np.float32)).to(self.device)
        if p.dim() != 2 or p.shape[1] != 3:
            raise ValueError(f"points must be (N, 3), got shape {tuple(p.shape)}")
        return p.contiguous()

    def _allocate(self, dim: int):
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.sums = torch.zeros(self.n_points, dim, dtype=torch.float32, device=self.device)

    def grow(self, n_points: int) -> None:
        """Add rows (zero sums and counts) up to ``n_points`` rows, for maps that grow."""
        extra = int(n_points) - self.n_points
        if extra < 0:
            raise ValueError(f"cannot shrink from {self.n_points} to {n_points} rows")
        if extra == 0:
            return
        self.counts = torch.cat([self.counts, self.counts.new_zeros(extra)])
        if self.sums is not None:
            self.sums = torch.cat([self.sums, self.sums.new_zeros(extra, self.dim)])
        self.n_points = int(n_points)
        self.points = None  # the default point set no longer covers every row

    def reset(self) -> None:
        """Forget every frame (keeps the allocation)."""
        self.counts.zero_()
        if self.sums is not None:
            self.sums.zero_()
        self.n_frames = 0

    def add(self, depth, pose, intrinsics: CameraIntrinsics, features, valid=None,
            points=None, index=None) -> int:
        """Fuse one frame.

        Args:
            depth: (H, W) metres (NumPy or torch; 0/NaN = none), or None: no occlusion test.
            pose: (4, 4) camera-to-world. intrinsics: the (H x W) camera.
            features: (Hf, Wf, C) torch/NumPy fp16 or fp32 (usually Hf, Wf = H, W).
            valid: optional (Hf, Wf) bool, False where the teacher has no feature.
            points: (M, 3) world points to test (default: the constructor's points).
            index: (M,) int64 row of each point (default: row i = point i). Rows may repeat
                (points sharing a voxel).

        Returns:
            the number of points that received a feature from this frame.
        """
        feats = _feature_tensor(features)
        if self.sums is None:
            self._allocate(int(feats.shape[2]))
        if feats.shape[2] != self.dim:
            raise ValueError(f"features have {feats.shape[2]} channels, the accumulator {self.dim}")
        if valid is not None and tuple(valid.shape) != tuple(feats.shape[:2]):
            raise ValueError(f"valid is {tuple(valid.shape)}, features are {tuple(feats.shape[:2])}")
        _check_depth(depth, intrinsics)
        if points is None:
            if self.points is None:
                raise ValueError("no points: pass points= here or to the constructor")
            pts = self.points
        else:
            pts = self._points_tensor(points)
        rows_all = None  # None: row i = point i (each row at most once per frame)
        if index is None:
            if pts.shape[0] != self.n_points:
                raise ValueError(f"{pts.shape[0]} points for {self.n_points} rows: pass index=")
        else:
            rows_all = torch.as_tensor(index, dtype=torch.int64).to(self.device).reshape(-1)
            if rows_all.shape[0] != pts.shape[0]:
                raise ValueError(f"index has {rows_all.shape[0]} entries for {pts.shape[0]} points")
            if rows_all.numel() and (int(rows_all.min()) < 0 or int(rows_all.max()) >= self.n_points):
                raise ValueError(f"index out of range for {self.n_points} rows")
        geo = _frame_geometry(pose, intrinsics, tuple(feats.shape[:2]))
        self.n_frames += 1
        if _use_numba(self.config, self.device):
            return self._add_numba(pts, geo, depth, valid, feats, rows_all)
        return self._add_torch(pts, geo, depth, valid, feats, rows_all)

    def _add_numba(self, pts, geo, depth, valid, feats, rows_all) -> int:
        sel, pix = _visible_numba(pts.numpy(), geo, depth, valid, self.config)
        if sel.size == 0:
            return 0
        f = feats.detach().to("cpu")
        if f.dtype == torch.float16:  # read as raw half bits, converted exactly in the kernel
            f_np = f.contiguous().numpy().reshape(-1, self.dim).view(np.uint16)
        else:
            f_np = f.to(torch.float32).contiguous().numpy().reshape(-1, self.dim)
        sums = self.sums.numpy()
        if rows_all is None:  # rows are distinct: parallel over points
            _nb_add_unique_rows(sums, self.counts.numpy(), sel, pix, f_np)
        else:  # rows may repeat: parallel over channel blocks
            rows = rows_all.numpy()[sel]
            _nb_add_any_rows(sums, rows, pix, f_np, max(1, numba.get_num_threads()))
            self.counts += torch.bincount(torch.from_numpy(rows), minlength=self.n_points).to(torch.int32)
        return int(sel.size)

    def _add_torch(self, pts, geo, depth, valid, feats, rows_all) -> int:
        sel, pix = _visible_torch(pts, geo, depth, valid, self.config)
        if sel.numel() == 0:
            return 0
        rows = sel if rows_all is None else rows_all[sel]
        f = feats.to(self.device).reshape(-1, self.dim)
        self.sums.index_add_(0, rows, f.index_select(0, pix).to(torch.float32))
        self.counts.index_add_(0, rows, torch.ones_like(rows, dtype=torch.int32))
        return int(sel.numel())

    @property
    def mask(self) -> torch.Tensor:
        """(N,) bool: rows that received at least one feature."""
        return self.counts > 0

    def mean(self, rows=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(R, C) mean features of ``rows`` (default all); rows never seen are zero."""
        if self.sums is None:
            raise ValueError("no frame has been added yet")
        sums = self.sums if rows is None else self.sums[torch.as_tensor(rows, device=self.device)]
        cnt = self.counts if rows is None else self.counts[torch.as_tensor(rows, device=self.device)]
        return (sums / cnt.clamp(min=1).unsqueeze(1).to(torch.float32)).to(dtype)

    def result(self, chunk: int = 65536) -> FusedFeatures:
        """The fused features (``config.out_dtype``), mask and counts (copies)."""
        if self.sums is None:
            raise ValueError("no frame has been added yet, so the feature size is unknown")
        dtype = torch.float16 if self.config.out_dtype == "float16" else torch.float32
        out = torch.empty(self.n_points, self.dim, dtype=dtype, device=self.device)
        for a in range(0, self.n_points, chunk):  # chunked: no (N, C) float32 temporary
            b = min(a + chunk, self.n_points)
            denom = self.counts[a:b].clamp(min=1).unsqueeze(1).to(torch.float32)
            out[a:b] = self.sums[a:b] / denom
        return FusedFeatures(out, self.counts > 0, self.counts.clone())


def _as_view(v) -> View:
    if isinstance(v, View):
        return v
    if isinstance(v, dict):
        return View(**v)
    v = tuple(v)
    if len(v) not in (4, 5):
        raise ValueError(f"a view is (depth, pose, intrinsics, features[, valid]), got {len(v)} items")
    return View(*v)


def fuse_views(points, views: Iterable, config: Optional[MultiViewFusionConfig] = None,
               device=None, progress: bool = False, total: Optional[int] = None) -> FusedFeatures:
    """Fuse the features of several frames onto points (OpenScene's multi-view fusion).

    Args:
        points: (N, 3) world coordinates (NumPy or torch).
        views: iterable of :class:`View` or tuples ``(depth, pose, intrinsics, features[, valid])``
            (see :meth:`FeatureAccumulator.add`); consumed one at a time (a generator can stream
            frames from disk).
        config: fusion rule (default OpenScene's).
        device: where to compute (default: the points' device).
        progress: show a tqdm progress bar (``total`` frames if known).

    Returns:
        FusedFeatures: (N, C) mean features (fp16 by default), visibility mask, counts.
        Raises ValueError if no view is given.
    """
    n = int(points.shape[0]) if hasattr(points, "shape") else len(points)
    acc = FeatureAccumulator(n, None, points=points, config=config, device=device)
    it = views
    if progress:
        from tqdm import tqdm

        it = tqdm(views, total=total, desc="fusing views", unit="frame")
    for v in it:
        v = _as_view(v)
        acc.add(v.depth, v.pose, v.intrinsics, v.features, v.valid)
    if acc.sums is None:
        raise ValueError("fuse_views needs at least one view")
    return acc.result()


def _teacher_views(frames, teacher) -> Iterator[tuple]:
    """Fusion views (depth, pose, intrinsics, features, valid) of frames, the teacher run lazily."""
    for frame in frames:
        feats, valid = teacher.features(frame)
        yield frame.depth, frame.pose, frame.intrinsics, feats, valid


def fuse_frames(points, frames, teacher, config: Optional[MultiViewFusionConfig] = None, device="cpu",
                progress: bool = True, total: Optional[int] = None) -> FusedFeatures:
    """Run one 2D teacher on ``frames`` and fuse its features onto ``points`` (:func:`fuse_views`).

    Args:
        points: (N, 3) world coordinates.
        frames: iterable of :class:`sas_core.types.Frame` (depth, pose, intrinsics); consumed lazily,
            so one frame's teacher output is in memory at a time.
        teacher: any object with ``features(frame) -> (features (h, w, C), valid (h, w))``.
        config, progress, total: as for :func:`fuse_views`; ``device``: where the points live.
    """
    import torch

    pts = torch.as_tensor(points, dtype=torch.float32).to(device)
    return fuse_views(pts, _teacher_views(frames, teacher), config, progress=progress, total=total)
