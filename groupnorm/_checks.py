"""Argument validation shared by every layer of the package.

Each check raises ``ValueError`` (bad value) or ``TypeError`` (bad type) with a message that names
the offending values, so that a wrong call fails at the API boundary and never deep inside a kernel.
Values that are legal but unusual pass untouched: NaN and Inf propagate as in torch, and an empty
batch (N = 0) gives an empty output.
"""

from __future__ import annotations

import math

import torch

# The fused activations, in the order of their integer codes in the compiled kernels (0..3).
ACTIVATIONS = (None, "relu", "silu", "gelu")
_HALF = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float32, torch.float64) + _HALF


def _shape(x) -> tuple:
    return tuple(x.shape)


def check_input(x, where: str = "input") -> None:
    """x must be a floating-point tensor of rank >= 2, laid out (N, C, *spatial)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{where}: expected an input of rank >= 2 (N, C, *spatial), "
                         f"got rank {x.dim()} with shape {_shape(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: expected a floating-point input, got dtype {x.dtype}")


def resolve_groups(num_channels: int, num_groups: int | None = None,
                   group_size: int | None = None, where: str = "group_norm") -> int:
    """Number of groups G from exactly one of num_groups (G) or group_size (C / G); checks C % G == 0."""
    if (num_groups is None) == (group_size is None):
        raise ValueError(f"{where}: give exactly one of num_groups and group_size, "
                         f"got num_groups={num_groups}, group_size={group_size}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"{where}: group_size must be a positive int, got {group_size!r}")
        if num_channels % group_size:
            raise ValueError(f"{where}: num_channels={num_channels} is not divisible by "
                             f"group_size={group_size}")
        return num_channels // group_size
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"{where}: num_groups must be a positive int, got {num_groups!r}")
    if num_channels % num_groups:
        raise ValueError(f"{where}: num_channels={num_channels} is not divisible by "
                         f"num_groups={num_groups}")
    return num_groups


def check_channels(x, num_channels: int, where: str = "input") -> None:
    """x's channel axis (dim 1) must have num_channels entries."""
    if x.shape[1] != num_channels:
        raise ValueError(f"{where}: expected {num_channels} channels (dim 1), got {x.shape[1]} "
                         f"for input of shape {_shape(x)}")


def check_affine(weight, bias, num_channels: int, where: str = "input") -> None:
    """weight and bias, when given, must be tensors of shape (num_channels,)."""
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor or None, got {type(p).__name__}")
        if p.dim() != 1 or p.shape[0] != num_channels:
            raise ValueError(f"{where}: {name} must have shape ({num_channels},) for an input with "
                             f"{num_channels} channels, got {_shape(p)}")


def check_eps(eps, where: str = "input") -> None:
    """eps must be a finite number > 0."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: eps must be a number, got {eps!r}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{where}: eps must be a finite number > 0, got {eps!r}")


def check_activation(activation, where: str = "input") -> None:
    """activation must be None, "relu", "silu" or "gelu"."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_residual(residual, x, where: str = "input") -> None:
    """residual, when given, must be a tensor of x's shape, dtype and device."""
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{where}: residual must be a torch.Tensor or None, "
                        f"got {type(residual).__name__}")
    if residual.shape != x.shape:
        raise ValueError(f"{where}: residual shape {_shape(residual)} must equal input shape "
                         f"{_shape(x)}")
    if residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"{where}: residual must have the input's dtype and device "
                         f"({x.dtype}, {x.device}), got ({residual.dtype}, {residual.device})")


def check_images_per_worker(images_per_worker, batch: int | None = None,
                            where: str = "batch_norm") -> None:
    """images_per_worker must be None or a positive int dividing the batch size."""
    if images_per_worker is None:
        return
    if (isinstance(images_per_worker, bool) or not isinstance(images_per_worker, int)
            or images_per_worker <= 0):
        raise ValueError(f"{where}: images_per_worker must be a positive int or None, "
                         f"got {images_per_worker!r}")
    if batch is not None and batch % images_per_worker:
        raise ValueError(f"{where}: images_per_worker={images_per_worker} does not divide the "
                         f"batch size N={batch}")


def check_momentum(momentum, where: str = "batch_norm", allow_none: bool = False) -> None:
    """momentum must be in [0, 1] (or None for a cumulative average where allowed)."""
    if momentum is None and allow_none:
        return
    if momentum is None or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{where}: momentum must be in [0, 1], got {momentum!r}")


def check_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None,
                     residual=None, where: str = "group_norm") -> None:
    """Every argument of Group Norm, checked once at the public boundary (``functional.group_norm``);
    the backends and kernels below it assume what this guarantees:

    * x: a float16/bfloat16/float32/float64 tensor of rank >= 2, (N, C, *spatial);
    * num_groups: a positive int dividing C;
    * weight, bias: None or real floating tensors of shape (C,) on x's device, in x's dtype, or
      float32 when x is float16/bfloat16 (parameters kept in float32 under mixed precision);
    * eps: a finite number > 0; activation: one of ``ACTIVATIONS``;
    * residual: None or a tensor of x's shape, dtype and device.

    Written for speed (it runs on every call): the common case costs a few attribute reads.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{where}: expected a float16, bfloat16, float32 or float64 input, "
                        f"got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{where}: expected an input of rank >= 2 (N, C, *spatial), "
                         f"got rank {x.dim()} with shape {_shape(x)}")
    channels = x.shape[1]
    if type(num_groups) is not int or num_groups <= 0 or channels % num_groups:
        resolve_groups(channels, num_groups, None, where)   # raises the precise message
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _check_param(p, name, x, where)
    if type(eps) is not float or not 0.0 < eps < math.inf:
        check_eps(eps, where)
    if activation not in ACTIVATIONS:
        check_activation(activation, where)
    if residual is not None:
        check_residual(residual, x, where)


def _check_param(p, name, x, where):
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor or None, got {type(p).__name__}")
    channels = x.shape[1]
    if p.dim() != 1 or p.shape[0] != channels:
        raise ValueError(f"{where}: {name} must have shape ({channels},) for an input with "
                         f"{channels} channels, got {_shape(p)}")
    if p.dtype != x.dtype and not (p.dtype == torch.float32 and x.dtype in _HALF):
        allowed = "float32 or " + str(x.dtype) if x.dtype in _HALF else str(x.dtype)
        raise TypeError(f"{where}: {name} dtype {p.dtype} does not go with input dtype {x.dtype}; "
                        f"expected {allowed}")
    if p.device != x.device:
        raise ValueError(f"{where}: {name} is on {p.device} but the input is on {x.device}")


def check_num_channels(num_channels, where: str = "module") -> None:
    """num_channels must be a positive int."""
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels <= 0:
        raise ValueError(f"{where}: num_channels must be a positive int, got {num_channels!r}")
