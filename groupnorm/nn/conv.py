"""Weight-standardized convolutions (Qiao et al., 2019), used with GN as "GN+WS"."""

from __future__ import annotations

import torch

from .. import _checks
from ..functional import weight_standardize

__all__ = ["WSConv1d", "WSConv2d", "WSConv3d"]


class _WeightStandardized:
    """Mixin: convolve with W_hat = (W - mean) / sqrt(var + ws_eps), per output filter.

    The raw ``weight`` stays the parameter (state_dict as the plain convolution); the standardized
    weight is recomputed at every forward, and gradients flow through the standardization.
    """

    def _init_ws(self, ws_eps: float) -> None:
        _checks.check_eps(ws_eps, type(self).__name__)
        self.ws_eps = float(ws_eps)

    def standardized_weight(self) -> torch.Tensor:
        """The weight actually used by the convolution."""
        return weight_standardize(self.weight, self.ws_eps)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ws_eps={self.ws_eps}"


class WSConv1d(_WeightStandardized, torch.nn.Conv1d):
    """``torch.nn.Conv1d`` with weight standardization; same arguments plus keyword ``ws_eps``."""

    def __init__(self, *args, ws_eps: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_ws(ws_eps)


class WSConv2d(_WeightStandardized, torch.nn.Conv2d):
    """``torch.nn.Conv2d`` with weight standardization; same arguments plus keyword ``ws_eps``.

    Weight (O, I / groups, kH, kW): each of the O filters is standardized over its I/groups * kH * kW
    entries before the convolution.
    """

    def __init__(self, *args, ws_eps: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_ws(ws_eps)


class WSConv3d(_WeightStandardized, torch.nn.Conv3d):
    """``torch.nn.Conv3d`` with weight standardization; same arguments plus keyword ``ws_eps``."""

    def __init__(self, *args, ws_eps: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_ws(ws_eps)
