"""Shared test helpers: random inputs in a memory format, dtype-aware comparison, tiny IDX datasets."""

import gzip
import os

import numpy as np
import pytest
import torch

from groupnorm import backends

# absolute tolerance, relative to the largest |reference| value, per dtype
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 3e-2}


def layout(x, fmt):
    """x in memory format ``fmt``: "contiguous" or "channels_last" ((N, *spatial, C) in memory)."""
    if fmt == "contiguous" or x.dim() == 2:
        return x.contiguous()
    return x.movedim(1, -1).contiguous().movedim(-1, 1)   # channels_last / _3d, or the 3-D analogue


def rand(shape, dtype=torch.float64, mean=0.5, seed=0, fmt="contiguous", std=1.3):
    """Normal(mean, std) values (never zeros), drawn in float64 then cast, in memory format ``fmt``."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return layout((x * std + mean).to(dtype), fmt)


def assert_close(got, ref, dtype, what=""):
    """|got - ref| <= TOL[dtype] * max(|ref|, 1) elementwise; ref is a tensor or an ndarray."""
    got = got.detach().double().numpy()
    ref = ref.detach().double().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    scale = max(float(np.abs(ref).max()), 1.0) if ref.size else 1.0
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL[dtype] * scale, err_msg=what)


def randomize(module, seed):
    """Give every parameter of ``module`` random values around 1 (so gamma and beta matter)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 1.0)
    return module


def write_idx(path, array):
    """Write ``array`` as a gzipped IDX file of unsigned bytes (the MNIST / Fashion-MNIST format)."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def fake_fashion(root, n_train, n_val, seed=0):
    """A tiny Fashion-MNIST look-alike in ``root``: random pixels with a class-dependent brightness."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        labels = np.arange(n) % 10
        images = np.clip(rng.normal(20 * labels[:, None, None], 30, (n, 28, 28)), 0, 255)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return str(root)


def backend_or_skip(name):
    """Skip the calling test when Group Norm backend ``name`` cannot run here, with the registry's
    reason, unless the environment requires it (``GROUPNORM_REQUIRE_BACKENDS=cpu,triton``, set by
    scripts/test.sh): then its absence fails the test instead of hiding it."""
    reason = backends.available(name)
    if reason is None:
        return
    required = os.environ.get("GROUPNORM_REQUIRE_BACKENDS", "").split(",")
    if name in required:
        pytest.fail(f"backend {name!r} is required here (GROUPNORM_REQUIRE_BACKENDS) but: {reason}")
    pytest.skip(f"backend {name!r} unavailable: {reason}")


class FusedBlock(torch.nn.Module):
    """conv -> fused GN + SiLU + residual -> plain GN, through ``group_norm(x, G, w, b, eps, act, r)``
    (a backend's own entry point): the small model of the kernels' torch.compile tests."""

    def __init__(self, group_norm):
        super().__init__()
        self.group_norm = group_norm
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.w = torch.nn.Parameter(torch.randn(8) * 0.5 + 1)
        self.b = torch.nn.Parameter(torch.randn(8) * 0.5)

    def forward(self, x):
        h = self.group_norm(self.conv(x), 4, self.w, self.b, 1e-5, "silu", x)
        return self.group_norm(h, 2)


def assert_compiled_matches_eager(model, inputs):
    """torch.compile(model, fullgraph=True) (no graph break) gives eager's outputs, output strides
    and parameter gradients on each input."""
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for x in inputs:
        out = compiled(x)
        out.square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ref = model(x)
        ref.square().sum().backward()
        torch.testing.assert_close(out, ref)
        assert out.stride() == ref.stride()
        for g, p in zip(grads, model.parameters()):
            torch.testing.assert_close(g, p.grad)
        model.zero_grad()


def tiny_config(out, data_dir, **kw):
    """A run of a few steps of a 4-channel ResNet-8 on fake images: 2 workers x 8 images; ``kw``
    overrides any field."""
    from groupnorm.train import Config
    values = dict(data_dir=data_dir, workers=2, images_per_worker=8, train_subset=32, epochs=2,
                  model="small_resnet", model_args={"width": 4, "depth": 8}, norm="bn", threads=1,
                  progress=False, out=str(out), eval_batch_size=16)
    values.update(kw)
    return Config(**values)
