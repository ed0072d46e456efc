"""The backend registry (names, choice, availability, "auto") and one behaviour on every backend:
exact at large means in every layout, double backward, argument dtypes, empty inputs, output layout."""

import os
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch

import groupnorm
from groupnorm import backends
from groupnorm import functional as GF
from groupnorm import reference as R
from helpers import backend_or_skip, rand

KERNEL_BACKENDS = ("native", "cpu", "triton")


@pytest.fixture(autouse=True)
def restore_backend():
    saved = backends._global_choice
    yield
    backends._global_choice = saved


# ---- the registry ----------------------------------------------------------------------------------
def test_names_and_default():
    assert backends.BACKENDS == ("auto", "native", "cpu", "triton")
    assert groupnorm.get_backend() in backends.BACKENDS
    groupnorm.set_backend("NATIVE")
    assert groupnorm.get_backend() == "native"
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'; expected one of"):
        groupnorm.set_backend("cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        with groupnorm.use_backend("fast"):
            pass


def test_use_backend_nests_and_restores_even_on_error():
    groupnorm.set_backend("auto")
    with groupnorm.use_backend("native"):
        assert groupnorm.get_backend() == "native"
        with groupnorm.use_backend("cpu"):
            assert groupnorm.get_backend() == "cpu"
        assert groupnorm.get_backend() == "native"
    assert groupnorm.get_backend() == "auto"
    with pytest.raises(RuntimeError, match="boom"):
        with groupnorm.use_backend("triton"):
            raise RuntimeError("boom")
    assert groupnorm.get_backend() == "auto"


def test_use_backend_is_per_thread():
    groupnorm.set_backend("auto")
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def other():
        with groupnorm.use_backend("cpu"):
            seen["inside"] = groupnorm.get_backend()
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=other)
    thread.start()
    entered.wait(5)
    seen["main"] = groupnorm.get_backend()   # the other thread's override does not leak here
    release.set()
    thread.join()
    assert seen == {"inside": "cpu", "main": "auto"}


@pytest.fixture
def fresh_registry(monkeypatch):
    """A registry that has tried nothing yet (restored afterwards)."""
    for name in ("_loaded", "_reasons", "_auto_modules"):
        monkeypatch.setattr(backends, name, {})
    monkeypatch.setattr(backends, "_warned", set())
    return backends


def test_auto_takes_the_cpu_op_for_cpu_tensors():
    backend_or_skip("cpu")
    with groupnorm.use_backend("auto"):
        assert backends.resolve(torch.empty(2, 4, 3)) is backends.load("cpu")
        assert backends.resolve(torch.empty(2, 4, 3, dtype=torch.bfloat16)) is backends.load("cpu")


def test_auto_falls_back_to_native_with_one_warning_naming_cause_and_fix(fresh_registry, monkeypatch):
    monkeypatch.setitem(backends._MODULES, "cpu", "groupnorm.kernels.no_such_extension")
    x = torch.randn(2, 4, 3) + 5
    with groupnorm.use_backend("auto"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = GF.group_norm(x, 2)
        y2 = GF.group_norm(x, 2)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "'cpu' is unavailable" in messages[0] and "no_such_extension" in messages[0]
    assert "scripts/setup.sh" in messages[0]
    ref, _, _ = R.normalize(x, "gn", 2)
    np.testing.assert_allclose(y1.numpy(), ref, atol=1e-6)
    assert torch.equal(y1, y2)


def test_an_unavailable_backend_asked_by_name_is_a_clear_error(fresh_registry, monkeypatch):
    monkeypatch.setitem(backends._MODULES, "triton", "no_such_triton_module")
    with groupnorm.use_backend("triton"):
        with pytest.raises(backends.BackendUnavailable,
                           match=r"backend 'triton' is unavailable: ModuleNotFoundError: .*"
                                 r"no_such_triton_module.*install Triton"):
            GF.group_norm(torch.randn(2, 4, 3), 2)
    assert "no_such_triton_module" in backends.available("triton")
    assert backends.available("native") is None and backends.available("auto") is None


def test_a_backend_on_the_wrong_device_is_a_clear_error(monkeypatch):
    backend_or_skip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with groupnorm.use_backend("triton"):
        with pytest.raises(backends.BackendUnavailable, match=r"'triton' needs CUDA tensors"):
            GF.group_norm(torch.randn(2, 4, 3), 2)


def test_environment_variable_and_cheap_import():
    code = ("import sys, groupnorm; print(groupnorm.get_backend()); "
            "print(sorted(m for m in ('triton', 'matplotlib', 'torchvision', 'groupnorm.kernels.cpu') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, GROUPNORM_BACKEND="native")).stdout.split("\n")
    assert out[0] == "native"
    assert out[1] == "[]"


# ---- one behaviour on every backend ---------------------------------------------------------------
FORMATS = ("contiguous", "channels_last")


def _rel_err(got, ref):
    got = got.detach().double().numpy()
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-300))


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype,mean,std,tol", [(torch.float32, 1e6, 0.1, 1e-5),
                                                (torch.float32, 1e3, 1.0, 1e-5),
                                                (torch.float64, 1e8, 1.0, 1e-6)])
