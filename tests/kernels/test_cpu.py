"""Numba GN kernels (groupnorm.kernels.cpu) against the float64 reference, forward and backward.

Every output and scratch buffer is NaN-filled before each call (the module's allocation hooks), so an
element a kernel leaves unwritten fails. Shapes are small but chosen to walk every path: "cf" one task
per group and chunked groups, "cl" with several row chunks, the backward's kept / stored / recomputed
dz, and the float64 remainder of the mean (lo) used when |mean| >> std.
"""
import math
import sys
import threading

import numpy as np
import pytest
import torch

from groupnorm import reference
from groupnorm.kernels import _cpu_kernels as K
from groupnorm.kernels import cpu

ACTS = (None, "relu", "silu", "gelu")
TOL = {torch.float32: 2e-6, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    def nan_empty(shape, dtype=torch.float32):
        return torch.full(tuple(shape), float("nan"), dtype=dtype)

    def nan_scratch(shape, dtype=np.float64):
        return np.full(shape, np.nan, dtype=dtype)

    monkeypatch.setattr(cpu, "_empty", nan_empty)
    monkeypatch.setattr(cpu, "_scratch", nan_scratch)
    # Tiny thresholds: every kernel call of these small shapes is split over the threads (torch's
    # OpenMP team), in several pieces, so each path and entry point runs threaded.
    monkeypatch.setattr(cpu, "_MIN_WORK_PER_THREAD", 1 << 7)
    monkeypatch.setattr(cpu, "_MIN_WORK_PER_PIECE", 1 << 7)


def fmt(x, layout):
    """x in one of the layouts: "nchw" (contiguous), "cl" (channels_last / _3d, or (N, L, C) storage
    for rank 3), "strided" (a non-contiguous slice)."""
    if layout == "nchw":
        return x.contiguous()
    if layout == "cl":
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "strided":
        big = torch.cat([x, x], dim=-1)
        return big[..., ::2]
    raise ValueError(layout)


def make(shape, dtype, layout="nchw", seed=0, mean=0.5, std=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * std + mean
    return fmt(x.to(dtype), layout)


def params(c, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(c, generator=g, dtype=torch.float64) * 0.5 + 1.0).to(dtype),
            (torch.randn(c, generator=g, dtype=torch.float64) * 0.5).to(dtype))


def rel_err(actual, expected, scale=0.0):
    """max |actual - expected| / max(max |expected|, scale); fails on a non-finite (unwritten)
    element."""
    actual = actual.detach().double().numpy()
    assert actual.shape == expected.shape
    assert np.isfinite(actual).all(), "non-finite output (an element left unwritten?)"
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), scale, 1e-30))


def check(shape, layout, G, act, residual, dtype, affine=True, mean=0.5, std=2.0, tol=None):
    x = make(shape, dtype, layout, mean=mean, std=std)
    w, b = params(shape[1], dtype) if affine else (None, None)
    r = make(shape, dtype, layout, seed=2) if residual else None
    dy = make(shape, dtype, layout, seed=3, mean=0.0, std=1.0)
    y, mean_, rstd = cpu.forward(x, w, b, r, G, 1e-5, act)
    y_ref, m_ref, v_ref = reference.normalize(x, "gn", G, w, b, 1e-5, act, r)
    tol = tol or TOL[dtype]
    assert y.dtype == x.dtype and mean_.dtype == x.dtype and mean_.shape == (shape[0], G)
    assert y.stride() == fmt(torch.empty(shape), layout if layout != "strided" else "nchw").stride()
    assert rel_err(y, y_ref) < tol
    assert rel_err(mean_, m_ref) < max(tol, 1e-7)
    assert rel_err(rstd, 1 / np.sqrt(v_ref + 1e-5)) < max(tol, 1e-7)
    dx, dw, db, dr = cpu.backward(dy, x, w, b, r, mean_, rstd, G, act)
    g = reference.normalize_backward(dy, x, "gn", G, w, b, 1e-5, act, r)
    # dx = rstd * (gamma dz - ...): its terms are ~rstd |gamma dz| even where dx itself is ~0
    # (one element per group), so errors are measured against that scale.
    dz_scale = rstd.double().abs().max().item() * np.abs(g["residual"] if residual else dy.double()
                                                          .numpy()).max()
    dz_scale *= 1.0 if w is None else w.double().abs().max().item()
    assert rel_err(dx, g["x"], dz_scale) < tol * 10
    assert dx.stride() == y.stride()
    if affine:
        assert rel_err(dw, g["weight"]) < tol * 10 and dw.dtype == w.dtype
        assert rel_err(db, g["bias"]) < tol * 10
    else:
        assert dw is None and db is None
    if residual:
        assert rel_err(dr, g["residual"]) < tol * 10
        if act is None:
            assert dr is dy      # documented: no activation, dresidual is grad_y itself
    else:
        assert dr is None


