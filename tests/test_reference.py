"""The float64 oracle against independent formulas: element-by-element sets S_i, torch in float64,
and central finite differences for the analytic backward."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from groupnorm import reference as R

SHAPES = [(4, 6), (3, 6, 5), (2, 6, 3, 4), (2, 6, 2, 3, 2)]   # ranks 2..5


def _data(shape, seed=0, mean=1.5):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape) * 1.3 + mean          # never zeros, non-zero mean


def _in_set(kind, i, k, channels, groups, per):
    """Membership k in S_i written straight from the paper's eqs. (3), (4), (5), (7)."""
    if kind == "bn":
        return k[1] == i[1] and (per is None or k[0] // per == i[0] // per)
    if kind == "ln":
        return k[0] == i[0]
    if kind == "in":
        return k[0] == i[0] and k[1] == i[1]
    size = channels // groups
    return k[0] == i[0] and k[1] // size == i[1] // size


def _direct(x, kind, groups=None, eps=1e-5, per=None):
    """x_hat by eqs. (1), (2) with S_i enumerated element by element (slow, obviously right)."""
    idx = list(itertools.product(*[range(s) for s in x.shape]))
    out = np.empty_like(x)
    for i in idx:
        members = [x[k] for k in idx if _in_set(kind, i, k, x.shape[1], groups, per)]
        mu = sum(members) / len(members)
        var = sum((v - mu) ** 2 for v in members) / len(members)
        out[i] = (x[i] - mu) / math.sqrt(var + eps)
    return out


@pytest.mark.parametrize("kind,groups,per", [("bn", None, None), ("bn", None, 2), ("ln", None, None),
                                             ("in", None, None), ("gn", 3, None), ("gn", 2, None)])
@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 3), (4, 6, 2, 2)])
def test_forward_matches_sets_element_by_element(kind, groups, per, shape):
    x = _data(shape)
    y, _, _ = R.normalize(x, kind, groups, images_per_worker=per)
    np.testing.assert_allclose(y, _direct(x, kind, groups, per=per), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_torch_float64(shape):
    x = _data(shape, 1)
    c = shape[1]
    w, b = _data((c,), 2), _data((c,), 3)
    xt, wt, bt = (torch.from_numpy(a) for a in (x, w, b))
    cases = {
        "gn": (dict(num_groups=3), F.group_norm(xt, 3, wt, bt, 1e-5)),
        "ln": (dict(), F.group_norm(xt, 1, wt, bt, 1e-5)),
        "in": (dict(), F.group_norm(xt, c, wt, bt, 1e-5)),
        "bn": (dict(), F.batch_norm(xt, None, None, wt, bt, True, 0.0, 1e-5)),
    }
    for kind, (kwargs, expected) in cases.items():
        y, _, _ = R.normalize(x, kind, weight=w, bias=b, **kwargs)
        np.testing.assert_allclose(y, expected.numpy(), rtol=1e-10, atol=1e-10, err_msg=kind)


def test_statistics_shapes_and_values():
    x = _data((4, 6, 3, 2))
    _, m, v = R.normalize(x, "gn", 3)
    assert m.shape == v.shape == (4, 3)
    np.testing.assert_allclose(m, x.reshape(4, 3, -1).mean(-1))
    np.testing.assert_allclose(v, x.reshape(4, 3, -1).var(-1))
    assert R.normalize(x, "ln")[1].shape == (4, 1)
    assert R.normalize(x, "in")[1].shape == (4, 6)
    _, m, v = R.normalize(x, "bn")
    assert m.shape == (6,)
    np.testing.assert_allclose(v, x.transpose(1, 0, 2, 3).reshape(6, -1).var(-1))
    _, m, _ = R.normalize(x, "bn", images_per_worker=2)
    assert m.shape == (2, 6)
    np.testing.assert_allclose(m[1], x[2:].mean(axis=(0, 2, 3)))


def test_extremes_of_gn_are_ln_and_in():
    x = _data((3, 6, 4))
    np.testing.assert_allclose(R.normalize(x, "gn", 1)[0], R.normalize(x, "ln")[0])
    np.testing.assert_allclose(R.normalize(x, "gn", 6)[0], R.normalize(x, "in")[0])


def test_per_worker_bn_is_bn_of_each_chunk():
    x = _data((6, 4, 3))
    y, _, _ = R.normalize(x, "bn", images_per_worker=2)
    chunks = [R.normalize(x[i:i + 2], "bn")[0] for i in (0, 2, 4)]
    np.testing.assert_allclose(y, np.concatenate(chunks))
    np.testing.assert_allclose(R.normalize(x, "bn", images_per_worker=6)[0], R.normalize(x, "bn")[0])


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_activation_and_residual_order(act):
    x, res = _data((2, 4, 5), 4), _data((2, 4, 5), 5)
    w, b = _data((4,), 6), _data((4,), 7)
    y, _, _ = R.normalize(x, "gn", 2, w, b, activation=act, residual=res)
    z = R.normalize(x, "gn", 2, w, b)[0] + res
    expected = {"relu": torch.relu, "silu": F.silu, "gelu": F.gelu}[act](torch.from_numpy(z))
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-12, atol=1e-12)


