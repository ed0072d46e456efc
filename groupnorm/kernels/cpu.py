"""Group Normalization on the CPU (Numba), forward and backward, fused with the per-channel affine,
an optional residual add and an optional activation. Implements the kernel contract of
docs/DESIGN.md; the compiled kernels are in ``_cpu_kernels``.

Math (Wu & He 2018, eqs. 1, 2, 6, 7), per sample n and group g (C/G channels x S positions, D elements):

    mu = mean(x),  var = mean((x - mu)^2),  rstd = 1 / sqrt(var + eps),  x_hat = (x - mu) * rstd
    z = gamma_c * x_hat + beta_c (+ residual),  y = act(z),  act in {None, relu, silu, gelu (erf)}

Backward, with dz = dy * act'(z) (z rebuilt from x bit for bit as in the forward):

    dresidual = dz,  dbeta_c = sum_{n, s} dz,  dgamma_c = sum_{n, s} dz * x_hat
    dx = rstd * (gamma_c dz - mean_group(gamma dz) - x_hat * mean_group(gamma dz x_hat))

Layouts. Inputs are seen, without copying, as one of two contiguous NumPy views:

* "cf" (contiguous NCHW, NCDHW, (N, C, L)): (N, C*S). A group is one contiguous run of D elements.
  With N*G >= 8 one task owns a group: it sums the group, then normalizes it (backward: sums, then dx)
  while the group is still in L2, a single pass over memory. With fewer groups (batch 1 with G = 1,
  say) each group is cut into chunks: partial sums, a serial merge, then a second parallel pass.
* "cl" (channels_last, channels_last_3d, (N, C), or (N, C, L) whose (N, L, C) is contiguous):
  (N, S, C). A group is C/G adjacent channels in every row. Each sample's rows are cut into chunks of
  ~32K elements (of >= 64 rows, see ``_cl_chunks``); tasks sum their rows per channel (vectorized
  along C), a serial step merges chunks and channels, and the tasks then normalize (backward: dx)
  their rows.

Accuracy. The statistics are sums of values shifted by a sample of the data (the group's first element
in "cf", each channel's first element in "cl"), so they are small and centred: two-level sums (in
"cf" blocks of 256 in x's dtype, in "cl" 16 rows per channel), then float64, merged across chunks
and channels with the exact parallel-variance formula in float64. Nothing cancels even at mean 1000
and std 1 in float32.
x - mean is taken as (x - hi) - lo with hi the stored mean and lo its float64 remainder, kept when
|mean| * rstd > 4 (below, dropping it costs < 3e-7 of x_hat), so y and dx keep float32 accuracy for
any mean. Measured: ~1e-7 relative to the float64 reference in float32, ~1e-14 in float64.

Determinism. fastmath is off, except multiply-add fusion inside the activation functions and
reordering inside the "cf" sums' blocks of 256 (``_cpu_kernels._sums``, ``_dots``, ``_dots4``, so
that the compiler vectorizes them; the order then depends on the shape and the machine's vector
width). Every other sum has a fixed order that depends on the shape only (chunks and samples in index
order); no atomics on data. Same input, same bits, on every run and for any thread count.

Threads. The kernels are serial Numba functions over ranges of tasks; ``_run`` spreads the ranges
over ``torch.get_num_threads()`` threads, one thread for inputs under ~32K elements. Where torch runs
on OpenMP (Linux builds) the threads are torch's own OpenMP team: a cached C entry point per kernel,
launched through the runtime's GOMP_parallel, takes pieces off an atomic counter (~3 us a launch, no
GIL; the team's threads are the ones torch's ops keep warm). Elsewhere a pool of Python threads runs
the pieces (tens of microseconds a wake-up, so only for larger inputs). Each calling thread gets its
own OpenMP team, so concurrent calls from Python threads are fine (tested); as with torch's own ops,
start worker processes with spawn, not fork, once threads have run. Compiled code is cached on
disk (``NUMBA_CACHE_DIR``, else ``__pycache__``): the first call in a fresh environment compiles
(~30-40 s for everything, both dtypes, on 2 cores), later processes load it in well under a second.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba._dispatcher import compute_fingerprint
import torch

from groupnorm._checks import channels_last_order
from . import _cpu_kernels as K

_ACT = {None: 0, "none": 0, "relu": 1, "silu": 2, "gelu": 3}
_DTYPES = (torch.float32, torch.float64)

# Allocation hooks: tests swap in NaN-filling versions, so that an element a kernel fails to write
# shows up as NaN (outputs via _empty, float64/x-dtype scratch via _scratch).
_empty = torch.empty
_scratch = np.empty

_pool = None
_pool_lock = threading.Lock()
# Elements below which waking a thread costs more than it saves, and the least work worth a piece of
# its own, for torch's OpenMP team (~3 us a launch); 8x both for Python threads (~30-100 us).
_MIN_WORK_PER_THREAD = 1 << 15
_MIN_WORK_PER_PIECE = 1 << 18


# -------------------------------------------------------------------------------------------------
# Threads
# -------------------------------------------------------------------------------------------------

def _get_pool(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="groupnorm-cpu")
        return _pool


def _openmp_parallel() -> int | None:
    """Address of GOMP_parallel in the OpenMP runtime torch's ops run on (the library torch loaded,
    found in this process's memory map), or None: not Linux, or torch not built with OpenMP."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        name = os.path.basename(path)
        if name.startswith(("libgomp", "libiomp5")):
            try:
                return ctypes.cast(ctypes.CDLL(path).GOMP_parallel, ctypes.c_void_p).value
            except (OSError, AttributeError):
                continue
    return None


