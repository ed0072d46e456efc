"""The "native" Group Norm backend: torch's own operators, made exact in every layout.

    y = act(GN(x) * weight + bias + residual)      (torch.group_norm, then an unfused add and act)

Why a shift on the CPU. torch's CPU kernel computes the variance of a channels_last input as
E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std, and in every layout it returns
a float32 mean for float32 input, which is off by up to half an ulp of the mean (0.03 at a mean of
1e6): with a std of 0.1 that is already 30 % of x_hat. Normalization is invariant to a constant
shift per group, value and gradient alike, so GN(x) = GN(x - s) for any per-group constant s. With
s = the group mean (summed in float64, rounded to x's dtype) the shifted values are centred, both
faults are gone, and x - s is exact for every value within a factor of 2 of s (Sterbenz): the shift
adds no rounding of its own where it matters. s is detached, so autograd sees x -> x - s only.
torch's CUDA kernel (Welford, statistics in float32) needs no shift for the variance; on CUDA this
backend is the fallback when Triton is missing, and it skips the extra pass.

float16 / bfloat16 inputs are computed in float32 and rounded once at the end: torch's
reduced-precision CPU backward is far less accurate (relative error > 1 for groups of two elements
in bfloat16). Arguments are validated by the caller (``groupnorm._checks.check_group_norm``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _layout

__all__ = ["available", "group_norm"]

ACTIVATION_FUNCTIONS = {None: None, "relu": F.relu, "silu": F.silu, "gelu": F.gelu}  # gelu: erf form
_HALF = (torch.float16, torch.bfloat16)


def available() -> None:
    """Always usable (torch's own operators)."""
    return None


def _group_shift(x: torch.Tensor, num_groups: int, channels_last: bool) -> torch.Tensor:
    """Per-(sample, group) mean of x summed in float64 and rounded to x's dtype, detached,
    broadcastable against x: (N, C, 1, ..., 1)."""
    n, c = x.shape[0], x.shape[1]
    with torch.no_grad():
        if channels_last:   # (N, *spatial, C) is dense: a group is C/G adjacent channels per row
            mean = x.movedim(1, -1).reshape(n, -1, num_groups, c // num_groups).mean(
                dim=(1, 3), dtype=torch.float64)
        else:
            mean = x.reshape(n, num_groups, -1).mean(dim=-1, dtype=torch.float64)
        shift = mean.to(x.dtype).repeat_interleave(c // num_groups, dim=1)
    return shift.view((n, c) + (1,) * (x.dim() - 2))


def _normalize(x, num_groups, weight, bias, eps):
    """GN(x) * weight + bias in x's layout (x float32 or float64)."""
    x, cl = _layout.dense(x)
    if x.numel() == 0:   # torch refuses empty spatial dims; the result is empty either way
        y = x * 0
        y = y if weight is None else y * weight.view((1, -1) + (1,) * (x.dim() - 2))
        return y if bias is None else y + bias.view((1, -1) + (1,) * (x.dim() - 2))
    if x.device.type == "cpu" and (x.dtype == torch.float32 or cl):
        x = x - _group_shift(x, num_groups, cl)   # keeps x's layout (x is dense)
    if cl and x.dim() == 3:   # (N, C, L) stored as (N, L, C): torch keeps that layout as NHWC
        # with H = 1 (as (N, C, L, 1) torch would see a contiguous tensor and change the layout)
        return torch.group_norm(x.unsqueeze(2), num_groups, weight, bias, eps,
                                torch.backends.cudnn.enabled).squeeze(2)
    # the aten op: F.group_norm refuses groups of one element in a batch of one (x_hat = 0 there)
    y = torch.group_norm(x, num_groups, weight, bias, eps, torch.backends.cudnn.enabled)
    # torch picks its output layout from suggest_memory_format(), which size-1 axes can mislead
    return _layout.match(y, True) if cl else y


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, residual=None):
    """act(GN(x) * weight + bias + residual) with torch operators; differentiable any number of
    times. Output in x's layout (``groupnorm._layout``)."""
    if x.dtype in _HALF:
        up = [None if t is None else t.float() for t in (x, weight, bias, residual)]
        return group_norm(up[0], num_groups, up[1], up[2], eps, activation, up[3]).to(x.dtype)
    y = _normalize(x, num_groups, weight, bias, eps)
    if residual is not None:
        y = y + residual
    fn = ACTIVATION_FUNCTIONS[activation]
    return y if fn is None else fn(y)
