import os

import torch

# The Triton kernels run on the CPU through the interpreter where there is no GPU (as in CI).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
