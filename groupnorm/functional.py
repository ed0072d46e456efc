"""Functional forms of the normalization family (Wu & He, 2018, Sec. 3).

All functions take an input of shape (N, C, *spatial) with rank >= 2 and return a tensor of the same
shape, dtype and memory format. With m the size of the set S_i (eqs. 1, 2):

    x_hat_i = (x_i - mu_i) / sqrt(sigma_i^2 + eps),   y_i = gamma_{i_C} * x_hat_i + beta_{i_C}

* ``group_norm``: S_i = the C/G channels of i's group in i's sample (eq. 7); optional fused
  ``residual`` and ``activation``: y = act(gamma * x_hat + beta + residual).
* ``layer_norm``: the paper's LN, GN with G = 1 (over C and spatial, per-channel affine). Not torch's
  ``layer_norm`` over trailing dimensions.
* ``instance_norm``: the paper's IN, GN with G = C.
* ``batch_norm``: S_i = channel i_C over (N, spatial), or over each worker's chunk of
  ``images_per_worker`` consecutive samples.
* ``batch_renorm``: Ioffe (2017), BN corrected towards the running statistics by r and d.
* ``sync_batch_norm``: BN over the union of the batches of all processes of a torch.distributed group.
* ``weight_standardize``: Qiao et al. (2019), each output filter of a weight to zero mean, unit var.

Group Norm goes through the backend registry (``groupnorm.set_backend``); the others are torch ops.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import _checks, backends
from ._layout import is_channels_last

__all__ = ["group_norm", "layer_norm", "instance_norm", "batch_norm", "batch_renorm",
           "sync_batch_norm", "weight_standardize"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float32 for half precisions, else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_common(input, weight, bias, eps, where):
    _checks.check_input(input, where)
    _checks.check_affine(weight, bias, input.shape[1], where)
    _checks.check_eps(eps, where)


# ---------------------------------------------------------------------------------------------
# Group Norm and its two extremes
# ---------------------------------------------------------------------------------------------

def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None,
               residual=None):
    """Group Normalization, eqs. (1), (2), (6), (7), with optional fused residual and activation.

    y = act(weight * x_hat + bias + residual), where x_hat normalizes each sample over each group of
    C / G consecutive channels and all spatial positions.

    Args:
        input: (N, C, *spatial), floating point, any memory format.
        num_groups: G, must divide C.
        weight, bias: (C,) or None.
        eps: > 0, added to the variance.
        activation: None, "relu", "silu" or "gelu" (exact erf form).
        residual: tensor of input's shape, dtype and device, added before the activation.
    Returns:
        Tensor of input's shape, dtype and memory format.
    """
    _checks.check_group_norm(input, num_groups, weight, bias, eps, activation, residual)
    return backends.group_norm(input, num_groups, weight, bias, float(eps), activation, residual)


def layer_norm(input, weight=None, bias=None, eps=1e-5):
    """The paper's Layer Norm: GN with G = 1 (statistics over C and spatial per sample).

    The affine is per channel, weight and bias of shape (C,), as in the paper's eq. (6).
    """
    _checks.check_input(input, "layer_norm")
    return group_norm(input, 1, weight, bias, eps)


def instance_norm(input, weight=None, bias=None, eps=1e-5):
    """The paper's Instance Norm: GN with G = C (statistics over spatial per sample and channel)."""
    _checks.check_input(input, "instance_norm")
    return group_norm(input, input.shape[1], weight, bias, eps)


# ---------------------------------------------------------------------------------------------
# Batch Norm with per-worker statistics
# ---------------------------------------------------------------------------------------------

# Which workers' batch statistics update the running (eval-time) statistics of per-worker BN:
# "worker0" (the paper's trainer and DDP's default: the master's buffers are the model's) or
# "average" (the average over the workers, W times less noisy).
RUNNING_STATS = ("worker0", "average")


