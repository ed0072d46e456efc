"""The C++ CPU op (groupnorm.kernels.cpu, groupnorm/csrc/group_norm_cpu.cpp) against the float64
reference: forward and backward in every layout and dtype, every kernel path (fused units, chunked
units, blocks of units, the backward's extra pass for lo), large means, gradcheck / gradgradcheck,
opcheck, torch.compile, determinism, empty inputs, a random fuzz, and the package without the op.

Outputs are NaN-filled before the kernels write them (GROUPNORM_CPU_POISON=1), so that an element a
kernel leaves unwritten fails.
"""
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from groupnorm import reference
from groupnorm.kernels import cpu
from helpers import FusedBlock, assert_compiled_matches_eager, backend_or_skip

ACTS = (None, "relu", "silu", "gelu")
TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 4e-3}

WITHOUT_OP = {"test_op_is_built_and_loads", "test_package_works_without_the_op",
              "test_loader_and_builder_agree_on_a_stale_library"}


def test_op_is_built_and_loads():
    """scripts/test.sh (CI) sets GROUPNORM_REQUIRE_BACKENDS=cpu,triton: there the op must be built
    and used; elsewhere a missing op skips the tests that need it."""
    backend_or_skip("cpu")
    assert cpu.available() is None


@pytest.fixture(autouse=True)
def poisoned(request, monkeypatch):
    if request.node.originalname not in WITHOUT_OP:
        backend_or_skip("cpu")
    monkeypatch.setenv("GROUPNORM_CPU_POISON", "1")


def fmt(x, layout):
    """x in one of the layouts: "nchw" (contiguous), "cl" (channels_last / _3d, or (N, L, C)
    storage for rank 3), "strided" (a non-contiguous slice)."""
    if layout == "nchw":
        return x.contiguous()
    if layout == "cl":
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "strided":
        return torch.cat([x, x], dim=-1)[..., ::2]
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


def out_layout(x):
    """The layout outputs must have: channels-last-like iff x is and is not contiguous."""
    cl = x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()
    return fmt(torch.empty(x.shape), "cl" if cl else "nchw").stride()


def check(shape, layout, G, act, residual, dtype, affine=True, mean=0.5, std=2.0, tol=None,
          pdtype=None):
    """forward and backward of the kernels against the reference, on the values x has."""
    x = make(shape, dtype, layout, mean=mean, std=std)
    w, b = params(shape[1], pdtype or dtype) if affine else (None, None)
    r = make(shape, dtype, layout, seed=2) if residual else None
    dy = make(shape, dtype, layout, seed=3, mean=0.0, std=1.0)
    tol = tol or TOL[dtype]
    y, mean_, rstd = cpu.forward(x, w, b, r, G, 1e-5, act)
    y_ref, m_ref, v_ref = reference.normalize(x, "gn", G, w, b, 1e-5, act, r)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == dtype and mean_.dtype == stat and rstd.dtype == stat
    assert mean_.shape == (shape[0], G) and y.stride() == out_layout(x)
    assert rel_err(y, y_ref) < tol
    assert rel_err(mean_, m_ref) < max(tol, 1e-7)
    assert rel_err(rstd, 1 / np.sqrt(v_ref + 1e-5)) < max(tol, 1e-6)
    dx, dw, db, dr = cpu.backward(dy, x, w, b, r, mean_, rstd, G, act)
    g = reference.normalize_backward(dy, x, "gn", G, w, b, 1e-5, act, r)
    # dx = rstd * (gamma dz - ...): its terms are ~rstd |gamma dz| even where dx itself is ~0, so
    # its error is measured against that scale.
    dz = g["residual"] if residual else dy.double().numpy()
    scale = rstd.double().abs().max().item() * np.abs(dz).max()
    scale *= 1.0 if w is None else w.double().abs().max().item()
    assert rel_err(dx, g["x"], scale) < tol * 10
    assert dx.stride() == y.stride() and dx.dtype == dtype
    if affine:
        assert rel_err(dw, g["weight"]) < tol * 10 and dw.dtype == w.dtype
        assert rel_err(db, g["bias"]) < tol * 10 and db.dtype == b.dtype
    else:
        assert dw is None and db is None
    if residual:
        assert rel_err(dr, g["residual"]) < tol * 10
        if act is None:
            assert dr is dy      # documented: no activation, dresidual is grad_y itself
        else:
            assert dr.stride() == y.stride()
    else:
        assert dr is None


