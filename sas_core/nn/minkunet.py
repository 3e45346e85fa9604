"""MinkUNet14A / 18A / 34C exactly as OpenScene's ``models/mink_unet.py`` defines them.

Same modules, same attribute names, same parameter shapes, so an OpenScene ``net3d`` state_dict
loads with ``strict=True`` (see :mod:`sas_core.nn.checkpoint`). Layout (INIT_DIM 32):

* ``conv0p1s1`` k5 in->32, ``bn0``; four encoder levels ``conv{i}p{2^(i-1)}s2`` k2s2 + ``bn{i}`` +
  ``block{i}`` (PLANES[0..3]); four decoder levels ``convtr{i}p{2^i}s2`` k2s2 transposed +
  ``bntr{i}``, then ``cat(up, skip)`` (up first) and ``block{5..8}`` (PLANES[4..7]);
  ``final`` 1x1 PLANES[7]->out_channels without bias.
* Blocks are MinkowskiEngine ``BasicBlock`` s (``conv1``/``norm1``/``conv2``/``norm2`` and a
  ``downsample`` = Sequential(1x1 conv, BN) where the width changes).

Unlike OpenScene (which returns ``.F``), ``forward`` returns a :class:`SparseTensor` on the input
coordinates, in the input row order.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from .conv import (MinkowskiBatchNorm, MinkowskiConvolution, MinkowskiConvolutionTranspose,
                   MinkowskiReLU, kaiming_normal_)
from .sparse import SparseTensor
from .sparse import cat as _cat_torch


def cat(*tensors):
    """Concatenate features (``sas_core.nn.cat``, or ``MinkowskiEngine.cat`` for ME tensors)."""
    if isinstance(tensors[0], SparseTensor):
        return _cat_torch(*tensors)
    import MinkowskiEngine as ME  # only reached through sas_core.nn.backend

    return ME.cat(*tensors)

__all__ = ["BasicBlock", "MinkUNetBase", "MinkUNet14A", "MinkUNet18A", "MinkUNet34C", "ARCHITECTURES",
           "build_model"]


class BasicBlock(nn.Module):
    """ME ``BasicBlock``: relu(norm2(conv2(relu(norm1(conv1(x))))) + downsample(x))."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, bn_momentum: float = 0.1, dimension: int = 3):
        super().__init__()
        self.conv1 = MinkowskiConvolution(inplanes, planes, kernel_size=3, stride=stride, dilation=dilation,
                                          dimension=dimension)
        self.norm1 = MinkowskiBatchNorm(planes, momentum=bn_momentum)
        self.conv2 = MinkowskiConvolution(planes, planes, kernel_size=3, stride=1, dilation=dilation,
                                          dimension=dimension)
        self.norm2 = MinkowskiBatchNorm(planes, momentum=bn_momentum)
        self.relu = MinkowskiReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: SparseTensor) -> SparseTensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        residual = self.downsample(x) if self.downsample is not None else x
        if isinstance(out, SparseTensor):
            return out.replace_feature(torch.relu_(out.F + residual.F))
        return self.relu(out + residual)  # MinkowskiEngine tensors (sas_core.nn.backend)


