"""Models with a pluggable normalization: ImageNet ResNets, small-input ResNets, VGG-16.

    model = build_model("resnet50", norm="gn")                     # GN, 32 groups
    model = build_model("resnet20", num_classes=10, norm="gn/4")   # 4 channels per group
    model = build_model("small_resnet", depth=14, width=32, in_channels=1, num_classes=10)
    model = build_model("vgg16", norm="none", small_input=True, num_classes=10)

Every model takes ``norm`` (a ``groupnorm.nn.make_norm`` spec: "bn", "bn@4", "brn@4", "gn", "gn:16",
"gn/16", "ln", "in", "none" or a NormSpec), ``ws`` (weight-standardized convs) and
``zero_init_residual``, and is initialized as in the paper (``init.init_weights``).
"""
from __future__ import annotations

from torch import nn

from .init import init_weights, is_norm, norm_types, param_groups
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet101
from .small_resnet import SmallResNet, resnet20, resnet32, resnet56, small_resnet
from .vgg import CONV5_3, VGG, vgg16

_MODELS = {
    "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet101": resnet101,
    "resnet20": resnet20, "resnet32": resnet32, "resnet56": resnet56, "small_resnet": small_resnet,
    "vgg16": vgg16,
}


def list_models() -> list[str]:
    """Names accepted by ``build_model``."""
    return sorted(_MODELS)


def build_model(name: str, *, num_classes: int = 1000, in_channels: int = 3, norm="bn",
                ws: bool = False, zero_init_residual: bool = True, **kwargs) -> nn.Module:
    """Build model ``name`` (see ``list_models``), initialized as in the paper.

    kwargs go to the model: ``depth``, ``width``, ``shortcut`` ("pad" | "conv") for "small_resnet"
    (``width``, ``shortcut`` also for resnet20/32/56); ``small_input``, ``dropout`` for "vgg16".
    """
    key = name.lower()
    if key not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    return _MODELS[key](num_classes=num_classes, in_channels=in_channels, norm=norm, ws=ws,
                        zero_init_residual=zero_init_residual, **kwargs)


__all__ = [
    "build_model", "list_models", "init_weights", "param_groups", "is_norm", "norm_types",
    "ResNet", "BasicBlock", "Bottleneck", "SmallResNet", "VGG", "CONV5_3",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet20", "resnet32", "resnet56",
    "small_resnet", "vgg16",
]
