"""Training: the paper's recipe over W workers of N images, on one CPU or many GPUs.

    from groupnorm.train import Config, run, evaluate
    cfg = Config(dataset="fashion-mnist", model="resnet20", norm="gn", workers=8, images_per_worker=32,
                 epochs=10, seed=0, out="runs/x")
    result = run(cfg)            # dict: val_error (median of the last 5 epochs), train_error, history, ...
    evaluate("runs/x")           # the checkpoint's error on the validation set

Modules: config (the Config dataclass), data (datasets and batches), engine (the loop), distributed
(simulated workers and torchrun/DDP), checkpoint (atomic checkpoints and RNG states).
"""
from .checkpoint import CheckpointError
from .config import Config, ConfigError
from .data import DatasetNotFoundError
from .engine import evaluate, run

__all__ = ["Config", "ConfigError", "run", "evaluate", "CheckpointError", "DatasetNotFoundError"]
