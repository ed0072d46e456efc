"""Backend registry for Group Normalization: who computes ``group_norm``.

Backends:

* ``"native"``: torch's own operators (``F.group_norm`` + unfused residual add and activation),
  made accurate in every memory format by shifting each group by its (detached) mean first; see
  ``native_group_norm``.
* ``"cpu"``: the Numba kernels of ``groupnorm.kernels.cpu`` through the custom op
  ``groupnorm.kernels.op`` (fused residual and activation).
* ``"triton"``: the Triton kernels of ``groupnorm.kernels.triton`` through the same custom op.
* ``"auto"`` (the default): chooses one of the above per call, see ``_choose_auto``.

The choice is process-wide with ``set_backend(name)``; ``use_backend(name)`` overrides it for the
current thread inside a ``with`` block and restores the previous choice on exit. The environment
variable ``GROUPNORM_BACKEND`` sets the initial process-wide choice.

The kernels are imported lazily, on the first call that needs them, so that ``import groupnorm``
never loads Numba or Triton.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading

import torch
import torch.nn.functional as F

BACKENDS = ("native", "cpu", "triton", "auto")

__all__ = ["BACKENDS", "set_backend", "get_backend", "use_backend", "group_norm",
           "native_group_norm", "resolve_backend"]

_local = threading.local()  # .stack: the use_backend overrides of this thread, innermost last
_global_choice = "auto"

ACTIVATION_FUNCTIONS = {
    None: None,
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,  # exact (erf) form, as in the reference
}


def _validate(name) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return name.lower()


def set_backend(name: str) -> None:
    """Choose the Group Norm backend for the whole process: "auto", "native", "cpu" or "triton"."""
    global _global_choice
    _global_choice = _validate(name)


def get_backend() -> str:
    """The backend in effect for this thread (the innermost ``use_backend``, else ``set_backend``'s)."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else _global_choice


@contextlib.contextmanager
def use_backend(name: str):
    """Use backend ``name`` inside a ``with`` block on this thread; the previous choice comes back on exit."""
    name = _validate(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


if "GROUPNORM_BACKEND" in os.environ:
    set_backend(os.environ["GROUPNORM_BACKEND"])


# Smallest CPU tensor (elements) for which "auto" takes our kernels, by (memory format, fused,
# training): the sizes from which they beat the accurate native path at every larger size of
# benchmarks/bench_auto.py's ladder (2 threads; docs/PERFORMANCE.md, session 3). "fused" = with
# an activation or a residual; "training" = autograd will need the backward.
_CPU_FROM = {
    ("nchw", False, False): 3 << 17,   # 0.39 M: plain forward
    ("nchw", True, False): 1 << 17,    # 0.13 M: fused forward
    ("nchw", False, True): 3 << 19,    # 1.6 M: plain forward + backward
    ("nchw", True, True): 3 << 18,     # 0.79 M: fused forward + backward
    ("cl", False, False): 1 << 13,     # channels_last forward: from the smallest size measured
    ("cl", True, False): 1 << 13,
    ("cl", False, True): 3 << 17,      # channels_last forward + backward
    ("cl", True, True): 3 << 17,
}


def _choose_auto(x, weight=None, bias=None, residual=None, activation=None) -> str:
    """The backend "auto" picks for this call: where our kernels are correct and faster, else "native".

    "cpu" for float32/float64 CPU tensors from the size in ``_CPU_FROM`` for their memory format
    (NCHW-contiguous or channels_last-like), fused or not, and whether a backward will follow; below
    it the kernels' fixed cost per call (Python, autograd) loses to torch's op. CUDA stays "native"
    until the Triton kernels have been timed on a GPU.
    """
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
            or not _cpu_kernels_available()):
        return "native"
    layout = "nchw" if x.is_contiguous() else "cl"
    fused = activation is not None or residual is not None
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, residual))
    return "cpu" if x.numel() >= _CPU_FROM[(layout, fused, training)] else "native"


_cpu_ok = None


def _cpu_kernels_available() -> bool:
    """Whether groupnorm.kernels.cpu (Numba) imports; tried once."""
    global _cpu_ok
    if _cpu_ok is None:
        try:
            importlib.import_module("groupnorm.kernels.cpu")
            _cpu_ok = True
        except Exception:  # Numba missing or broken: "auto" stays on torch's ops
            _cpu_ok = False
    return _cpu_ok


