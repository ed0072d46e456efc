"""The training loop: the paper's recipe over W workers of N images, resumable epoch by epoch.

Recipe (Sec. 4.1 of the paper): SGD, momentum 0.9, weight decay 1e-4 on every weight including gamma
and beta, lr = base_lr * N / 32 for N images per worker (linear scaling), lr x 0.1 at 30%, 60% and
90% of the epochs (optionally a linear warm-up first), He init and zero-init of each residual
block's last gamma (done by the models); the run's error is the median of the last 5 epochs'
validation errors.

One step, for either launcher (see ``distributed``): logits of the worker's images, cross entropy
averaged over them, backward, SGD step. Simulated workers hold all W*N images in one batch whose
BN layers normalize per chunk of N; under torchrun DDP averages the W workers' gradients -- the same
mean over W*N images.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from groupnorm.errors import RunDirError, TrainingError
from groupnorm.nn import NormSpec

from . import distributed as D
from . import rundir
from .checkpoint import (CheckpointError, atomic_write_text, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state)
from .config import Config, ConfigError, result_neutral_keys
from .data import load_data
from .probe import Probe
from .schedule import lr_at, milestones, reported_error

# Keys that may change between a run and its resumption: those marked same_results in Config.
RESUMABLE_CHANGES = result_neutral_keys()


# ---- the model --------------------------------------------------------------------------------------
def norm_spec(cfg: Config, ctx: D.Context) -> str:
    """The make_norm spec the model is built with: for BN/BRN, statistics per worker.

    simulated, not sync_bn: "bn@N" (chunks of N images in the W*N batch); torchrun: "bn" (each rank
    already holds N images) or "syncbn" with sync_bn; simulated with sync_bn: "bn" over the W*N batch.
    """
    spec = NormSpec.parse(cfg.norm)  # the factory's own parser: "bn @ 32" is bn@32 here as there
    if spec.kind not in ("bn", "brn", "syncbn"):
        return str(spec)
    at = spec.images_per_worker
    if at is not None and at != cfg.images_per_worker:
        raise ConfigError(f"norm={cfg.norm!r} asks for BN statistics over {at} images but images_per_worker="
                          f"{cfg.images_per_worker}; write norm={spec.kind} (the engine sets the per-worker "
                          f"size)")
    sync = cfg.sync_bn or spec.kind == "syncbn"
    kind = "bn" if spec.kind == "syncbn" else spec.kind
    if sync:
        if ctx.distributed:
            if kind == "brn":
                raise ConfigError("sync_bn is not supported for Batch Renorm (norm=brn) under torchrun")
            return "syncbn"
        return kind
    return kind if ctx.distributed else f"{kind}@{cfg.images_per_worker}"


def build(cfg: Config, num_classes: int, in_channels: int, ctx: D.Context) -> torch.nn.Module:
    from groupnorm.models import build_model
    from groupnorm.nn import BatchNorm
    try:
        model = build_model(cfg.model, num_classes=num_classes, in_channels=in_channels,
                            norm=norm_spec(cfg, ctx), ws=cfg.ws, zero_init_residual=cfg.zero_init_residual,
                            **cfg.model_args)
    except (ValueError, TypeError) as exc:  # what the models raise for arguments they cannot take
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"model={cfg.model!r} with norm={cfg.norm!r}, model_args={cfg.model_args!r}: "
                          f"{exc}") from exc
    for m in model.modules():   # which simulated workers' statistics the running ones follow
        if isinstance(m, BatchNorm):
            m.running_stats = cfg.bn_running_stats
    return model.to(ctx.device)


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.SGD:
    from groupnorm.models import param_groups
    return torch.optim.SGD(param_groups(model, cfg.weight_decay, cfg.norm_weight_decay), lr=cfg.lr,
                           momentum=cfg.momentum)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- epochs -----------------------------------------------------------------------------------------
def evaluate_model(model, data, ctx: D.Context, batch_size: int = 500) -> tuple[float, float]:
    """(mean cross-entropy loss, top-1 error in %) of ``model`` in eval mode over ``data``."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    with torch.no_grad():
        for x, y in data.eval_batches(batch_size, ctx.rank, ctx.world):
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            out = model(x)
            sums += torch.stack([F.cross_entropy(out, y, reduction="sum").double(),
                                 (out.argmax(1) != y).sum().double(),
                                 torch.tensor(float(len(y)), dtype=torch.float64, device=ctx.device)])
    D.all_reduce_sum(sums, ctx)
    model.train(was_training)
    loss, wrong, n = sums.tolist()
    return loss / max(n, 1), 100.0 * wrong / max(n, 1)


