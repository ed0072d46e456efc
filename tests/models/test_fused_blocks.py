"""Residual blocks end with relu(norm(out) + shortcut); a GN-family norm computes that in one call
(``norm(out, residual=shortcut, activation="relu")``, models.layers.norm_add_relu). The fused block must
equal the unfused one, forward and gradients, on every backend; BN stays unfused."""
import pytest
import torch

import groupnorm
from groupnorm.models import BasicBlock, Bottleneck, build_model
from groupnorm.models import layers
from groupnorm.models.resnet import projection
from groupnorm.nn import BatchNorm, GroupNorm, LayerNorm

from helpers import backend_or_skip, randomize

BACKENDS = ("native", "cpu", "triton")
# "triton" runs CUDA tensors, or CPU ones under the interpreter (tests/conftest.py sets it without a GPU)
DEVICE = {"triton": "cuda" if torch.cuda.is_available() else "cpu"}


def make_block(kind, norm, seed=0):
    torch.manual_seed(seed)
    if kind == "basic":
        block = BasicBlock(8, 8, norm=norm)
    elif kind == "basic_stride":
        block = BasicBlock(8, 16, 2, norm=norm, downsample=projection(8, 16, 2, norm=norm, ws=False))
    else:
        block = Bottleneck(16, 4, norm=norm, downsample=projection(16, 16, 1, norm=norm, ws=False))
    randomize(block, seed)   # gamma of the last norm away from 0, so the main path matters
    return block


def run(block, x, fused):
    """(output, gradients of x and of every parameter) with the fusion on or off."""
    block.zero_grad()
    x = x.detach().requires_grad_()
    with layers.residual_fusion(fused):
        out = block(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape))
    return out.detach(), [x.grad] + [p.grad.clone() for p in block.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["basic", "basic_stride", "bottleneck"])
@pytest.mark.parametrize("norm,dtype", [("gn:4", torch.float32), ("gn:2", torch.float64), ("ln", torch.float32),
                                        ("bn", torch.float32)])
def test_fused_block_equals_unfused(backend, kind, norm, dtype):
    backend_or_skip(backend)
    device = DEVICE.get(backend, "cpu")
    block = make_block(kind, norm).to(device, dtype)
    x = (torch.randn(2, 16 if kind == "bottleneck" else 8, 6, 6, dtype=dtype) + 0.3).to(device).contiguous(
        memory_format=torch.channels_last if kind == "basic" else torch.contiguous_format)
    with groupnorm.use_backend(backend):
        fused_out, fused_grads = run(block, x, fused=True)
        plain_out, plain_grads = run(block, x, fused=False)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(fused_out, plain_out, **tol)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, **tol)
    assert (fused_out >= 0).all()


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_gn_blocks_fuse_and_bn_blocks_do_not(kind):
    """The last norm gets the shortcut and the ReLU (a call with residual= and activation="relu") exactly
    when it is of the GroupNorm family without its own activation."""
    for norm, fuses in (("gn:4", True), ("ln", True), ("bn", False)):
        block = make_block(kind, norm)
        last = block.last_norm()
        seen = []
        last.register_forward_hook(lambda m, args, kwargs, out: seen.append(dict(kwargs)), with_kwargs=True)
        block(torch.randn(2, 16 if kind == "bottleneck" else 8, 5, 5))
        with layers.residual_fusion(False):      # the switch the equality tests compare with
            block(torch.randn(2, 16 if kind == "bottleneck" else 8, 5, 5))
        assert layers.fuses_residual_relu(last) is fuses
        assert (seen[0].get("activation") == "relu" and "residual" in seen[0]) is fuses, (norm, seen)
        assert "residual" not in seen[1] and layers._fuse_blocks, (norm, seen)
    assert not layers.fuses_residual_relu(GroupNorm(2, 8, activation="silu"))   # has its own activation
    assert not layers.fuses_residual_relu(torch.nn.GroupNorm(2, 8))              # torch's: no residual
    assert layers.fuses_residual_relu(LayerNorm(8)) and not layers.fuses_residual_relu(BatchNorm(8))


def test_whole_resnet_with_gn_matches_the_unfused_network():
    torch.manual_seed(0)
    model = build_model("resnet18", norm="gn:8", num_classes=10, zero_init_residual=False)
    x = torch.randn(2, 3, 32, 32)
    fused_out, fused_grads = run(model, x, fused=True)
    plain_out, plain_grads = run(model, x, fused=False)
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-4, atol=1e-5)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_a_hook_on_the_relu_still_sees_the_block_output(kind):
    """Fused, the block's last ReLU module would not run: while a hook watches it, the block stays
    unfused, so the hook fires on the block's output (and the values are the same either way)."""
    block = make_block(kind, "gn:4")
    x = torch.randn(2, 16 if kind == "bottleneck" else 8, 5, 5)
    unhooked = block(x)
    seen = []
    block.relu.register_forward_hook(lambda m, args, out: seen.append(out))
    hooked = block(x)
    assert seen and seen[-1] is hooked
    torch.testing.assert_close(hooked, unhooked, rtol=2e-5, atol=2e-6)
