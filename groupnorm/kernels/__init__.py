"""Fused Group Normalization kernels.

* ``groupnorm.kernels.cpu``: the C++ CPU op (``groupnorm/csrc``), loaded from its build
  (``python -m groupnorm.kernels.build``).
* ``groupnorm.kernels.triton``: Triton, GPU (CPU through ``TRITON_INTERPRET=1``).
* ``groupnorm.kernels.op``: the ``torch.library`` custom op that dispatches to them, with autograd.

Both kernel modules expose the same ``forward(...)`` / ``backward(...)`` (docs/DESIGN.md, "Kernel
contract"). Nothing is imported here: the C++ op and Triton load only when a module above is imported.
"""
