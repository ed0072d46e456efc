"""The features probe of the paper's Figure 6: percentiles of one layer's output during training.

The paper plots the {1, 20, 80, 99} percentiles of VGG-16's conv5_3 output (before normalization and
ReLU) over training. ``Probe`` hooks any module (by its ``named_modules`` path) and records them on
the iterations the engine marks ``active``. With simulated workers the percentiles are over the whole
step's W*N images; under torchrun over rank 0's N images.
"""
from __future__ import annotations

import difflib

import torch

from .config import ConfigError

PERCENTILES = (1, 20, 80, 99)


def percentiles(t: torch.Tensor, qs=PERCENTILES) -> list[float]:
    """The qs-th percentiles of all values of ``t`` (linear interpolation, as numpy.percentile)."""
    v = t.detach().flatten().float().sort().values
    pos = torch.tensor(qs, dtype=torch.float64) / 100 * (v.numel() - 1)
    lo, hi = pos.floor().long(), pos.ceil().long()
    w = (pos - lo).to(v.device, v.dtype)
    return ((1 - w) * v[lo.to(v.device)] + w * v[hi.to(v.device)]).tolist()


class Probe:
    """Records percentiles of one module's output on the iterations where ``active`` is set."""

    def __init__(self, model: torch.nn.Module, path: str):
        names = dict(model.named_modules())
        if path not in names:
            close = difflib.get_close_matches(path, list(names), n=3)
            raise ConfigError(f"probe={path!r} is not a module of the model"
                              + (f" (close: {', '.join(close)})" if close else ""))
        self.active, self.records, self.where = False, [], {}
        self.handle = names[path].register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.active:
            self.records.append({**self.where, **{f"p{q}": v for q, v in zip(PERCENTILES, percentiles(output))}})
            self.active = False
