"""Sparse convolution layers with MinkowskiEngine's parameter layout and semantics.

* :class:`MinkowskiConvolution` — kernel parameter ``kernel`` of shape (K**3, Cin, Cout)
  ((Cin, Cout) for a 1x1 kernel with stride 1), optional ``bias`` (1, Cout), off by default.
  stride 1: submanifold (output on the input coordinates); stride t > 1: output on
  ``floor(c/(s*t))*(s*t)``.
* :class:`MinkowskiConvolutionTranspose` — same parameter layout; writes back onto the existing
  finer coordinate set of stride ``s/t`` (the encoder's), never generating new coordinates.
* :class:`MinkowskiBatchNorm` (``.bn`` = ``torch.nn.BatchNorm1d``, as ME, so state_dict keys
  are ``<name>.bn.weight`` ...), :class:`MinkowskiReLU`, :func:`cat`.

The convolution is gather-GEMM-scatter: for every kernel offset ``k`` with pairs
``(in_idx, out_idx)``: ``out[out_idx] += in[in_idx] @ W[k]``, written as a custom autograd
function whose backward recomputes the gathers (nothing per offset is kept alive between
forward and backward), so memory stays at the size of the features. Two implementations:

* CPU, float32/float64 (default when numba imports): the fused, cache-tiled kernels of
  :mod:`sas_core.nn.cpu_kernels`, for every kernel size and stride.
* Everywhere else (CUDA, other dtypes, ``SAS_SPARSE_CPU_BACKEND=torch``, see
  :func:`set_cpu_backend`): plain PyTorch, per offset ``index_select`` / ``mm`` / ``index_add_``;
  non-overlapping stride-2 kernels (k2s2 down and up) use one GEMM over all offsets instead.

:func:`me_to_dense_weight` / :func:`dense_to_me_weight` convert between the ME kernel layout
and ``torch.nn.functional.conv3d``'s (Cout, Cin, K, K, K) on a grid indexed ``[x, y, z]``.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import nn

from . import cpu_kernels
from .sparse import KernelMap, SparseTensor, cat

__all__ = ["MinkowskiConvolution", "MinkowskiConvolutionTranspose", "MinkowskiBatchNorm",
           "MinkowskiReLU", "cat", "sparse_conv", "me_to_dense_weight", "dense_to_me_weight",
           "kaiming_normal_", "set_cpu_backend", "cpu_backend"]

_CPU_BACKENDS = ("auto", "fused", "torch")
_cpu_backend = os.environ.get("SAS_SPARSE_CPU_BACKEND", "auto")


def set_cpu_backend(name: str) -> str:
    """Choose how sparse convolutions (other than 1x1) run on CPU; returns the previous choice.

    ``"fused"``: the cache-tiled numba kernels of :mod:`sas_core.nn.cpu_kernels` (float32 and
    float64; other dtypes use torch); ``"torch"``: per-offset ``index_select`` / ``mm`` /
    ``index_add_``; ``"auto"`` (default, or ``$SAS_SPARSE_CPU_BACKEND``): fused when numba imports.
    """
    global _cpu_backend
    if name not in _CPU_BACKENDS:
        raise ValueError(f"CPU backend must be one of {_CPU_BACKENDS}, got {name!r}")
    before, _cpu_backend = _cpu_backend, name
    return before


def cpu_backend() -> str:
    """The CPU backend sparse convolutions use now: "fused" or "torch"."""
    if _cpu_backend not in _CPU_BACKENDS:
        raise ValueError(f"SAS_SPARSE_CPU_BACKEND must be one of {_CPU_BACKENDS}, got {_cpu_backend!r}")
    if _cpu_backend == "torch":
        return "torch"
    if cpu_kernels.available():
        return "fused"
    if _cpu_backend == "fused":
        raise RuntimeError("the fused CPU sparse convolution needs numba, which cannot be imported")
    return "torch"


def me_to_dense_weight(kernel: torch.Tensor, kernel_size: int, transposed: bool = False) -> torch.Tensor:
    """MinkowskiEngine kernel (K**3, Cin, Cout) (or (Cin, Cout)) -> dense conv weight.

    Offset index ``k = ix + K*iy + K*K*iz`` means the (K**3,) axis reshapes to (Kz, Ky, Kx);
    for a dense grid indexed ``[batch, channel, x, y, z]``:

    * ``conv3d`` weight (Cout, Cin, Kx, Ky, Kz) = ``W.view(Kz, Ky, Kx, Cin, Cout).permute(4, 3, 2, 1, 0)``
    * ``conv_transpose3d`` weight (Cin, Cout, Kx, Ky, Kz) = ``...permute(3, 4, 2, 1, 0)``
    """
    K = kernel_size
    w = kernel.reshape(K, K, K, kernel.shape[-2], kernel.shape[-1])
    return w.permute(3, 4, 2, 1, 0).contiguous() if transposed else w.permute(4, 3, 2, 1, 0).contiguous()


def dense_to_me_weight(weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """Inverse of :func:`me_to_dense_weight`: dense weight -> (K**3, Cin, Cout)."""
    K = weight.shape[-1]
    w = weight.permute(4, 3, 2, 0, 1) if transposed else weight.permute(4, 3, 2, 1, 0)
    return w.reshape(K ** 3, w.shape[-2], w.shape[-1]).contiguous()


def kaiming_normal_(kernel: torch.Tensor, mode: str = "fan_out", nonlinearity: str = "relu") -> torch.Tensor:
    """He initialisation for ME kernels (as ``MinkowskiEngine.utils.kaiming_normal_``): the fan of
    a (K**3, Cin, Cout) kernel is ``K**3 * Cin`` (in) / ``K**3 * Cout`` (out)."""
    if kernel.dim() == 2:
        fan_in, fan_out = kernel.shape[1], kernel.shape[0]
    else:
        fan_in, fan_out = kernel.shape[0] * kernel.shape[1], kernel.shape[0] * kernel.shape[2]
    fan = fan_in if mode == "fan_in" else fan_out
    std = nn.init.calculate_gain(nonlinearity) / math.sqrt(fan)
    with torch.no_grad():
        return kernel.normal_(0, std)


class _GatherGemmScatter(torch.autograd.Function):
    """out[o] += x[i] @ W[k] over the pairs of a kernel map; backward recomputes the gathers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, kmap: KernelMap):
        ctx.kmap = kmap
        ctx.save_for_backward(x, weight)
        out = x.new_zeros(kmap.n_out, weight.shape[-1])
        if kmap.identity >= 0:
            torch.mm(x, weight[kmap.identity], out=out)
        for k, p in enumerate(kmap.pairs):
            if p is None:
                continue
            i, o = p
            out.index_add_(0, o, torch.mm(x.index_select(0, i), weight[k]))
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        kmap: KernelMap = ctx.kmap
        grad_out = grad_out.contiguous()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None
        if kmap.identity >= 0:
            c = kmap.identity
            if need_x:
                torch.mm(grad_out, weight[c].t(), out=grad_x)
            if need_w:
                torch.mm(x.t(), grad_out, out=grad_w[c])
        for k, p in enumerate(kmap.pairs):
            if p is None:
                continue
            i, o = p
            go = grad_out.index_select(0, o)
            if need_x:
                grad_x.index_add_(0, i, torch.mm(go, weight[k].t()))
            if need_w:
                torch.mm(x.index_select(0, i).t(), go, out=grad_w[k])
        return grad_x, grad_w, None