# (shape, layout, G): each row takes a different path; see the asserts in test_paths_are_covered.
CASES = [
    ((4, 8, 6, 5), "nchw", 4),          # cf, one task per group (N*G >= 8)
    ((1, 4, 64, 40), "nchw", 1),        # cf, G = 1, chunked groups (N*G < 8)
    ((2, 6, 9, 9), "cl", 3),            # cl, channels_last
    ((1, 8, 40, 40), "cl", 8),          # cl, G = C, many row chunks
    ((2, 16, 3, 4, 5), "cl", 8),        # cl, channels_last_3d
    ((2, 16, 3, 4, 5), "nchw", 2),      # cf, rank 5
    ((3, 12, 50), "nchw", 3),           # (N, C, L)
    ((3, 12, 50), "cl", 6),             # (N, C, L) stored as (N, L, C)
    ((5, 12), "nchw", 4),               # (N, C)
    ((3, 12, 1, 1), "nchw", 12),        # one position: G = C, instance norm of a single value
    ((2, 8, 7, 6), "strided", 2),       # non-contiguous input
    ((2, 12, 7, 7), "nchw", 2),         # cf, short channels: 4 at a time, then 2 one by one
    ((1, 171, 7, 7), "nchw", 1),        # cf, short channels in chunks that cut a channel
]