def test_exact_at_large_means(name, fmt, dtype, mean, std, tol):
    """Issue 15 items 1-2: relative error against the float64 formula applied to the same input,
    forward and backward, (1, 16, 16, 16) and an (N, C, L) input, G = 4, with affine and residual."""
    backend_or_skip(name)
    for shape in ((1, 16, 16, 16), (2, 8, 40)):
        x = rand(shape, dtype, mean=mean, std=std, seed=1, fmt=fmt).requires_grad_()
        c = shape[1]
        w = (torch.rand(c, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
        b = torch.randn(c, dtype=torch.float64).to(dtype).requires_grad_()
        r = rand(shape, dtype, mean=0.0, seed=2, fmt=fmt).requires_grad_()
        dy = rand(shape, dtype, mean=0.0, seed=3)
        with groupnorm.use_backend(name):
            y = GF.group_norm(x, 4, w, b, activation="silu", residual=r)
            y.backward(dy)
        args = [t.detach().double() for t in (x, w, b, r)]
        ref, _, _ = R.normalize(args[0], "gn", 4, args[1], args[2], 1e-5, "silu", args[3])
        grads = R.normalize_backward(dy.double(), args[0], "gn", 4, args[1], args[2], 1e-5, "silu",
                                     args[3])
        assert _rel_err(y, ref) <= tol, f"{name} {fmt} {shape} y"
        for t, key in ((x, "x"), (w, "weight"), (b, "bias"), (r, "residual")):
            assert _rel_err(t.grad, grads[key]) <= 10 * tol, f"{name} {fmt} {shape} d{key}"


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_double_backward_on_small_and_large_inputs(name):
    """Issue 15 item 13: create_graph=True works everywhere, whatever the size."""
    backend_or_skip(name)
    x = rand((2, 4, 3, 2), torch.float64, mean=3.0, seed=4).requires_grad_()
    w = rand((4,), torch.float64, mean=1.0, seed=5).requires_grad_()
    b = rand((4,), torch.float64, seed=6).requires_grad_()
    with groupnorm.use_backend(name):
        assert torch.autograd.gradgradcheck(lambda x, w, b: GF.group_norm(x, 2, w, b, activation="silu"),
                                            (x, w, b))
    big = rand((2, 32, 24, 24), torch.float32, seed=7, fmt="channels_last").requires_grad_()
    grads = {}
    for backend in (name, "native"):
        with groupnorm.use_backend(backend):
            y = GF.group_norm(big, 8, activation="gelu")
            (g,) = torch.autograd.grad(y.square().sum(), big, create_graph=True)
            (gg,) = torch.autograd.grad(g.sum(), big)
        grads[backend] = (g.detach(), gg)
    for a, b_ in zip(grads[name], grads["native"]):
        torch.testing.assert_close(a, b_, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_parameter_dtypes_are_checked_the_same_on_every_size(name):
    """Issue 15 item 13: a float64 or complex weight with float32 input is an error on any size."""
    backend_or_skip(name)
    for shape in ((2, 4, 3), (2, 64, 40, 40)):
        x = torch.randn(shape)
        with groupnorm.use_backend(name):
            for bad in (torch.ones(shape[1], dtype=torch.float64),
                        torch.ones(shape[1], dtype=torch.complex64),
                        torch.ones(shape[1], dtype=torch.int64)):
                with pytest.raises(TypeError, match=r"group_norm: weight dtype .* does not go with "
                                                    r"input dtype torch.float32"):
                    GF.group_norm(x, 2, bad)
            # half input with float32 parameters (mixed precision) is fine
            y = GF.group_norm(x.bfloat16(), 2, torch.ones(shape[1]), torch.zeros(shape[1]))
            assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3), (2, 4, 0)])
