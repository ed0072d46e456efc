"""The backend registry: names, process-wide choice, per-thread context manager, dispatch."""

import importlib
import os
import subprocess
import sys
import threading

import pytest
import torch

import groupnorm
from groupnorm import backends
from groupnorm import functional as GF
from groupnorm import reference as R


@pytest.fixture(autouse=True)
def restore_backend():
    saved = backends._global_choice
    yield
    backends._global_choice = saved


def test_names_and_default():
    assert backends.BACKENDS == ("native", "cpu", "triton", "auto")
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


def test_auto_resolves_to_a_concrete_backend():
    x = torch.randn(2, 4, 3)
    with groupnorm.use_backend("auto"):
        assert backends.resolve_backend(x) in ("native", "cpu", "triton")
    with groupnorm.use_backend("native"):
        assert backends.resolve_backend(x) == "native"


def test_auto_rule_follows_the_benchmark():
    """auto: our CPU kernel where benchmarks/bench_auto.py measured it faster, torch's op elsewhere."""
    big = torch.empty(2, 256, 56, 56)            # 1.6 M elements: ResNet-50 stage 1 at batch 2
    mid = torch.empty(2, 2048, 7, 7)             # 0.2 M
    tiny = torch.empty(2, 64, 4, 4)              # 2 K
    train = torch.empty(2, 2048, 7, 7, requires_grad=True)
    with groupnorm.use_backend("auto"):
        assert backends.resolve_backend(big, activation="silu") == "cpu"
        assert backends.resolve_backend(big, residual=big) == "cpu"
        assert backends.resolve_backend(big.to(memory_format=torch.channels_last)) == "cpu"
        assert backends.resolve_backend(mid, activation="silu") == "cpu"          # fused forward
        assert backends.resolve_backend(mid) == "native"                          # plain forward
        assert backends.resolve_backend(train, activation="silu") == "native"    # + backward
        with torch.no_grad():
            assert backends.resolve_backend(train, activation="silu") == "cpu"
        assert backends.resolve_backend(mid.to(memory_format=torch.channels_last)) == "cpu"
        assert backends.resolve_backend(tiny) == "native"
        assert backends.resolve_backend(big.bfloat16(), activation="silu") == "native"


def test_native_supports_activation_and_residual():
    x, res = torch.randn(2, 4, 5, dtype=torch.float64) + 3, torch.randn(2, 4, 5, dtype=torch.float64)
    w, b = torch.rand(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    for act in (None, "relu", "silu", "gelu"):
        got = backends.native_group_norm(x, 2, w, b, 1e-5, act, res)
        ref, _, _ = R.normalize(x, "gn", 2, w, b, activation=act, residual=res)
        torch.testing.assert_close(got, torch.from_numpy(ref))


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_kernel_backends_match_reference_or_say_unavailable(name):
    x = torch.randn(2, 4, 3, 3) + 2
    with groupnorm.use_backend(name):
        try:
            y = GF.group_norm(x, 2, activation="relu")
        except RuntimeError as exc:
            assert f"backend {name!r}" in str(exc)
            return
    ref, _, _ = R.normalize(x, "gn", 2, activation="relu")
    torch.testing.assert_close(y.double(), torch.from_numpy(ref), atol=2e-5, rtol=2e-5)


def test_missing_kernels_give_a_clear_error(monkeypatch):
    monkeypatch.setattr(backends, "_op_module", None)
    real_import = importlib.import_module

    def fake_import(name, *args):
        if name == "groupnorm.kernels.op":
            raise ImportError("no module named groupnorm.kernels.op")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with groupnorm.use_backend("cpu"), pytest.raises(RuntimeError, match=r"backend 'cpu' unavailable"):
        GF.group_norm(torch.randn(2, 4, 3), 2)


def test_environment_variable_and_cheap_import():
    code = ("import sys, groupnorm; print(groupnorm.get_backend()); "
            "print(sorted(m for m in ('numba', 'triton', 'matplotlib', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, GROUPNORM_BACKEND="native")).stdout.split("\n")
    assert out[0] == "native"
    assert out[1] == "[]"