class MinkUNetBase(nn.Module):
    """OpenScene's MinkUNetBase; subclasses set LAYERS and PLANES."""

    BLOCK = BasicBlock
    PLANES: Tuple[int, ...] = ()
    LAYERS: Tuple[int, ...] = (2, 2, 2, 2, 2, 2, 2, 2)
    INIT_DIM = 32

    def __init__(self, in_channels: int = 3, out_channels: int = 512, D: int = 3):
        super().__init__()
        if D != 3:
            raise ValueError("only D=3 is supported")
        self.D = D
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self._build(self.in_channels, self.out_channels)
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = None
        if self.inplanes != planes * self.BLOCK.expansion:
            downsample = nn.Sequential(
                MinkowskiConvolution(self.inplanes, planes * self.BLOCK.expansion, kernel_size=1, stride=1),
                MinkowskiBatchNorm(planes * self.BLOCK.expansion))
        layers = [self.BLOCK(self.inplanes, planes, stride=1, downsample=downsample)]
        self.inplanes = planes * self.BLOCK.expansion
        layers += [self.BLOCK(self.inplanes, planes, stride=1) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _build(self, in_channels: int, out_channels: int) -> None:
        P, L, E = self.PLANES, self.LAYERS, self.BLOCK.expansion
        self.inplanes = self.INIT_DIM
        self.conv0p1s1 = MinkowskiConvolution(in_channels, self.inplanes, kernel_size=5)
        self.bn0 = MinkowskiBatchNorm(self.inplanes)
        self.conv1p1s2 = MinkowskiConvolution(self.inplanes, self.inplanes, kernel_size=2, stride=2)
        self.bn1 = MinkowskiBatchNorm(self.inplanes)
        self.block1 = self._make_layer(P[0], L[0])
        self.conv2p2s2 = MinkowskiConvolution(self.inplanes, self.inplanes, kernel_size=2, stride=2)
        self.bn2 = MinkowskiBatchNorm(self.inplanes)
        self.block2 = self._make_layer(P[1], L[1])
        self.conv3p4s2 = MinkowskiConvolution(self.inplanes, self.inplanes, kernel_size=2, stride=2)
        self.bn3 = MinkowskiBatchNorm(self.inplanes)
        self.block3 = self._make_layer(P[2], L[2])
        self.conv4p8s2 = MinkowskiConvolution(self.inplanes, self.inplanes, kernel_size=2, stride=2)
        self.bn4 = MinkowskiBatchNorm(self.inplanes)
        self.block4 = self._make_layer(P[3], L[3])
        self.convtr4p16s2 = MinkowskiConvolutionTranspose(self.inplanes, P[4], kernel_size=2, stride=2)
        self.bntr4 = MinkowskiBatchNorm(P[4])
        self.inplanes = P[4] + P[2] * E
        self.block5 = self._make_layer(P[4], L[4])
        self.convtr5p8s2 = MinkowskiConvolutionTranspose(self.inplanes, P[5], kernel_size=2, stride=2)
        self.bntr5 = MinkowskiBatchNorm(P[5])
        self.inplanes = P[5] + P[1] * E
        self.block6 = self._make_layer(P[5], L[5])
        self.convtr6p4s2 = MinkowskiConvolutionTranspose(self.inplanes, P[6], kernel_size=2, stride=2)
        self.bntr6 = MinkowskiBatchNorm(P[6])
        self.inplanes = P[6] + P[0] * E
        self.block7 = self._make_layer(P[6], L[6])
        self.convtr7p2s2 = MinkowskiConvolutionTranspose(self.inplanes, P[7], kernel_size=2, stride=2)
        self.bntr7 = MinkowskiBatchNorm(P[7])
        self.inplanes = P[7] + self.INIT_DIM
        self.block8 = self._make_layer(P[7], L[7])
        self.final = MinkowskiConvolution(P[7], out_channels, kernel_size=1)
        self.relu = MinkowskiReLU(inplace=True)

    def _init_weights(self) -> None:
        # OpenScene/ResNetBase: kaiming_normal_(fan_out, relu) on (non-transposed) convolutions,
        # BN weight 1 bias 0; transposed convolutions keep ME's uniform default.
        for m in self.modules():
            if isinstance(m, MinkowskiConvolution):
                kaiming_normal_(m.kernel, mode="fan_out", nonlinearity="relu")
            if isinstance(m, MinkowskiBatchNorm):
                nn.init.constant_(m.bn.weight, 1)
                nn.init.constant_(m.bn.bias, 0)

    def forward(self, x: SparseTensor) -> SparseTensor:
        """x: SparseTensor (M, in_channels), tensor stride 1 -> SparseTensor (M, out_channels)."""
        if not isinstance(x, SparseTensor):
            raise TypeError(f"{type(self).__name__} expects a SparseTensor, got {type(x).__name__}")
        if x.tensor_stride != 1:
            raise ValueError(f"input must have tensor stride 1, got {x.tensor_stride}")
        # Run on coordinates in sorted (batch, x, y, z) order: neighbour indices become nearly
        # monotone, which makes every gather/scatter cache-friendly. Output is in input order.
        order = x.manager.sort_order(1)
        if order is not None:
            inner = SparseTensor(x.F.index_select(0, order), x.C.index_select(0, order).contiguous())
        else:
            inner = x
        out = self._forward(inner)
        inner.manager.drop_lookups()  # search tables are only needed while maps are built
        if order is None:
            return out
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=order.device)
        return x.replace_feature(out.F.index_select(0, inv))

    def _forward(self, x):
        """The OpenScene graph; ``cat`` dispatches to ``ME.cat`` for MinkowskiEngine tensors."""
        relu = self.relu
        out_p1 = relu(self.bn0(self.conv0p1s1(x)))
        out = relu(self.bn1(self.conv1p1s2(out_p1)))
        out_b1p2 = self.block1(out)
        out = relu(self.bn2(self.conv2p2s2(out_b1p2)))
        out_b2p4 = self.block2(out)
        out = relu(self.bn3(self.conv3p4s2(out_b2p4)))
        out_b3p8 = self.block3(out)
        out = relu(self.bn4(self.conv4p8s2(out_b3p8)))
        out = self.block4(out)
        out = relu(self.bntr4(self.convtr4p16s2(out)))
        out = self.block5(cat(out, out_b3p8))
        out = relu(self.bntr5(self.convtr5p8s2(out)))
        out = self.block6(cat(out, out_b2p4))
        out = relu(self.bntr6(self.convtr6p4s2(out)))
        out = self.block7(cat(out, out_b1p2))
        out = relu(self.bntr7(self.convtr7p2s2(out)))
        out = self.block8(cat(out, out_p1))
        return self.final(out)


class MinkUNet14A(MinkUNetBase):
    LAYERS = (1, 1, 1, 1, 1, 1, 1, 1)
    PLANES = (32, 64, 128, 256, 128, 128, 96, 96)


class MinkUNet18A(MinkUNetBase):
    LAYERS = (2, 2, 2, 2, 2, 2, 2, 2)
    PLANES = (32, 64, 128, 256, 128, 128, 96, 96)


class MinkUNet34C(MinkUNetBase):
    LAYERS = (2, 3, 4, 6, 2, 2, 2, 2)
    PLANES = (32, 64, 128, 256, 256, 128, 96, 96)


ARCHITECTURES: Dict[str, type] = {"MinkUNet14A": MinkUNet14A, "MinkUNet18A": MinkUNet18A,
                                  "MinkUNet34C": MinkUNet34C}


def build_model(arch: str = "MinkUNet18A", in_channels: int = 3, out_channels: int = 512) -> MinkUNetBase:
    """Build a MinkUNet by OpenScene name ("MinkUNet14A" | "MinkUNet18A" | "MinkUNet34C")."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; available: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](in_channels, out_channels)
