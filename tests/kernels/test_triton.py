"""The "triton" backend (groupnorm.kernels.triton): kernels, launch plans, autograd and the torch.library op,
against the float64 reference (groupnorm.reference).

Without a GPU everything runs on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before Triton is imported). The interpreter is slow, so shapes are tiny and the launch
plan is forced (small tiles, spatial chunks) to walk every path: one tile per group ("single"), tiles in a
loop ("loop"), chunks with partials ("split"), several channel blocks per group, masked tails, 64-bit
offsets. Every output and scratch buffer is NaN-filled before each call, so an element left unwritten fails.
Tests that need a GPU (Inductor launching our kernels, CUDA graphs, direct launches) are skipped only
where torch.cuda.is_available() is False.
"""
import json
import math
import os
import pathlib
import random
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install -e .[gpu])")

import groupnorm  # noqa: E402
from groupnorm import reference  # noqa: E402
from groupnorm.kernels import triton as gt  # noqa: E402  (not guarded: an import error must fail)
from helpers import FusedBlock, assert_compiled_matches_eager  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
if not CUDA:
    assert gt._INTERPRET, "tests/conftest.py sets TRITON_INTERPRET=1 where there is no GPU"
ACTS = (None, "relu", "silu", "gelu")
# masked-off lanes of a tile hold garbage (never stored); NumPy, running the interpreter, warns about its exp
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """NaN-filled outputs and scratch buffers; plans rebuilt for every test."""
    monkeypatch.setattr(gt, "_empty_strided", lambda shape, stride, dtype, device: torch.empty_strided(
        shape, stride, dtype=dtype, device=device).fill_(float("nan")))
    monkeypatch.setattr(gt, "_empty", lambda shape, dtype, device: torch.full(
        (shape,) if isinstance(shape, int) else shape, float("nan"), dtype=dtype, device=device))
    gt._PLANS.clear()
    yield
    gt._PLANS.clear()


def in_layout(x, layout):
    """x (N, C, *spatial) in memory layout: nchw (contiguous), cl (channels_last / _3d or (N, L, C) storage),
    sliced (not dense: a strided view)."""
    if layout == "cl":
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "sliced":
        wide = torch.cat([x, x], dim=-1).contiguous()
        return wide[..., ::2]
    return x.contiguous()


