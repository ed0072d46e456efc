"""Group Normalization as a ``torch.library`` custom op, with autograd, dispatching to our kernels.

    y = group_norm(x, num_groups, weight, bias, eps, activation, residual, impl=None)
      = act(weight * x_hat + bias + residual)          (x_hat: eqs. 1-2 of Wu & He 2018 over C/G groups)

Two ops are registered:

* ``groupnorm::gn_fwd(x, weight?, bias?, residual?, num_groups, eps, activation, impl) -> (y, mean, rstd)``
* ``groupnorm::gn_bwd(grad_y, x, weight?, bias?, residual?, mean, rstd, num_groups, activation, needs, impl)
  -> (dx, dweight, dbias, dresidual)`` (an output that is not needed comes back with 0 elements).

Both have fake (meta) implementations, so ``torch.compile`` traces them without graph breaks, and
``gn_fwd`` has an autograd formula that calls ``gn_bwd``. Double backward is not supported (the
backward is not itself differentiable: asking for it raises); mean and rstd are not differentiable.

``group_norm`` calls the op under torch.compile, tracing, torch-function / dispatch modes and for
tensor subclasses; in plain eager calls it runs the same implementation and autograd formula through
a ``torch.autograd.Function`` instead, which skips ~0.1 ms of custom-op dispatch per forward +
backward.

Dispatch (``impl``): "cpu" runs ``groupnorm.kernels.cpu`` (Numba), "triton" runs
``groupnorm.kernels.triton`` (CUDA, or the CPU when ``TRITON_INTERPRET=1``); None picks "cpu" for CPU
tensors and "triton" otherwise. Kernel modules are imported on first use.

Dtypes: float32 and float64 everywhere; float16 and bfloat16 are accepted as they are (nothing is
registered for autocast, so under autocast a bf16 x stays bf16 and y is bf16), with weight and bias in
any float dtype (typically float32). Triton computes them natively; the CPU kernels compute them in
float32 and round y and dx back. mean and rstd are float32 (float64 for float64 x).

Memory format: y, dx and dresidual follow x's: contiguous when x is, channels_last(-like) when x's
(N, *spatial, C) permutation is contiguous, contiguous otherwise (the fake tensors follow the same rule).
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

import torch
from torch import Tensor

from groupnorm import _checks

__all__ = ["group_norm", "gn_fwd", "gn_bwd"]

IMPLS = ("cpu", "triton")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


_MODULES: dict = {}


def _kernels(impl: str):
    """The kernel module for impl, imported lazily (once)."""
    mod = _MODULES.get(impl)
    if mod is None:
        if impl not in IMPLS:
            raise ValueError(f"groupnorm.kernels.op: impl must be one of {IMPLS} or None, "
                             f"got {impl!r}")
        mod = _MODULES[impl] = importlib.import_module(f"groupnorm.kernels.{impl}")
    return mod


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _is_channels_last_like(x: Tensor) -> bool:
    return x.dim() > 2 and not x.is_contiguous() and _checks.channels_last_order(x)


def _new_like(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Empty tensor of x's shape in the output memory format of the module docstring."""
    dtype = dtype or x.dtype
    if _is_channels_last_like(x):
        shape = (x.shape[0], *x.shape[2:], x.shape[1])
        return torch.empty(shape, dtype=dtype, device=x.device).movedim(-1, 1)
    return torch.empty(x.shape, dtype=dtype, device=x.device)


def _in_format_of(t: Tensor, x: Tensor) -> Tensor:
    """t with the strides _new_like(x) has (a copy only when a kernel chose otherwise)."""
    if t.numel() == 0 or (x.is_contiguous() and t.is_contiguous()):   # the common case, cheaply
        return t
    if t.stride() == _new_like_strides(x):
        return t
    return _new_like(x, t.dtype).copy_(t)


def _new_like_strides(x: Tensor) -> tuple:
    """The strides of _new_like(x), computed without allocating."""
    shape = tuple(x.shape)
    if _is_channels_last_like(x):
        order = (0, *range(2, len(shape)), 1)          # memory order: N, spatial..., C
    else:
        order = tuple(range(len(shape)))
    strides = [0] * len(shape)
    step = 1
    for d in reversed(order):
        strides[d] = step
        step *= max(shape[d], 1)
    return tuple(strides)


