"""The paper's learning-rate schedule and its reported metric.

lr = base_lr * N / 32 for N images per worker (the linear scaling rule the paper uses for every N),
multiplied by lr_decay (0.1) at 30%, 60% and 90% of the epochs, optionally after a linear warm-up;
the run's error is the median of the last 5 epochs' validation errors.
"""
from __future__ import annotations

import math
import statistics

from .config import Config


def milestones(cfg: Config) -> list[int]:
    """Epochs at which the lr is multiplied by lr_decay: round(fraction * epochs), e.g. 30, 60, 90 of 100."""
    return [int(math.floor(f * cfg.epochs + 0.5)) for f in cfg.lr_steps]


def lr_at(cfg: Config, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """Learning rate of iteration ``step`` of epoch ``epoch`` (both 0-based).

    base_lr * N / 32, times lr_decay for every milestone reached, times the warm-up factor
    (iteration i of the first warmup_epochs * steps_per_epoch ones gets (i + 1) / their number)."""
    lr = cfg.lr * cfg.lr_decay ** sum(epoch >= m for m in milestones(cfg))
    warm = cfg.warmup_epochs * steps_per_epoch
    i = epoch * steps_per_epoch + step
    if i < warm:
        lr *= (i + 1) / warm
    return lr


def reported_error(history: list[dict], last: int = 5) -> float:
    """The paper's metric: the median of the final ``last`` epochs' validation errors."""
    return float(statistics.median(h["val_error"] for h in history[-last:]))