def make(shape, layout="nchw", dtype=torch.float32, seed=0, mean=0.5, std=2.0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    return in_layout(x.to(DEVICE), layout).requires_grad_(requires_grad)


def params(c, dtype=torch.float32, seed=1, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(c, generator=g, dtype=torch.float64) * 0.5 + 1.0).to(dtype).to(DEVICE)
    b = (torch.randn(c, generator=g, dtype=torch.float64) * 0.5).to(dtype).to(DEVICE)
    return w.requires_grad_(requires_grad), b.requires_grad_(requires_grad)


def rel_err(actual, expected):
    """max |actual - expected| / max |expected| (expected: NumPy float64 or a tensor)."""
    expected = torch.as_tensor(expected, dtype=torch.float64).cpu()
    actual = actual.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite output (an element left unwritten?)"
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def expected_stride(x):
    """Outputs follow x: its own strides when dense (either layout), contiguous otherwise."""
    dense, _ = groupnorm._layout.dense(x)
    return groupnorm._layout.empty_like(dense).stride()


def run_autograd(x, g, w, b, r, act, dy, eps=1e-5):
    """y and the gradients (x, weight, bias, residual) through gt.group_norm and autograd."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    y = gt.group_norm(leaves[0], g, leaves[1], leaves[2], eps, act, leaves[3])
    inputs = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, inputs, dy))
    return y, [next(grads) if t is not None else None for t in leaves]


def check(x, g, w, b, r, act, tol, grad_tol, eps=1e-5, plan=None, kernel_level=False):
    """Forward and backward against the float64 reference; y and dx in x's layout."""
    dy = make(x.shape, dtype=x.dtype, seed=7, mean=0.0, std=1.0)
    ref_y, ref_mean, ref_var = reference.normalize(x.detach().cpu(), "gn", g, *(
        None if t is None else t.detach().cpu() for t in (w, b)), eps, act,
        None if r is None else r.detach().cpu())
    ref = reference.normalize_backward(dy.cpu(), x.detach().cpu(), "gn", g, *(
        None if t is None else t.detach().cpu() for t in (w, b)), eps, act,
        None if r is None else r.detach().cpu())
    with gt.tuning(**(plan or {})):
        y, grads = run_autograd(x, g, w, b, r, act, dy, eps)
        if kernel_level:
            y2, mean, rstd = gt.forward(x, w, b, r, g, eps, act)
            grads2 = gt.backward(dy, x, w, b, r, mean, rstd, g, act)
    assert y.dtype == x.dtype and y.stride() == expected_stride(x)
    assert rel_err(y, ref_y) < tol
    for name, got in zip(("x", "weight", "bias", "residual"), grads):
        if ref[name] is not None:
            assert rel_err(got, ref[name]) < grad_tol, name
    assert grads[0].stride() == expected_stride(x)
    if kernel_level:
        stat = torch.float64 if x.dtype == torch.float64 else torch.float32
        assert mean.dtype == rstd.dtype == stat and mean.shape == rstd.shape == (x.shape[0], g)
        assert rel_err(mean, ref_mean) < tol and rel_err(rstd, 1 / (ref_var + eps) ** 0.5) < tol
        assert torch.equal(y2, y)
        for name, got in zip(("x", "weight", "bias", "residual"), grads2):
            if ref[name] is None:
                assert got is None, name
            else:
                assert rel_err(got, ref[name]) < grad_tol, name
    return y, grads


# shape, G, layout, activation, residual, affine, plan. Tiles of 8-64 elements force several tiles and channel
# blocks per group; fit=0 turns the one-tile path off; chunks > 1 forces the split path, chunks=1 the loop.
CASES = [
    ((2, 8, 5, 6), 4, "nchw", None, False, True, {}),                                   # single
    ((2, 8, 5, 6), 4, "cl", "silu", True, True, dict(tile=16, fit=0, chunks=3)),        # split
    ((2, 8, 5, 6), 4, "nchw", "gelu", True, True, dict(tile=16, fit=0, chunks=1)),      # loop
    ((1, 6, 7, 3), 2, "cl", "relu", True, True, dict(tile=16, fit=0)),                  # split by SM count
    ((1, 12, 4, 4), 1, "nchw", "relu", False, True, dict(tile=16, fit=0, chunks=2)),    # G = 1, channel blocks
    ((2, 6, 3, 3), 6, "cl", "silu", False, False, {}),                                  # G = C, no affine
    ((3, 4, 11), 2, "nchw", "relu", True, True, dict(tile=8, fit=0, chunks=2)),         # (N, C, L)
    ((3, 4, 11), 2, "cl", "gelu", True, True, dict(tile=8, fit=0, chunks=1)),           # (N, L, C) storage
    ((5, 12), 3, "nchw", "gelu", True, True, {}),                                       # (N, C)
    ((2, 8, 3, 4, 5), 2, "cl", "silu", True, True, dict(tile=32, fit=0, chunks=2)),     # channels_last_3d
    ((1, 4, 2, 3, 5), 2, "nchw", None, False, True, dict(tile=64, fit=0, chunks=1)),    # NCDHW, loop
    ((2, 4, 5, 6), 2, "sliced", "silu", True, True, dict(tile=32)),                     # not dense: copied
]


@pytest.mark.parametrize("shape,g,layout,act,res,affine,plan", CASES)
def test_fp32_matches_reference(shape, g, layout, act, res, affine, plan):
    x = make(shape, layout)
    w, b = params(shape[1]) if affine else (None, None)
    r = make(shape, layout, seed=3, mean=0.0, std=1.0) if res else None
    check(x, g, w, b, r, act, tol=1e-5, grad_tol=2e-5, plan=plan, kernel_level=True)


def random_cases(count, seed=2026):
    """Groups of at least 4 elements: with 2, x_hat is +-1 whatever x, and dx is pure rounding noise."""
    rng = random.Random(seed)
    while count:
        n, g, d = rng.choice([1, 2, 3]), rng.choice([1, 2, 3]), rng.choice([1, 2, 3, 5])
        spatial = tuple(rng.randint(1, 6) for _ in range(rng.choice([0, 1, 2, 3])))
        if d * math.prod(spatial) < 4:
            continue
        count -= 1
        plan = rng.choice([{}, dict(tile=16, fit=0, chunks=1), dict(tile=16, fit=0, chunks=rng.randint(2, 4))])
        yield ((n, g * d, *spatial), g, rng.choice(["nchw", "cl"]), rng.choice(ACTS), rng.random() < 0.5,
               rng.random() < 0.8, plan)


@pytest.mark.parametrize("shape,g,layout,act,res,affine,plan", list(random_cases(6)))
def test_random_shapes(shape, g, layout, act, res, affine, plan):
    x = make(shape, layout, seed=sum(shape))
    w, b = params(shape[1]) if affine else (None, None)
    r = make(shape, layout, seed=4, mean=0.0, std=1.0) if res else None
    check(x, g, w, b, r, act, tol=1e-5, grad_tol=3e-5, plan=plan)


def test_weight_only_bias_only_and_partial_gradients():
    x = make((2, 4, 3, 5))
    w, b = params(4)
    check(x, 2, w, None, None, "gelu", 1e-5, 2e-5, plan=dict(tile=16))
    check(x, 2, None, b, None, "relu", 1e-5, 2e-5, plan=dict(tile=16, fit=0, chunks=2))
    dy = make(x.shape, seed=9)
    ref = reference.normalize_backward(dy.cpu(), x.cpu(), "gn", 2, w.cpu(), b.cpu(), 1e-5, "silu")
    for kind in ("single", "split"):
        for wanted in ("x", "weight", "bias"):
            xx, ww, bb = (t.detach().requires_grad_(name == wanted) for t, name in
                          ((x, "x"), (w, "weight"), (b, "bias")))
            with gt.tuning(**PLANS[kind]):
                (grad,) = torch.autograd.grad(gt.group_norm(xx, 2, ww, bb, 1e-5, "silu"),
                                              {"x": xx, "weight": ww, "bias": bb}[wanted], dy)
            assert rel_err(grad, ref[wanted]) < 2e-5, (kind, wanted)


def test_strided_parameters():
    """weight and bias as strided views (a slice, an expanded scalar) are read as what they are."""
    x = make((2, 6, 3, 3))
    w = torch.linspace(0.5, 1.5, 12, device=DEVICE)[::2]
    b = torch.full((1,), 0.25, device=DEVICE).expand(6)
    check(x, 3, w, b, None, "silu", 1e-5, 2e-5)


@pytest.mark.parametrize("kind", ["single", "split"])
def test_parameter_gradients_over_many_samples(kind):
    """The parameter gradients sum per-sample partials in steps of block_n samples (a masked last step)."""
    x = make((5, 6, 3, 4), "cl")
    w, b = params(6)
    check(x, 3, w, b, None, "gelu", 1e-5, 2e-5, plan=dict(PLANS[kind], block_n=2))


def test_residual_without_activation_passes_dy_on():
    x = make((2, 4, 3, 3))
    r = make(x.shape, seed=2, requires_grad=True)
    dy = make(x.shape, seed=9)
    (gr,) = torch.autograd.grad(gt.group_norm(x, 2, None, None, 1e-5, None, r), r, dy)
    assert torch.equal(gr, dy)
    w, b = params(4)
    _, mean, rstd = gt.forward(x, w, b, r, 2, 1e-5, None)   # kernel level: a fresh dresidual = dy
    dx, dw, db, dr = gt.backward(dy, x, w, b, r, mean, rstd, 2, None, (False, False, False, True))
    assert dx is None and dw is None and db is None
    assert torch.equal(dr, dy) and dr.data_ptr() != dy.data_ptr()


def test_mixed_layouts_and_an_expanded_gradient():
    """A residual in the other layout than x; dy as y.sum() makes it (stride 0 everywhere)."""
    x = make((2, 4, 5, 6), "cl")
    w, b = params(4)
    check(x, 2, w, b, make(x.shape, "nchw", seed=2), "silu", 1e-5, 2e-5, plan=dict(tile=32))
    xx = x.detach().requires_grad_()
    (gx,) = torch.autograd.grad(gt.group_norm(xx, 2, w, b, 1e-5, "gelu").sum(), xx)
    ref = reference.normalize_backward(torch.ones(x.shape, dtype=torch.float64), x.cpu(), "gn", 2, w.cpu(),
                                       b.cpu(), 1e-5, "gelu")
    assert rel_err(gx, ref["x"]) < 2e-5 and gx.stride() == x.stride()


@pytest.mark.parametrize("dtype,layout,pdtype", [(torch.bfloat16, "cl", torch.float32),
                                                 (torch.float16, "nchw", torch.float16)])
def test_half_precision(dtype, layout, pdtype):
    """16-bit x and residual, parameters in float32 (autocast) or x's dtype: float32 math inside."""
    x = make((2, 8, 4, 5), layout, dtype)
    w, b = params(8, pdtype)
    r = make(x.shape, layout, dtype, seed=5, mean=0.0, std=1.0)
    for plan in ({}, dict(tile=32, fit=0, chunks=3)):
        y, (dx, dw, db, dr) = check(x, 4, w, b, r, "silu", tol=1e-2, grad_tol=2e-2, plan=plan)
        assert dx.dtype == dr.dtype == dtype and dw.dtype == db.dtype == pdtype


def test_float64():
    x = make((2, 6, 3, 4), "cl", torch.float64)
    w, b = params(6, torch.float64)
    check(x, 3, w, b, None, "gelu", tol=1e-12, grad_tol=1e-11, plan=dict(tile=16, fit=0, chunks=2),
          kernel_level=True)


PLANS = {"single": {}, "loop": dict(tile=32, fit=0, chunks=1), "split": dict(tile=32, fit=0, chunks=3)}


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("kind", PLANS)
def test_float32_exact_at_mean_1e6(kind, layout):
    """mean 1e6, std 0.1: the float32 mean alone is off by up to ulp(1e6) / 2 = 0.03 = 30 % of x_hat; hi + lo
    keeps forward and backward within 1e-5 of the float64 formula (here ~1e-7)."""
    x = make((2, 8, 6, 6), layout, mean=1e6, std=0.1)
    w, b = params(8)
    check(x, 4, w, b, make(x.shape, layout, seed=3), "silu", tol=1e-5, grad_tol=1e-5, plan=PLANS[kind],
          kernel_level=True)
    with gt.tuning(**PLANS[kind]):
        gt.group_norm(x, 4)
        assert [p.kind for p in gt._PLANS.values()] == [kind]


@pytest.mark.parametrize("kind", PLANS)
def test_float64_exact_at_mean_1e8(kind):
    """Against an exact reference: the float64 formula itself rounds the mean (~1e-8 at 1e8); the reference
    on x minus one of each group's values (exact, and GN is shift invariant) does not."""
    x = make((2, 8, 6, 6), "cl", torch.float64, mean=1e8, std=0.1)
    w, b = params(8, torch.float64)
    shift = x.reshape(2, 4, -1)[:, :, :1].expand(2, 4, 72).reshape(x.shape).cpu()
    with gt.tuning(**PLANS[kind]):
        y, mean, rstd = gt.forward(x, w, b, None, 4, 1e-5, "relu")
    ref_y, _, ref_var = reference.normalize(x.cpu() - shift, "gn", 4, w.cpu(), b.cpu(), 1e-5, "relu")
    assert rel_err(y, ref_y) < 1e-12
    assert rel_err(rstd, 1 / (ref_var + 1e-5) ** 0.5) < 1e-12


@pytest.mark.parametrize("kind", PLANS)
def test_bitwise_deterministic(kind):
    x = make((2, 8, 5, 5), "cl")
    w, b = params(8)
    r = make(x.shape, "cl", seed=2)
    dy = make(x.shape, "cl", seed=9)
    with gt.tuning(**PLANS[kind]):
        first = run_autograd(x, 2, w, b, r, "silu", dy)
        second = run_autograd(x, 2, w, b, r, "silu", dy)
    for a, c in zip([first[0], *first[1]], [second[0], *second[1]]):
        assert torch.equal(a, c)


def test_plans_agree_and_64_bit_offsets():
    x = make((1, 4, 7, 6), "cl")
    w, b = params(4)
    dy = make(x.shape, "cl", seed=9)
    base = run_autograd(x, 2, w, b, None, "gelu", dy)
    for plan in (dict(tile=16, fit=0, chunks=4), dict(tile=16, fit=0, chunks=4, i64=True),
                 dict(tile=16, fit=0, chunks=1, i64=True), dict(i64=True)):
        with gt.tuning(**plan):
            other = run_autograd(x, 2, w, b, None, "gelu", dy)
        for a, c in zip([base[0], *base[1][:3]], [other[0], *other[1][:3]]):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3), (0, 4)])
