"""Triton GN kernels (groupnorm.kernels.triton) against the float64 reference, forward and backward.

Without a GPU they run on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set here before Triton
is first imported; scripts/test.sh sets it too). The interpreter is slow, so shapes are tiny and the
launch plan is forced (small tiles, several spatial chunks) to walk every code path: one program per
group and the chunked path, several channel blocks per group, masked tails, 64-bit offsets.
Every output and scratch buffer is NaN-filled before each call, so an element left unwritten fails.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton is not installed")

from groupnorm import reference  # noqa: E402
from groupnorm.kernels import triton as gt  # noqa: E402

INTERPRETED = gt._INTERPRET
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("groupnorm.kernels.triton was imported without TRITON_INTERPRET=1 and there is no GPU; "
                "run with TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"
FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last, "cl3d": torch.channels_last_3d}


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """NaN-filled outputs and scratch buffers (full_like keeps x's memory format)."""
    monkeypatch.setattr(gt, "_empty", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    monkeypatch.setattr(gt, "_empty_like", lambda x, dtype=None: torch.full_like(
        x, float("nan"), dtype=dtype))


def make(shape, layout="nchw", dtype=torch.float32, seed=0, mean=0.5, std=2.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    return x.to(DEVICE).contiguous(memory_format=FORMATS[layout])


def params(c, affine=True, seed=1):
    if not affine:
        return None, None
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, generator=g) * 0.5 + 1.0
    b = torch.randn(c, generator=g) * 0.5
    return w.to(DEVICE), b.to(DEVICE)


def rel_err(actual, expected):
    """max |actual - expected| / max |expected| (expected: NumPy float64)."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    actual = actual.detach().double().cpu()
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "non-finite output (an element left unwritten?)"
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def run(x, g, w, b, r, act, eps=1e-5, dy=None, **plan):
    with gt.tuning(**plan):
        y, mean, rstd = gt.forward(x, w, b, r, g, eps, act)
        grads = gt.backward(dy, x, w, b, r, mean, rstd, g, act) if dy is not None else None
    return y, mean, rstd, grads


def check_against_reference(x, g, w, b, r, act, tol, grad_tol, eps=1e-5, strides=None, **plan):
    """Forward and backward against the float64 reference; outputs must have x's strides (or `strides`)."""
    strides = strides or x.stride()
    dy = make(x.shape, dtype=x.dtype, seed=7, mean=0.0, std=1.0)
    y, mean, rstd, (dx, dw, db, dr) = run(x, g, w, b, r, act, eps, dy, **plan)
    y_ref, mean_ref, var_ref = reference.normalize(x, "gn", g, w, b, eps, act, r)
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == strides
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert mean.dtype == rstd.dtype == stat_dtype and mean.shape == rstd.shape == (x.shape[0], g)
    assert rel_err(y, y_ref) < tol
    assert rel_err(mean, mean_ref) < tol
    assert rel_err(rstd, 1.0 / (var_ref + eps) ** 0.5) < tol
    ref = reference.normalize_backward(dy, x, "gn", g, w, b, eps, act, r)
    for name, got in (("x", dx), ("weight", dw), ("bias", db), ("residual", dr)):
        if ref[name] is None:
            assert got is None, name
        else:
            assert got.shape == ref[name].shape, name
            assert rel_err(got, ref[name]) < grad_tol, name
    assert dx.stride() == strides
    return y, (dx, dw, db, dr)


# shape, G, layout, activation, residual, affine, plan. Tiles of 16-64 elements force several blocks
# per group; chunks > 1 forces the split (partials + fixed-order merge) path, chunks = 1 the fused one.
CASES = [
    ((2, 8, 5, 6), 4, "nchw", None, False, True, dict(tile=16, chunks=1)),
    ((2, 8, 5, 6), 4, "nchw", "silu", True, True, dict(tile=16, chunks=3)),
    ((2, 8, 5, 6), 4, "cl", None, True, True, dict(tile=16, chunks=1)),
    ((1, 6, 7, 3), 2, "cl", "gelu", True, True, dict(tile=16, chunks=3)),
    ((1, 12, 4, 4), 1, "nchw", "relu", False, True, dict(block_s=4, block_d=4, chunks=2)),  # G = 1 (LN)
    ((2, 6, 3, 3), 6, "cl", "silu", False, False, dict(tile=8)),  # G = C (IN), no affine, auto chunks
    ((3, 4, 11), 2, "nchw", "relu", True, True, dict(tile=8, chunks=2)),  # (N, C, L)
    ((5, 12), 3, "nchw", "gelu", True, True, {}),  # (N, C)
    ((2, 8, 3, 4, 5), 2, "cl3d", "silu", True, True, dict(tile=32, chunks=2)),
    ((1, 4, 2, 3, 5), 2, "nchw", None, False, True, dict(tile=64)),
]


@pytest.mark.parametrize("shape,g,layout,act,res,affine,plan", CASES)
def test_fp32_matches_reference(shape, g, layout, act, res, affine, plan):
    x = make(shape, layout)
    w, b = params(shape[1], affine)
    r = make(shape, layout, seed=3, mean=0.0, std=1.0) if res else None
    check_against_reference(x, g, w, b, r, act, tol=1e-5, grad_tol=2e-5, **plan)


def test_matches_torch_native_group_norm():
    x = make((2, 8, 6, 5), "cl")
    w, b = params(8)
    r = make(x.shape, "cl", seed=4)
    y, *_ = run(x, 4, w, b, None, None, tile=32, chunks=2)
    torch.testing.assert_close(y, torch.nn.functional.group_norm(x, 4, w, b, 1e-5), rtol=1e-5, atol=1e-5)
    y, *_ = run(x, 4, w, b, r, "silu", tile=32, chunks=1)
    native = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4, w, b, 1e-5) + r)
    torch.testing.assert_close(y, native, rtol=1e-5, atol=1e-5)


