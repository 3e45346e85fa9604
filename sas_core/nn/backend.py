"""Optional MinkowskiEngine backend (used only when ``import MinkowskiEngine`` works).

The pure-PyTorch implementation is the default and needs nothing else. Where MinkowskiEngine is
installed (it does not build against current PyTorch/NumPy, so usually it is not),
:func:`to_minkowski_model` turns one of our MinkUNets into a twin whose sparse layers are
MinkowskiEngine modules holding a copy of the same parameters (same key names and kernel layout, so
no conversion is needed), and :func:`minkowski_forward` runs it on our :class:`SparseTensor`.

    from sas_core.nn import backend
    if backend.minkowski_available():
        twin = backend.to_minkowski_model(model)
        feats = backend.minkowski_forward(twin, sparse_tensor)   # (M, C) torch tensor
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .conv import MinkowskiBatchNorm, MinkowskiConvolution, MinkowskiConvolutionTranspose, MinkowskiReLU
from .sparse import SparseTensor

__all__ = ["minkowski_available", "minkowski_unavailable_reason", "default_backend", "to_minkowski",
           "to_minkowski_model", "minkowski_forward"]

_ME = None
_ME_ERROR: Optional[str] = None


def _import_me():
    global _ME, _ME_ERROR
    if _ME is None and _ME_ERROR is None:
        try:
            import MinkowskiEngine as ME  # noqa: N813

            _ME = ME
        except Exception as e:  # noqa: BLE001 - any import failure means "not available"
            _ME_ERROR = f"{type(e).__name__}: {e}"
    return _ME


def minkowski_available() -> bool:
    """True when MinkowskiEngine imports in this environment."""
    return _import_me() is not None


def minkowski_unavailable_reason() -> Optional[str]:
    """Why MinkowskiEngine is not usable (None when it is)."""
    _import_me()
    return _ME_ERROR


def default_backend() -> str:
    """"torch" (always available); "minkowski" is opt-in through :func:`to_minkowski_model`."""
    return "torch"


def _require():
    ME = _import_me()
    if ME is None:
        raise RuntimeError(f"MinkowskiEngine backend unavailable ({_ME_ERROR}); the default pure-PyTorch "
                           "backend needs nothing extra")
    return ME


def to_minkowski(x: SparseTensor):
    """Our SparseTensor (stride 1) -> ``MinkowskiEngine.SparseTensor`` with the same rows."""
    ME = _require()
    if x.tensor_stride != 1:
        raise ValueError("only stride-1 tensors can be converted")
    return ME.SparseTensor(x.F, coordinates=x.C.to(x.device))


def _swap(module: nn.Module, ME) -> nn.Module:
    if isinstance(module, (MinkowskiConvolution, MinkowskiConvolutionTranspose)):
        cls = ME.MinkowskiConvolutionTranspose if module.is_transpose else ME.MinkowskiConvolution
        twin = cls(module.in_channels, module.out_channels, kernel_size=module.kernel_size, stride=module.stride,
                   dilation=module.dilation, bias=module.bias is not None, dimension=3)
        if tuple(twin.kernel.shape) != tuple(module.kernel.shape):
            raise RuntimeError(f"MinkowskiEngine kernel layout {tuple(twin.kernel.shape)} differs from "
                               f"ours {tuple(module.kernel.shape)}")
        twin.kernel = module.kernel
        if module.bias is not None:
            twin.bias = module.bias
        return twin
    if isinstance(module, MinkowskiBatchNorm):
        twin = ME.MinkowskiBatchNorm(module.bn.num_features)
        twin.bn = module.bn
        return twin
    if isinstance(module, MinkowskiReLU):
        return ME.MinkowskiReLU(inplace=module.inplace)
    for name, child in list(module.named_children()):
        setattr(module, name, _swap(child, ME))
    return module


def to_minkowski_model(model: nn.Module) -> nn.Module:
    """A twin of a MinkUNet whose sparse layers are MinkowskiEngine modules holding a copy of our
    parameters (identical key names and shapes: ``twin.state_dict()`` equals ``model.state_dict()``)."""
    ME = _require()
    return _swap(copy.deepcopy(model), ME)


def minkowski_forward(twin: nn.Module, x: SparseTensor) -> torch.Tensor:
    """Run a twin from :func:`to_minkowski_model` on our SparseTensor; returns (M, C) features
    in ``x``'s row order."""
    ME = _require()
    me_in = to_minkowski(x)
    out = twin._forward(me_in)
    # ME may reorder rows: read features back at our coordinates
    return out.features_at_coordinates(x.C.to(out.F.device).float()) if hasattr(out, "features_at_coordinates") \
        else out.F