# (shape, layout, G), each row a different path of the kernels (see the file's header comment).
CASES = [
    ((4, 8, 6, 5), "nchw", 4),          # cf, fused units (N*G >= 8)
    ((2, 640, 9, 9), "nchw", 32),       # cf, fused units in several batches, the last one short
    ((1, 4, 64, 160), "nchw", 1),       # cf, G = 1: one unit cut into chunks
    ((4, 8, 300, 300), "nchw", 1),      # cf, chunked units in several blocks
    ((2, 6, 9, 9), "cl", 3),            # cl, channels_last, small: fused
    ((1, 24, 40, 40), "cl", 8),         # cl, batch 1: rows in chunks
    ((2, 16, 3, 4, 5), "cl", 8),        # cl, channels_last_3d
    ((2, 16, 3, 4, 5), "nchw", 2),      # cf, rank 5
    ((3, 12, 50), "nchw", 3),           # (N, C, L)
    ((3, 12, 50), "cl", 6),             # (N, C, L) stored as (N, L, C)
    ((5, 12), "nchw", 4),               # (N, C): S = 1, along C
    ((3, 12, 1, 1), "nchw", 12),        # S = 1, G = C
    ((2, 8, 7, 6), "strided", 2),       # non-contiguous input: copied
    ((1, 171, 7, 7), "nchw", 1),        # cf chunks that cut channels
    ((2, 20, 9, 11), "cl", 5),          # C not a multiple of the vector width
    ((1, 256, 12, 12), "cl", 32),       # cl, batch 1, few rows but one block of groups: row chunks
    ((1, 200, 16, 12), "cl", 40),       # the same with C % K != 0
    ((1, 1280, 6, 6), "cl", 32),        # cl group blocks: 5 blocks of 7 groups rounded to 4 of 8
    ((1, 1200, 6, 6), "cl", 30),        # group blocks of 8 groups, the last of 6
    ((1, 600, 8, 8), "cl", 120),        # group blocks of 260 channels (C % K != 0), the last of 80
    ((2, 1280, 12, 12), "cl", 32),      # group blocks > L2: with a residual, output by whole rows
]


