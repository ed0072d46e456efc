"""groupnorm.nn.GroupNorm / LayerNorm / InstanceNorm against torch.nn.GroupNorm and the float64
reference, forward and backward, every rank, layout and dtype; state_dict interchange."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from groupnorm import nn as gnn
from groupnorm import reference as R
from helpers import assert_close, rand, randomize

SHAPES = {2: (5, 8), 3: (3, 8, 6), 4: (2, 8, 5, 3), 5: (2, 8, 2, 3, 4)}


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_group_norm_vs_torch_and_reference(rank, fmt, dtype):
    shape = SHAPES[rank]
    ours = randomize(gnn.GroupNorm(4, 8), 1).to(dtype)
    theirs = torch.nn.GroupNorm(4, 8).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    x, gy = rand(shape, dtype, seed=2, fmt=fmt), rand(shape, dtype, 0.0, seed=3, fmt=fmt)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = ours(x1)
    y.backward(gy)
    ref, _, _ = R.normalize(x, "gn", 4, ours.weight, ours.bias)
    grads = R.normalize_backward(gy, x, "gn", 4, ours.weight, ours.bias)
    assert_close(y, ref, dtype, "y")
    assert_close(x1.grad, grads["x"], dtype, "dx")
    assert_close(ours.weight.grad, grads["weight"], dtype, "dweight")
    assert_close(ours.bias.grad, grads["bias"], dtype, "dbias")
    # torch agrees too where its kernel is accurate (float64; lower precisions: loose bound)
    y2 = theirs(x2.contiguous())
    y2.backward(gy.contiguous())
    loose = 1e-9 if dtype == torch.float64 else (1e-4 if dtype == torch.float32 else 0.1)
    torch.testing.assert_close(y.double(), y2.double(), atol=loose, rtol=loose)
    torch.testing.assert_close(ours.bias.grad.double(), theirs.bias.grad.double(), atol=loose * 10,
                               rtol=loose)


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_activation_and_residual(act):
    m = randomize(gnn.GroupNorm(num_channels=8, group_size=2, activation=act), 4).double()
    assert m.num_groups == 4 and m.group_size == 2 and "activation" in repr(m)
    x, res = rand((2, 8, 3, 3), seed=5, fmt="channels_last"), rand((2, 8, 3, 3), seed=6)
    gy = rand((2, 8, 3, 3), mean=0.0, seed=7)
    xg, rg = x.clone().requires_grad_(), res.clone().requires_grad_()
    y = m(xg, residual=rg)
    y.backward(gy)
    ref, _, _ = R.normalize(x, "gn", 4, m.weight, m.bias, activation=act, residual=res)
    grads = R.normalize_backward(gy, x, "gn", 4, m.weight, m.bias, activation=act, residual=res)
    assert_close(y, ref, torch.float64)
    assert_close(xg.grad, grads["x"], torch.float64)
    assert_close(rg.grad, grads["residual"], torch.float64)
    assert_close(m.weight.grad, grads["weight"], torch.float64)


@settings(max_examples=20, deadline=None)
@given(groups=st.integers(1, 4), per_group=st.integers(1, 4), n=st.integers(1, 3),
       spatial=st.lists(st.integers(1, 3), max_size=3), use_size=st.booleans(), seed=st.integers(0, 999))
def test_group_norm_module_property(groups, per_group, n, spatial, use_size, seed):
    c = groups * per_group
    m = gnn.GroupNorm(num_channels=c, group_size=per_group) if use_size else gnn.GroupNorm(groups, c)
    randomize(m, seed).double()
    x = rand((n, c, *spatial), seed=seed, mean=2.0)
    assert_close(m(x), R.normalize(x, "gn", groups, m.weight, m.bias)[0], torch.float64)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_layer_and_instance_norm(fmt):
    x = rand((3, 6, 4, 5), torch.float32, seed=8, fmt=fmt)
    ln, inorm = randomize(gnn.LayerNorm(6), 9), randomize(gnn.InstanceNorm(6), 10)
    assert ln.num_groups == 1 and inorm.num_groups == 6
    assert repr(ln) == "LayerNorm(6, eps=1e-05, affine=True)"
    assert_close(ln(x), R.normalize(x, "ln", weight=ln.weight, bias=ln.bias)[0], torch.float32)
    assert_close(inorm(x), R.normalize(x, "in", weight=inorm.weight, bias=inorm.bias)[0], torch.float32)
    assert gnn.LayerNorm(6, affine=False).weight is None


def test_gradcheck_module():
    m = randomize(gnn.GroupNorm(2, 4, eps=1e-3, activation="silu"), 11).double()
    x = rand((2, 4, 3), seed=12).requires_grad_()
    res = rand((2, 4, 3), seed=13).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, r: m(a, residual=r), (x, res))
    assert torch.autograd.gradcheck(lambda w, b: torch.nn.functional.group_norm(x, 2, w, b, 1e-3),
                                    (m.weight.detach().clone().requires_grad_(),
                                     m.bias.detach().clone().requires_grad_()))


def test_state_dict_round_trips_with_torch():
    theirs = randomize(torch.nn.GroupNorm(8, 32), 14)
    ours = gnn.GroupNorm(8, 32)
    ours.load_state_dict(theirs.state_dict())               # torch -> ours
    back = torch.nn.GroupNorm(8, 32)
    back.load_state_dict(ours.state_dict())                 # ours -> torch
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    x = rand((2, 32, 4, 4), torch.float32, seed=15)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(back(x), theirs(x))
    # a model built with torch's layer loads into the same model built with ours
    seq_t = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.GroupNorm(8, 32))
    seq_o = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), gnn.GroupNorm(num_channels=32, group_size=4))
    seq_o.load_state_dict(seq_t.state_dict())


def test_drop_in_attributes():
    m = gnn.GroupNorm(4, 8, 1e-3, False)
    assert isinstance(m, torch.nn.GroupNorm)
    assert (m.num_groups, m.num_channels, m.eps, m.affine) == (4, 8, 1e-3, False)
    assert m.weight is None and m.bias is None
    assert gnn.GroupNorm(4, 8, bias=False).bias is None
    assert gnn.GroupNorm(4, 8, dtype=torch.float64).weight.dtype == torch.float64
    x = rand((2, 8, 3), torch.float32, seed=16)
    torch.testing.assert_close(m(x), torch.nn.functional.group_norm(x, 4, eps=1e-3))
    assert m(torch.randn(0, 8, 3)).shape == (0, 8, 3)
