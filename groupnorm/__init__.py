"""Group Normalization (Wu & He, ECCV 2018): exact layers, fast kernels, models and the paper's studies.

    import groupnorm
    layer = groupnorm.nn.GroupNorm(32, 256)          # drop-in for torch.nn.GroupNorm
    y = groupnorm.functional.group_norm(x, 32)
    with groupnorm.use_backend("native"): ...         # choose who computes GN

Importing the package is cheap: submodules (``functional``, ``nn``, ``reference``, ...) load on first
use, and the kernels (the C++ op, Triton) only when a backend needs them.
"""

from __future__ import annotations

import importlib

from .backends import get_backend, set_backend, use_backend

try:
    from importlib.metadata import PackageNotFoundError, version as _version
    __version__ = _version("groupnorm")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

__all__ = ["set_backend", "get_backend", "use_backend", "functional", "nn", "reference",
           "__version__"]

_LAZY_SUBMODULES = {"functional", "nn", "reference"}


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _LAZY_SUBMODULES)