def resolve_backend(x, weight=None, bias=None, residual=None, activation=None) -> str:
    """The concrete backend ("native", "cpu" or "triton") that ``group_norm`` would use for x."""
    name = get_backend()
    if name == "auto":
        name = _choose_auto(x, weight, bias, residual, activation)
    return name


# ---------------------------------------------------------------------------------------------
# "native": torch operators, accurate in every layout
# ---------------------------------------------------------------------------------------------

def _group_shift(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per-(sample, group) mean of x (float32 or float64), detached, shaped (N, C, 1, ..., 1).

    Why: torch's CPU GroupNorm on channels_last input computes the variance as E[x^2] - E[x]^2,
    which cancels catastrophically when |mean| >> std (relative error 1e-1 and worse in float32 at
    mean 1000, std 1). Normalization is invariant to a per-group shift, value and gradient alike, so
    GN(x) = GN(x - s) for any constant s per group; with s the group mean the shifted values are
    centred and the cancellation is gone. s is detached, hence autograd sees only the identity
    x -> x - s, and GN's own gradient is the same at x and at x - s. For values within a factor 2
    of s the subtraction is exact (Sterbenz), so the shift adds no rounding error of its own.
    """
    n, c = x.shape[0], x.shape[1]
    with torch.no_grad():
        if x.is_contiguous():
            mean = x.view(n, num_groups, -1).mean(dim=-1)
        else:  # channels_last(-like): (N, *spatial, C) is contiguous, group = C/G adjacent channels
            mean = x.movedim(1, -1).reshape(n, -1, num_groups, c // num_groups).mean(dim=(1, 3))
        shift = mean.repeat_interleave(c // num_groups, dim=1)
    return shift.view((n, c) + (1,) * (x.dim() - 2))


def native_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None,
                      residual=None):
    """act(GN(x) * weight + bias + residual) with torch ops (unfused); autograd as usual.

    For float32 the statistics are computed on group-mean-shifted input (see ``_group_shift``) so
    that the result is within ~1e-6 relative of the float64 formula in every memory format, also for
    inputs whose mean is large compared with their spread. float16 / bfloat16 inputs are computed in
    float32 and rounded once at the end: torch's reduced-precision CPU backward is far less accurate
    (e.g. relative error > 1 for groups of two elements in bfloat16).
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        up = [None if t is None else t.float() for t in (x, weight, bias, residual)]
        return native_group_norm(up[0], num_groups, up[1], up[2], eps, activation,
                                 up[3]).to(x.dtype)
    if x.dtype != torch.float64 and x.numel() > 0:
        x = x - _group_shift(x, num_groups)
    # the aten op: F.group_norm refuses groups of one element in a batch of one, which are
    # well defined (x_hat = 0)
    y = torch.group_norm(x, num_groups, weight, bias, eps, torch.backends.cudnn.enabled)
    if residual is not None:
        y = y + residual
    fn = ACTIVATION_FUNCTIONS[activation]
    return y if fn is None else fn(y)


# ---------------------------------------------------------------------------------------------
# "cpu" / "triton": the custom op of groupnorm.kernels.op
# ---------------------------------------------------------------------------------------------

_op_module = None


def _load_op(name: str):
    """groupnorm.kernels.op, imported on first use, with a clear error when it cannot be."""
    global _op_module
    if _op_module is None:
        try:
            _op_module = importlib.import_module("groupnorm.kernels.op")
        except Exception as exc:  # ImportError, or a kernel library failing at import time
            raise RuntimeError(f"backend {name!r} unavailable: cannot import groupnorm.kernels.op "
                               f"({type(exc).__name__}: {exc}); use set_backend('native')") from exc
    if not hasattr(_op_module, "group_norm"):
        raise RuntimeError(f"backend {name!r} unavailable: groupnorm.kernels.op has no group_norm")
    return _op_module


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, residual=None):
    """Dispatch act(GN(x) * weight + bias + residual) to the backend in effect.

    Arguments are assumed validated (``groupnorm.functional.group_norm`` does it).
    """
    name = resolve_backend(x, weight, bias, residual, activation)
    if name == "native":
        return native_group_norm(x, num_groups, weight, bias, eps, activation, residual)
    if name == "cpu" and x.device.type != "cpu":
        raise RuntimeError(f"backend 'cpu' needs CPU tensors, got a tensor on {x.device}")
    op = _load_op(name)
    return op.group_norm(x, num_groups, weight, bias, eps, activation, residual, impl=name)
