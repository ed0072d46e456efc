"""VGG-16 (Simonyan & Zisserman 2015, configuration D) with an optional norm after every conv.

The paper's Figure 6 trains VGG-16 with no normalization, BN and GN and probes the output of conv5_3
*before* normalization and ReLU. Every layer of ``features`` therefore has a stable name:

    features.conv{s}_{i}   the i-th 3x3 conv of stage s (s = 1..5), e.g. ``features.conv5_3``
    features.norm{s}_{i}   its normalization (absent when norm="none")
    features.relu{s}_{i}   its ReLU (not in place, so a hook's reference to the conv output stays valid)
    features.pool{s}       2x2 max pool closing stage s

A forward hook on ``model.get_submodule(CONV5_3)`` sees exactly the paper's probe.

ImageNet layout: features (5 pools, 224 -> 7) -> avgpool to 7x7 -> classifier
Linear(25088, 4096) -> ReLU -> Dropout -> Linear(4096, 4096) -> ReLU -> Dropout -> Linear(4096, classes).
With norm="none" this has 138,357,544 parameters (the published count). Convs keep their bias with
every norm (as torchvision's vgg16_bn does), so a norm only adds its gamma and beta.

``small_input=True`` (28x28 and 32x32 images): pool5 is dropped (a fifth 2x2 pool would take 28 px
to 0), the features are averaged globally and one Linear(512, classes) classifies.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .init import init_weights
from .layers import act, conv3x3, is_identity, norm as norm_layer

VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
CONV5_3 = "features.conv5_3"  # module path of the paper's Figure 6 probe


class VGG(nn.Module):
    """VGG with ``stages`` (channels of each conv, per stage). in: (N, in_channels, H, W) ->
    out: (N, num_classes). ImageNet layout needs H, W >= 32; small_input needs H, W >= 16."""

    def __init__(self, stages=VGG16_STAGES, *, num_classes: int = 1000, in_channels: int = 3,
                 norm="bn", ws: bool = False, small_input: bool = False, dropout: float = 0.5,
                 zero_init_residual: bool = True):
        super().__init__()
        del zero_init_residual  # accepted so every model takes the same arguments; VGG has no residual blocks
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_channels
        for s, widths in enumerate(stages, start=1):
            for i, width in enumerate(widths, start=1):
                layers[f"conv{s}_{i}"] = conv3x3(channels, width, ws=ws, bias=True)
                n = norm_layer(norm, width)
                if not is_identity(n):
                    layers[f"norm{s}_{i}"] = n
                layers[f"relu{s}_{i}"] = act()
                channels = width
            if not (small_input and s == len(stages)):
                layers[f"pool{s}"] = nn.MaxPool2d(kernel_size=2, stride=2)
        self.features = nn.Sequential(layers)
        if small_input:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(channels, num_classes)
        else:
            self.avgpool = nn.AdaptiveAvgPool2d(7)
            self.classifier = nn.Sequential(
                nn.Linear(channels * 7 * 7, 4096), nn.ReLU(), nn.Dropout(dropout),
                nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(dropout),
                nn.Linear(4096, num_classes))
        init_weights(self, zero_init_residual=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg16(width: int = 64, **kwargs) -> VGG:
    """VGG-16. ``width``: channels of stage 1 (the published 64); every stage scales with it, e.g.
    width=16 gives 16, 32, 64, 128, 128 channels (1/16 of the compute, for CPU studies)."""
    if width < 1:
        raise ValueError(f"width must be positive, got width={width}")
    stages = tuple(tuple(c * width // 64 or 1 for c in stage) for stage in VGG16_STAGES)
    return VGG(stages, **kwargs)