def test_empty_inputs_give_empty_outputs(name, shape):
    backend_or_skip(name)
    x = torch.randn(shape, requires_grad=True)
    w, b = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    with groupnorm.use_backend(name):
        y = GF.group_norm(x, 2, w, b, activation="relu", residual=torch.zeros(shape))
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == shape
    assert w.grad is None or not w.grad.any()


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_output_layout_follows_the_input(name):
    """y and dx follow x's layout, (N, C, L) stored as (N, L, C) included, on every backend."""
    backend_or_skip(name)
    cases = [rand((2, 8, 5), fmt="channels_last"), rand((2, 8, 3, 4), fmt="channels_last"),
             rand((2, 8, 2, 3, 2), fmt="channels_last"), rand((2, 8, 5)), rand((2, 8, 3, 4))]
    for x in cases:
        x = x.float().requires_grad_()
        with groupnorm.use_backend(name):
            y = GF.group_norm(x, 4, activation="silu")
            y.backward(torch.ones_like(y))
        assert y.stride() == x.stride(), (name, x.shape, x.stride(), y.stride())
        assert x.grad.stride() == x.stride(), (name, x.shape, x.stride(), x.grad.stride())
    strided = rand((2, 8, 6, 4))[:, :, ::2]          # neither layout: contiguous output
    with groupnorm.use_backend(name):
        assert GF.group_norm(strided.float(), 4).is_contiguous()


def test_half_precision_is_computed_in_float32_on_every_backend():
    x = rand((2, 8, 4, 4), torch.bfloat16, mean=100.0, std=2.0, seed=9)
    ref, _, _ = R.normalize(x.double(), "gn", 4)
    for name in KERNEL_BACKENDS:
        if backends.available(name) is not None:
            continue
        with groupnorm.use_backend(name):
            y = GF.group_norm(x, 4)
        assert y.dtype == torch.bfloat16
        assert _rel_err(y, ref) < 1e-2, name


@pytest.mark.parametrize("choice", ["auto", "native", "cpu"])
def test_the_first_call_of_a_process_may_come_from_a_compiled_function(fresh_registry, choice):
    """Finding the backend imports its module: under torch.compile that must not break the graph."""
    if choice != "native":
        backend_or_skip("cpu")
    fresh_registry._loaded.clear()
    torch._dynamo.reset()
    x = rand((2, 8, 4, 4), torch.float32, seed=11)
    with groupnorm.use_backend(choice):
        y = torch.compile(lambda t: GF.group_norm(t, 4, activation="silu"), fullgraph=True)(x)
        with groupnorm.use_backend("native"):
            ref = GF.group_norm(x, 4, activation="silu")
    torch.testing.assert_close(y, ref)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_every_backend_follows_the_one_layout_rule_on_every_stride_pattern(name):
    """The output strides of each backend are those of ``_layout.empty_like(x)`` for x of ranks 3-5
    in every axis permutation, with and without size-1 axes, and sliced (the stride of a size-1 axis
    means nothing and is not compared)."""
    import itertools

    from groupnorm import _layout
    backend_or_skip(name)
    seen = 0
    for shape in ((2, 4, 3), (2, 4, 1), (1, 4, 3, 2), (2, 4, 1, 3), (2, 2, 3, 1, 2)):
        for perm in itertools.permutations(range(len(shape))):
            base = torch.randn([shape[p] for p in perm]).permute(*[perm.index(i) for i in range(len(shape))])
            for x in (base, base[:, :, :2] if shape[2] > 1 else base):
                with groupnorm.use_backend(name):
                    y = GF.group_norm(x, 2)
                want = _layout.empty_like(x).stride()
                assert _strides(y) == _strides(y.as_strided(y.shape, want)), (name, x.shape, x.stride())
                seen += 1
    assert seen > 100


def _strides(t):
    return tuple(st for st, n in zip(t.stride(), t.shape) if n > 1)
