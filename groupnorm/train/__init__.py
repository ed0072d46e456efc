"""Training: the paper's recipe over W workers of N images, on one CPU or many GPUs.

    from groupnorm.train import Config, run, evaluate
    cfg = Config(dataset="fashion-mnist", model="resnet20", norm="gn", workers=8, images_per_worker=32,
                 epochs=10, seed=0, out="runs/x")
    result = run(cfg)            # dict: val_error (median of the last 5 epochs), train_error, history, ...
    evaluate("runs/x")           # the checkpoint's error on the validation set

Modules, each importing only those after it: launch (``run``: in this process, or the W processes of
launcher=torchrun), engine (the loop, ``evaluate``), rundir (the run directory's lock and checks),
distributed (simulated workers and torchrun/DDP), probe, data (datasets and batches), checkpoint
(verified atomic checkpoints and RNG states), schedule, config (the Config dataclass).
Errors are ``groupnorm.errors`` classes (ConfigError, DataError, CheckpointError, RunDirError, ...).
"""
from groupnorm.errors import (CheckpointError, ConfigError, DataError, DatasetNotFoundError, RunDirError,
                              TrainingError)

from .config import Config
from .engine import evaluate
from .launch import run

__all__ = ["Config", "ConfigError", "run", "evaluate", "CheckpointError", "DataError", "DatasetNotFoundError",
           "RunDirError", "TrainingError"]