def _check_batch_args(input, running_mean, running_var, weight, bias, momentum, eps,
                      images_per_worker, training, where, running_stats="worker0"):
    _check_common(input, weight, bias, eps, where)
    if running_stats not in RUNNING_STATS:
        raise ValueError(f"{where}: running_stats must be one of {', '.join(RUNNING_STATS)}, "
                         f"got {running_stats!r}")
    _checks.check_momentum(momentum, where)
    _checks.check_images_per_worker(images_per_worker, input.shape[0], where)
    channels = input.shape[1]
    for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
        if buf is not None and tuple(buf.shape) != (channels,):
            raise ValueError(f"{where}: {name} must have shape ({channels},), got {tuple(buf.shape)}")
    per_worker = images_per_worker or input.shape[0]
    values = per_worker * (input[0, 0].numel() if input.shape[0] else 1)
    if training and input.shape[0] and values <= 1:
        raise ValueError(f"{where}: training needs more than 1 value per channel per worker, got "
                         f"input shape {tuple(input.shape)} with images_per_worker={images_per_worker}")


class _WorkerView:
    """x (N, C, *spatial) seen as k = N / per workers: (k, per, C, S), or (k, per, S, C) when x is
    channels_last (then it is a view, too). Statistics per (worker, channel) reduce ``dims``."""

    def __init__(self, x, per):
        self.shape, self.k, self.c = x.shape, x.shape[0] // per, x.shape[1]
        self.channels_last = is_channels_last(x)
        if self.channels_last:
            self.data = x.movedim(1, -1).reshape(self.k, per, -1, self.c)
            self.dims, self.c_dim = (1, 2), 3
        else:
            self.data = x.reshape(self.k, per, self.c, -1)
            self.dims, self.c_dim = (1, 3), 2

    def stat(self, v):
        """A (k, C) statistic broadcastable against ``data``."""
        shape = [self.k, 1, 1, 1]
        shape[self.c_dim] = self.c
        return v.view(shape)

    def back(self, y):
        """A tensor laid out like ``data`` back to (N, C, *spatial) in the input's memory format."""
        if self.channels_last:
            return y.reshape(self.shape[:1] + self.shape[2:] + self.shape[1:2]).movedim(-1, 1)
        return y.reshape(self.shape)


def _bn_workers(x, per, weight, bias, eps):
    """BN with batch statistics of each chunk of ``per`` consecutive samples, in one fused call.

    x: float32 or float64 (the caller upcasts half precisions). Returns (y, mean, var): mean and
    unbiased var of shape (workers, C).

    The k = N / per workers become k * C independent channels of one torch batch_norm call: the k
    axis of the worker view is moved next to C (for k = 1 this costs no copy). Torch's kernel is
    called with scratch running buffers and momentum 1, which makes it return the batch mean and
    unbiased variance.

    Each (worker, channel) is first shifted by its detached mean: BN is shift invariant, value and
    gradient, and torch's CPU kernel computes the variance as E[x^2] - E[x]^2 in some layouts, which
    cancels when |mean| >> std (float32 at mean 1000, std 1: relative error ~1e-4 and worse).
    """
    view = _WorkerView(x, per)
    k, c = view.k, view.c
    xs, shift = view.data, None
    if x.dtype != torch.float64:
        with torch.no_grad():
            shift = xs.mean(dim=view.dims)  # (k, C)
        xs = xs - view.stat(shift)
    if view.channels_last:   # columns (k, C) of a (per * S, k * C) matrix
        xt = xs.permute(1, 2, 0, 3).reshape(-1, k * c)
    else:                    # channels (k, C) of a (per, k * C, S) batch
        xt = xs.transpose(0, 1).reshape(per, k * c, -1)
    mean = torch.zeros(k * c, dtype=x.dtype, device=x.device)
    var = torch.ones(k * c, dtype=x.dtype, device=x.device)
    w = None if weight is None else weight.repeat(k)
    b = None if bias is None else bias.repeat(k)
    y = F.batch_norm(xt, mean, var, w, b, True, 1.0, eps)
    if view.channels_last:
        y = y.view(per, -1, k, c).permute(2, 0, 1, 3)
    else:
        y = y.view(per, k, c, -1).transpose(0, 1)
    mean = mean.view(k, c)
    if shift is not None:
        mean = mean + shift
    return view.back(y), mean, var.view(k, c)


