"""groupnorm.nn.BatchNorm (any rank, per worker, synchronized) and BatchRenorm."""

import os

import numpy as np
import pytest
import torch

from groupnorm import functional as GF
from groupnorm import nn as gnn
from groupnorm import reference as R
from helpers import assert_close, rand, randomize

SHAPES = {2: (6, 4), 3: (4, 4, 5), 4: (4, 4, 3, 5), 5: (4, 4, 2, 3, 2)}
TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
            5: torch.nn.BatchNorm3d}


# ---------------------------------------------------------------------------------------------
# BatchNorm
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_batch_norm_vs_torch_and_reference(rank, fmt, dtype):
    shape = SHAPES[rank]
    ours = randomize(gnn.BatchNorm(4, momentum=0.3), 1).to(dtype)
    theirs = TORCH_BN[rank](4, momentum=0.3).double()   # torch's layer in float64 as the yardstick
    theirs.load_state_dict(ours.state_dict())
    for step in range(2):
        x, gy = rand(shape, dtype, seed=2 + step, fmt=fmt), rand(shape, dtype, 0.0, seed=4 + step, fmt=fmt)
        xg = x.clone().requires_grad_()
        ours.zero_grad()
        y = ours(xg)
        y.backward(gy)
        ref, _, _ = R.normalize(x, "bn", weight=ours.weight, bias=ours.bias)
        grads = R.normalize_backward(gy, x, "bn", weight=ours.weight, bias=ours.bias)
        assert_close(y, ref, dtype, "y")
        assert_close(xg.grad, grads["x"], dtype, "dx")
        assert_close(ours.weight.grad, grads["weight"], dtype, "dweight")
        assert_close(ours.bias.grad, grads["bias"], dtype, "dbias")
        assert_close(y, theirs(x.double()), dtype, "torch")
    assert_close(ours.running_mean, theirs.running_mean, dtype, "running_mean")
    assert_close(ours.running_var, theirs.running_var, dtype, "running_var")
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 2
    ours.eval()
    theirs.eval()
    x = rand(shape, dtype, seed=9, fmt=fmt)
    assert_close(ours(x), theirs(x.double()), dtype, "eval")


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("running_stats", ["worker0", "average", None])
def test_per_worker_module_is_bn_on_each_chunk(fmt, running_stats):
    extra = {} if running_stats is None else {"running_stats": running_stats}
    ours = randomize(gnn.BatchNorm(4, images_per_worker=2, **extra), 10).double()
    workers = [torch.nn.BatchNorm2d(4).double() for _ in range(3)]
    for w in workers:
        w.load_state_dict(ours.state_dict())
    for step in range(2):
        x = rand((6, 4, 3, 3), seed=11 + step, fmt=fmt)
        y = ours(x)
        expected = torch.cat([w(x[2 * i:2 * i + 2]) for i, w in enumerate(workers)])
        torch.testing.assert_close(y, expected)
    if running_stats == "average":  # the average of the workers' own running statistics
        torch.testing.assert_close(ours.running_mean, torch.stack([w.running_mean for w in workers]).mean(0))
        torch.testing.assert_close(ours.running_var, torch.stack([w.running_var for w in workers]).mean(0))
    else:   # the default: worker 0's own, exactly as a worker that kept only its chunks' statistics
        torch.testing.assert_close(ours.running_mean, workers[0].running_mean)
        torch.testing.assert_close(ours.running_var, workers[0].running_var)
        assert not torch.allclose(ours.running_mean, workers[1].running_mean)
    ours.eval()   # eval ignores images_per_worker: any batch size
    assert ours(rand((5, 4, 3, 3), seed=13)).shape == (5, 4, 3, 3)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_per_worker_double_backward(fmt):
    """Per-worker BN is twice differentiable (create_graph=True): second derivatives are right."""
    x = rand((6, 3, 2, 3), seed=50, fmt=fmt).requires_grad_()
    w, b = rand((3,), seed=51).requires_grad_(), rand((3,), seed=52).requires_grad_()

    def f(x_, w_, b_):
        return GF.batch_norm(x_, None, None, w_, b_, True, 0.1, 1e-5, images_per_worker=2)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_per_worker_exact_at_a_large_mean(fmt):
    """float32 at mean 1e4, std 0.5: values, gradients and statistics as the float64 reference."""
    x64 = rand((8, 4, 3, 3), seed=53, fmt=fmt, mean=1e4, std=0.5)
    gy = rand((8, 4, 3, 3), seed=54, fmt=fmt, mean=0.0)
    w, b = rand((4,), seed=55), rand((4,), seed=56)
    rm, rv = torch.zeros(4), torch.ones(4)
    x = x64.float().requires_grad_()
    y = GF.batch_norm(x, rm, rv, w.float(), b.float(), True, 1.0, 1e-5, images_per_worker=4)
    y.backward(gy.float())
    x0 = x.detach().double()   # the float32 values, exactly, as the reference's input
    for i in range(2):
        chunk = x0[4 * i:4 * i + 4]
        ref, _, _ = R.normalize(chunk, "bn", weight=w, bias=b)
        grads = R.normalize_backward(gy[4 * i:4 * i + 4], chunk, "bn", weight=w, bias=b)
        assert_close(y[4 * i:4 * i + 4], ref, torch.float32, "y")
        assert_close(x.grad[4 * i:4 * i + 4], grads["x"], torch.float32, "dx")
    first = x0[:4]   # worker 0's statistics became the running ones (momentum 1)
    torch.testing.assert_close(rm.double(), first.mean((0, 2, 3)), rtol=1e-7, atol=1e-3)
    torch.testing.assert_close(rv.double(), first.var((0, 2, 3)), rtol=1e-3, atol=1e-6)


