"""The custom op groupnorm::gn_fwd / gn_bwd (groupnorm.kernels.op): values against the float64 reference,
gradcheck through autograd, torch.library.opcheck, torch.compile without graph breaks, autocast and
low-precision inputs, determinism and argument errors."""
import os

import numpy as np
import pytest
import torch

from groupnorm import reference
from groupnorm.kernels import op

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def make(shape, dtype=torch.float32, cl=False, seed=0, mean=0.5, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + mean).to(dtype)
    if cl:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x.requires_grad_(requires_grad)


def params(c, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(c, generator=g) * 0.5 + 1).to(dtype).requires_grad_(requires_grad)
    b = (torch.randn(c, generator=g) * 0.5).to(dtype).requires_grad_(requires_grad)
    return w, b


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("act", [None, "relu", "silu", "gelu"])
def test_forward_backward_match_reference(cl, act):
    x = make((2, 8, 5, 6), cl=cl, requires_grad=True)
    w, b = params(8, requires_grad=True)
    r = make((2, 8, 5, 6), cl=cl, seed=2, requires_grad=True)
    dy = make((2, 8, 5, 6), seed=3, mean=0.0)
    y = op.group_norm(x, 4, w, b, 1e-5, act, r)
    y.backward(dy)
    y_ref, _, _ = reference.normalize(x.detach(), "gn", 4, w.detach(), b.detach(), 1e-5, act,
                                      r.detach())
    g = reference.normalize_backward(dy, x.detach(), "gn", 4, w.detach(), b.detach(), 1e-5, act,
                                     r.detach())
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    np.testing.assert_allclose(y.detach().double().numpy(), y_ref, rtol=1e-5, atol=1e-5)
    for t, name in ((x, "x"), (w, "weight"), (b, "bias"), (r, "residual")):
        np.testing.assert_allclose(t.grad.double().numpy(), g[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act", [None, "relu", "silu", "gelu"])
def test_gradcheck(act):
    x = make((2, 6, 3, 4), torch.float64, requires_grad=True)
    w, b = params(6, torch.float64, requires_grad=True)
    r = make((2, 6, 3, 4), torch.float64, seed=2, requires_grad=True)
    if act == "relu":   # keep z away from relu's kink, where finite differences are meaningless
        with torch.no_grad():
            r.add_(torch.sign(r) * 0.5)
    assert torch.autograd.gradcheck(lambda *a: op.group_norm(a[0], 3, a[1], a[2], 1e-5, act, a[3]),
                                    (x, w, b, r))
    xc = make((2, 6, 3, 4), torch.float64, cl=True, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: op.group_norm(x, 2, None, None, 1e-5, act), (xc,))


def test_gradcheck_rank2_and_rank5():
    x2 = make((4, 6), torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: op.group_norm(x, 3), (x2,))
    x5 = make((2, 4, 2, 3, 2), torch.float64, requires_grad=True)
    w, b = params(4, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: op.group_norm(x, 2, w, b, 1e-5, "silu"),
                                    (x5, w, b))


def test_opcheck():
    x = make((2, 8, 3, 3))
    w, b = params(8)
    r = make((2, 8, 3, 3), seed=2)
    torch.library.opcheck(op.gn_fwd, (x, w, b, r, 4, 1e-5, "silu", "cpu"))
    torch.library.opcheck(op.gn_fwd, (make((2, 8, 3, 3), cl=True), None, None, None, 2, 1e-5,
                                      "none", "cpu"))
    y, mean, rstd = op.gn_fwd(x, w, b, r, 4, 1e-5, "silu", "cpu")
    torch.library.opcheck(op.gn_bwd, (make((2, 8, 3, 3), seed=3), x, w, b, r, mean, rstd, 4, "silu",
                                      [True, True, False, True], "cpu"))


def test_outputs_that_are_not_needed():
    x = make((2, 8, 3, 3), requires_grad=True)
    w, b = params(8)                       # no grad: gn_bwd returns empty (distinct) tensors
    op.group_norm(x, 4, w, b, 1e-5, "silu").sum().backward()
    assert x.grad is not None and w.grad is None
    r = make((2, 8, 3, 3), seed=2, requires_grad=True)
    x2 = make((2, 8, 3, 3))
    op.group_norm(x2, 4, None, None, 1e-5, None, r).sum().backward()
    assert torch.equal(r.grad, torch.ones_like(r))      # no activation: dresidual = grad_y


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.w = torch.nn.Parameter(torch.randn(8) * 0.5 + 1)
        self.b = torch.nn.Parameter(torch.randn(8) * 0.5)

    def forward(self, x):
        h = op.group_norm(self.conv(x), 4, self.w, self.b, 1e-5, "silu", x)
        return op.group_norm(h, 2)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = _Block()
    x = torch.randn(2, 8, 6, 6)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    xc = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(compiled(xc), model(xc))


def test_autocast_keeps_bfloat16():
    x = make((2, 8, 4, 4))
    w, b = params(8, requires_grad=True)
    conv = torch.nn.Conv2d(8, 8, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = op.group_norm(h, 4, w, b, 1e-5, "silu")
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and conv.weight.grad is not None
    y32 = op.group_norm(h.detach().float(), 4, w, b, 1e-5, "silu")
    torch.testing.assert_close(y.float(), y32, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_on_cpu(dtype):
    x = make((2, 8, 4, 4), dtype, requires_grad=True)
    w, b = params(8, requires_grad=True)
    y = op.group_norm(x, 4, w, b)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == torch.float32
    ref, _, _ = reference.normalize(x.detach(), "gn", 4, w.detach(), b.detach())
    np.testing.assert_allclose(y.detach().double().numpy(), ref, atol=3e-2, rtol=2e-2)


def test_deterministic_forward_and_backward():
    runs = []
    for _ in range(2):
        x = make((2, 32, 12, 12), cl=True, requires_grad=True)
        w, b = params(32, requires_grad=True)
        y = op.group_norm(x, 8, w, b, 1e-5, "gelu")
        y.backward(make((2, 32, 12, 12), seed=5, cl=True))
        runs.append((y.detach(), x.grad, w.grad, b.grad))
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


def test_double_backward_is_refused():
    x = make((2, 4, 3, 3), torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):       # eager path: at once
        torch.autograd.grad(op.group_norm(x, 2, None, None, 1e-5, "silu").sum(), x,
                            create_graph=True)
    y, _, _ = op.gn_fwd(x, None, None, None, 2, 1e-5, "silu", "cpu")  # the op itself: on use
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        g.sum().backward()


def test_triton_impl_on_cpu_matches_cpu_impl():
    if os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 on a machine without a GPU")
    try:
        import groupnorm.kernels.triton  # noqa: F401
    except Exception as exc:  # triton missing or the module not importable here
        pytest.skip(f"groupnorm.kernels.triton unavailable: {exc}")
    x = make((2, 8, 3, 4), requires_grad=True)
    w, b = params(8)
    y_t = op.group_norm(x, 4, w, b, 1e-5, "silu", impl="triton")
    y_c = op.group_norm(x, 4, w, b, 1e-5, "silu", impl="cpu")
    torch.testing.assert_close(y_t, y_c, atol=1e-5, rtol=1e-5)
    (gx_t,) = torch.autograd.grad(y_t.sum(), x)
    (gx_c,) = torch.autograd.grad(y_c.sum(), x)
    torch.testing.assert_close(gx_t, gx_c, atol=1e-5, rtol=1e-4)


def test_bad_arguments():
    x = make((2, 8, 3, 3))
    with pytest.raises(ValueError, match="not divisible"):
        op.group_norm(x, 3)
    with pytest.raises(ValueError, match="impl must be one of"):
        op.group_norm(x, 4, impl="cuda")
    with pytest.raises(ValueError, match="activation"):
        op.group_norm(x, 4, activation="tanh")
    with pytest.raises(ValueError, match="weight must have shape"):
        op.group_norm(x, 4, torch.ones(3))
    with pytest.raises(ValueError, match="residual shape"):
        op.group_norm(x, 4, residual=x[:1])
    with pytest.raises(ValueError, match="rank >= 2"):
        op.group_norm(x[0, 0, 0], 1)
    with pytest.raises(TypeError, match="floating-point"):
        op.group_norm(x.long(), 4)
    with pytest.raises(ValueError, match="eps"):
        op.group_norm(x, 4, eps=0.0)
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            op.group_norm(x, 4, impl="triton")