class _FusedGatherGemmScatter(torch.autograd.Function):
    """The same operation as :class:`_GatherGemmScatter`, by the fused CPU kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, kmap: KernelMap):
        ctx.kmap = kmap
        ctx.save_for_backward(x, weight)
        tile = cpu_kernels.DEFAULT_TILE
        return cpu_kernels.conv_forward(x, weight, _tiles(kmap, tile, False), kmap.identity, kmap.n_out, tile)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        kmap: KernelMap = ctx.kmap
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        tile = cpu_kernels.DEFAULT_TILE
        grad_x, grad_w = cpu_kernels.conv_backward(
            x, weight, grad_out, _tiles(kmap, tile, False), _tiles(kmap, tile, True) if need_x else None,
            kmap.identity, tile, need_x, need_w)
        return grad_x, grad_w, None


def _tiles(kmap: KernelMap, tile: int, reverse: bool):
    """The map grouped by (output tile, offset) (by input rows when ``reverse``), cached on it."""
    key = ("tiles", tile, reverse)
    if key not in kmap.derived:
        kmap.derived[key] = cpu_kernels.tiled_pairs(kmap.pairs, kmap.kernel_volume,
                                                    kmap.n_in if reverse else kmap.n_out, tile, reverse)
    return kmap.derived[key]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # fp16 GEMM/index_add on CPU is slow or missing: compute in fp32 there.
    if x.device.type == "cpu" and x.dtype == torch.float16:
        return torch.float32
    return x.dtype


def sparse_conv(x: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, transposed: bool = False) -> torch.Tensor:
    """Apply kernel ``weight`` (K**3, Cin, Cout) to features ``x`` (n_in, Cin) over ``kmap``.

    Returns (n_out, Cout) features in ``x``'s dtype (in the autocast dtype under CUDA autocast;
    fp16 on CPU is computed in fp32 and cast back).
    """
    if x.device.type != "cpu" and torch.is_autocast_enabled(x.device.type):
        # autocast: run in the autocast dtype, with autocast off inside (our kernels use out=).
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return _sparse_conv(x.to(dtype), weight.to(dtype), kmap, transposed)
    dtype = _compute_dtype(x)
    return _sparse_conv(x.to(dtype), weight.to(dtype), kmap, transposed).to(x.dtype)


def _sparse_conv(xin: torch.Tensor, w: torch.Tensor, kmap: KernelMap, transposed: bool) -> torch.Tensor:
    if xin.device.type == "cpu" and xin.dtype in (torch.float32, torch.float64) and cpu_backend() == "fused":
        return _FusedGatherGemmScatter.apply(xin, w, kmap)
    if kmap.parent is not None and kmap.child is not None:
        kv, cin, cout = w.shape
        if transposed:
            # coarse -> fine, each fine row has exactly one parent: one GEMM over all offsets,
            # then one gather of (parent, offset) rows.
            y = torch.mm(xin, w.permute(1, 0, 2).reshape(cin, kv * cout)).view(-1, cout)
            return y.index_select(0, kmap.parent * kv + kmap.child)
        # fine -> coarse, each input row in exactly one (output, offset) cell: scatter into an
        # im2col buffer (no overlaps), one GEMM.
        buf = xin.new_zeros(kmap.n_out * kv, cin)
        buf = buf.index_copy(0, kmap.parent * kv + kmap.child, xin)
        return torch.mm(buf.view(kmap.n_out, kv * cin), w.reshape(kv * cin, cout))
    return _GatherGemmScatter.apply(xin, w, kmap)


class _ConvBase(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1, bias: bool = False, dimension: int = 3, transposed: bool = False):
        super().__init__()
        if dimension != 3:
            raise ValueError(f"only 3-D sparse convolutions are supported (dimension={dimension})")
        if kernel_size < 1 or stride < 1 or dilation < 1:
            raise ValueError("kernel_size, stride and dilation must be >= 1")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = int(kernel_size)
        self.stride = int(stride)
        self.dilation = int(dilation)
        self.dimension = dimension
        self.is_transpose = transposed
        kv = self.kernel_size ** 3
        # ME: a 1x1 kernel with stride 1 is a plain matrix (Cin, Cout)
        self.use_mm = kv == 1 and self.stride == 1
        shape = (self.in_channels, self.out_channels) if self.use_mm else (kv, self.in_channels, self.out_channels)
        self.kernel = nn.Parameter(torch.empty(*shape))
        self.bias = nn.Parameter(torch.empty(1, self.out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ME default: uniform(-1/sqrt(n), 1/sqrt(n)), n = (Cout if transposed else Cin) * K**3."""
        n = (self.out_channels if self.is_transpose else self.in_channels) * self.kernel_size ** 3
        stdv = 1.0 / math.sqrt(n)
        with torch.no_grad():
            self.kernel.uniform_(-stdv, stdv)
            if self.bias is not None:
                self.bias.uniform_(-stdv, stdv)

    def extra_repr(self) -> str:
        return (f"in={self.in_channels}, out={self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, dilation={self.dilation}, bias={self.bias is not None}")

    def _finish(self, feats: torch.Tensor, x: SparseTensor, out_stride: int) -> SparseTensor:
        if self.bias is not None:
            feats = feats + self.bias.to(feats.dtype)
        return SparseTensor(feats, tensor_stride=out_stride, coordinate_manager=x.manager)

    def _check(self, x: SparseTensor) -> None:
        if not isinstance(x, SparseTensor):
            raise TypeError(f"{type(self).__name__} expects a SparseTensor, got {type(x).__name__}")
        if x.F.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: expected {self.in_channels} input channels, "
                             f"got {x.F.shape[1]}")

    def _pointwise(self, x: SparseTensor) -> SparseTensor:
        """1x1 kernel with stride 1: one GEMM on the same coordinates, no kernel map."""
        dtype = _compute_dtype(x.F)
        feats = torch.mm(x.F.to(dtype), self.kernel.to(dtype)).to(x.F.dtype)
        return self._finish(feats, x, x.tensor_stride)