def batch_norm(input, running_mean=None, running_var=None, weight=None, bias=None, training=True,
               momentum=0.1, eps=1e-5, *, images_per_worker=None, running_stats="worker0"):
    """Batch Normalization, S_i = {k | k_C = i_C} (eq. 3), optionally per worker.

    With ``images_per_worker=n`` the batch is split into N / n consecutive chunks of n samples, each
    normalized with its own mean and variance, exactly as n images on each of N / n unsynchronized
    workers (the paper's "batch size per GPU").

    Batch statistics are used when ``training`` is True or a running buffer is None; otherwise
    y = weight * (x - running_mean) / sqrt(running_var + eps) + bias.

    Running statistics (updated in place when training and given), with mu_w and var_w (unbiased)
    worker w's batch statistics:
        running_stats="worker0" (default):
            running_mean <- (1 - momentum) * running_mean + momentum * mu_0
            running_var  <- (1 - momentum) * running_var  + momentum * var_0
        running_stats="average": mean_w(mu_w) and mean_w(var_w) instead of mu_0 and var_0.
    "worker0" is what unsynchronized data-parallel trainers keep: the paper's (Caffe2) copies the
    master GPU's statistics to the others, DDP broadcasts rank 0's buffers. "average" equals every
    worker keeping its own moving averages (the update is linear) and averaging them: W times less
    noisy eval statistics than the paper's.

    Args:
        input: (N, C, *spatial). running_mean, running_var, weight, bias: (C,) or None.
        momentum: in [0, 1]. eps: > 0. images_per_worker: None (one worker) or a divisor of N.
        running_stats: "worker0" or "average" (only matters with images_per_worker < N).
    """
    where = "batch_norm"
    use_batch_stats = training or running_mean is None or running_var is None
    _check_batch_args(input, running_mean, running_var, weight, bias, momentum, eps,
                      images_per_worker, use_batch_stats, where, running_stats)
    if not use_batch_stats:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    if input.shape[0] == 0:  # empty batch: empty output, running statistics untouched
        return F.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
    if input.dtype in (torch.float16, torch.bfloat16):
        # computed in float32 and rounded once: torch's reduced-precision CPU kernels are less exact
        up = [None if t is None else t.float() for t in (input, weight, bias)]
        y, mean, var = _bn_workers(up[0], images_per_worker or input.shape[0], up[1], up[2],
                                   float(eps))
        y = y.to(input.dtype)
    else:
        y, mean, var = _bn_workers(input, images_per_worker or input.shape[0], weight, bias,
                                   float(eps))
    if training:
        _update_running(running_mean, _from_workers(mean, running_stats), momentum)
        _update_running(running_var, _from_workers(var, running_stats), momentum)
    return y


def _from_workers(stat, running_stats):
    """The (C,) statistic that updates a running buffer, from the workers' (k, C) ones."""
    return stat[0] if running_stats == "worker0" else stat.mean(0)


def _update_running(buf, value, momentum):
    if buf is not None:
        with torch.no_grad():
            buf.mul_(1.0 - momentum).add_(value.to(buf.dtype), alpha=momentum)


# ---------------------------------------------------------------------------------------------
# Batch Renormalization (Ioffe, 2017)
# ---------------------------------------------------------------------------------------------

