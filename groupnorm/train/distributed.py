"""Where the W workers run: one process ("simulated") or W processes with DDP ("torchrun").

simulated  every step takes the whole global batch of W*N images in one process; the model's BN
           layers compute statistics per chunk of N images (``bn@N``), and the loss is the mean over
           all W*N images -- which is exactly the gradient DistributedDataParallel averages.
torchrun   W processes (started by ``torchrun --nproc_per_node W`` or, when ``run`` is called outside
           torchrun, by ``launch.spawn`` with torch.multiprocessing); rank r takes images
           [r*N, (r+1)*N) of the same global batch; gloo on CPU, NCCL on GPU; BN uses each rank's own
           images (unsynchronized, as in the paper) unless sync_bn.

Running BN statistics (``Config.bn_running_stats``), the same in both launchers:
  worker0  (default, the paper's) worker / rank 0's: the simulated BN updates them from its first
           chunk; under torchrun ``broadcast_buffers`` copies rank 0's floating-point buffers to the
           others after every step -- what DDP's default buffer broadcast does before each forward,
           and what the paper's Caffe2 trainer does by copying the master GPU's statistics.
  average  the average over the workers of what each one's BN would keep (the simulated BN
           averages its chunks' statistics; ``average_buffers`` all-reduces under torchrun).
DDP's own broadcast is turned off (``wrap_ddp``) so that one rule serves both choices; doing it after
the step rather than before the next forward also leaves every rank with rank 0's buffers for the
evaluation. Batch Renorm, which reads the running statistics during training, sees the same values
in both launchers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass
class Context:
    """This process's place among the workers."""
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device
    distributed: bool
    owns_group: bool = False  # setup() created the process group, so teardown() destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def in_torchrun() -> bool:
    """True inside a process started by torchrun (or ``launch.spawn``): the rendezvous variables are set."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available; use device=cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device name (auto, cpu, cuda or cuda:K)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def setup(cfg) -> Context:
    """Set threads, pick the device, and join the process group under torchrun."""
    if cfg.launcher != "torchrun":
        ctx = Context(0, 1, 0, 1, pick_device(cfg.device), False)
    else:
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if world != cfg.workers:
            raise ConfigError(f"torchrun started {world} processes but workers={cfg.workers}; "
                             f"use --nproc_per_node {cfg.workers} (times the number of nodes)")
        device = pick_device(cfg.device, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        ctx = Context(rank, world, local_rank, local_world, device, True, owns)
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // ctx.local_world))
    return ctx


def teardown(ctx: Context) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.barrier()   # no rank tears its connections down while another still talks to it
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Sum of ``values`` over the ranks (returned, also in place); identity in one process."""
    if ctx.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def average_buffers(module: torch.nn.Module, ctx: Context) -> None:
    """Replace every floating-point buffer (BN running mean/var) by its average over the ranks.

    Batch Renorm keeps sigma = sqrt(running_var + eps) as its moving average (Ioffe's Algorithm 1), so
    for it sigma is averaged, which is what its simulated workers do."""
    if not ctx.distributed:
        return
    from groupnorm.nn import BatchRenorm
    renorm_vars = {id(m.running_var): m.eps for m in module.modules()
                   if isinstance(m, BatchRenorm) and m.running_var is not None}
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    parts = []
    for b in bufs:
        v = b.detach().reshape(-1).double()
        parts.append((v + renorm_vars[id(b)]).sqrt() if id(b) in renorm_vars else v)
    flat = torch.cat(parts)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world
    offset = 0
    for b in bufs:
        v = flat[offset:offset + b.numel()]
        if id(b) in renorm_vars:
            v = v * v - renorm_vars[id(b)]
        b.copy_(v.view_as(b))
        offset += b.numel()


def broadcast_buffers(module: torch.nn.Module, ctx: Context) -> None:
    """Copy rank 0's floating-point buffers (BN running mean/var) to every rank."""
    if not ctx.distributed:
        return
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.detach().reshape(-1) for b in bufs])
    dist.broadcast(flat, src=0)
    offset = 0
    for b in bufs:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def sync_buffers(module: torch.nn.Module, ctx: Context, running_stats: str) -> None:
    """After a step, make every rank's BN buffers the run's: rank 0's ("worker0") or their average
    ("average"). Nothing to do in one process (the simulated BN chose already)."""
    if running_stats == "worker0":
        broadcast_buffers(module, ctx)
    else:
        average_buffers(module, ctx)


def wrap_ddp(model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    """DistributedDataParallel without the per-forward broadcast of rank 0's buffers (``sync_buffers``
    does it, or averages them, after each step instead)."""
    import inspect
    from torch.nn.parallel import DistributedDataParallel as DDP
    # torch >= 2.14 names the switch forward_sync_buffers; older versions broadcast_buffers.
    key = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
           else "broadcast_buffers")
    return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, **{key: False})

