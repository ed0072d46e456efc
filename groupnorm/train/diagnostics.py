"""Evaluation diagnostics after training: where a BN model's small-batch loss comes from.

BN's error at a few images per worker mixes two things (cf. EvalNorm, Singh & Shrivastava 2019, and
"Rethinking 'Batch' in BatchNorm", Wu & Johnson 2021): the eval-time statistics differ from the
batch statistics the weights were trained with (a train/test mismatch), and training with noisy
statistics gives worse weights (a training deficit). With the weights frozen, ``diagnose`` measures

    train_error        top-1 error (%) on training images in eval mode (every run, any norm)
    val_error_running  validation error with BN's running statistics as trained (the model as it is)
    val_error_precise  ... with population statistics recomputed on training images ("precise BN")
    train_error_precise  training images in eval mode with those population statistics
    val_error_batch    ... with each group of N test images normalized by its own statistics, as a
                       worker normalizes its N images in training (N: images per worker, or W*N with
                       sync_bn)

The BN keys are present only when the model has BatchNorm layers. All three validation errors are on
the same images: a fixed shuffle (``SEED_STREAM``) of the validation set cut to a multiple of N, so
that every test group has exactly N images (at most N - 1 of the 10k images are left out).

Population statistics: the training images (a fixed shuffle, at most ``PRECISE_IMAGES``) go through
the model in groups of N with every BN normalizing each group by its own statistics, exactly as in
training; for each BN layer the mean and unbiased variance of its input over all of them (positions
and images) become its running statistics. Batch Renorm layers keep their trained running statistics
during that pass (their training forward reads them).

Only for the in-memory datasets (Fashion-MNIST, CIFAR); ``diagnose`` returns {} for image folders.
"""
from __future__ import annotations

import copy
import time

import torch

from .data import TensorData, epoch_generator

PRECISE_IMAGES = 10_000   # training images for the population statistics and the train error
SEED_STREAM = 7           # generator stream of the diagnostics' shuffles (training uses stream 0)
BATCH_IMAGES = 512        # images per forward (rounded down to a multiple of N)


def _bn_layers(model: torch.nn.Module) -> list:
    from groupnorm.nn import BatchNorm
    return [m for m in model.modules() if isinstance(m, BatchNorm) and m.running_mean is not None]


def _batches(data: TensorData, seed: int, limit: int | None, group: int, size: int):
    """(x, y) batches of ``size`` images (a multiple of ``group``; the last one shorter) over a fixed
    shuffle of ``data``, cut to at most ``limit`` images and to a multiple of ``group``."""
    perm = torch.randperm(len(data), generator=epoch_generator(seed, 0, SEED_STREAM))
    count = min(len(data), limit or len(data))
    count -= count % group
    idx = perm[:count].to(data.labels.device)
    for start in range(0, count, size):
        part = idx[start:start + size]
        yield data.normalize(data.images[part]), data.labels[part]


def _error(model, batches, device) -> tuple[float, int]:
    wrong, n = 0, 0
    with torch.no_grad():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            wrong += int((model(x).argmax(1) != y).sum())
            n += len(y)
    return 100.0 * wrong / max(n, 1), n


def _per_group(model, bns, group: int) -> None:
    """Every BN layer normalizes each group of ``group`` images by its own statistics (training-mode
    forward) and leaves its running statistics alone; everything else stays in eval mode."""
    model.eval()
    for m in bns:
        m.train()
        m.momentum, m.sync, m.images_per_worker = 0.0, False, group


def _population_stats(model, bns, batches, device) -> int:
    """Set every BN layer's running mean/var to the mean and unbiased variance of its input over
    ``batches`` (a training-mode pass, see the module docstring). Returns the images used."""
    sums = {}

    def hook(module, inputs):
        x = inputs[0].detach().double()
        shift = module.running_mean.double().view(1, -1, *([1] * (x.dim() - 2)))
        d = (x - shift).transpose(0, 1).reshape(x.shape[1], -1)   # shifted by the trained mean
        s1, s2, n = sums.get(module, (0.0, 0.0, 0))
        sums[module] = (s1 + d.sum(1), s2 + (d * d).sum(1), n + d.shape[1])

    handles = [m.register_forward_pre_hook(hook) for m in bns]
    try:
        _, images = _error(model, batches, device)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for m in bns:
            s1, s2, n = sums[m]
            mean = s1 / n
            var = (s2 - s1 * mean) / max(n - 1, 1)
            m.running_mean.add_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.clamp_min(0).to(m.running_var.dtype))
    return images


def diagnose(model: torch.nn.Module, train, val, cfg, device) -> dict:
    """The diagnostics of a trained ``model`` (see the module docstring); ``model`` is not changed."""
    if not isinstance(train, TensorData) or not isinstance(val, TensorData):
        return {}
    start = time.perf_counter()
    model = copy.deepcopy(model).eval()
    group = cfg.global_batch if cfg.sync_bn else cfg.images_per_worker
    size = max(group, BATCH_IMAGES // group * group)
    out = {}
    out["train_error"], out["train_images"] = _error(
        model, _batches(train, cfg.seed, PRECISE_IMAGES, 1, BATCH_IMAGES), device)
    bns = _bn_layers(model)
    if bns:
        def val_batches():
            return _batches(val, cfg.seed, None, group, size)

        out["val_error_running"], out["val_images"] = _error(model, val_batches(), device)
        trained = copy.deepcopy(model)
        _per_group(trained, _bn_layers(trained), group)
        out["val_error_batch"], _ = _error(trained, val_batches(), device)
        out["precise_images"] = _population_stats(
            trained, _bn_layers(trained), _batches(train, cfg.seed, PRECISE_IMAGES, group, size), device)
        trained.eval()
        out["val_error_precise"], _ = _error(trained, val_batches(), device)
        out["train_error_precise"], _ = _error(
            trained, _batches(train, cfg.seed, PRECISE_IMAGES, 1, BATCH_IMAGES), device)
        out["group"] = group
    out["seconds"] = time.perf_counter() - start
    return out