@pytest.mark.parametrize("shape,layout,G", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(shape, layout, G, dtype):
    for k, act in enumerate(ACTS):
        check(shape, layout, G, act, residual=k % 2 == 1, dtype=dtype, affine=k != 2)


@pytest.mark.parametrize("act", ACTS)
def test_activation_with_and_without_residual(act):
    for residual in (False, True):
        check((2, 8, 6, 5), "nchw", 2, act, residual, torch.float32)
        check((2, 8, 6, 5), "cl", 4, act, residual, torch.float32, affine=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_low_precision_computed_in_float32(dtype, layout):
    """bf16 / fp16 x with float32 or x-dtype parameters, against the reference on the same values."""
    for pdtype in (torch.float32, dtype):
        check((2, 16, 9, 7), layout, 4, "silu", True, dtype, pdtype=pdtype)
        check((1, 8, 64, 70), layout, 2, None, False, dtype, pdtype=pdtype)


# Large means: float32 at mean 1e6 / std 0.1 and float64 at 1e8 / std 1 must stay within 1e-5 and
# 1e-6 of the float64 formula on the same input, forward and backward, in both layouts and on
# every path (the extra pass for lo runs with an activation).
LARGE = [((2, 8, 6, 5), "nchw", 4), ((1, 4, 64, 160), "nchw", 1), ((2, 6, 9, 9), "cl", 3),
         ((1, 24, 40, 40), "cl", 8), ((3, 12, 50), "cl", 6), ((5, 12), "nchw", 4),
         ((1, 256, 12, 12), "cl", 32)]


@pytest.mark.parametrize("shape,layout,G", LARGE)
@pytest.mark.parametrize("dtype,mean,std,tol", [(torch.float32, 1e3, 1.0, 1e-5),
                                                (torch.float32, 1e6, 0.1, 1e-5),
                                                (torch.float64, 1e8, 1.0, 1e-6)])
@pytest.mark.parametrize("act", [None, "silu"])
def test_large_mean(shape, layout, G, dtype, mean, std, tol, act):
    check(shape, layout, G, act, residual=act is not None, dtype=dtype, mean=mean, std=std,
          tol=tol / 10)


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_activations_at_extreme_preactivations(act):
    """z = weight * x_hat + bias over [-400, 400] (exp over- and underflows inside silu / gelu and
    their derivatives): outputs and gradients stay finite and match the reference."""
    for dtype in (torch.float32, torch.float64):
        x = make((2, 8, 16, 16), dtype)
        w = torch.full((8,), 150.0, dtype=dtype)
        y, m, s = cpu.forward(x, w, None, None, 4, 1e-5, act)
        y_ref, _, _ = reference.normalize(x, "gn", 4, w, None, 1e-5, act)
        assert rel_err(y, y_ref) < TOL[dtype]
        dy = make((2, 8, 16, 16), dtype, seed=3)
        dx, dw, _, _ = cpu.backward(dy, x, w, None, None, m, s, 4, act)
        g = reference.normalize_backward(dy, x, "gn", 4, w, None, 1e-5, act)
        assert rel_err(dw, g["weight"]) < TOL[dtype] * 10
        assert rel_err(dx, g["x"], s.double().abs().max().item() * 150) < TOL[dtype] * 10


def test_large_mean_elementwise():
    """Not just the largest element: every y stays close at mean 1e6, std 0.1 in float32."""
    for layout in ("nchw", "cl"):
        x = make((2, 8, 16, 16), torch.float32, layout, mean=1e6, std=0.1)
        y, _, _ = cpu.forward(x, None, None, None, 4, 1e-5, None)
        y_ref, _, _ = reference.normalize(x, "gn", 4)
        assert (np.abs(y.double().numpy() - y_ref) / (np.abs(y_ref) + 1e-2)).max() < 1e-5


def test_statistics_exact_when_the_first_element_is_an_outlier():
    """The shift is the group's first element: an outlier there must not cost accuracy."""
    x = make((2, 4, 32, 32), torch.float32, std=1e-3)
    x[:, 0, 0, 0] = 1e4
    y, m, s = cpu.forward(x, None, None, None, 2, 1e-5, None)
    y_ref, m_ref, v_ref = reference.normalize(x, "gn", 2)
    assert rel_err(y, y_ref) < 1e-6 and rel_err(m, m_ref) < 1e-7


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape,G", [((2, 4, 32, 32), 2), ((1, 16, 128, 130), 2),
                                     ((1, 256, 12, 12), 32)])
def test_statistics_exact_when_the_shift_is_far_from_the_mean(layout, shape, G):
    """float32 statistics are summed in float blocks around a shift taken from the first elements
    of each group (cf) or its first rows (cl); when those are far outliers, the group is summed
    again exactly (fused and chunked units)."""
    x = make(shape, torch.float32, std=1e-3)
    x[:, :, 0, :16] = 1e4                      # each channel's first 16: far from the rest
    x = fmt(x, layout)
    y, m, s = cpu.forward(x, None, None, None, G, 1e-5, None)
    y_ref, m_ref, v_ref = reference.normalize(x, "gn", G)
    assert rel_err(y, y_ref) < 1e-6 and rel_err(m, m_ref) < 1e-7
    assert rel_err(s, 1 / np.sqrt(v_ref + 1e-5)) < 1e-6


def test_needs_and_mixed_layouts():
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
    assert cpu.backward(dy, x, w, b, r, m, s, 4, "silu", (False,) * 4) == (None,) * 4
    dy0 = torch.ones(()).expand(2, 8, 5, 6)                          # stride 0, as from .sum()
    dx, _, _, _ = cpu.backward(dy0, x, w, b, r, m, s, 4, "silu")
    g = reference.normalize_backward(dy0, x, "gn", 4, w, b, 1e-5, "silu", r)
    assert rel_err(dx, g["x"], 1.0) < 1e-5


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("act", [None, "gelu"])
def test_gradcheck_and_gradgradcheck(layout, act):
    x = make((2, 6, 3, 4), torch.float64, layout).requires_grad_()
    w, b = (p.requires_grad_() for p in params(6, torch.float64))
    r = make((2, 6, 3, 4), torch.float64, layout, seed=2).requires_grad_()

    def f(x, w, b, r):
        return cpu.group_norm(x, 3, w, b, 1e-5, act, r)

    assert torch.autograd.gradcheck(f, (x, w, b, r))
    assert torch.autograd.gradgradcheck(f, (x, w, b, r))


