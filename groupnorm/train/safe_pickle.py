"""Reading the CIFAR python pickles without letting them run code.

``pickle.load`` calls whatever function a file names, so a crafted file in ``data_dir`` could run any
command (``os.system``) the moment it is read. ``load`` reads with an unpickler whose ``find_class``
resolves only what the CIFAR format needs -- the containers and scalars (dict, list, tuple, bytes,
str, int, float, bool, None) are built by pickle's own opcodes and need no lookup -- plus:

  numpy arrays     ``numpy.core.multiarray._reconstruct`` (the name in the files from
                   cs.toronto.edu, numpy < 2) or ``numpy._core.multiarray._reconstruct`` (numpy >= 2),
                   with ``numpy.ndarray`` and ``numpy.dtype`` (protocols 2-4); protocol 5 rebuilds them
                   with ``numpy._core.numeric._frombuffer`` (``numpy.core.numeric`` before numpy 2);
  numpy scalars    ``numpy.core.multiarray.scalar`` / ``numpy._core.multiarray.scalar`` (e.g. a list of
                   np.int64 labels);
  bytes            ``_codecs.encode`` with the latin1 codec only: how Python 3 writes bytes at
                   protocol 2.

Each allowed name maps to a fixed object here: no module is imported by a name read from the file.
Everything else is refused with ``pickle.UnpicklingError`` naming the global.
"""
from __future__ import annotations

import io
import pickle

import numpy as np

_core = getattr(np, "_core", None) or np.core  # numpy >= 2 : numpy < 2


def _latin1(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of bytes use it (latin1), and only that."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r} (only latin1 "
                                     f"rebuilds bytes)")
    return text.encode("latin1", errors)


_ALLOWED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
}
for _module in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_module}.multiarray", "_reconstruct")] = _core.multiarray._reconstruct
    _ALLOWED[(f"{_module}.multiarray", "scalar")] = _core.multiarray.scalar
    _ALLOWED[(f"{_module}.numeric", "_frombuffer")] = _core.numeric._frombuffer


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused {module}.{name}: not a type of the CIFAR format "
                                         f"(dicts, lists, bytes, str, ints and numpy arrays)") from None


def load(data: bytes):
    """The object pickled in ``data`` (Python 2 strings read as bytes, as torchvision reads CIFAR).
    Raises pickle.UnpicklingError for a global outside the CIFAR format, and whatever a malformed
    pickle makes the reader raise."""
    return _Unpickler(io.BytesIO(data), encoding="bytes").load()
