"""Batch Norm for any rank (per worker or synchronized) and Batch Renorm, as modules."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _checks
from .. import functional as GF

__all__ = ["BatchNorm", "BatchRenorm"]


class BatchNorm(_BatchNorm):
    r"""Batch Normalization for inputs (N, C, *spatial) of any rank >= 2, per worker or synchronized.

    .. math:: y = \gamma \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta

    with mean and biased variance per channel over the batch and spatial positions (training), or the
    running statistics (eval). State dict and buffers are those of ``torch.nn.BatchNorm2d``
    (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``).

    Args:
        num_channels: C.
        eps, momentum, affine, track_running_stats, bias: as in ``torch.nn.BatchNorm2d`` (momentum
            None: cumulative average).
        images_per_worker: split each training batch into consecutive chunks of this many samples,
            each normalized with its own statistics, as on unsynchronized workers (the paper's
            "batch size per GPU").
        running_stats: which chunks update the running statistics (``functional.batch_norm``):
            "worker0" (the first chunk's, as the paper's trainer and DDP keep the master's) or
            "average" (the average over the chunks). An attribute, so a trainer may set it on a
            built model.
        sync: in training, compute the statistics over all processes of ``process_group`` (default:
            the world) through torch.distributed. Without an initialized process group of more than
            one process it is ordinary BN. On CUDA it reuses ``torch.nn.SyncBatchNorm``'s function.
        process_group: the group to synchronize over when ``sync``.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True, images_per_worker: int | None = None, sync: bool = False,
                 process_group=None, running_stats: str = "worker0"):
        where = type(self).__name__
        _checks.check_num_channels(num_channels, where)
        _checks.check_eps(eps, where)
        _checks.check_momentum(momentum, where, allow_none=True)
        _checks.check_images_per_worker(images_per_worker, None, where)
        if running_stats not in GF.RUNNING_STATS:
            raise ValueError(f"{where}: running_stats must be one of {', '.join(GF.RUNNING_STATS)}, "
                             f"got {running_stats!r}")
        if sync and images_per_worker is not None:
            raise ValueError(f"{where}: sync=True synchronizes all workers, so images_per_worker must "
                             f"be None, got {images_per_worker}")
        extra = {} if bias else {"bias": False}  # only when asked: older torch lacks the argument
        super().__init__(num_channels, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype, **extra)
        self.images_per_worker = images_per_worker
        self.running_stats = running_stats
        self.sync = sync
        self.process_group = process_group
        # rank of the last input, so that to_torch_native picks nn.BatchNorm1d/2d/3d (not a buffer)
        self.input_rank: int | None = None

    @property
    def num_channels(self) -> int:
        return self.num_features

    def _check_input_dim(self, input):
        where = type(self).__name__
        _checks.check_input(input, where)
        _checks.check_channels(input, self.num_features, where)
        self.input_rank = input.dim()

    def _average_factor(self) -> float:
        """Momentum of this step; counts the step (torch's rule, including momentum=None)."""
        if not (self.training and self.track_running_stats):
            return 0.0 if self.momentum is None else self.momentum
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _sync_group(self):
        """(group, world_size) when this forward must synchronize, else None."""
        if not (self.sync and self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        world_size = dist.get_world_size(group)
        return (group, world_size) if world_size > 1 else None

    def _buffers_for_step(self):
        """Running buffers to pass: updated in training only when tracked; used in eval when present."""
        if self.training and not self.track_running_stats:
            return None, None
        return self.running_mean, self.running_var

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = self._average_factor()
        running_mean, running_var = self._buffers_for_step()
        synced = self._sync_group()
        if synced is not None:
            group, world_size = synced
            if input.is_cuda:  # torch's fused implementation serves here
                from torch.nn.modules._functions import SyncBatchNorm as _TorchSyncBN
                return _TorchSyncBN.apply(input, self.weight, self.bias, running_mean, running_var,
                                          self.eps, factor, group, world_size)
            return GF.sync_batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                      factor, self.eps, group)
        return GF.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                             self.training, factor, self.eps,
                             images_per_worker=self.images_per_worker if self.training else None,
                             running_stats=self.running_stats)

    def extra_repr(self) -> str:
        text = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")
        if self.images_per_worker is not None:
            text += f", images_per_worker={self.images_per_worker}, running_stats={self.running_stats}"
        if self.sync:
            text += ", sync=True"
        return text


