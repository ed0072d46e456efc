"""The run directory belongs to one training at a time, and never silently to another run.

``claim`` is what a training does first, on rank 0, before writing anything in ``out``:

1. lock: ``flock`` on ``out/.lock`` for the training's life. A second training into the same
   directory is refused with a message naming the holder's pid (two runs would interleave
   metrics.jsonl and leave whichever checkpoint and result came last). The OS drops the lock when
   its process dies, however it dies, so a killed training never blocks the directory; the lock
   file itself is left in place and means nothing without a holder.
2. leftovers: the temporary files of an atomic write interrupted by a kill
   (``.checkpoint.pt.XXXX.tmp``, ...) are deleted -- safe now that no one else writes here.
3. overwrite=True: the earlier run's files are deleted before anything new is written, so that a
   fresh run killed early cannot leave an old checkpoint behind to be resumed as its own.

``check_fresh_start`` refuses to start a fresh run (no checkpoint to resume) in a directory that
already holds a run's epochs or result, unless overwrite=True: a finished run whose checkpoint was
deleted would otherwise be replaced without a word, even by another configuration.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

from groupnorm.errors import GroupnormError, RunDirError

from . import distributed as D

LOCK_NAME = ".lock"
# What a training writes in its directory (atomic writes go through ".NAME.XXXX.tmp" files).
OUTPUTS = ("checkpoint.pt", "result.json", "metrics.jsonl", "probe.jsonl", "config.yaml")


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``out/.lock``, held until ``release`` (or the process
    ends). Use as ``with RunLock(out): ...``. Without fcntl (not POSIX) it locks nothing."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self._file = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:
            return self
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held by another open file, in this process or another
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise RunDirError(f"another training (pid {holder}) is using {self.out}: wait for it to "
                              f"finish, or choose another out= directory") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the last descriptor of the open file drops the flock
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_leftovers(out: Path) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes of our outputs; returns them."""
    removed = []
    for path in out.glob(".*.tmp"):
        if any(path.name.startswith(f".{name}.") for name in OUTPUTS) and path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def remove_outputs(out: Path) -> None:
    """Delete an earlier run's files (overwrite=True)."""
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "tensorboard", ignore_errors=True)


def _has_lines(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def check_fresh_start(out: Path) -> None:
    """Refuse a fresh start (no checkpoint) over a run that got somewhere: RunDirError naming what
    is there. A directory whose run died in its first epoch (config.yaml, empty metrics) is fine."""
    if (out / "result.json").exists():
        what = "a finished run (result.json)"
    elif _has_lines(out / "metrics.jsonl"):
        what = "epochs of a run (metrics.jsonl)"
    else:
        return
    raise RunDirError(f"{out} holds {what} but no checkpoint.pt to continue it from; pass "
                      f"overwrite=True (--overwrite) to replace that run, or choose another out= directory")


@contextlib.contextmanager
def claim(cfg, ctx: D.Context):
    """Hold ``cfg.out`` for the training inside the ``with`` block (see the module docstring).
    Rank 0 does the work; every rank raises if it failed, so no rank waits for the others forever."""
    out = Path(cfg.out)
    lock, error = None, None
    if ctx.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = RunLock(out).acquire()
            remove_leftovers(out)
            if cfg.overwrite:
                remove_outputs(out)
        except (GroupnormError, OSError) as exc:
            error = exc
    failed = D.all_reduce_sum(torch.tensor([float(error is not None)], device=ctx.device), ctx)
    if error is not None:
        raise error
    if failed.item():
        raise RunDirError(f"rank 0 could not take the run directory {out}; see its message")
    try:
        yield out
    finally:
        if lock is not None:
            lock.release()