def test_weight_only_and_bias_only():
    x = make((2, 4, 3, 5))
    w, b = params(4)
    check_against_reference(x, 2, w, None, None, "gelu", 1e-5, 2e-5, tile=16)
    check_against_reference(x, 2, None, b, None, "relu", 1e-5, 2e-5, tile=16, chunks=2)


@pytest.mark.parametrize("dtype,layout", [(torch.bfloat16, "cl"), (torch.float16, "nchw")])
def test_half_precision(dtype, layout):
    """16-bit x (and residual) with float32 weight: float32 statistics, output in x's dtype."""
    x = make((2, 8, 4, 5), layout, dtype)
    w, b = params(8)  # float32 parameters with 16-bit activations, as under autocast
    r = make(x.shape, layout, dtype, seed=5, mean=0.0, std=1.0)
    for plan in (dict(tile=32, chunks=1), dict(tile=32, chunks=3)):
        _, (dx, dw, db, dr) = check_against_reference(x, 4, w, b, r, "silu", tol=1e-2, grad_tol=2e-2, **plan)
        assert dx.dtype == dr.dtype == dtype and dw.dtype == db.dtype == torch.float32


def test_float64():
    x = make((2, 6, 3, 4), "cl", torch.float64)
    w, b = params(6)
    w, b = w.double(), b.double()
    check_against_reference(x, 3, w, b, None, "gelu", tol=1e-12, grad_tol=1e-11, tile=16, chunks=2)


@pytest.mark.parametrize("chunks", [1, 3])
def test_large_mean_keeps_float32_accuracy(chunks):
    """mean 1000, std 1: a naive E[x^2] - E[x]^2 in float32 would lose the variance entirely."""
    x = make((2, 8, 6, 6), "nchw", mean=1000.0, std=1.0)
    w, b = params(8)
    y, mean, rstd, _ = run(x, 4, w, b, None, None, tile=32, chunks=chunks)
    y_ref, mean_ref, var_ref = reference.normalize(x, "gn", 4, w, b, 1e-5)
    assert rel_err(mean, mean_ref) < 1e-6
    assert rel_err(rstd, 1.0 / (var_ref + 1e-5) ** 0.5) < 1e-5
    # y's error is bounded by float32's resolution of the mean itself (ulp(1000) ~ 6e-5)
    assert rel_err(y, y_ref) < 1e-4


@pytest.mark.parametrize("plan", [dict(tile=16, chunks=1), dict(tile=16, chunks=3)])
def test_deterministic(plan):
    x = make((2, 8, 5, 5), "cl")
    w, b = params(8)
    r = make(x.shape, "cl", seed=2)
    dy = make(x.shape, "cl", seed=9)
    first = run(x, 2, w, b, r, "silu", dy=dy, **plan)
    second = run(x, 2, w, b, r, "silu", dy=dy, **plan)
    flat = lambda out: [out[0], out[1], out[2], *out[3]]  # noqa: E731
    for a, c in zip(flat(first), flat(second)):
        assert torch.equal(a, c)


def test_chunked_and_fused_paths_agree_and_int64_offsets():
    x = make((1, 4, 7, 6), "cl")
    w, b = params(4)
    dy = make(x.shape, "cl", seed=9)
    base = run(x, 2, w, b, None, "gelu", dy=dy, tile=16, chunks=1)
    for plan in (dict(tile=16, chunks=4), dict(tile=16, chunks=4, i64=True),
                 dict(tile=16, chunks=1, i64=True)):
        other = run(x, 2, w, b, None, "gelu", dy=dy, **plan)
        for a, c in zip([base[0], *base[3]], [other[0], *other[3]]):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_needs_input_grad_and_missing_inputs():
    x = make((2, 4, 3, 3))
    w, b = params(4)
    r = make(x.shape, seed=2)
    dy = make(x.shape, seed=9)
    _, mean, rstd, _ = run(x, 2, w, b, r, None)
    with gt.tuning(tile=16):
        dx, dw, db, dr = gt.backward(dy, x, w, b, r, mean, rstd, 2, None, (False, True, False, False))
        assert dx is None and db is None and dr is None
        ref = reference.normalize_backward(dy, x, "gn", 2, w, b, 1e-5, None, r)
        assert rel_err(dw, ref["weight"]) < 2e-5
        dx, dw, db, dr = gt.backward(dy, x, w, b, r, mean, rstd, 2, None, (False, False, False, True))
        assert dx is None and dw is None and db is None
        torch.testing.assert_close(dr, dy)  # no activation: dresidual = dy, in a fresh tensor
        assert dr.data_ptr() != dy.data_ptr()
        none = gt.backward(dy, x, None, None, None, mean, rstd, 2, None, (False, True, True, True))
        assert none == (None,) * 4