def test_gradgradcheck_every_activation_rank3_and_large_mean():
    for act in ("relu", "silu"):
        x = make((3, 4, 5), torch.float64, "cl").requires_grad_()
        r = make((3, 4, 5), torch.float64, seed=2)
        r = (r + torch.sign(r) * 0.5).requires_grad_()   # z away from relu's kink
        assert torch.autograd.gradgradcheck(
            lambda x, r: cpu.group_norm(x, 2, None, None, 1e-5, act, r), (x, r))
    x = make((2, 4, 3, 3), torch.float64, mean=1e8, std=1.0).requires_grad_()
    y = cpu.group_norm(x, 2, None, None, 1e-5, "silu")
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)
    g = reference.normalize_backward(torch.ones_like(y), x.detach(), "gn", 2, None, None, 1e-5,
                                     "silu")
    assert rel_err(gx, g["x"], 1.0) < 1e-6 and gx.requires_grad


def test_first_backward_without_create_graph_runs_the_fused_kernel():
    """The backward op is what autograd runs (the composite only with create_graph=True)."""
    x = make((2, 8, 4, 4), torch.float32).requires_grad_()
    y = cpu.group_norm(x, 4, None, None, 1e-5, "silu")
    with torch.profiler.profile() as prof:
        y.sum().backward()
    names = {e.name for e in prof.events()}
    assert "groupnorm_cpu::backward" in names


def test_opcheck():
    ops = torch.ops.groupnorm_cpu
    x = make((2, 8, 3, 3), torch.float32)
    w, b = params(8, torch.float32)
    r = make((2, 8, 3, 3), torch.float32, seed=2)
    xc = make((2, 8, 3, 3), torch.float32, "cl")
    torch.library.opcheck(ops.forward.default, (x, w, b, r, 4, 1e-5, 2))
    torch.library.opcheck(ops.forward.default, (xc, None, None, None, 2, 1e-5, 0))
    y, m, s = ops.forward(x, w, b, r, 4, 1e-5, 2)
    torch.library.opcheck(ops.backward.default,
                           (make((2, 8, 3, 3), torch.float32, seed=3), x, w, b, r, m, s, 4, 2,
                            [True, True, False, True]))
    args = (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(),
            r.clone().requires_grad_(), 4, 1e-5, 3)
    torch.library.opcheck(ops.group_norm.default, args)
    torch.library.opcheck(ops.group_norm.default,
                          (xc.clone().requires_grad_(), None, None, None, 2, 1e-5, 1))


def test_torch_compile_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    assert_compiled_matches_eager(FusedBlock(cpu.group_norm),
                                  (x, x.contiguous(memory_format=torch.channels_last)))


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape,G", [((2, 64, 20, 20), 8), ((1, 16, 128, 130), 1),
                                     ((2, 512, 10, 10), 16), ((1, 1280, 6, 6), 32)])
def test_deterministic_across_runs_and_thread_counts(layout, shape, G):
    x = make(shape, torch.float32, layout)
    w, b = params(shape[1], torch.float32)
    dy = make(shape, torch.float32, layout, seed=3)
    n = torch.get_num_threads()
    outs = []
    try:
        for threads in (2, 2, 1):
            torch.set_num_threads(threads)
            y, m, s = cpu.forward(x, w, b, None, G, 1e-5, "silu")
            outs.append((y, m, s) + cpu.backward(dy, x, w, b, None, m, s, G, "silu")[:3])
    finally:
        torch.set_num_threads(n)
    for other in outs[1:]:
        for a, b_ in zip(outs[0], other):
            assert torch.equal(a, b_)


def test_empty_inputs():
    for shape in ((0, 8, 3, 3), (2, 8, 0, 3), (0, 8)):
        x = torch.empty(shape).requires_grad_()
        w = torch.ones(8, requires_grad=True)
        y = cpu.group_norm(x, 4, w, None, 1e-5, "silu")
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(8))
        _, m, s = cpu.forward(x.detach(), None, None, None, 4, 1e-5, None)
        assert m.shape == (shape[0], 4)


def test_nan_propagates_within_its_group_only():
    x = make((2, 8, 4, 4), torch.float32)
    x[0, 0, 0, 0] = float("nan")
    for layout in ("nchw", "cl"):
        y, _, _ = cpu.forward(fmt(x, layout), None, None, None, 4, 1e-5, "relu")
        assert torch.isnan(y[0, :2]).all() and torch.isfinite(y[0, 2:]).all()
        assert torch.isfinite(y[1]).all()