@pytest.mark.parametrize("shape,layout,G", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(shape, layout, G, dtype):
    for k, act in enumerate(ACTS):
        check(shape, layout, G, act, residual=k % 2 == 1, dtype=dtype)


@pytest.mark.parametrize("act", ACTS)
def test_activation_with_and_without_residual(act):
    for residual in (False, True):
        check((2, 8, 6, 5), "nchw", 2, act, residual, torch.float32)
        check((2, 8, 6, 5), "cl", 4, act, residual, torch.float32, affine=False)


def test_paths_are_covered():
    assert cpu._cf_chunks(4, 4, 60) == 1
    assert cpu._cf_chunks(1, 1, 4 * 64 * 40) > 1
    assert cpu._cl_chunks(1, 1600, 8) > 1
    assert cpu._layout(make((3, 12, 50), torch.float32, "cl")) == "cl"
    assert cpu._layout(make((3, 12, 50), torch.float32, "nchw")) == "cf"
    assert cpu._layout(make((5, 12), torch.float32)) == "cl"
    assert 49 <= K.SHORT
    assert cpu._cf_chunks(1, 1, 171 * 49) == 2 and (171 * 49 // 2) % 49    # a chunk cuts a channel


@pytest.mark.parametrize("shape,layout,G", [((4, 8, 6, 5), "nchw", 2), ((1, 4, 64, 40), "nchw", 1),
                                            ((2, 6, 9, 9), "cl", 3)])
@pytest.mark.parametrize("act", [None, "silu"])
def test_large_mean_keeps_float32_accuracy(shape, layout, G, act):
    """mean 1000, std 1: shifted float64 sums and the float64 remainder of the mean keep ~1e-6."""
    check(shape, layout, G, act, residual=True, dtype=torch.float32, mean=1000.0, std=1.0,
          tol=3e-6)


def test_large_mean_elementwise():
    x = make((2, 8, 16, 16), torch.float32, mean=1000.0, std=1.0)
    y, _, _ = cpu.forward(x, None, None, None, 4, 1e-5, None)
    y_ref, _, _ = reference.normalize(x, "gn", 4)
    err = np.abs(y.double().numpy() - y_ref) / (np.abs(y_ref) + 1e-2)
    assert err.max() < 1e-5


def test_backward_dz_paths():
    """dz kept between the passes (group <= 256 KiB), stored in dr, and recomputed (big groups)."""
    check((8, 2, 33000), "nchw", 1, "silu", residual=False, dtype=torch.float32)   # recompute
    check((4, 8, 6, 5), "nchw", 2, "gelu", residual=False, dtype=torch.float32)    # keep
    check((4, 8, 6, 5), "nchw", 2, "relu", residual=True, dtype=torch.float32)     # dr


def test_needs_input_grad_and_mixed_layouts():
    x = make((2, 8, 5, 6), torch.float32, "cl")
    w, b = params(8, torch.float32)
    r = make((2, 8, 5, 6), torch.float32, "nchw", seed=2)          # residual in another layout
    dy = make((2, 8, 5, 6), torch.float32, "nchw", seed=3)         # so is grad_y
    y, m, s = cpu.forward(x, w, b, r, 4, 1e-5, "silu")
    g = reference.normalize_backward(dy, x, "gn", 4, w, b, 1e-5, "silu", r)
    dx, dw, db, dr = cpu.backward(dy, x, w, b, r, m, s, 4, "silu", (False, True, False, True))
    assert dx is None and db is None
    assert rel_err(dw, g["weight"]) < 1e-5 and rel_err(dr, g["residual"]) < 1e-5
    assert dr.is_contiguous(memory_format=torch.channels_last)
    assert cpu.backward(dy, x, w, b, r, m, s, 4, "silu", (False, False, False, False)) == (
        None, None, None, None)


@pytest.mark.parametrize("runner", ["openmp", "python"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_deterministic_across_runs_and_threads(layout, runner, monkeypatch):
    if runner == "python":
        monkeypatch.setattr(cpu, "_GOMP_PARALLEL", None)
    x = make((2, 64, 20, 20), torch.float32, layout)
    w, b = params(64, torch.float32)
    dy = make((2, 64, 20, 20), torch.float32, layout, seed=3)
    n = torch.get_num_threads()
    outs = []
    try:
        for threads in (2, 2, 1):
            torch.set_num_threads(threads)
            y, m, s = cpu.forward(x, w, b, None, 8, 1e-5, "silu")
            outs.append((y, m, s) + cpu.backward(dy, x, w, b, None, m, s, 8, "silu")[:3])
    finally:
        torch.set_num_threads(n)
    for other in outs[1:]:
        for a, b_ in zip(outs[0], other):
            assert torch.equal(a, b_)


def test_runs_on_torchs_openmp_team_where_torch_uses_openmp():
    """On Linux with torch on OpenMP the kernels must not fall back to Python threads silently."""
    if sys.platform != "linux" or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch does not run on OpenMP here")
    assert cpu._GOMP_PARALLEL is not None


def test_concurrent_calls_from_python_threads():
    """Each calling thread gets its own OpenMP team: results stay exact when threads overlap."""
    xs = [make((2, 32, 6, 6), torch.float32, layout, seed=i) for i, layout in enumerate(["nchw", "cl"] * 2)]
    w, b = params(32, torch.float32)
    expected = [cpu.forward(x, w, b, None, 4, 1e-5, "silu")[0] for x in xs]
    mismatches = []

    def work(i):
        for _ in range(10):
            if not torch.equal(cpu.forward(xs[i], w, b, None, 4, 1e-5, "silu")[0], expected[i]):
                mismatches.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mismatches == []


def test_empty_batch():
    x = torch.empty(0, 8, 3, 3)
    y, m, s = cpu.forward(x, None, None, None, 4, 1e-5, None)
    assert y.shape == x.shape and m.shape == (0, 4)
    dx, _, _, _ = cpu.backward(x, x, None, None, None, m, s, 4, None)
    assert dx.shape == x.shape


def test_nan_propagates():
    x = make((2, 8, 4, 4), torch.float32)
    x[0, 0, 0, 0] = float("nan")
    y, _, _ = cpu.forward(x, None, None, None, 4, 1e-5, "relu")
    assert torch.isnan(y[0, :2]).all() and torch.isfinite(y[0, 2:]).all() and torch.isfinite(y[1]).all()


def test_bad_inputs_give_clear_errors():
    x = make((2, 8, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="num_channels=8 is not divisible by num_groups=3"):
        cpu.forward(x, None, None, None, 3, 1e-5, None)
    with pytest.raises(TypeError, match="unsupported dtype torch.bfloat16"):
        cpu.forward(x.bfloat16(), None, None, None, 4, 1e-5, None)
    with pytest.raises(TypeError, match="unsupported dtype torch.int64"):
        cpu.forward(x.long(), None, None, None, 4, 1e-5, None)
    with pytest.raises(ValueError, match="rank >= 2"):
        cpu.forward(x[0, 0, 0], None, None, None, 1, 1e-5, None)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\), got \(4,\)"):
        cpu.forward(x, torch.ones(4), None, None, 4, 1e-5, None)
    with pytest.raises(ValueError, match="residual shape"):
        cpu.forward(x, None, None, x[:1], 4, 1e-5, None)
    with pytest.raises(ValueError, match="activation must be"):
        cpu.forward(x, None, None, None, 4, 1e-5, "tanh")
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        cpu.forward(x, None, None, None, 0, 1e-5, None)
    y, m, s = cpu.forward(x, None, None, None, 4, 1e-5, None)
    with pytest.raises(ValueError, match=r"mean and rstd must have shape \(2, 4\)"):
        cpu.backward(x, x, None, None, None, m[:1], s, 4, None)


@K.njit(**K.OPTS)
def _apply_activation_math(z, out, which):
    for i in range(z.shape[0]):
        if which == 0:
            out[i] = K.exp_f32(z[i])
        elif which == 1:
            out[i] = K.silu(z[i])
        elif which == 2:
            out[i] = K.dsilu(z[i])
        elif which == 3:
            out[i] = K.gelu(z[i])
        else:
            out[i] = K.dgelu(z[i])


def test_activation_math_float32():
    """The vectorizable float32 exp / SiLU / GELU (and derivatives) against float64: relative
    error for exp, error relative to max(|f|, 1) for the others (a few float32 ulps)."""
    z = np.linspace(-12, 12, 40001).astype(np.float32)
    w = z.astype(np.float64)
    s = 1 / (1 + np.exp(-w))
    phi_cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in w])
    phi = np.exp(-w * w / 2) / math.sqrt(2 * math.pi)
    refs = [np.exp(w), w * s, s * (1 + w * (1 - s)), w * phi_cdf, phi_cdf + w * phi]
    for which, ref in enumerate(refs):
        out = np.empty_like(z)
        _apply_activation_math(z, out, which)
        scale = np.abs(ref) if which == 0 else np.maximum(np.abs(ref), 1.0)
        assert (np.abs(out - ref) / scale).max() < 4e-7, which
