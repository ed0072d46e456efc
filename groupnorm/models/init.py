"""The paper's initialization and its weight-decay parameter groups.

Initialization (Sec. 4.1 and the recipe in paper_results.json):
  * conv weights: He (MSRA) normal, fan_out mode, gain for ReLU: w ~ N(0, 2 / (k*k*C_out)); biases 0;
  * linear layers: w ~ N(0, 0.01^2), bias 0 (the Goyal et al. / Detectron recipe the paper follows,
    not torch's default uniform init);
  * every normalization layer: gamma = 1, beta = 0, except gamma = 0 for the last normalization of
    each residual block when ``zero_init_residual`` is on, so that each block starts as the identity
    on its main path (output = relu(shortcut(x))).

Weight decay: the paper decays gamma and beta like every other weight (1e-4); the detection
fine-tuning recipe does not decay them. ``param_groups`` makes the two one argument apart.
"""
from __future__ import annotations

import sys

from torch import nn

import groupnorm.nn as gnn

from .layers import ResidualBlock


def norm_types() -> tuple[type, ...]:
    """Every normalization module type we know: torch's (BatchNorm*/SyncBatchNorm/InstanceNorm*
    through their common base, GroupNorm, LayerNorm, RMSNorm, LocalResponseNorm), ours (groupnorm.nn)
    and torchvision's FrozenBatchNorm2d when torchvision is already imported (a model can only hold
    one if it is)."""
    types = [nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm]
    if hasattr(nn, "RMSNorm"):
        types.append(nn.RMSNorm)
    types += [getattr(gnn, name) for name in
              ("GroupNorm", "LayerNorm", "InstanceNorm", "BatchNorm", "BatchRenorm") if hasattr(gnn, name)]
    misc = sys.modules.get("torchvision.ops.misc")
    if misc is not None and hasattr(misc, "FrozenBatchNorm2d"):
        types.append(misc.FrozenBatchNorm2d)
    return tuple(types)


def is_norm(module: nn.Module) -> bool:
    """True for a normalization layer (of any kind listed by ``norm_types``)."""
    return isinstance(module, norm_types())


def init_weights(model: nn.Module, *, zero_init_residual: bool = True) -> nn.Module:
    """Initialize ``model`` in place as the paper does (see the module docstring); returns it."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif is_norm(m):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, ResidualBlock):
                last = m.last_norm()
                if getattr(last, "weight", None) is not None:  # "none" norm: nothing to zero
                    nn.init.zeros_(last.weight)
    return model


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float | None = None
                 ) -> list[dict]:
    """Optimizer parameter groups: ``[{"name": "weights", "params": [...], "weight_decay": wd},
    {"name": "norm", "params": [...], "weight_decay": norm_wd}]`` (empty groups are left out).

    A parameter belongs to "norm" when the module that owns it is a normalization layer (by type,
    see ``norm_types``): gamma and beta of BN, GN, LN, IN, ... Conv and linear weights *and biases*
    go to "weights". ``norm_weight_decay=None`` decays norm parameters by ``weight_decay`` (the
    paper's ImageNet recipe); ``0.0`` gives the detection recipe. Frozen parameters
    (requires_grad=False) are left out; a parameter shared by several modules is listed once.
    """
    if norm_weight_decay is None:
        norm_weight_decay = weight_decay
    seen: set[int] = set()
    weights, norms = [], []
    for module in model.modules():
        target = norms if is_norm(module) else weights
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                target.append(p)
    groups = [{"name": "weights", "params": weights, "weight_decay": float(weight_decay)},
              {"name": "norm", "params": norms, "weight_decay": float(norm_weight_decay)}]
    return [g for g in groups if g["params"]]
