"""Group Norm and its two extremes, Layer Norm (G = 1) and Instance Norm (G = C), as modules."""

from __future__ import annotations

import torch

from .. import _checks
from .. import functional as GF

__all__ = ["GroupNorm", "LayerNorm", "InstanceNorm"]


class GroupNorm(torch.nn.GroupNorm):
    r"""Group Normalization (Wu & He, 2018), a drop-in for ``torch.nn.GroupNorm``.

    .. math::
        y = \mathrm{act}\Big(\gamma \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}
            + \beta + \text{residual}\Big)

    where mean and (biased) variance are taken per sample over each group of C / G consecutive
    channels and all spatial positions (the paper's eq. 7), and gamma, beta are per channel.

    Same arguments, parameter names (``weight``, ``bias``) and state_dict as ``torch.nn.GroupNorm``;
    it is a subclass of it. Additions (keyword-only):

    Args:
        num_groups: G, must divide num_channels. May be omitted when ``group_size`` is given.
        num_channels: C.
        eps: > 0, added to the variance.
        affine: learn per-channel weight (init 1) and bias (init 0).
        group_size: channels per group, C / G (the paper's Table 3, bottom), instead of num_groups.
        bias: learn the bias (with affine), as in torch >= 2.5.
        activation: None, "relu", "silu" or "gelu", applied after the affine (fused by kernels).

    Shape:
        input (N, C, *spatial), rank >= 2, any memory format; output the same.
        ``forward(input, residual=None, activation=None)``: residual (input's shape) is added before
        the activation; activation, when given, replaces the module's for that call.
    """

    def __init__(self, num_groups: int | None = None, num_channels: int | None = None,
                 eps: float = 1e-5, affine: bool = True, device=None, dtype=None, *,
                 bias: bool = True, group_size: int | None = None,
                 activation: str | None = None):
        where = type(self).__name__
        if num_channels is None:
            raise TypeError(f"{where}: num_channels is required")
        _checks.check_num_channels(num_channels, where)
        groups = _checks.resolve_groups(num_channels, num_groups, group_size, where)
        _checks.check_eps(eps, where)
        _checks.check_activation(activation, where)
        # bias=False (no learned shift) is passed only when asked, for torch versions without it
        extra = {} if bias else {"bias": False}
        super().__init__(groups, num_channels, eps, affine, device=device, dtype=dtype, **extra)
        self.group_size = num_channels // groups
        self.activation = activation

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None, *,
                activation: str | None = None) -> torch.Tensor:
        # activation, when given, replaces the module's own for this call: a residual block fuses
        # its final ReLU with norm(out, residual=shortcut, activation="relu")
        return GF.group_norm(input, self.num_groups, self.weight, self.bias, self.eps,
                             activation=activation or self.activation, residual=residual)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.activation is None else f"{text}, activation={self.activation!r}"


class LayerNorm(GroupNorm):
    """The paper's Layer Norm for (N, C, *spatial): GN with one group, per-channel affine.

    Statistics per sample over all channels and spatial positions; weight and bias have shape (C,).
    Not ``torch.nn.LayerNorm`` (which normalizes trailing dimensions with an element-wise affine).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None,
                 dtype=None, *, bias: bool = True, activation: str | None = None):
        super().__init__(1, num_channels, eps, affine, device=device, dtype=dtype, bias=bias,
                         activation=activation)

    def extra_repr(self) -> str:
        text = f"{self.num_channels}, eps={self.eps}, affine={self.affine}"
        return text if self.activation is None else f"{text}, activation={self.activation!r}"


class InstanceNorm(GroupNorm):
    """The paper's Instance Norm: GN with one channel per group (G = C), per-channel affine.

    Statistics per sample and channel over spatial positions; weight and bias have shape (C,).
    Unlike ``torch.nn.InstanceNorm2d`` the affine is on by default and there are no running stats.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None,
                 dtype=None, *, bias: bool = True, activation: str | None = None):
        _checks.check_num_channels(num_channels, type(self).__name__)
        super().__init__(num_channels, num_channels, eps, affine, device=device, dtype=dtype,
                         bias=bias, activation=activation)

    def extra_repr(self) -> str:
        text = f"{self.num_channels}, eps={self.eps}, affine={self.affine}"
        return text if self.activation is None else f"{text}, activation={self.activation!r}"
