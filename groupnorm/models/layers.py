"""The few verbs every model is built from: conv3x3, conv1x1, norm, act, and the residual block base.

Keeping the choice of convolution (plain or weight-standardized) and of normalization (any
``make_norm`` spec) in these verbs is what lets every model take ``norm=`` and ``ws=`` without
knowing what they mean.
"""
from __future__ import annotations

import contextlib
import math

from torch import nn

from groupnorm.nn import GroupNorm, NormSpec, WSConv2d, make_norm


def conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *,
         ws: bool = False, bias: bool = False) -> nn.Conv2d:
    """A square 2-D convolution with "same" padding (``(k - 1) // 2``).

    ws=True gives a ``WSConv2d``: the weight of every output filter is standardized to zero mean
    and unit variance at each forward (Qiao et al.); the parameter count is unchanged.
    """
    cls = WSConv2d if ws else nn.Conv2d
    return cls(in_channels, out_channels, kernel_size, stride=stride,
               padding=(kernel_size - 1) // 2, bias=bias)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, *, ws: bool = False,
            bias: bool = False) -> nn.Conv2d:
    """3x3 convolution, padding 1. No bias by default: a norm layer follows and has its own beta."""
    return conv(in_channels, out_channels, 3, stride, ws=ws, bias=bias)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1, *, ws: bool = False,
            bias: bool = False) -> nn.Conv2d:
    """1x1 convolution (projection shortcuts and bottleneck reductions)."""
    return conv(in_channels, out_channels, 1, stride, ws=ws, bias=bias)


def norm(spec, num_channels: int) -> nn.Module:
    """The normalization layer for ``num_channels`` channels from a ``make_norm`` spec
    ("bn", "gn", "gn:32", "gn/16", "bn@4", "brn@4", "ln", "in", "none" or a NormSpec).
    "none" gives ``nn.Identity``."""
    try:
        return make_norm(spec, num_channels)
    except ValueError as error:
        parsed = spec if isinstance(spec, NormSpec) else NormSpec.parse(spec)
        if parsed.kind != "gn" or parsed.group_size is not None or num_channels % parsed.num_groups == 0:
            raise
        # The model's widths are multiples of its narrowest one: a G dividing that one fits them all.
        hint = math.gcd(num_channels, parsed.num_groups)
        raise ValueError(f"{error}. This model has {num_channels}-channel layers: choose a number of "
                         f"groups that divides its widths, e.g. norm='gn:{hint}', or channels per group "
                         f"K dividing {num_channels}, norm='gn/K'") from error


def is_identity(module: nn.Module) -> bool:
    """True for the "none" normalization (``nn.Identity``)."""
    return isinstance(module, nn.Identity)


def fuses_residual_relu(norm_layer: nn.Module) -> bool:
    """Whether ``norm_layer(x, residual=r, activation="relu")`` computes ``relu(norm(x) + r)`` itself,
    in one pass over the data: our GroupNorm family (GN, LN, IN) without an activation of its own.
    BatchNorm, "none" and torch's layers do not; a block then adds and applies the ReLU itself."""
    return isinstance(norm_layer, GroupNorm) and norm_layer.activation is None


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


_fuse_blocks = True


@contextlib.contextmanager
def residual_fusion(enabled: bool):
    """Within this context, residual blocks fuse their add + ReLU into the norm (``enabled``, the
    default outside it) or apply them after it. For comparing the two: the values are the same
    (tests/models/test_fused_blocks.py), the speed is not (benchmarks/bench_train.py)."""
    global _fuse_blocks
    saved, _fuse_blocks = _fuse_blocks, bool(enabled)
    try:
        yield
    finally:
        _fuse_blocks = saved


def norm_add_relu(norm_layer: nn.Module, x, shortcut, relu: nn.Module):
    """``relu(norm_layer(x) + shortcut)``, the end of a residual block; fused into the norm where
    ``fuses_residual_relu`` says it can be (the same values, one kernel instead of three passes).
    Not fused while a hook watches ``relu`` (a probe, a feature extractor): fused, ``relu`` would
    never run and its hooks would silently see nothing. (A hook on the norm still runs; fused, it
    sees the call with ``residual=`` and ``activation="relu"``.)"""
    if _fuse_blocks and fuses_residual_relu(norm_layer) and not _hooked(relu):
        return norm_layer(x, residual=shortcut, activation="relu")
    return relu(norm_layer(x) + shortcut)


def act() -> nn.Module:
    """The non-linearity of every model here: ReLU.

    Not in place: forward hooks (the features study) may keep a reference to a layer's output,
    and an in-place ReLU would later overwrite it."""
    return nn.ReLU()


class ResidualBlock(nn.Module):
    """Base of residual blocks: ``relu(main(x) + shortcut(x))``.

    Subclasses name their last normalization layer of the main path in ``last_norm_name``; the
    paper's init sets that layer's gamma to 0 (``zero_init_residual``), which makes the main path
    output zero at initialization, so every block starts as ``relu(shortcut(x))``.
    """

    last_norm_name: str = ""

    def last_norm(self) -> nn.Module:
        return getattr(self, self.last_norm_name)
