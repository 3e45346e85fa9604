"""Sparse 3D backbone: pure-PyTorch sparse convolution with MinkowskiEngine semantics,
OpenScene's MinkUNets and checkpoint I/O.

``import sas_core.nn`` imports torch; ``import sas_core`` does not import this package.

Public API: :class:`SparseTensor`, :func:`build_model`, :func:`save_checkpoint`,
:func:`load_checkpoint`, :func:`load_openscene_checkpoint`, plus the ME-style layers.
"""

from .sparse import CoordinateManager, KernelMap, SparseTensor, cat, kernel_offsets  # noqa: F401
from .conv import (MinkowskiBatchNorm, MinkowskiConvolution, MinkowskiConvolutionTranspose,  # noqa: F401
                   MinkowskiReLU, dense_to_me_weight, me_to_dense_weight)
from .minkunet import ARCHITECTURES, MinkUNet14A, MinkUNet18A, MinkUNet34C, build_model  # noqa: F401
from .checkpoint import (CheckpointError, UnsafeCheckpointError, load_checkpoint,  # noqa: F401
                         load_openscene_checkpoint, load_state_dict_strict, save_checkpoint)

__all__ = ["SparseTensor", "CoordinateManager", "KernelMap", "cat", "kernel_offsets",
           "MinkowskiConvolution", "MinkowskiConvolutionTranspose", "MinkowskiBatchNorm", "MinkowskiReLU",
           "me_to_dense_weight", "dense_to_me_weight", "ARCHITECTURES", "MinkUNet14A", "MinkUNet18A",
           "MinkUNet34C", "build_model", "save_checkpoint", "load_checkpoint", "load_openscene_checkpoint",
           "load_state_dict_strict", "CheckpointError", "UnsafeCheckpointError"]
