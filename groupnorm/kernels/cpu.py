"""The "cpu" backend: Group Norm on the CPU as a compiled C++ op (``groupnorm/csrc/group_norm_cpu.cpp``),
fused with the per-channel affine, an optional residual add and an optional activation:

    y = act(weight * x_hat + bias + residual),   x_hat: Wu & He 2018, eqs. 1-2, over C/G groups

Exact for any mean (shifted float64 statistics, the mean split in hi + lo), vectorized with ATen's
``at::vec``, threaded with torch's own pool, NCHW / channels_last / channels_last_3d / (N, C) /
(N, C, L) in either storage, float32 / float64 / bfloat16 / float16 (the last two computed in
float32). The source's header comment has the math and the design.

This module only loads the library that ``python -m groupnorm.kernels.build`` (run by
``scripts/setup.sh``) built for the running torch, from ``_build/torch-<version>/``; it never
compiles. When that library is missing, stale or does not load, ``available()`` says why in one
line, with the command that rebuilds it, and the package falls back to the "native" backend.
``GROUPNORM_CPU_LIB=/path/to/groupnorm_cpu.so`` loads another file instead (tests use it).

Backend contract (docs/DESIGN.md; arguments already validated by ``groupnorm._checks``):

* ``group_norm(x, num_groups, weight, bias, eps, activation, residual) -> y``: differentiable
  through the op's C++ autograd function; double backward (create_graph=True) works.
* ``forward(...) -> (y, mean, rstd)`` and ``backward(...) -> (dx, dweight, dbias, dresidual)``:
  the kernels themselves, for tests. mean / rstd: (N, G), float32 (float64 for float64 x).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import build as _build

__all__ = ["available", "group_norm", "forward", "backward"]

# Activation names -> the op's integer codes (groupnorm._checks.ACTIVATIONS order).
_ACT = {None: 0, "none": 0, "relu": 1, "silu": 2, "gelu": 3}


def _load() -> str | None:
    """Loads the library for this torch; None when loaded, else the reason (one line)."""
    version = torch.__version__
    override = os.environ.get("GROUPNORM_CPU_LIB")
    lib = Path(override) if override else _build.library_path(version)
    fix = f"rebuild it with {_build.REBUILD}"
    if not lib.is_file():
        return f"the C++ CPU op is not built for torch {version} (no {lib}); {fix}"
    if not override:
        stamp = _build.read_stamp(lib.parent) or {}
        stale = _build.stale_reason(stamp)
        if stale:
            return f"the C++ CPU op in {lib.parent} is stale ({stale}); {fix}"
        capability = stamp.get("capability", "DEFAULT")
        needed = set(_build.CAPABILITIES.get(capability, ((),))[0])
        flags = _build.cpu_flags()
        if flags and not needed <= flags:
            return (f"the C++ CPU op was built for {capability}, which this CPU lacks "
                    f"({' '.join(sorted(needed - flags))}); {fix}")
    try:
        torch.ops.load_library(str(lib))
        torch.ops.groupnorm_cpu.group_norm.default  # noqa: B018 (registered?)
    except Exception as exc:  # a library built for another torch, a missing symbol, ...
        return f"the C++ CPU op did not load from {lib} ({' '.join(str(exc).split())[:200]}); {fix}"
    return None


_ERROR = _load()
if _ERROR is None:
    _OPS = torch.ops.groupnorm_cpu
    _GROUP_NORM = _OPS.group_norm.default
    _FORWARD = _OPS.forward.default
    _BACKWARD = _OPS.backward.default


def available() -> str | None:
    """None when the op is usable, else the reason, one line, naming the command that fixes it."""
    return _ERROR


def _require():
    if _ERROR is not None:
        raise RuntimeError(f"groupnorm 'cpu' backend: {_ERROR}")


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, residual=None):
    """act(weight * GN(x) + bias + residual), differentiable (twice). y follows x's layout."""
    if _ERROR is not None:
        _require()
    return _GROUP_NORM(x, weight, bias, residual, num_groups, eps, _ACT[activation])


def forward(x, weight, bias, residual, num_groups: int, eps: float, activation):
    """(y, mean, rstd): y = act(weight * x_hat + bias + residual) in x's layout and dtype; mean and
    rstd of shape (N, G), float32 (float64 for float64 x). Not differentiable (use group_norm)."""
    _require()
    return _FORWARD(x, weight, bias, residual, num_groups, float(eps), _ACT[activation])


def backward(grad_y, x, weight, bias, residual, mean, rstd, num_groups: int, activation,
             needs=(True, True, True, True)):
    """Gradients of ``forward`` for grad_y: (dx, dweight, dbias, dresidual), each None where not
    needed (needs flags x, weight, bias, residual) or where that input is None. dx and dresidual
    follow x's layout and dtype, dweight and dbias the parameters' dtypes. Without an activation
    dresidual is grad_y itself (not a copy)."""
    _require()
    act = _ACT[activation]
    need_x, need_w, need_b, need_r = (bool(f) for f in needs)
    need_w = need_w and weight is not None
    need_b = need_b and bias is not None
    need_r = need_r and residual is not None
    dx, dw, db, dr = _BACKWARD(grad_y, x, weight, bias, residual if act else None, mean, rstd,
                               num_groups, act, [need_x, need_w, need_b, need_r and act != 0])
    return (dx if need_x else None, dw if need_w else None, db if need_b else None,
            (dr if act else grad_y) if need_r else None)
