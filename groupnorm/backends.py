"""Backend registry for Group Normalization: who computes ``group_norm``. The one owner of backend
names, their availability and the "auto" choice.

Backends (each a module with ``available()`` and ``group_norm(x, num_groups, weight, bias, eps,
activation, residual)``):

* ``"native"``: torch's own operators, exact in every layout (``groupnorm.kernels.native``).
* ``"cpu"``: the compiled C++ op (``groupnorm.kernels.cpu``): fused residual and activation, CPU
  tensors. Built by ``scripts/setup.sh`` (``python -m groupnorm.kernels.build``).
* ``"triton"``: the Triton kernels (``groupnorm.kernels.triton``): CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1``.
* ``"auto"`` (the default): "cpu" for CPU tensors and "triton" for CUDA tensors when they are
  available, else "native" (with one warning that names the cause and the fix).

The choice is process-wide with ``set_backend(name)``; ``use_backend(name)`` overrides it for the
current thread inside a ``with`` block. The environment variable ``GROUPNORM_BACKEND`` sets the
initial process-wide choice. A backend's module is imported on the first call that needs it, so
``import groupnorm`` never loads Triton or the extension.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings

BACKENDS = ("auto", "native", "cpu", "triton")

__all__ = ["BACKENDS", "BackendUnavailable", "set_backend", "get_backend", "use_backend",
           "available", "load", "resolve", "group_norm"]

_MODULES = {"native": "groupnorm.kernels.native", "cpu": "groupnorm.kernels.cpu",
            "triton": "groupnorm.kernels.triton"}
_FIX = {"cpu": "build it with `bash scripts/setup.sh` (or `python -m groupnorm.kernels.build`)",
        "triton": "install Triton (`pip install triton`, needs a CUDA GPU) or use backend 'native'"}


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why and what to do."""


class _ThreadChoice(threading.local):
    stack: tuple = ()   # the use_backend overrides of this thread, innermost last


_local = _ThreadChoice()
_global_choice = "auto"


def _validate(name) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return name.lower()


def set_backend(name: str) -> None:
    """Choose the Group Norm backend for the whole process: "auto", "native", "cpu" or "triton"."""
    global _global_choice
    _global_choice = _validate(name)


def get_backend() -> str:
    """The backend in effect for this thread (the innermost ``use_backend``, else ``set_backend``'s)."""
    stack = _local.stack
    return stack[-1] if stack else _global_choice


@contextlib.contextmanager
def use_backend(name: str):
    """Use backend ``name`` inside a ``with`` block on this thread; the previous choice comes back on exit."""
    name = _validate(name)
    saved = _local.stack
    _local.stack = saved + (name,)
    try:
        yield name
    finally:
        _local.stack = saved


if "GROUPNORM_BACKEND" in os.environ:
    set_backend(os.environ["GROUPNORM_BACKEND"])


# ---- availability --------------------------------------------------------------------------------
_loaded: dict = {}    # name -> module, for the backends that are usable
_reasons: dict = {}   # name -> why it is not
_warned: set = set()


def _constant_when_compiled(fn):
    """Mark fn the way ``torch.compiler.assume_constant_result`` does: Dynamo then calls it at trace
    time and keeps its result as a constant. Needed because the first Group Norm call of a process
    may come from inside a compiled function, and an import cannot be traced. Done by hand because
    the public decorator imports torch._dynamo (1.7 s, Triton with it) when groupnorm is imported;
    tests/test_backends.py checks that a first call under torch.compile(fullgraph=True) works."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_when_compiled
def available(name: str) -> str | None:
    """None when backend ``name`` can run in this process, else the reason (one line, with the fix).
    The import is tried once."""
    name = _validate(name)
    if name == "auto" or name in _loaded:
        return None
    if name not in _reasons:
        try:
            module = importlib.import_module(_MODULES[name])
            reason = module.available()
        except ImportError as exc:   # the kernel library itself is missing (Triton not installed)
            reason = f"{type(exc).__name__}: {exc}"
        if reason is None:
            _loaded[name] = module
            return None
        _reasons[name] = f"{reason}; {_FIX[name]}" if name in _FIX else reason
    return _reasons[name]


def load(name: str):
    """The module of backend ``name``; ``BackendUnavailable`` with the reason when it cannot run."""
    # available() first: under torch.compile it runs at trace time and fills _loaded, which the
    # traced code must not have read before
    reason = available(name)
    if reason is not None:
        raise BackendUnavailable(f"groupnorm backend {name!r} is unavailable: {reason}")
    return _loaded[name]


def _triton_devices() -> tuple:
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


_AUTO_PREFERS = {"cpu": "cpu", "cuda": "triton"}
_auto_modules: dict = {}   # device type -> the module "auto" settled on


@_constant_when_compiled
def _auto(device_type: str) -> str:
    """The backend "auto" uses for tensors on ``device_type`` (loaded); warns once on a fallback."""
    preferred = _AUTO_PREFERS.get(device_type)
    if preferred is not None:
        reason = available(preferred)
        if reason is None:
            return preferred
        if preferred not in _warned:
            _warned.add(preferred)
            warnings.warn(f"groupnorm: backend 'auto' uses 'native' (torch's ops) for {device_type} "
                          f"tensors because {preferred!r} is unavailable: {reason}", RuntimeWarning,
                          stacklevel=5)
    available("native")
    return "native"


def resolve(x):
    """The backend module that ``group_norm`` uses for x under the backend in effect."""
    stack = _local.stack
    name = stack[-1] if stack else _global_choice
    if name == "auto":
        device_type = "cpu" if x.is_cpu else x.device.type
        module = _auto_modules.get(device_type)
        if module is None:
            module = _auto_modules[device_type] = _loaded[_auto(device_type)]
        return module
    module = load(name)
    if name == "cpu" and x.device.type != "cpu":
        raise BackendUnavailable(f"groupnorm backend 'cpu' needs CPU tensors, got a tensor on {x.device}")
    if name == "triton" and x.device.type not in _triton_devices():
        raise BackendUnavailable(f"groupnorm backend 'triton' needs CUDA tensors (CPU ones only under "
                                 f"TRITON_INTERPRET=1), got a tensor on {x.device}")
    return module


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, residual=None):
    """Dispatch act(GN(x) * weight + bias + residual) to the backend in effect (arguments already
    validated by ``groupnorm.functional.group_norm``)."""
    return resolve(x).group_norm(x, num_groups, weight, bias, eps, activation, residual)
