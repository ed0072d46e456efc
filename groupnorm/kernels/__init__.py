"""Group Normalization backends (the registry that chooses among them is ``groupnorm.backends``).

* ``groupnorm.kernels.native``: torch's own operators, exact at any mean.
* ``groupnorm.kernels.cpu``: the C++ CPU op (``groupnorm/csrc``), loaded from its build
  (``python -m groupnorm.kernels.build``).
* ``groupnorm.kernels.triton``: Triton kernels, GPU (CPU through ``TRITON_INTERPRET=1``).

Each exposes ``available()`` and ``group_norm(...)``; cpu and triton also ``forward(...)`` and
``backward(...)`` (docs/DESIGN.md). Nothing is imported here: the C++ op and Triton load only when
their module is imported.
"""
