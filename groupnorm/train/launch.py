"""Starting a training: ``run`` trains in this process, or starts the W torchrun-style processes.

This is the top of the training package: it imports the engine, and nothing in the package imports
it back (``groupnorm.train.run`` is this ``run``), so the imports run one way:
launch -> engine -> distributed, rundir, checkpoint, data, config.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from groupnorm.errors import GroupnormError, TrainingError

from . import distributed as D
from . import engine
from .config import Config

_USER_ERROR_EXIT = 3  # a spawned rank stopped on a GroupnormError (its message is on its stderr)


def run(cfg: Config) -> dict:
    """Train ``cfg`` in ``cfg.out`` (resuming when asked) and return its result (see result.json).

    launcher=torchrun outside torchrun: ``spawn`` starts the W processes here and the result is read
    back from result.json; otherwise the engine trains in this process (inside torchrun: as one rank).
    """
    if cfg.launcher == "torchrun" and not D.in_torchrun():
        spawn(cfg)
        return json.loads((Path(cfg.out) / "result.json").read_text())
    return engine.run(cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, values: dict, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    try:
        engine.run(Config(**values))
    except GroupnormError as exc:  # a message, not a traceback, as from the command line
        print(f"rank {rank}: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(_USER_ERROR_EXIT) from None


def spawn(cfg: Config, start_method: str = "spawn") -> None:
    """Run ``cfg`` under DDP in ``cfg.workers`` local processes (what torchrun would start).

    start_method "spawn" (fresh interpreters; required with CUDA) or "fork" (CPU only: starts in
    milliseconds instead of re-importing torch in every process). A rank that stops on a
    GroupnormError (a busy run directory, a bad setting) raises TrainingError here."""
    import torch.multiprocessing as mp
    try:
        mp.start_processes(_spawned, args=(cfg.to_dict(), cfg.workers, free_port()), nprocs=cfg.workers,
                           join=True, start_method=start_method)
    except mp.ProcessExitedException as exc:
        if exc.exit_code != _USER_ERROR_EXIT:
            raise
        raise TrainingError(f"the training in {cfg.out} stopped on rank {exc.error_index}; its message is "
                            f"above") from None