def _compute_dtype(x: Tensor, impl: str) -> Optional[torch.dtype]:
    """float32 when the CPU kernels get a float16/bfloat16 input (Numba has no bf16), else None."""
    return torch.float32 if impl == "cpu" and x.dtype in _LOW_PRECISION else None


def _act(activation: str) -> Optional[str]:
    return None if activation == "none" else activation


def _fwd_impl(x, weight, bias, residual, num_groups, eps, activation, impl):
    kern = _kernels(impl)
    cdt = _compute_dtype(x, impl)
    xk = x if cdt is None else x.to(cdt)
    rk = residual if residual is None or cdt is None else residual.to(cdt)
    y, mean, rstd = kern.forward(xk, weight, bias, rk, num_groups, eps, _act(activation))
    if cdt is not None:
        y = y.to(x.dtype)
    sdt = _stat_dtype(x)
    if mean.dtype != sdt:
        mean, rstd = mean.to(sdt), rstd.to(sdt)
    return _in_format_of(y, x), mean, rstd


@torch.library.custom_op("groupnorm::gn_fwd", mutates_args=())
def gn_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
           num_groups: int, eps: float, activation: str, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd) with y = act(weight * x_hat + bias + residual); mean, rstd: (N, G)."""
    return _fwd_impl(x, weight, bias, residual, num_groups, eps, activation, impl)


@gn_fwd.register_fake
def _gn_fwd_fake(x, weight, bias, residual, num_groups, eps, activation, impl):
    stats = (x.shape[0], num_groups)
    return (_new_like(x), x.new_empty(stats, dtype=_stat_dtype(x)),
            x.new_empty(stats, dtype=_stat_dtype(x)))


def _bwd_impl(grad_y, x, weight, bias, residual, mean, rstd, num_groups, activation, needs, impl):
    kern = _kernels(impl)
    cdt = _compute_dtype(x, impl)
    conv = (lambda t: t) if cdt is None else (lambda t: None if t is None else t.to(cdt))
    dx, dw, db, dr = kern.backward(conv(grad_y), conv(x), weight, bias, conv(residual), mean, rstd,
                                   num_groups, _act(activation), tuple(needs))
    def empty():   # a distinct tensor per unused output: custom-op outputs may not alias
        return x.new_empty(0)

    def cast(t, dtype):
        return t if t.dtype == dtype else t.to(dtype)

    dx = empty() if dx is None else _in_format_of(cast(dx, x.dtype), x)
    dr = empty() if dr is None or not needs[3] or activation == "none" else _in_format_of(
        cast(dr, x.dtype), x)
    dw = empty() if dw is None else cast(dw, weight.dtype)
    db = empty() if db is None else cast(db, bias.dtype)
    return dx, dw, db, dr


@torch.library.custom_op("groupnorm::gn_bwd", mutates_args=())
def gn_bwd(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
           residual: Optional[Tensor], mean: Tensor, rstd: Tensor, num_groups: int, activation: str,
           needs: list[bool], impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dresidual) for needs = [x, weight, bias, residual]; dresidual is only
    computed with an activation (without one it is grad_y, which the autograd formula uses directly)."""
    return _bwd_impl(grad_y, x, weight, bias, residual, mean, rstd, num_groups, activation, needs,
                     impl)


@gn_bwd.register_fake
def _gn_bwd_fake(grad_y, x, weight, bias, residual, mean, rstd, num_groups, activation, needs, impl):
    dx = _new_like(x) if needs[0] else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if needs[1] and weight is not None else x.new_empty(0)
    db = bias.new_empty(bias.shape) if needs[2] and bias is not None else x.new_empty(0)
    dr = (_new_like(x) if needs[3] and residual is not None and activation != "none"
          else x.new_empty(0))
    return dx, dw, db, dr


def _save(ctx, x, weight, bias, residual, num_groups, activation, impl, mean, rstd):
    # The residual is needed only to rebuild z = gamma x_hat + beta + residual for act'(z).
    ctx.save_for_backward(x, weight, bias, residual if activation != "none" else None, mean, rstd)
    ctx.num_groups, ctx.activation, ctx.impl = num_groups, activation, impl
    ctx.has_residual = residual is not None


