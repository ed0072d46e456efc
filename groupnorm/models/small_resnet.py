"""Small-input ResNets for 28x28 and 32x32 images (the CIFAR family of He et al. 2016, Sec. 4.2).

Layout for depth 6n + 2 and width w (default 16):
    conv1 3x3 (w) -> norm1 -> relu -> layer1 (n blocks, w) -> layer2 (n, 2w, stride 2)
    -> layer3 (n, 4w, stride 2) -> avgpool -> fc
Basic blocks only. 32x32 -> 32, 16, 8; 28x28 -> 28, 14, 7. ``stem_stride`` shrinks the maps before
layer1 as the ImageNet ResNets' stem does: 2 makes conv1 stride 2 (28x28 -> 14, 7, 4), 4 adds a 3x3
stride-2 max pool after it (28x28 -> 7, 4, 2). Each halving quarters the compute, and the last
stages become as small, relative to the image, as an ImageNet ResNet's 7x7 stage 4, which is where
per-worker BN statistics of a few images are noisiest.

Shortcut when the shape changes: ``shortcut="pad"`` (the default, option A of the paper: subsample
and append zero channels, no parameters; ResNet-20 then has 269,722 parameters for 10 classes, the
published 0.27M) or ``shortcut="conv"`` (option B: conv1x1 -> norm, as in the ImageNet ResNets).

With the default 32 groups GN cannot split a 16-channel layer: ask for groups that divide the
widths, e.g. ``norm="gn:8"`` (8 groups) or ``norm="gn/4"`` (4 channels per group).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .init import init_weights
from .layers import act, conv3x3, norm as norm_layer
from .resnet import BasicBlock, projection


class PadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::stride, ::stride]`` with zero channels appended up to
    ``out_channels``. (N, C_in, H, W) -> (N, out_channels, ceil(H / s), ceil(W / s))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra}"


class SmallResNet(nn.Module):
    """CIFAR-style ResNet of ``depth`` = 6n + 2 layers and base ``width``.

    norm: ``make_norm`` spec; ws: weight-standardized convs; zero_init_residual: gamma = 0 for the
    last norm of every block; shortcut: "pad" (option A) or "conv" (option B); stem_stride: how
    much the stem shrinks the maps (1, 2 or 4).
    in: (N, in_channels, H, W), typically 28x28 or 32x32 -> out: (N, num_classes) logits.
    """

    def __init__(self, depth: int = 20, width: int = 16, *, num_classes: int = 10,
                 in_channels: int = 3, norm="bn", ws: bool = False, zero_init_residual: bool = True,
                 shortcut: str = "pad", stem_stride: int = 1):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"small ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 56, 110, ...), "
                             f"got depth={depth}")
        if shortcut not in ("pad", "conv"):
            raise ValueError(f"shortcut must be 'pad' or 'conv', got {shortcut!r}")
        if width < 1:
            raise ValueError(f"width must be positive, got width={width}")
        if stem_stride not in (1, 2, 4):
            raise ValueError(f"stem_stride must be 1, 2 or 4, got {stem_stride}")
        n = (depth - 2) // 6
        self.conv1 = conv3x3(in_channels, width, stride=min(stem_stride, 2), ws=ws)
        self.norm1 = norm_layer(norm, width)
        self.relu = act()
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem_stride == 4 else nn.Identity()
        channels = width
        for i, stride in enumerate((1, 2, 2), start=1):
            out_channels = width * 2 ** (i - 1)
            blocks = []
            for b in range(n):
                s = stride if b == 0 else 1
                downsample = None
                if s != 1 or channels != out_channels:
                    downsample = (PadShortcut(channels, out_channels, s) if shortcut == "pad" else
                                  projection(channels, out_channels, s, norm=norm, ws=ws))
                blocks.append(BasicBlock(channels, out_channels, s, norm=norm, ws=ws,
                                         downsample=downsample))
                channels = out_channels
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self, zero_init_residual=zero_init_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.norm1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def small_resnet(depth: int = 20, width: int = 16, **kwargs) -> SmallResNet:
    return SmallResNet(depth, width, **kwargs)


def resnet20(**kwargs) -> SmallResNet:
    return SmallResNet(20, **kwargs)


def resnet32(**kwargs) -> SmallResNet:
    return SmallResNet(32, **kwargs)


def resnet56(**kwargs) -> SmallResNet:
    return SmallResNet(56, **kwargs)