class BatchRenorm(BatchNorm):
    r"""Batch Renormalization (Ioffe, 2017): BN corrected towards the running statistics.

    Training, with batch (or per-worker chunk) mean mu_B and sigma_B = sqrt(Var_B + eps), and the
    running mu and sigma = sqrt(running_var + eps):

    .. math::
        r = \mathrm{sg}\big(\mathrm{clip}_{[1/r_{max}, r_{max}]}(\sigma_B / \sigma)\big), \quad
        d = \mathrm{sg}\big(\mathrm{clip}_{[-d_{max}, d_{max}]}((\mu_B - \mu) / \sigma)\big), \quad
        y = \gamma \Big(\frac{x - \mu_B}{\sigma_B} r + d\Big) + \beta

    (sg: stop-gradient). Eval uses the running statistics, like BN. The limits start as plain BN
    (r_max = 1, d_max = 0) for ``hold_iters`` training steps, then are relaxed linearly to the given
    ``r_max`` and ``d_max`` over ``warmup_iters`` steps, as in Ioffe's paper; the step count is the
    ``num_batches_tracked`` buffer, so it is saved with the state dict. The GN paper compares BR at
    4 images per worker with r_max = 1.5 and d_max = 0.5 (the defaults).

    Args (all but num_channels keyword-only, so that neither BN's nor BR's argument order can be
    mistaken for the other):
        num_channels, eps, momentum, affine, bias: as for BatchNorm (momentum must be a number).
        r_max (>= 1), d_max (>= 0): final clipping limits.
        warmup_iters: steps of the linear relaxation (0: final limits at once).
        hold_iters: plain-BN steps before the relaxation starts.
        images_per_worker, running_stats: per-worker statistics, as for BatchNorm.
    """

    def __init__(self, num_channels: int, *, r_max: float = 1.5, d_max: float = 0.5,
                 warmup_iters: int = 5000, hold_iters: int = 0,
                 images_per_worker: int | None = None, running_stats: str = "worker0",
                 eps: float = 1e-5, momentum: float = 0.1, affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        where = type(self).__name__
        _checks.check_momentum(momentum, where)
        if not r_max >= 1.0 or not d_max >= 0.0:
            raise ValueError(f"{where}: needs r_max >= 1 and d_max >= 0, got r_max={r_max}, "
                             f"d_max={d_max}")
        if warmup_iters < 0 or hold_iters < 0:
            raise ValueError(f"{where}: warmup_iters and hold_iters must be >= 0, got "
                             f"{warmup_iters}, {hold_iters}")
        super().__init__(num_channels, eps, momentum, affine, True, device=device, dtype=dtype,
                         bias=bias, images_per_worker=images_per_worker,
                         running_stats=running_stats)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_iters = int(warmup_iters)
        self.hold_iters = int(hold_iters)

    def current_limits(self) -> tuple[float, float]:
        """(r_max, d_max) in effect at the current step (num_batches_tracked steps done)."""
        step = int(self.num_batches_tracked) - self.hold_iters
        if step < 0:
            return 1.0, 0.0
        t = 1.0 if self.warmup_iters == 0 else min(step / self.warmup_iters, 1.0)
        return 1.0 + (self.r_max - 1.0) * t, self.d_max * t

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training:
            return GF.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                 self.bias, False, 0.0, self.eps)
        r_max, d_max = self.current_limits()
        self.num_batches_tracked.add_(1)
        return GF.batch_renorm(input, self.running_mean, self.running_var, self.weight, self.bias,
                               True, self.momentum, self.eps, r_max, d_max,
                               images_per_worker=self.images_per_worker,
                               running_stats=self.running_stats)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup_iters={self.warmup_iters}, hold_iters={self.hold_iters}")