def test_cheap_checks_in_the_op():
    x = make((2, 8, 4, 4), torch.float32)
    with pytest.raises(RuntimeError, match="not divisible by num_groups=3"):
        cpu.forward(x, None, None, None, 3, 1e-5, None)
    with pytest.raises(RuntimeError, match="rank >= 2"):
        cpu.forward(x[0, 0, 0], None, None, None, 1, 1e-5, None)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(8,\)"):
        cpu.forward(x, torch.ones(4), None, None, 4, 1e-5, None)


def test_fuzz_against_reference():
    """Random ranks 2-5, odd sizes, layouts, dtypes, activations, residual, affine."""
    rng = random.Random(0)
    for case in range(40):
        rank = rng.randint(2, 5)
        G = rng.choice([1, 2, 3])
        C = G * rng.randint(1, 5)
        shape = (rng.randint(1, 3), C) + tuple(rng.randint(1, 9) for _ in range(rank - 2))
        layout = rng.choice(["nchw", "cl", "strided"]) if rank > 2 else "nchw"
        dtype = rng.choice([torch.float32, torch.float64])
        act = rng.choice(ACTS)
        mean = rng.choice([0.0, 3.0, 1e3])
        check(shape, layout, G, act, residual=rng.random() < 0.5, dtype=dtype,
              affine=rng.random() < 0.7, mean=mean, std=rng.choice([0.5, 2.0]),
              tol=TOL[dtype] * 5)


def _run(code, **env):
    full = {**os.environ, **env}
    full.pop("GROUPNORM_CPU_POISON", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full, timeout=300)


def test_package_works_without_the_op(tmp_path):
    """Extension absent: available() names the cause and the rebuild command, nothing raises at
    import, the public function computes the exact result (on another backend), and the backend's
    own group_norm raises that one line."""
    code = """
        import torch
        from groupnorm import reference
        from groupnorm.kernels import cpu
        reason = cpu.available()
        assert reason and "not built" in reason and "groupnorm.kernels.build" in reason, reason
        x = (torch.randn(2, 8, 5, 5, dtype=torch.float64) + 1e8)
        import groupnorm.functional as F
        y = F.group_norm(x, 4)
        ref, _, _ = reference.normalize(x, "gn", 4)
        assert abs(y.numpy() - ref).max() < 1e-6
        try:
            cpu.group_norm(x, 4)
        except RuntimeError as exc:
            assert "groupnorm.kernels.build" in str(exc)
        else:
            raise AssertionError("no error")
        print("ok")
    """
    proc = _run(code, GROUPNORM_CPU_LIB=str(tmp_path / "missing" / "groupnorm_cpu.so"))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_no_compiler_at_import_or_first_call():
    """The loader only loads a built library: it never imports torch.utils.cpp_extension."""
    code = """
        import sys, torch
        from groupnorm.kernels import cpu
        assert cpu.available() is None, cpu.available()
        cpu.group_norm(torch.randn(2, 8, 4, 4), 4)
        assert "torch.utils.cpp_extension" not in sys.modules
        print("ok")
    """
    proc = _run(code)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_loader_and_builder_agree_on_a_stale_library():
    """One rule (build.stale_reason) for the builder and the loader: a library from an older source
    or an older build (no OpenMP: one thread) is refused by the loader, not run."""
    from groupnorm.kernels import build
    stamp = build.wanted_stamp(torch.__version__, "DEFAULT")
    assert build.stale_reason(stamp) is None
    assert "older source" in build.stale_reason({**stamp, "source_sha256": "0" * 64})
    if build.OPENMP:
        assert "OpenMP" in build.stale_reason({k: v for k, v in stamp.items() if k != "openmp"})


def test_capability_needs_every_flag_its_build_uses(monkeypatch):
    """A capability is chosen only where the CPU has every feature its compiler flags turn on:
    ATen's 256-bit vectors convert Half with F16C, so an AVX2 CPU without it builds the default."""
    from groupnorm.kernels import build
    monkeypatch.delenv("GROUPNORM_CPU_CAPABILITY", raising=False)
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "avx2", "f16c"}
    assert build.choose_capability(avx512) == "AVX512"
    assert build.choose_capability({"avx2", "fma", "f16c"}) == "AVX2"
    assert build.choose_capability({"avx2", "fma"}) == "DEFAULT"
    assert "-mf16c" in build.CAPABILITIES["AVX2"][1]