def test_empty_inputs_give_empty_outputs(shape):
    x = torch.empty(shape, device=DEVICE, requires_grad=True)
    w, b = params(4, requires_grad=True)
    y = gt.group_norm(x, 2, w, b, 1e-5, "silu")
    assert y.shape == x.shape
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))
    _, mean, rstd = gt.forward(x.detach(), w, b, None, 2, 1e-5, None)
    assert mean.shape == rstd.shape == (shape[0], 2)


ACT_CASES = [("relu", "cl", "split"), ("silu", "cl", "loop"), ("gelu", "nchw", "single"), (None, "cl", "single")]


@pytest.mark.parametrize("act,layout,kind", ACT_CASES)
def test_gradcheck(act, layout, kind):
    x = make((2, 6, 3, 4), layout, torch.float64, requires_grad=True)
    w, b = params(6, torch.float64, requires_grad=True)
    r = make(x.shape, "nchw", torch.float64, seed=2, requires_grad=True)
    if act == "relu":   # keep z away from relu's kink, where finite differences are meaningless
        with torch.no_grad():
            r.add_(torch.sign(r) * 0.5)
    with gt.tuning(**PLANS[kind]):
        assert torch.autograd.gradcheck(lambda *a: gt.group_norm(a[0], 3, a[1], a[2], 1e-5, act, a[3]),
                                        (x, w, b, r), fast_mode=True)