def train_epoch(cfg, ctx, model, optimizer, data, epoch, probe=None, bar=None) -> dict:
    """One epoch; returns its train loss and error over all workers' images, lr, seconds, images/s."""
    model.train()
    steps = data.steps(cfg.global_batch)
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    start = time.perf_counter()
    lr = lr_at(cfg, epoch, 0, steps)
    for step, (x, y) in enumerate(data.train_batches(epoch, cfg.seed, cfg.global_batch, ctx.rank, ctx.world,
                                                     cfg.augment)):
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        lr = lr_at(cfg, epoch, step, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if probe is not None and (epoch * steps + step) % cfg.probe_every == 0:
            probe.active, probe.where = True, {"epoch": epoch, "step": step, "iteration": epoch * steps + step}
        out = model(x)
        loss = F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        D.sync_buffers(model, ctx, cfg.bn_running_stats)
        with torch.no_grad():
            sums += torch.stack([loss.detach().double() * len(y), (out.argmax(1) != y).sum().double(),
                                 torch.tensor(float(len(y)), dtype=torch.float64, device=ctx.device)])
        if bar is not None:
            bar.update(cfg.global_batch)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4g}")
    D.all_reduce_sum(sums, ctx)
    seconds = time.perf_counter() - start
    loss_sum, wrong, n = sums.tolist()
    return {"train_loss": loss_sum / n, "train_error": 100.0 * wrong / n, "lr": lr, "seconds": seconds,
            "images_per_s": n / seconds}


# ---- run --------------------------------------------------------------------------------------------
def run(cfg: Config) -> dict:
    """Train ``cfg`` in ``cfg.out`` in this process (resuming when asked) and return its result (see
    result.json). Under torchrun this process is one rank; ``groupnorm.train.run`` (launch.run) is
    the entry that also starts the ranks itself."""
    if cfg.launcher == "torchrun" and not D.in_torchrun():
        raise ConfigError("launcher=torchrun, but this process was not started by torchrun: start it with "
                          "torchrun, or call groupnorm.train.run, which starts the workers' processes")
    if cfg.launcher == "simulated" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("this process was started by torchrun (WORLD_SIZE > 1) but launcher=simulated; "
                          "pass --launcher torchrun, or run simulated workers without torchrun")
    ctx = D.setup(cfg)
    try:
        from groupnorm import backends
        check_backend(cfg.backend, ctx.device)
        with rundir.claim(cfg, ctx), backends.use_backend(cfg.backend):
            return _run(cfg, ctx)
    finally:
        D.teardown(ctx)


def check_backend(name: str, device: torch.device) -> None:
    """ConfigError, before anything is trained, when backend ``name`` cannot run on ``device`` here
    (e.g. backend=triton without Triton); the registry's message says why and what to do."""
    from groupnorm import backends
    if name == "auto":  # always runs (falls back to "native"); asking now would only warn early
        return
    try:
        with backends.use_backend(name):
            backends.resolve(torch.empty(0, device=device))
    except backends.BackendUnavailable as exc:
        raise ConfigError(f"backend={name}: {exc}") from None


def _log(ctx, msg: str) -> None:
    if ctx.is_main:
        print(msg, file=sys.stderr, flush=True)


