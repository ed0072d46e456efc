"""Checkpoints that survive a crash: written atomically, read strictly.

``save_checkpoint`` writes to a temporary file in the same folder, fsyncs it, then ``os.replace``s
it over the old checkpoint and fsyncs the folder: at every instant ``checkpoint.pt`` is either the
previous complete checkpoint or the new complete one, so a run killed with SIGKILL loses at most the
epoch it was in. ``load_checkpoint`` never returns something half-read: a truncated or corrupt file
raises ``CheckpointError`` naming the file (a run never silently restarts from scratch).

The RNG helpers capture torch (CPU and CUDA), NumPy and Python ``random`` states in a form that
``torch.load(weights_only=True)`` accepts (tensors, lists, ints).
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "groupnorm-checkpoint/1"
REQUIRED = ("format", "epoch", "model", "optimizer", "config", "history")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (truncated, corrupt, or not ours)."""


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, then rename it to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomically write ``state`` (a dict with at least REQUIRED's keys but "format") to ``path``."""
    state = {"format": FORMAT, **state}
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by ``save_checkpoint``; CheckpointError when it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            f"delete it (or the run directory) to start the run over, or restore it from a copy") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a groupnorm training checkpoint (expected format {FORMAT!r})")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; it is incomplete")
    return state


def rng_state() -> dict:
    """The states of every random generator a run uses."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