def test_gradcheck_rank2_and_rank5():
    x2 = make((4, 6), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: gt.group_norm(x, 3), (x2,), fast_mode=True)
    x5 = make((2, 4, 2, 3, 2), "cl", torch.float64, requires_grad=True)
    w, b = params(4, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: gt.group_norm(x, 2, w, b, 1e-5, "silu"), (x5, w, b),
                                    fast_mode=True)


@pytest.mark.parametrize("act", ["silu", None])
def test_gradgradcheck(act):
    """Double backward (create_graph=True) goes through a composite of torch ops."""
    x = make((2, 4, 3, 3), "cl", torch.float64, requires_grad=True)
    w, b = params(4, torch.float64, requires_grad=True)
    r = make(x.shape, dtype=torch.float64, seed=2, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda *a: gt.group_norm(a[0], 2, a[1], a[2], 1e-5, act, a[3]),
                                        (x, w, b, r), fast_mode=True)


def test_double_backward_keeps_exact_statistics():
    """The composite's first derivatives at mean 1e6 (float32) match the kernels' (create_graph=False)."""
    x = make((2, 4, 5, 5), mean=1e6, std=0.1, requires_grad=True)
    w, b = params(4, requires_grad=True)
    dy = make(x.shape, seed=5)
    kernel = torch.autograd.grad(gt.group_norm(x, 2, w, b, 1e-5, "gelu"), (x, w, b), dy)
    graph = torch.autograd.grad(gt.group_norm(x, 2, w, b, 1e-5, "gelu"), (x, w, b), dy, create_graph=True)
    ref = reference.normalize_backward(dy.cpu(), x.detach().cpu(), "gn", 2, w.detach().cpu(),
                                       b.detach().cpu(), 1e-5, "gelu")
    for k, g_, name in zip(kernel, graph, ("x", "weight", "bias")):
        assert g_.requires_grad
        assert rel_err(k, ref[name]) < 1e-5 and rel_err(g_, ref[name]) < 1e-5, name