_GOMP_PARALLEL = _openmp_parallel()
# (kernel, Numba's fingerprint of the packed arguments) -> the kernel's C entry point (a cfunc). The
# fingerprint (~1 us; numba.typeof costs ~300 us) holds each array's dtype, rank, layout and
# writeability, not its alignment, so _run keys arguments with an unaligned array by their full
# Numba type instead (never seen in practice: torch and NumPy allocate aligned).
_entries = {}


def _run(work: int, fn, ntasks: int, *args) -> None:
    """fn(t0, t1, *args) over [0, ntasks) in up to torch.get_num_threads() threads, fewer when the
    work (elements) is too small to pay for waking a thread.

    The range is cut into 1-4 pieces per thread (4 when the work is large enough to pay for the
    extra calls) that threads take in turn, so a thread that another process keeps off its core
    simply takes fewer pieces. Which thread runs a task never changes its result.
    Threads: torch's OpenMP team (``_cpu_kernels.launch``) where torch runs on OpenMP, else a pool
    of Python threads.
    """
    scale = 1 if _GOMP_PARALLEL is not None else 8
    threads = min(torch.get_num_threads(), ntasks, 1 + work // (scale * _MIN_WORK_PER_THREAD))
    if threads <= 1:
        fn(0, ntasks, *args)
        return
    pieces = min(ntasks, threads * max(1, min(4, work // (threads * scale * _MIN_WORK_PER_PIECE))))
    if _GOMP_PARALLEL is None:
        _run_python_threads(threads, pieces, fn, ntasks, args)
        return
    packed = (ntasks, pieces, np.zeros(1, np.int64), args)
    aligned = all(a.flags.aligned for a in args if isinstance(a, np.ndarray))
    key = (fn, compute_fingerprint(packed) if aligned else numba.typeof(packed))
    entry = _entries.get(key)
    if entry is None:
        entry = _entries[key] = K.entry(fn, numba.typeof(packed))
    K.launch(_GOMP_PARALLEL, entry.address, threads, packed)


def _run_python_threads(threads, pieces, fn, ntasks, args) -> None:
    """_run's pieces on a pool of Python threads (the caller runs pieces too)."""
    counter = itertools.count()
    lock = threading.Lock()
    finished = threading.Event()
    done = [0]
    errors = []

    def worker():
        while True:
            i = next(counter)   # atomic under the GIL
            if i >= pieces:
                return
            try:
                fn(ntasks * i // pieces, ntasks * (i + 1) // pieces, *args)
            except BaseException as exc:  # re-raised in the caller
                errors.append(exc)
            with lock:
                done[0] += 1
                if done[0] == pieces:
                    finished.set()

    pool = _get_pool(threads - 1)
    for _ in range(threads - 1):
        pool.submit(worker)
    worker()
    finished.wait()
    if errors:
        raise errors[0]


# -------------------------------------------------------------------------------------------------
# Layouts and arguments
# -------------------------------------------------------------------------------------------------

def _act_code(activation) -> int:
    try:
        return _ACT[activation]
    except (KeyError, TypeError):
        raise ValueError(f"groupnorm.kernels.cpu: activation must be None, 'relu', 'silu' or "
                         f"'gelu', got {activation!r}") from None


def _check(x, num_groups, where="groupnorm.kernels.cpu"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{where}: unsupported dtype {x.dtype} (float32 or float64)")
    if x.device.type != "cpu":
        raise ValueError(f"{where}: expected a CPU tensor, got device {x.device}")
    if x.dim() < 2:
        raise ValueError(f"{where}: expected rank >= 2 (N, C, *spatial), got shape {tuple(x.shape)}")
    C = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"{where}: num_groups must be a positive int, got {num_groups!r}")
    if C % num_groups:
        raise ValueError(f"{where}: num_channels={C} is not divisible by num_groups={num_groups}")


def _same_shape(name, t, x):
    if t is not None and tuple(t.shape) != tuple(x.shape):
        raise ValueError(f"groupnorm.kernels.cpu: {name} shape {tuple(t.shape)} must equal input "
                         f"shape {tuple(x.shape)}")


def _layout(x) -> str:
    """'cl' when x's (N, *spatial, C) permutation is contiguous, else 'cf'. A contiguous input with
    one position per channel ((N, C), (N, C, 1, 1)) counts as 'cl', the better-vectorized kernel."""
    one_position = math.prod(x.shape[2:]) == 1
    if x.is_contiguous() and not one_position:
        return "cf"
    return "cl" if channels_last_order(x) else "cf"


def _view(t, layout, dtype=None):
    """NumPy view of t as (N, C*S) ('cf') or (N, S, C) ('cl'); copies only when t is in another
    layout (or dtype)."""
    t = t.detach()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    N, C = t.shape[0], t.shape[1]
    a = None
    if layout == "cf":
        a = t.contiguous().numpy().reshape(N, -1)
    elif t.dim() > 2 and channels_last_order(t):   # NumPy moves the axis for less than torch does
        a = t.numpy().transpose(0, *range(2, t.dim()), 1)
        a = a.reshape(N, -1, C) if a.flags.c_contiguous else None   # (reshape is then a view)
    if a is None:
        a = t.movedim(1, -1).contiguous().numpy().reshape(N, -1, C)
    return a


def _alloc_like(x, dtype):
    """A new tensor of x's shape: contiguous when x is, channels_last(-like) when x's (N, *spatial, C)
    permutation is contiguous, else contiguous (the rule op.py's fake tensors follow)."""
    if not x.is_contiguous() and x.dim() > 2 and channels_last_order(x):
        return _empty((x.shape[0], *x.shape[2:], x.shape[1]), dtype=dtype).movedim(-1, 1)
    return _empty(tuple(x.shape), dtype=dtype)


_FILLS = {}   # (C, fill) -> the float64 (C,) array _param gives for a missing weight or bias


def _param(p, C, fill, name):
    """gamma or beta as a contiguous float64 (C,) array (all `fill` when None; kernels never write
    these, so the fill arrays are shared)."""
    if p is None:
        a = _FILLS.get((C, fill))
        if a is None:
            a = _FILLS[(C, fill)] = np.full(C, fill)
        return a
    if not isinstance(p, torch.Tensor) or tuple(p.shape) != (C,):
        shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
        raise ValueError(f"groupnorm.kernels.cpu: {name} must have shape ({C},), got {shape}")
    if p.device.type != "cpu" or p.dtype not in _DTYPES:
        p = p.detach().to(device="cpu", dtype=torch.float64)
    a = p.detach().numpy()
    return a if a.dtype == np.float64 and a.flags.c_contiguous else a.astype(np.float64)


def _param_grad_dtype(weight, bias):
    """The dtype the kernels store dweight and dbias in: the parameters' when they share a float32 or
    float64 dtype (no cast afterwards), else float64 (cast to each parameter's dtype after)."""
    dtypes = {p.dtype for p in (weight, bias) if p is not None}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= set(_DTYPES) else torch.float64


def _cf_chunks(N, G, D):
    """Chunks per group in 'cf': 1 (fused single pass) when N*G >= 8 tasks, else enough for ~16 tasks
    of >= 4096 elements. Shape-only, so the summation order never depends on the machine."""
    if N * G >= 8:
        return 1
    return max(1, min(-(-16 // (N * G)), D // 4096))


def _cl_chunks(N, S, C):
    """Row chunks per sample in 'cl': ~32K elements each and >= 16 tasks, but only while a chunk
    keeps >= 64 rows, with >= 4 tasks in all when S allows. Why the 64 rows: each chunk stores 2
    float64 sums per channel and the merge reads them serially; at 2x2048x7x7 the 8 chunks
    that 16 tasks asked for made those sums two thirds of x's bytes, and the merge as slow as a
    parallel pass (fewer chunks: calls 5-15 % faster at 7x7, no change measured from 14x14 up).
    Shape-only, as the sums' order must be."""
    tasks = max(-(-S * C // 32768), -(-16 // N))
    return max(1, min(S, max(-(-4 // N), min(tasks, S // 64))))


# -------------------------------------------------------------------------------------------------
# The contract
# -------------------------------------------------------------------------------------------------

def forward(x, weight, bias, residual, num_groups: int, eps: float, activation: str | None):
    """y = act(weight * x_hat + bias + residual), with the group statistics.

    Args:
        x: (N, C, *spatial), float32 or float64, any memory format.
        weight, bias: (C,) or None (1 and 0). Any float dtype; used in float64.
        residual: x's shape, or None; converted to x's dtype and layout if it differs.
        num_groups: G, dividing C.  eps: added to the variance.  activation: None|"relu"|"silu"|"gelu".

    Returns:
        (y, mean, rstd): y of x's shape, dtype and memory format (channels_last stays channels_last);
        mean and rstd of shape (N, G) in x's dtype.
    """
    _check(x, num_groups)
    act = _act_code(activation)
    _same_shape("residual", residual, x)
    G = num_groups
    N, C = x.shape[0], x.shape[1]
    layout = _layout(x)
    y = _alloc_like(x, x.dtype)
    mean = _empty((N, G), dtype=x.dtype)
    rstd = _empty((N, G), dtype=x.dtype)
    gamma, beta = _param(weight, C, 1.0, "weight"), _param(bias, C, 0.0, "bias")
    if x.numel() == 0:
        if N:  # no positions: statistics of an empty set
            mean.fill_(float("nan"))
            rstd.fill_(float("nan"))
        return y, mean, rstd
    xv, yv = _view(x, layout), _view(y, layout)
    rv = xv if residual is None else _view(residual, layout, x.dtype)
    rc = xv.dtype.type(0.0 if residual is None else 1.0)
    mv, sv = mean.numpy(), rstd.numpy()
    coef = _scratch((N, 8, C), dtype=xv.dtype)
    eps = float(eps)
    work = x.numel()
    if layout == "cf":
        D = xv.shape[1] // G
        Q = _cf_chunks(N, G, D)
        part = _scratch((N * G * Q, 2))
        if Q == 1:
            _run(work, K.cf_forward_tasks, N * G, 0, xv, rv, rc, gamma, beta, G, eps, act, Q, yv, mv, sv,
                 part, coef)
        else:
            _run(work, K.cf_forward_tasks, N * G * Q, 1, xv, rv, rc, gamma, beta, G, eps, act, Q, yv, mv,
                 sv, part, coef)
            K.cf_combine(xv, part, G, eps, gamma, beta, mv, sv, coef)
            _run(work, K.cf_forward_tasks, N * G * Q, 2, xv, rv, rc, gamma, beta, G, eps, act, Q, yv, mv,
                 sv, part, coef)
    else:
        S = xv.shape[1]
        P = _cl_chunks(N, S, C)
        part = _scratch((N, P, 2, C))
        _run(work, K.cl_forward_tasks, N * P, 0, xv, rv, rc, act, P, yv, part, coef)
        K.cl_combine(xv, part, _scratch((2, C)), G, eps, gamma, beta, mv, sv, coef)
        _run(work, K.cl_forward_tasks, N * P, 1, xv, rv, rc, act, P, yv, part, coef)
    return y, mean, rstd


def backward(grad_y, x, weight, bias, residual, mean, rstd, num_groups: int, activation: str | None,
             needs_input_grad=(True, True, True, True)):
    """Gradients of ``forward`` for the upstream gradient grad_y.

    mean and rstd are ``forward``'s (N, G) outputs. needs_input_grad flags (x, weight, bias,
    residual). Returns (dx, dweight, dbias, dresidual); an entry is None where it is not needed or the
    input was None. dx and dresidual have x's layout and dtype, dweight and dbias the parameter's
    dtype. dresidual = grad_y * act'(z); without activation that is grad_y itself (not a copy).
    """
    _check(x, num_groups)
    act = _act_code(activation)
    _same_shape("grad_y", grad_y, x)
    _same_shape("residual", residual, x)
    need_dx, need_dw, need_db, need_dr = (bool(f) for f in needs_input_grad)
    need_dw = need_dw and weight is not None
    need_db = need_db and bias is not None
    need_dr = need_dr and residual is not None
    G = num_groups
    N, C = x.shape[0], x.shape[1]
    if tuple(mean.shape) != (N, G) or tuple(rstd.shape) != (N, G):
        raise ValueError(f"groupnorm.kernels.cpu: mean and rstd must have shape ({N}, {G}), got "
                         f"{tuple(mean.shape)} and {tuple(rstd.shape)}")
    layout = _layout(x)
    store_dr = need_dr and act != 0
    dx = _alloc_like(x, x.dtype) if need_dx else None
    dr = _alloc_like(x, x.dtype) if store_dr else (grad_y if need_dr else None)
    gdt = _param_grad_dtype(weight, bias)
    dgamma = torch.zeros(C, dtype=gdt)
    dbeta = torch.zeros(C, dtype=gdt)
    if x.numel() and (need_dx or need_dw or need_db or store_dr):
        _backward(grad_y, x, weight, bias, residual, mean, rstd, G, act, layout, dx,
                  dr if store_dr else None, dgamma.numpy(), dbeta.numpy())
    dw = dgamma.to(weight.dtype) if need_dw else None
    db = dbeta.to(bias.dtype) if need_db else None
    return dx, dw, db, dr


def _backward(grad_y, x, weight, bias, residual, mean, rstd, G, act, layout, dx, dr, dgamma, dbeta):
    N, C = x.shape[0], x.shape[1]
    xv = _view(x, layout)
    dyv = _view(grad_y, layout, x.dtype)
    rv = xv if residual is None or act == 0 else _view(residual, layout, x.dtype)
    rc = xv.dtype.type(0.0 if residual is None else 1.0)
    need_dx = dx is not None
    store_dr = dr is not None
    dxv = _view(dx, layout) if need_dx else dyv      # never written when not needed
    drv = _view(dr, layout) if store_dr else dyv
    mv = _view(mean, "cf", x.dtype).reshape(N, G)
    sv = _view(rstd, "cf", x.dtype).reshape(N, G)
    gamma, beta = _param(weight, C, 1.0, "weight"), _param(bias, C, 0.0, "bias")
    coef = _scratch((N, 8, C), dtype=xv.dtype)
    ab = _scratch((N, 2, C))
    work = x.numel()
    need_lo = K.setup_backward(mv, sv, gamma, beta, coef)
    if layout == "cf":
        D = xv.shape[1] // G
        Q = _cf_chunks(N, G, D)
        if need_lo:   # the remainder lo of x - mean, from a fresh float64 sum (as in the forward)
            part = _scratch((N * G * Q, 2))
            _run(work, K.cf_forward_tasks, N * G * Q, 1, xv, rv, rc, gamma, beta, G, 1.0, act, Q, xv, mv,
                 sv, part, coef)
            K.cf_set_lo(xv, part, G, coef)
        part = _scratch((N * G * Q, 2, C // G))
        args = (dyv, xv, rv, rc, gamma, sv, G, act, Q, dxv, need_dx, drv, store_dr, part, ab, coef)
        if Q == 1:
            _run(work, K.cf_backward_tasks, N * G, 0, *args)
            K.param_grads(ab, sv, dgamma, dbeta)
        else:
            _run(work, K.cf_backward_tasks, N * G * Q, 1, *args)
            K.cf_backward_combine(part, ab, gamma, sv, D, coef, dgamma, dbeta)
            if need_dx:
                _run(work, K.cf_backward_tasks, N * G * Q, 2, *args)
    else:
        S = xv.shape[1]
        P = _cl_chunks(N, S, C)
        part = _scratch((N, P, 2, C))
        if need_lo:
            _run(work, K.cl_forward_tasks, N * P, 0, xv, rv, rc, act, P, xv, part, coef)
            K.cl_set_lo(xv, part, _scratch((2, C)), G, coef)
        args = (dyv, xv, rv, rc, act, P, dxv, drv, store_dr, part, coef)
        _run(work, K.cl_backward_tasks, N * P, 0, *args)
        K.cl_backward_combine(part, ab, gamma, sv, S * (C // G), coef, dgamma, dbeta)
        if need_dx:
            _run(work, K.cl_backward_tasks, N * P, 1, *args)