def _resume_state(cfg: Config, path: Path, ctx) -> dict | None:
    """The checkpoint to continue from, or None for a fresh run; errors instead of overwriting a run."""
    if not path.exists():
        rundir.check_fresh_start(path.parent)
        if cfg.resume:
            _log(ctx, f"resume: no checkpoint at {path}; starting a fresh run")
        return None
    if not cfg.resume:
        raise RunDirError(f"{path} exists: pass resume=True (--resume) to continue that run, overwrite=True "
                          f"(--overwrite) to replace it, or choose another out= directory")
    state = load_checkpoint(path, map_location=ctx.device)
    old = state["config"]
    diff = [k for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES and old.get(k, v) != v]
    if diff:
        raise ConfigError(f"cannot resume {path}: the config differs in "
                          + ", ".join(f"{k} ({old[k]!r} -> {getattr(cfg, k)!r})" for k in diff))
    return state


def _run(cfg: Config, ctx: D.Context) -> dict:
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    D.barrier(ctx)
    state = _resume_state(cfg, ckpt_path, ctx)
    seed_everything(cfg.seed)
    train, val = load_data(cfg, ctx.device if ctx.device.type == "cuda" else "cpu")
    model = build(cfg, train.num_classes, train.channels, ctx)
    optimizer = make_optimizer(cfg, model)
    history, start_epoch = [], 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, start_epoch = list(state["history"]), int(state["epoch"])
        set_rng_state(state["rng"])
        _log(ctx, f"resumed {ckpt_path} at epoch {start_epoch}/{cfg.epochs}")
    net = model
    if ctx.distributed:
        net = D.wrap_ddp(model, ctx)
    probe = Probe(model, cfg.probe) if cfg.probe and ctx.is_main else None
    if ctx.is_main:
        cfg.dump(out / "config.yaml")
        _rewrite_jsonl(out / "metrics.jsonl", history)
        if cfg.probe:
            _trim_probe(out / "probe.jsonl", start_epoch)
    writer = _tensorboard(cfg, out) if ctx.is_main else None
    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    for epoch in range(start_epoch, cfg.epochs):
        bar = None
        if show and ctx.is_main:
            from tqdm import tqdm
            bar = tqdm(total=train.steps(cfg.global_batch) * cfg.global_batch, unit="img", unit_scale=True,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr)
        record = {"epoch": epoch + 1}
        record.update(train_epoch(cfg, ctx, net, optimizer, train, epoch, probe, bar))
        if bar is not None:
            bar.close()
        _check_finite_loss(cfg, record)
        val_loss, record["val_error"] = evaluate_model(model, val, ctx, cfg.eval_batch_size)
        record["val_loss"] = val_loss
        history.append(record)
        if ctx.is_main:
            if probe is not None:
                _append_jsonl(out / "probe.jsonl", probe.records)
                probe.records = []
            save_checkpoint(ckpt_path, {"epoch": epoch + 1, "model": model.state_dict(),
                                        "optimizer": optimizer.state_dict(), "config": cfg.to_dict(),
                                        "history": history, "rng": rng_state()})
            _append_jsonl(out / "metrics.jsonl", [record])
            if writer is not None:
                for k, v in record.items():
                    if k != "epoch":
                        writer.add_scalar(k, v, epoch + 1)
                writer.flush()
            _log(ctx, f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}  "
                      f"train err {record['train_error']:.2f}%  val err {record['val_error']:.2f}%  "
                      f"lr {record['lr']:.4g}  {record['images_per_s']:.0f} img/s")
        D.barrier(ctx)
    if writer is not None:
        writer.close()
    result = summarize(cfg, history)
    if ctx.is_main:
        from .diagnostics import diagnose   # BN's eval-statistics diagnostics, with frozen weights
        result["diagnostics"] = diagnose(model, train, val, cfg, ctx.device)
        atomic_write_text(out / "result.json", result_json(result))
    return result