def test_running_stats_choice_is_checked():
    with pytest.raises(ValueError, match="running_stats must be one of worker0, average, got 'mean'"):
        gnn.BatchNorm(4, images_per_worker=2, running_stats="mean")
    with pytest.raises(ValueError, match="running_stats must be one of"):
        gnn.BatchRenorm(4, images_per_worker=2, running_stats="rank0")
    bn = gnn.BatchNorm(4, images_per_worker=2)
    bn.running_stats = "all"   # set after construction (as a trainer may): checked at the call
    with pytest.raises(ValueError, match="running_stats must be one of"):
        bn(rand((4, 4, 3, 3), seed=1))


def test_momentum_none_and_untracked_stats_follow_torch():
    for kwargs in (dict(momentum=None), dict(track_running_stats=False), dict(affine=False)):
        ours, theirs = gnn.BatchNorm(3, **kwargs).double(), torch.nn.BatchNorm1d(3, **kwargs).double()
        for step in range(3):
            x = rand((5, 3, 4), seed=14 + step)
            torch.testing.assert_close(ours(x), theirs(x))
        ours.eval()
        theirs.eval()
        x = rand((5, 3, 4), seed=20)
        torch.testing.assert_close(ours(x), theirs(x))
        if ours.running_mean is not None:
            torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_state_dict_interchange_with_torch_batchnorm2d():
    theirs = randomize(torch.nn.BatchNorm2d(8), 21)
    theirs(rand((4, 8, 3, 3), torch.float32, seed=22))   # non-trivial running stats
    ours = gnn.BatchNorm(8)
    ours.load_state_dict(theirs.state_dict())
    back = torch.nn.BatchNorm2d(8)
    back.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for m in (ours, theirs, back):
        m.eval()
    x = rand((2, 8, 3, 3), torch.float32, seed=23)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(back(x), theirs(x))
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
    assert "images_per_worker=4" in repr(gnn.BatchNorm(8, images_per_worker=4))


def test_sync_without_process_group_is_ordinary_bn():
    synced, plain = gnn.BatchNorm(4, sync=True).double(), gnn.BatchNorm(4).double()
    x = rand((4, 4, 3), seed=24)
    torch.testing.assert_close(synced(x), plain(x))
    torch.testing.assert_close(synced.running_var, plain.running_var)