def batch_renorm(input, running_mean, running_var, weight=None, bias=None, training=True,
                 momentum=0.1, eps=1e-5, r_max=1.0, d_max=0.0, *, images_per_worker=None,
                 running_stats="worker0"):
    """Batch Renormalization (Ioffe, 2017), optionally per worker.

    Training, per worker chunk B with batch mean mu_B and biased variance var_B:
        sigma_B = sqrt(var_B + eps),  sigma = sqrt(running_var + eps),  mu = running_mean
        r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
        d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
        y = weight * ((x - mu_B) / sigma_B * r + d) + bias
    then (Ioffe's Algorithm 1) from worker 0's chunk (``running_stats="worker0"``, as for
    ``batch_norm``) or the average over the chunks (``"average"``):
        mu    <- mu + momentum * (mu_B - mu)
        sigma <- sigma + momentum * (sigma_B - sigma),  stored as running_var = sigma^2 - eps.
    With r_max = 1, d_max = 0 this is BN. Eval (``training=False``) is BN with the running statistics.
    """
    where = "batch_renorm"
    _check_batch_args(input, running_mean, running_var, weight, bias, momentum, eps,
                      images_per_worker, training, where, running_stats)
    if running_mean is None or running_var is None:
        raise ValueError(f"{where}: needs running_mean and running_var (the r, d corrections use them)")
    if not r_max >= 1.0 or not d_max >= 0.0:
        raise ValueError(f"{where}: needs r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
    if not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    if input.shape[0] == 0:
        return F.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
    acc = _acc_dtype(input.dtype)
    mu = running_mean.detach().to(acc)
    sigma = torch.sqrt(running_var.detach().to(acc) + eps)
    view = _WorkerView(input, images_per_worker or input.shape[0])
    xa = view.data.to(acc)
    var_b, mu_b = torch.var_mean(xa, dim=view.dims, correction=0)  # (k, C), two-pass
    sigma_b = torch.sqrt(var_b + eps)
    r = (sigma_b.detach() / sigma).clamp(1.0 / r_max, r_max)
    d = ((mu_b.detach() - mu) / sigma).clamp(-d_max, d_max)
    z = (xa - view.stat(mu_b)) * view.stat(r / sigma_b) + view.stat(d)
    if weight is not None:
        z = z * view.stat(weight.to(acc).expand(view.k, -1))
    if bias is not None:
        z = z + view.stat(bias.to(acc).expand(view.k, -1))
    with torch.no_grad():
        new_mu = mu + momentum * (_from_workers(mu_b, running_stats) - mu)
        new_sigma = sigma + momentum * (_from_workers(sigma_b.detach(), running_stats) - sigma)
        running_mean.copy_(new_mu.to(running_mean.dtype))
        running_var.copy_((new_sigma * new_sigma - eps).clamp_min(0.0).to(running_var.dtype))
    return view.back(z.to(input.dtype))


# ---------------------------------------------------------------------------------------------
# Synchronized Batch Norm (torch.distributed)
# ---------------------------------------------------------------------------------------------

def _channel_view(v, x):
    return v.view((1, -1) + (1,) * (x.dim() - 2))


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes of ``group``, differentiable: the gradient of a sum is the sum of the
    gradients, so the backward all-reduces too. Synchronous (no work left pending in the backend's
    threads), unlike the deprecated ``torch.distributed.nn.functional.all_reduce``."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad, ctx.group), None


def _all_reduce(t, group=None):
    return _AllReduceSum.apply(t, group)


def sync_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps, group):
    """BN whose statistics are over the union of the batches of all processes in ``group``.

    Differentiable: the two all-reduces (sums, then squared deviations: two-pass, no cancellation)
    go through ``_all_reduce``, whose backward all-reduces the gradients, so each process gets the
    gradient of the sum of all processes' losses, exactly as for BN over the whole batch. Ranks may
    hold different batch sizes (even 0).
    """
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xa = x.to(acc)
    channels = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    count = x.numel() // channels if channels else 0
    packed = torch.cat([xa.sum(dim=dims), xa.new_full((1,), float(count))])
    total = _all_reduce(packed, group=group)
    n_total = total[channels]
    if n_total.item() <= 1:
        raise ValueError(f"BatchNorm(sync=True): training needs more than 1 value per channel over "
                         f"all processes, got {int(n_total.item())}")
    mean = total[:channels] / n_total
    centred = xa - _channel_view(mean, xa)
    var = _all_reduce((centred * centred).sum(dim=dims), group=group) / n_total
    y = centred * _channel_view(torch.rsqrt(var + eps), xa)
    if weight is not None:
        y = y * _channel_view(weight.to(acc), xa)
    if bias is not None:
        y = y + _channel_view(bias.to(acc), xa)
    with torch.no_grad():
        unbiased = var * (n_total / (n_total - 1))
        for buf, value in ((running_mean, mean), (running_var, unbiased)):
            if buf is not None:
                buf.mul_(1.0 - momentum).add_(value.detach().to(buf.dtype), alpha=momentum)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Weight Standardization
# ---------------------------------------------------------------------------------------------

def weight_standardize(weight, eps=1e-5):
    """Weight Standardization (Qiao et al., 2019) of a (O, *rest) weight, per output filter o:

        W_hat[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)     (mean, biased var over *rest)

    Differentiable; used by ``groupnorm.nn.WSConv2d`` on every forward pass.
    """
    where = "weight_standardize"
    _checks.check_input(weight, where)
    _checks.check_eps(eps, where)
    flat = weight.reshape(weight.shape[0], -1)
    acc = _acc_dtype(weight.dtype)
    var, mean = torch.var_mean(flat.to(acc), dim=1, correction=0, keepdim=True)
    return ((flat.to(acc) - mean) * torch.rsqrt(var + eps)).to(weight.dtype).view_as(weight)
