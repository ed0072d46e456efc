"""Normalization modules: the paper's family (GN, LN, IN, BN per worker / synchronized), Batch Renorm,
weight-standardized convolutions, and the ``make_norm`` factory that models use."""

from .batch_norm import BatchNorm, BatchRenorm
from .conv import WSConv1d, WSConv2d, WSConv3d
from .factory import KINDS, NormSpec, make_norm
from .group_norm import GroupNorm, InstanceNorm, LayerNorm

__all__ = ["GroupNorm", "LayerNorm", "InstanceNorm", "BatchNorm", "BatchRenorm",
           "WSConv1d", "WSConv2d", "WSConv3d", "KINDS", "NormSpec", "make_norm"]