def _sync_worker(rank, world, out_dir):
    """One process of the SyncBN test: its slice of the batch through BatchNorm(sync=True).
    The rendezvous is a file, so no rank hosts a TCP store server that another rank still reads
    while the first one exits."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    store = os.path.join(out_dir, "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        m = randomize(gnn.BatchNorm(3, momentum=0.5, sync=True), 30).double()
        results = {}
        for name, split in (("even", [4, 4]), ("uneven", [3, 5])):
            x, gy = rand((8, 3, 4, 2), seed=31, fmt="channels_last"), rand((8, 3, 4, 2), mean=0.0, seed=32)
            lo = sum(split[:rank])
            xs = x[lo:lo + split[rank]].clone().requires_grad_()
            m.zero_grad()
            y = m(xs)
            y.backward(gy[lo:lo + split[rank]])
            for p in m.parameters():           # as DDP would: sum the parameter gradients
                dist.all_reduce(p.grad)
            results[name] = dict(y=y.detach(), dx=xs.grad, dw=m.weight.grad.clone(),
                                 db=m.bias.grad.clone(), rm=m.running_mean.clone(),
                                 rv=m.running_var.clone())
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()   # both ranks done before either tears its connections down
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_sync_batch_norm_two_processes_equals_whole_batch(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_sync_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    whole = randomize(torch.nn.BatchNorm2d(3, momentum=0.5), 30).double()
    for name in ("even", "uneven"):
        x = rand((8, 3, 4, 2), seed=31, fmt="channels_last").requires_grad_()
        gy = rand((8, 3, 4, 2), mean=0.0, seed=32)
        whole.zero_grad()
        y = whole(x)
        y.backward(gy)
        got = ranks[0][name], ranks[1][name]
        torch.testing.assert_close(torch.cat([g["y"] for g in got]), y.detach())
        torch.testing.assert_close(torch.cat([g["dx"] for g in got]), x.grad)
        for g in got:
            torch.testing.assert_close(g["dw"], whole.weight.grad)
            torch.testing.assert_close(g["db"], whole.bias.grad)
            torch.testing.assert_close(g["rm"], whole.running_mean)
            torch.testing.assert_close(g["rv"], whole.running_var)


# ---------------------------------------------------------------------------------------------
# BatchRenorm
# ---------------------------------------------------------------------------------------------

def test_renorm_limits_schedule():
    m = gnn.BatchRenorm(4, r_max=3.0, d_max=5.0, warmup_iters=10, hold_iters=5)
    seen = []
    for _ in range(17):
        seen.append(m.current_limits())
        m(rand((4, 4), torch.float32, seed=len(seen)))
    assert seen[0] == seen[5] == (1.0, 0.0)
    assert seen[10] == pytest.approx((2.0, 2.5))
    assert seen[15] == seen[16] == (3.0, 5.0)
    assert gnn.BatchRenorm(4, warmup_iters=0).current_limits() == (1.5, 0.5)


def test_renorm_with_unit_limits_is_bn():
    brn = randomize(gnn.BatchRenorm(4, warmup_iters=100), 40).double()
    bn = gnn.BatchNorm(4).double()
    bn.load_state_dict(brn.state_dict())
    x = rand((6, 4, 3, 3), seed=41, fmt="channels_last")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    gy = rand((6, 4, 3, 3), mean=0.0, seed=42)
    brn(x1).backward(gy)
    bn(x2).backward(gy)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(brn.weight.grad, bn.weight.grad)
    torch.testing.assert_close(brn.running_mean, bn.running_mean)


@pytest.mark.parametrize("per, running_stats", [(None, "worker0"), (2, "worker0"), (2, "average")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_renorm_formula_and_stop_gradient(per, running_stats, dtype):
    """y = gamma * (x_hat_B * r + d) + beta, with r and d constants for the gradient (Ioffe 2017);
    the running statistics follow worker 0's chunk or the chunks' average."""
    m = randomize(gnn.BatchRenorm(4, momentum=0.2, warmup_iters=0, r_max=1.5, d_max=0.5,
                                  images_per_worker=per, running_stats=running_stats), 43).to(dtype)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([0.4, 0.9, 0.2, 2.0]))
        m.running_var.copy_(torch.tensor([1.0, 3.0, 0.4, 1.5]))
    rm0, rv0 = m.running_mean.double().numpy().copy(), m.running_var.double().numpy().copy()
    x = rand((4, 4, 3, 2), dtype, seed=44, fmt="channels_last")
    gy = rand((4, 4, 3, 2), dtype, 0.0, seed=45)
    xg = x.clone().requires_grad_()
    y = m(xg)
    y.backward(gy)
    gamma, beta = m.weight.double().detach().numpy(), m.bias.double().detach().numpy()
    x64, gy64 = x.double().numpy(), gy.double().numpy()
    k = 1 if per is None else 4 // per
    chunk = 4 // k
    sigma = np.sqrt(rv0 + m.eps)
    mus, sigmas = [], []
    for i in range(k):
        xs, gs = x64[i * chunk:(i + 1) * chunk], gy64[i * chunk:(i + 1) * chunk]
        _, mu_b, var_b = R.normalize(xs, "bn")
        sigma_b = np.sqrt(var_b + m.eps)
        r = np.clip(sigma_b / sigma, 1 / 1.5, 1.5)
        d = np.clip((mu_b - rm0) / sigma, -0.5, 0.5)
        x_hat = R.normalize(xs, "bn")[0]
        cv = (1, -1, 1, 1)
        expected = gamma.reshape(cv) * (x_hat * r.reshape(cv) + d.reshape(cv)) + beta.reshape(cv)
        assert_close(y[i * chunk:(i + 1) * chunk], expected, dtype, "y")
        # stop-gradient: dx is BN's backward with a per-channel scale gamma * r
        dx = R.normalize_backward(gs, xs, "bn", weight=gamma * r)["x"]
        assert_close(xg.grad[i * chunk:(i + 1) * chunk], dx, dtype, "dx")
        mus.append(mu_b)
        sigmas.append(sigma_b)
    assert ((r > 1 / 1.5) & (r < 1.5)).any() and (np.abs(d) < 0.5).any()   # not all clipped
    pick = (lambda v: v[0]) if running_stats == "worker0" else (lambda v: np.mean(v, 0))
    new_sigma = sigma + 0.2 * (pick(sigmas) - sigma)
    assert_close(m.running_mean, rm0 + 0.2 * (pick(mus) - rm0), dtype, "running_mean")
    assert_close(m.running_var, new_sigma ** 2 - m.eps, dtype, "running_var")
    m.eval()   # eval: BN with the running statistics
    cv = (1, -1, 1, 1)
    rm1, rv1 = m.running_mean.double().numpy(), m.running_var.double().numpy()
    expected = gamma.reshape(cv) * (x64 - rm1.reshape(cv)) / np.sqrt(rv1.reshape(cv) + m.eps)
    assert_close(m(x), expected + beta.reshape(cv), dtype, "eval")


def test_renorm_gradcheck_where_clipped():
    """With r and d both clipped they are locally constant, so finite differences see the same
    function as autograd's stop-gradient."""
    x = rand((4, 3, 2), seed=46).requires_grad_()
    w, b = rand((3,), seed=47).requires_grad_(), rand((3,), seed=48).requires_grad_()

    def fn(x_, w_, b_):
        rm, rv = torch.full((3,), 100.0, dtype=torch.float64), torch.full((3,), 1e4, dtype=torch.float64)
        return GF.batch_renorm(x_, rm, rv, w_, b_, True, 0.1, 1e-5, 1.5, 0.5)

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_renorm_state_dict_is_batchnorms():
    brn = gnn.BatchRenorm(5)
    assert set(brn.state_dict()) == set(torch.nn.BatchNorm2d(5).state_dict())
    assert "r_max=1.5" in repr(brn)