def test_mixed_layouts_and_non_contiguous():
    """A residual in another memory format than x, an (N, L, C) tensor and a sliced (non-dense) x."""
    x = make((2, 4, 5, 6), "cl")
    w, b = params(4)
    r = make(x.shape, "nchw", seed=2)
    check_against_reference(x, 2, w, b, r, "silu", 1e-5, 2e-5, tile=32)
    x_nlc = make((2, 7, 6)).transpose(1, 2)  # (N, L, C) data seen as (N, C, L): channel stride 1
    check_against_reference(x_nlc, 3, params(6)[0], None, None, "relu", 1e-5, 2e-5, tile=16, chunks=2)
    x_sliced = make((2, 4, 5, 12))[..., ::2]
    check_against_reference(x_sliced, 2, w, b, None, None, 1e-5, 2e-5, strides=(120, 30, 6, 1), tile=32)


def test_empty_batch():
    x = torch.empty((0, 4, 3, 3), device=DEVICE)
    w, b = params(4)
    y, mean, rstd, _ = run(x, 2, w, b, None, None)
    assert y.shape == x.shape and mean.shape == (0, 2)
    dx, dw, db, _ = gt.backward(x, x, w, b, None, mean, rstd, 2, None)
    assert dx.shape == x.shape
    assert torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))


def test_bad_input_names_the_problem():
    x = make((2, 6, 3, 3))
    with pytest.raises(ValueError, match="num_channels=6.*num_groups=4"):
        gt.forward(x, None, None, None, 4, 1e-5, None)
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\)"):
        gt.forward(x, torch.ones(5, device=DEVICE), None, None, 3, 1e-5, None)
    with pytest.raises(TypeError, match="torch.int32"):
        gt.forward(x.to(torch.int32), None, None, None, 3, 1e-5, None)
    with pytest.raises(ValueError, match="activation"):
        gt.forward(x, None, None, None, 3, 1e-5, "tanh")
    with pytest.raises(ValueError, match="rank >= 2"):
        gt.forward(x[0, 0, 0], None, None, None, 1, 1e-5, None)
    with pytest.raises(ValueError, match="residual shape"):
        gt.forward(x, None, None, x[:1], 3, 1e-5, None)


def test_gpu_plan_fills_the_machine_at_batch_1():
    """The launch plan (pure host logic) splits the spatial axis when N x G alone is too few programs."""
    dev = torch.device("cpu")
    saved, gt._sm_count = gt._sm_count, (lambda device: 132)
    saved_interp, gt._INTERPRET = gt._INTERPRET, False
    try:
        plan = gt._plan(1, 32, 8, 56 * 56, 4, True, dev)  # ResNet-50 stage 1 at batch 1
        assert 32 * plan["chunks"] >= 2 * 132 and plan["block_d"] == 8
        assert gt._plan(32, 32, 8, 56 * 56, 2, True, dev)["chunks"] == 1  # 1024 programs already
        for n, c, hw, cl in ((2, 320, 64 * 64, True), (2, 1280, 16 * 16, False), (1, 2048, 49, False)):
            p = gt._plan(n, 32, c // 32, hw, 4, cl, dev)
            assert p["block_s"] * p["block_d"] <= 2048 and p["chunk_len"] % p["block_s"] == 0
            assert (p["chunks"] - 1) * p["chunk_len"] < hw <= p["chunks"] * p["chunk_len"]
    finally:
        gt._sm_count, gt._INTERPRET = saved, saved_interp


def test_kernels_compile_for_h100():
    """The interpreter does not compile: build every kernel for sm_90 ahead of time (no GPU needed) in a
    process without TRITON_INTERPRET, as the launches on ResNet / U-Net shapes would. No register spills,
    and channels_last float32 reads use 16-byte vector loads."""
    import json
    import pathlib
    import subprocess
    import sys

    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip(f"this Triton build has no NVIDIA backend (has {sorted(backends)})")
    script = pathlib.Path(__file__).with_name("_compile_sm90.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cases = ["resnet_b2_cl_fp32", "resnet_b32_cl_bf16_silu_res"]  # the split and the fused path
    proc = subprocess.run([sys.executable, str(script), *cases], capture_output=True, text=True, env=env, timeout=600,
                          cwd=pathlib.Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    kernels = {name for name in dir(gt) if name.endswith("_kernel")}
    assert {r["kernel"] for r in rows} == kernels
    assert all(r["stack"] == 0 for r in rows), [r for r in rows if r["stack"]]
    big = [r for r in rows if r["case"] == "resnet_b2_cl_fp32" and r["warps"] == 8]
    assert big and all("v4" in r["vector_loads"] for r in big)