class MinkowskiConvolution(_ConvBase):
    """Sparse convolution (MinkowskiEngine semantics, see module docstring).

    forward(SparseTensor (M, Cin) stride s) -> SparseTensor (M', Cout) stride s*stride.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1, bias: bool = False, dimension: int = 3):
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, bias, dimension, False)

    def forward(self, x: SparseTensor) -> SparseTensor:
        self._check(x)
        if self.use_mm:
            return self._pointwise(x)
        out_stride, kmap = x.manager.kernel_map(x.tensor_stride, self.kernel_size, self.stride, self.dilation)
        return self._finish(sparse_conv(x.F, self.kernel, kmap), x, out_stride)


class MinkowskiConvolutionTranspose(_ConvBase):
    """Transposed sparse convolution onto the encoder's finer coordinates.

    forward(SparseTensor (M, Cin) stride s) -> SparseTensor (M_fine, Cout) stride s/stride.
    For kernel_size == stride (the U-Net's k2s2) output row ``p`` receives ``x[q] @ W[k]`` from
    its coarse cell ``q = floor(p/s)*s`` with ``k`` the position of ``p`` in the cell, exactly
    ``conv_transpose3d`` restricted to the fine set.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, stride: int = 2,
                 dilation: int = 1, bias: bool = False, dimension: int = 3):
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, bias, dimension, True)

    def forward(self, x: SparseTensor) -> SparseTensor:
        self._check(x)
        if self.use_mm:
            return self._pointwise(x)
        out_stride, kmap = x.manager.transposed_kernel_map(x.tensor_stride, self.kernel_size, self.stride,
                                                           self.dilation)
        return self._finish(sparse_conv(x.F, self.kernel, kmap, transposed=True), x, out_stride)


class MinkowskiBatchNorm(nn.Module):
    """BatchNorm over the features of a sparse tensor; the ``bn`` child keeps ME's key names."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, eps=eps, momentum=momentum, affine=affine,
                                 track_running_stats=track_running_stats)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace_feature(self.bn(x.F))


class MinkowskiReLU(nn.Module):
    """ReLU on the features of a sparse tensor."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace_feature(torch.relu_(x.F) if self.inplace else torch.relu(x.F))