def _check_finite_loss(cfg: Config, record: dict) -> None:
    """Stop a diverged run before its epoch is saved (every rank sees the same all-reduced loss)."""
    if not math.isfinite(record["train_loss"]):
        raise TrainingError(
            f"training diverged: the loss is {record['train_loss']} in epoch {record['epoch']} (lr "
            f"{record['lr']:.4g}); that epoch was not saved. Lower base_lr (now {cfg.base_lr}) or add "
            f"warmup_epochs, and start over (overwrite=True) or resume from the last checkpoint")


def _finite(value):
    """``value`` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def result_json(result: dict) -> str:
    """result.json's text: standard JSON (a value that is not a finite number is written null)."""
    return json.dumps(_finite(result), indent=2, allow_nan=False) + "\n"


def summarize(cfg: Config, history: list[dict]) -> dict:
    last = history[-1] if history else {}
    return {"val_error": reported_error(history) if history else None,
            "val_error_last": last.get("val_error"), "train_error": last.get("train_error"),
            "train_loss": last.get("train_loss"), "epochs": len(history),
            "seconds": sum(h["seconds"] for h in history), "run_dir": str(cfg.out), "history": history,
            "config": cfg.to_dict()}


def _append_jsonl(path: Path, records: list[dict]) -> None:
    if records:
        with open(path, "a") as f:
            f.writelines(json.dumps(_finite(r), allow_nan=False) + "\n" for r in records)
            f.flush()


def _rewrite_jsonl(path: Path, records: list[dict]) -> None:
    """metrics.jsonl = the checkpoint's history (drops lines of an epoch that was not checkpointed)."""
    atomic_write_text(path, "".join(json.dumps(_finite(r), allow_nan=False) + "\n" for r in records))


def _trim_probe(path: Path, start_epoch: int) -> None:
    if path.exists():
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["epoch"] < start_epoch]
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def _tensorboard(cfg: Config, out: Path):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(out / "tensorboard"))
    except ImportError as exc:
        print(f"tensorboard=True but TensorBoard is not installed ({exc}); `pip install tensorboard` to "
              f"log there. Continuing without it.", file=sys.stderr)
        return None


# ---- evaluation of a finished (or running) run ------------------------------------------------------
def evaluate(run_dir, split: str = "val", device: str = "auto", batch_size: int | None = None) -> dict:
    """Load ``run_dir``'s config and checkpoint and measure the model on ``split`` ("val" or "train",
    no augmentation). Returns {"split", "error", "loss", "images", "epoch", "run_dir"}."""
    run_dir = Path(run_dir)
    if split not in ("val", "train"):
        raise ConfigError(f"split must be 'val' or 'train', got {split!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ConfigError(f"evaluation batch size must be >= 1, got {batch_size}")
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise RunDirError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = Config.load(cfg_path).override("launcher=simulated", f"device={device}", "resume=false",
                                         "overwrite=false")
    ctx = D.Context(0, 1, 0, 1, D.pick_device(device), False)
    state = load_checkpoint(run_dir / "checkpoint.pt", map_location=ctx.device)
    train, val = load_data(cfg, ctx.device if ctx.device.type == "cuda" else "cpu")
    model = build(cfg, train.num_classes, train.channels, ctx)
    model.load_state_dict(state["model"])
    from groupnorm import backends
    with backends.use_backend(cfg.backend):
        loss, error = evaluate_model(model, val if split == "val" else train, ctx,
                                     cfg.eval_batch_size if batch_size is None else batch_size)
    return {"split": split, "error": error, "loss": loss, "images": len(val if split == "val" else train),
            "epoch": int(state["epoch"]), "run_dir": str(run_dir)}


__all__ = ["run", "evaluate", "evaluate_model", "train_epoch", "lr_at", "milestones", "reported_error",
           "norm_spec", "check_backend", "result_json", "summarize", "CheckpointError"]