def _numeric_grads(fn, arrays, grad_y, h=1e-6):
    """Central differences of L = sum(grad_y * fn(*arrays)) w.r.t. each array."""
    grads = []
    for a in arrays:
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            old = a[idx]
            a[idx] = old + h
            up = (grad_y * fn(*arrays)).sum()
            a[idx] = old - h
            down = (grad_y * fn(*arrays)).sum()
            a[idx] = old
            g[idx] = (up - down) / (2 * h)
        grads.append(g)
    return grads


@pytest.mark.parametrize("kind,groups,per,act", [
    ("gn", 2, None, "silu"), ("gn", 4, None, "gelu"), ("ln", None, None, None),
    ("in", None, None, "silu"), ("bn", None, None, None), ("bn", None, 2, "gelu")])
@pytest.mark.parametrize("shape", [(4, 4), (4, 4, 3)])
def test_backward_matches_finite_differences(kind, groups, per, act, shape):
    x, res, gy = _data(shape, 8), _data(shape, 9), _data(shape, 10)
    w, b = _data((shape[1],), 11), _data((shape[1],), 12)

    def fn(x_, w_, b_, r_):
        return R.normalize(x_, kind, groups, w_, b_, 1e-3, act, r_, per)[0]

    expected = _numeric_grads(fn, [x, w, b, res], gy)
    got = R.normalize_backward(gy, x, kind, groups, w, b, 1e-3, act, res, per)
    for name, e in zip(("x", "weight", "bias", "residual"), expected):
        np.testing.assert_allclose(got[name], e, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", [None, "relu", "gelu"])
def test_backward_matches_torch_autograd(shape, act):
    c = shape[1]
    x, res, gy = _data(shape, 13), _data(shape, 14), _data(shape, 15)
    w, b = _data((c,), 16), _data((c,), 17)
    xt, rt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, res, w, b))
    fn = {None: lambda t: t, "relu": torch.relu, "gelu": F.gelu}[act]
    fn(F.group_norm(xt, 3, wt, bt, 1e-5) + rt).backward(torch.from_numpy(gy))
    got = R.normalize_backward(gy, x, "gn", 3, w, b, 1e-5, act, res)
    for name, t in (("x", xt), ("weight", wt), ("bias", bt), ("residual", rt)):
        np.testing.assert_allclose(got[name], t.grad.numpy(), rtol=1e-9, atol=1e-10, err_msg=name)
    assert R.normalize_backward(gy, x, "gn", 3)["weight"] is None


def test_weight_standardize_and_backward():
    w = _data((4, 3, 3, 3), 18, mean=0.2) * 0.1
    ws = R.weight_standardize(w, eps=1e-5)
    flat = w.reshape(4, -1)
    direct = (flat - flat.mean(1, keepdims=True)) / np.sqrt(flat.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(ws, direct.reshape(w.shape), rtol=1e-12)
    g = _data(w.shape, 19)
    small = w[:2, :2]
    expected = _numeric_grads(lambda a: R.weight_standardize(a, 1e-5), [small.copy()], g[:2, :2])[0]
    np.testing.assert_allclose(R.weight_standardize_backward(g[:2, :2], small, 1e-5), expected,
                               rtol=1e-5, atol=1e-7)


def test_accepts_torch_tensors_and_empty_batch():
    x = torch.randn(2, 4, 3, dtype=torch.float32) + 2
    y, _, _ = R.normalize(x, "gn", 2)
    assert y.dtype == np.float64 and y.shape == (2, 4, 3)
    y, _, _ = R.normalize(np.zeros((0, 4, 3)), "gn", 2)
    assert y.shape == (0, 4, 3)


@pytest.mark.parametrize("args,match", [
    (dict(kind="xx"), "unknown kind"), (dict(kind="gn", num_groups=5), "num_groups"),
    (dict(kind="bn", num_groups=2), "gn' only"), (dict(kind="ln", images_per_worker=2), "bn' only"),
    (dict(kind="bn", images_per_worker=3), "divide")])
def test_reference_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        R.normalize(_data((4, 6, 2)), **args)
    with pytest.raises(ValueError, match="rank"):
        R.normalize(np.ones(3), "ln")
    with pytest.raises(ValueError, match="activation"):
        R.normalize(_data((4, 6)), "ln", activation="tanh")