def _grads(ctx, grad_y, bwd):
    """The autograd formula: (dx, dweight, dbias, dresidual) through bwd (gn_bwd or _bwd_impl)."""
    x, weight, bias, residual, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
    need_w = need_w and weight is not None
    need_b = need_b and bias is not None
    need_r = need_r and ctx.has_residual
    fused_r = need_r and ctx.activation != "none"
    dx = dw = db = dr = None
    if need_x or need_w or need_b or fused_r:
        dx, dw, db, dr = bwd(grad_y, x, weight, bias, residual, mean, rstd, ctx.num_groups,
                             ctx.activation, [need_x, need_w, need_b, fused_r], ctx.impl)
    return (dx if need_x else None, dw if need_w else None, db if need_b else None,
            (dr if fused_r else grad_y) if need_r else None)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, num_groups, eps, activation, impl = inputs
    _, mean, rstd = output
    _save(ctx, x, weight, bias, residual, num_groups, activation, impl, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    return _grads(ctx, grad_y, gn_bwd) + (None, None, None, None)


gn_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerGroupNorm(torch.autograd.Function):
    """The same forward and autograd formula as gn_fwd, without the custom-op machinery: used in
    plain eager calls (see _eager_ok), where the op's dispatch and checks cost ~0.1 ms per call."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, num_groups, eps, activation, impl):
        y, mean, rstd = _fwd_impl(x, weight, bias, residual, num_groups, eps, activation, impl)
        _save(ctx, x, weight, bias, residual, num_groups, activation, impl, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():   # create_graph=True: the result would silently be a constant
            raise RuntimeError("groupnorm.kernels.op.group_norm: double backward "
                               "(create_graph=True) is not supported")
        return _grads(ctx, grad_y, _bwd_impl) + (None, None, None, None)


def _plain(t) -> bool:
    return t is None or (type(t) is torch.Tensor
                         and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def _eager_ok(*tensors) -> bool:
    """True when nothing could need the custom op itself: no torch.compile / jit tracing, no
    torch-function or dispatch mode (FakeTensorMode, profilers of ops, ...), plain tensors only
    (no subclasses, no functorch wrappers such as vmap's)."""
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch._C._is_torch_function_mode_enabled()
            and torch._C._len_torch_dispatch_stack() == 0
            and all(_plain(t) for t in tensors))


def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5, activation: Optional[str] = None,
               residual: Optional[Tensor] = None, *, impl: Optional[str] = None) -> Tensor:
    """act(weight * GN(x) + bias + residual) through the custom op, differentiable once.

    Args:
        x: (N, C, *spatial), rank >= 2, any memory format; float32/float64 (float16/bfloat16 kept).
        num_groups: G, dividing C.
        weight, bias: (C,) or None.  eps: > 0.  activation: None, "relu", "silu" or "gelu" (erf).
        residual: tensor of x's shape, dtype and device, added before the activation, or None.
        impl: "cpu", "triton" or None (by device).

    Returns:
        y of x's shape and dtype, in x's memory format (see the module docstring).
    """
    where = "groupnorm.kernels.op.group_norm"
    _checks.check_input(x, where)
    _checks.resolve_groups(x.shape[1], num_groups=num_groups, where=where)
    _checks.check_affine(weight, bias, x.shape[1], where)
    _checks.check_eps(eps, where)
    _checks.check_activation(activation, where)
    _checks.check_residual(residual, x, where)
    if impl is None:
        impl = "cpu" if x.device.type == "cpu" else "triton"
    if impl not in IMPLS:
        raise ValueError(f"{where}: impl must be one of {IMPLS} or None, got {impl!r}")
    if impl == "cpu" and x.device.type != "cpu":
        raise ValueError(f"{where}: impl 'cpu' needs a CPU tensor, got device {x.device}")
    if impl == "triton" and x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{where}: impl 'triton' on a CPU tensor needs TRITON_INTERPRET=1")
    if x.dtype not in (torch.float32, torch.float64, *_LOW_PRECISION):
        raise TypeError(f"{where}: unsupported dtype {x.dtype}")
    act = activation or "none"
    if _eager_ok(x, weight, bias, residual):
        return _EagerGroupNorm.apply(x, weight, bias, residual, num_groups, float(eps), act, impl)
    y, _, _ = gn_fwd(x, weight, bias, residual, num_groups, float(eps), act, impl)
    return y