def test_autocast_keeps_the_16_bit_activations():
    """Under autocast a conv gives bfloat16, the parameters stay float32: y is bfloat16, grads are float32."""
    conv = torch.nn.Conv2d(8, 8, 1).to(DEVICE)
    x = make((2, 8, 4, 4))
    w, b = params(8, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        h = conv(x)
        y = gt.group_norm(h, 4, w, b, 1e-5, "silu")
    assert h.dtype == y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and conv.weight.grad is not None
    ref, _, _ = reference.normalize(h.detach().float().cpu(), "gn", 4, w.detach().cpu(), b.detach().cpu(), 1e-5,
                                    "silu")
    assert rel_err(y, ref) < 1e-2


def test_no_grad_and_inference_skip_autograd():
    x = make((2, 4, 3, 3), requires_grad=True)
    w, b = params(4)
    with torch.no_grad():
        y = gt.group_norm(x, 2, w, b)
    assert y.grad_fn is None
    assert gt.group_norm(x.detach(), 2, w, b).grad_fn is None
    assert gt.group_norm(x, 2, w, b).grad_fn is not None


# ---- plans and the host path --------------------------------------------------------------------------------
def count_launches(monkeypatch, fn):
    calls = []
    monkeypatch.setattr(gt._Launch, "__call__", lambda self, stream, args: calls.append(self.kernel.__name__))
    fn()
    return calls


@pytest.mark.parametrize("kind,fwd,bwd,bwd_frozen", [
    ("single", ["_fwd_kernel"], ["_bwd_kernel", "_param_grad_kernel"], ["_bwd_kernel"]),
    ("loop", ["_fwd_kernel"], ["_bwd_kernel", "_param_grad_kernel"], ["_bwd_kernel"]),
    ("split", ["_fwd_part_kernel", "_fwd_apply_kernel"], ["_bwd_part_kernel", "_bwd_dx_kernel"],
     ["_bwd_part_kernel", "_bwd_dx_kernel"])])
def test_launches_per_plan(monkeypatch, kind, fwd, bwd, bwd_frozen):
    """As few launches as the plan needs: forward 1 (2 when split); backward 1, + 1 for the parameter
    gradients (split: 2, the parameter gradients riding along with dx)."""
    x = make((2, 8, 4, 4), "cl", requires_grad=True)
    w, b = params(8, requires_grad=True)
    with gt.tuning(**PLANS[kind]):
        assert count_launches(monkeypatch, lambda: gt.group_norm(x.detach(), 4, w.detach(), b.detach())) == fwd
        assert count_launches(monkeypatch, lambda: gt.group_norm(x, 4, w, b).sum().backward()) == fwd + bwd
        frozen = count_launches(monkeypatch, lambda: gt.group_norm(x, 4, w.detach(), b.detach()).sum().backward())
        assert frozen == fwd + bwd_frozen   # no parameter gradients wanted: none computed
        assert {p.kind for p in gt._PLANS.values()} == {kind}


def test_plan_is_cached_per_call_signature(monkeypatch):
    """The second call with the same shapes, strides, dtypes and options builds no plan."""
    built = []
    real = gt._fwd_plan
    monkeypatch.setattr(gt, "_fwd_plan", lambda *a: built.append(a) or real(*a))
    x = make((2, 8, 4, 4), "cl")
    for _ in range(3):
        gt.group_norm(x, 4)
    assert len(built) == 1
    gt.group_norm(make((2, 8, 4, 4)), 4)               # another layout: another plan
    gt.group_norm(x, 4, activation="silu")             # another option: another plan
    assert len(built) == 3


def test_plan_fills_an_h200_at_batch_1_and_2():
    """The plan (pure host logic) on 132 SMs: one program per group when N*G programs fill the GPU or a group
    fits one tile; the spatial axis split at batch 1-2 for large groups."""
    saved = gt._INTERPRET
    gt._INTERPRET = False
    try:
        with gt.tuning(sms=132):
            def plan(shape, dtype=torch.float32, cl=True):
                stride = torch.empty(shape, device="meta").contiguous(
                    memory_format=torch.channels_last if cl and len(shape) == 4 else torch.contiguous_format).stride()
                return gt._fwd_plan(torch.Size(shape), stride, dtype, torch.device("cpu"), -1, 32, 0, None, None,
                                    None)
            assert plan((1, 256, 256, 256)).kind == "split"                 # VAE decoder: 32 groups of 512 K
            assert len(plan((1, 256, 256, 256)).launches) == 2
            p = plan((2, 256, 200, 304), torch.bfloat16, cl=False)       # detection stage
            assert p.kind == "split" and p.launches[0].grid[0] * p.launches[0].grid[1] >= 132
            assert plan((32, 256, 56, 56)).kind == "loop"                   # 1024 groups fill the GPU
            assert plan((2, 2048, 7, 7)).kind == "single"                   # 64 x 49: one tile per group
            assert plan((2, 1280, 16, 16), cl=False).kind == "single"
            assert plan((2, 320, 64, 64)).kind == "split"
    finally:
        gt._INTERPRET = saved


def test_available():
    assert gt.available() is None            # interpreter here, or a GPU
    assert groupnorm.backends.available("triton") is None


def test_through_functional_and_the_registry():
    x = make((2, 8, 4, 4), "cl")
    w, b = params(8)
    r = make(x.shape, "cl", seed=2)
    with groupnorm.use_backend("triton"):
        y = groupnorm.functional.group_norm(x, 4, w, b, activation="silu", residual=r)
    torch.testing.assert_close(y, gt.group_norm(x, 4, w, b, 1e-5, "silu", r), rtol=0, atol=0)


# ---- torch.compile and the op -----------------------------------------------------------------------------------
def test_torch_compile_fullgraph_matches_eager():
    """fullgraph=True: no graph break. Under the interpreter the op is opaque to the compiler (a custom op
    with a fake implementation; wrap_triton cannot trace interpreted kernels), on a GPU it is a
    triton_op whose kernels Inductor launches (test_inductor_launches_our_kernels)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6, device=DEVICE)
    assert_compiled_matches_eager(FusedBlock(gt.group_norm).to(DEVICE),
                                  (x, x.contiguous(memory_format=torch.channels_last)))


def test_compile_through_the_module_and_registry():
    """The user's path (nn.GroupNorm -> functional -> registry -> this backend) traces with fullgraph=True
    once the backend is loaded (the registry imports it on the first eager call)."""
    norm = groupnorm.nn.GroupNorm(4, 8, activation="silu").to(DEVICE)
    x, r = make((2, 8, 4, 4), "cl"), make((2, 8, 4, 4), "cl", seed=2)
    with groupnorm.use_backend("triton"):
        eager = norm(x, residual=r)
        compiled = torch.compile(lambda x, r: norm(x, residual=r, activation="relu"), fullgraph=True,
                                 backend="aot_eager")
        torch.testing.assert_close(compiled(x, r), norm(x, residual=r, activation="relu"), rtol=0, atol=0)
    assert eager.stride() == x.stride()


def test_opcheck():
    x = make((2, 8, 3, 3))
    w, b = params(8)
    r = make(x.shape, seed=2)
    torch.library.opcheck(gt.triton_fwd, (x, w, b, r, 4, 1e-5, 2))
    torch.library.opcheck(gt.triton_fwd, (make(x.shape, "cl"), None, None, None, 2, 1e-5, 0))
    _, stats = gt.triton_fwd(x, w, b, r, 4, 1e-5, 2)
    torch.library.opcheck(gt.triton_bwd, (make(x.shape, seed=3), x, w, b, r, stats, 4, 2,
                                          [True, True, False, True]))


def _run_script(code):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_compiled_graph_calls_our_kernels_through_wrap_triton():
    """The GPU build of the op (triton_op), traced as torch.compile's AOT stage does, on fake CUDA tensors (no
    GPU needed): the graph holds our kernels (Triton's JIT functions, launched by Inductor's code), not an
    opaque op call, and exactly the launches of the eager plan."""
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip(f"this Triton build has no NVIDIA backend (has {sorted(backends)})")
    code = r'''
import json, torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._functorch.aot_autograd import aot_function
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from functorch.compile import make_boxed_func
from groupnorm.kernels import triton as gt
gt._sm_count = lambda i: 132
graphs = []
def grab(gm, inputs):
    graphs.append(gm)
    return make_boxed_func(gm.forward)
for shape in [(2, 64, 8, 8), (1, 256, 64, 64)]:
    with FakeTensorMode():
        x = torch.empty(shape, device="cuda").contiguous(memory_format=torch.channels_last)
        w, b = torch.empty(shape[1], device="cuda"), torch.empty(shape[1], device="cuda")
        dy = torch.empty_like(x)
        def f(x, w, b, r, dy):
            y, st = gt.triton_fwd(x, w, b, r, 32, 1e-5, 2)
            return y, gt.triton_bwd(dy, x, w, b, r, st, 32, 2, [True, True, True, True])
        aot_function(f, fw_compiler=grab)(x, w, b, torch.empty_like(x), dy)
    kernels = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in graphs[-1].graph.nodes
               if "triton_kernel_wrapper" in str(n.target)]
    ops = [str(n.target) for n in graphs[-1].graph.nodes if "groupnorm" in str(n.target)]
    print(json.dumps({"shape": shape, "kernels": kernels, "ops": ops}))
found = {k.fn.__name__ for k in torch._library.triton.get_triton_kernels_for_op("groupnorm::triton_fwd")}
print(json.dumps({"op_kernels": sorted(found)}))
'''
    rows = _run_script(code)
    assert rows[0]["kernels"] == ["_fwd_kernel", "_bwd_kernel", "_param_grad_kernel"] and not rows[0]["ops"]
    assert rows[1]["kernels"] == ["_fwd_part_kernel", "_fwd_apply_kernel", "_bwd_part_kernel", "_bwd_dx_kernel"]
    # torch finds every kernel of the op (its compile caches hash their source)
    assert rows[2]["op_kernels"] == sorted(name for name in dir(gt) if name.endswith("_kernel"))


def test_kernels_compile_for_h100():
    """The interpreter does not compile: build every kernel for sm_90 ahead of time (no GPU needed) in a
    process without TRITON_INTERPRET, as the launches on ResNet / U-Net / VAE shapes would. No register
    spills, and 16-byte vector loads where the layout allows them."""
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip(f"this Triton build has no NVIDIA backend (has {sorted(backends)})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # the subprocess
    proc = subprocess.run([sys.executable, str(ROOT / "tests/kernels/_compile_sm90.py")], capture_output=True,
                          text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    kernels = {name for name in dir(gt) if name.endswith("_kernel")}
    assert {r["kernel"] for r in rows} == kernels
    assert all(r["stack"] == 0 for r in rows), [r for r in rows if r["stack"]]
    big = [r for r in rows if r["case"] != "ln_nc_fp64_relu" and not r["kernel"].startswith("_param")]
    assert big and all("v4" in r["vector_loads"] for r in big), big


# ---- GPU only ---------------------------------------------------------------------------------------------------
@needs_gpu
def test_inductor_launches_our_kernels(monkeypatch):
    """torch.compile (Inductor): our kernels appear in the generated code, and our Python body does not run
    on later calls."""
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    model = FusedBlock(gt.group_norm).cuda()
    x = torch.randn(2, 8, 6, 6, device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    out, codes = run_and_get_code(compiled, x)
    assert any("_fwd_kernel" in code for code in codes)
    calls = []
    real = gt._forward_impl
    monkeypatch.setattr(gt, "_forward_impl", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2   # the eager reference's two calls; none from the compiled model


@needs_gpu
def test_reduce_overhead_cuda_graphs():
    torch._dynamo.reset()
    model = FusedBlock(gt.group_norm).cuda()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for step in range(4):
        x = torch.randn(2, 8, 6, 6, device="cuda")
        out = compiled(x)
        out.square().sum().backward()
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


@needs_gpu
def test_eager_path_captures_in_a_cuda_graph():
    """No host sync, allocations through torch: the eager launches capture and replay."""
    x = make((2, 64, 8, 8), "cl")
    w, b = params(64)
    y = gt.group_norm(x, 32, w, b, 1e-5, "silu")   # warm: compiled, plan built
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = gt.group_norm(x, 32, w, b, 1e-5, "silu")
    x.copy_(make(x.shape, "cl", seed=5))
    graph.replay()
    torch.testing.assert_close(y_graph, gt.group_norm(x, 32, w, b, 1e-5, "silu"), rtol=0, atol=0)
    assert not torch.equal(y_graph, y)


@needs_gpu
def test_direct_launch_equals_jit_launch(monkeypatch):
    """After the first call a plan launches the compiled kernels directly; same bits as Triton's JIT path."""
    x = make((1, 256, 32, 32), "cl", requires_grad=True)
    w, b = params(256, requires_grad=True)
    dy = make(x.shape, "cl", seed=4)
    results = []
    for fast in (False, True):
        monkeypatch.setattr(gt, "_FAST", fast)
        gt._PLANS.clear()
        for _ in range(3):
            y = gt.group_norm(x, 32, w, b, 1e-5, "gelu")
            grads = torch.autograd.grad(y, (x, w, b), dy)
        results.append([y, *grads])
    assert all(note == "direct" for note in gt._launch_notes.values()), gt._launch_notes
    for a, c in zip(*results):
        assert torch.equal(a, c)
