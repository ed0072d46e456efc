"""Checkpoints that survive a crash: written atomically, read strictly.

``save_checkpoint`` writes to a temporary file in the same folder, fsyncs it, then ``os.replace``s
it over the old checkpoint and fsyncs the folder: at every instant ``checkpoint.pt`` is either the
previous complete checkpoint or the new complete one, so a run killed with SIGKILL loses at most the
epoch it was in (the temporary file it may leave, ``.checkpoint.pt.*.tmp``, is removed by the next
training in that directory: ``rundir.remove_leftovers``). ``load_checkpoint`` never returns something
half-read or altered: the checkpoint holds a SHA-256 of its whole content (every tensor's bytes,
dtype and shape, and every other value), recomputed on load, so a truncated file, a flipped byte
in tensor data or a file that is not a checkpoint raises ``CheckpointError`` naming the file (a run
never silently restarts from scratch or continues from damaged weights). Loading keeps
``torch.load(weights_only=True)``: no code in a checkpoint file is ever run.

The RNG helpers capture torch (CPU and CUDA), NumPy and Python ``random`` states in a form that
``torch.load(weights_only=True)`` accepts (tensors, lists, ints).
"""
from __future__ import annotations

import hashlib
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from groupnorm.errors import CheckpointError

FORMAT = "groupnorm-checkpoint/2"          # /2: with "sha256"
UNCHECKED_FORMATS = ("groupnorm-checkpoint/1",)  # written before checksums; still loaded
REQUIRED = ("format", "epoch", "model", "optimizer", "config", "history")
CHECKSUM = "sha256"


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


def content_digest(value) -> str:
    """SHA-256 of a checkpoint's content: tensors by dtype, shape and bytes (wherever they live),
    containers element by element in order, other values by type and repr."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h, value) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        h.update(f"D{len(value)};".encode())
        for k, v in value.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)};".encode())
        for v in value:
            _feed(h, v)
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomically write ``state`` (a dict with at least REQUIRED's keys but "format") to ``path``,
    with the checksum of its content."""
    state = {"format": FORMAT, **state}
    state[CHECKSUM] = content_digest(state)
    atomic_write(path, lambda f: torch.save(state, f))


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is truncated or corrupt ({why}); delete it (or the run "
                           f"directory) to start the run over, or restore it from a copy")


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by ``save_checkpoint`` and verify its checksum; CheckpointError
    (naming the file) when it is missing or cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # whatever a damaged file makes the reader raise, the file is the problem
        lines = str(exc).strip().splitlines()
        raise _corrupt(path, f"{type(exc).__name__}: {lines[0][:200] if lines else 'no message'}") from exc
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, *UNCHECKED_FORMATS):
        raise CheckpointError(f"{path} is not a groupnorm training checkpoint (expected format {FORMAT!r})")
    if state["format"] == FORMAT:
        stored = state.pop(CHECKSUM, None)
        if stored is None:
            raise _corrupt(path, "its checksum is missing")
        if content_digest(state) != stored:
            raise _corrupt(path, "the checksum of its content does not match: the file was altered after "
                                 "it was written")
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
