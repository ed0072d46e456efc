"""ImageNet ResNets (He et al. 2016) in the "v1.5" layout used by the paper's Caffe2/Detectron code
and by torchvision: in a bottleneck block the stride sits on the 3x3 convolution, not the first 1x1.

Layout (input 224x224 -> output 7x7 before pooling):
    conv1 7x7/2 -> norm1 -> relu -> maxpool 3x3/2 -> layer1..layer4 -> avgpool -> fc
layer1..4 have 64, 128, 256, 512 base channels (x4 output for bottlenecks) and strides 1, 2, 2, 2.
A block whose input and output shapes differ has a projection shortcut ``downsample`` =
conv1x1(stride) -> norm. Module names follow torchvision except ``bn*`` -> ``norm*`` (the layer is
any normalization). With BN the parameter count of ResNet-50 is 25,557,032 (the published number);
GN, LN and IN have the same count (one gamma and one beta per channel).
"""
from __future__ import annotations

import torch
from torch import nn

from .init import init_weights
from .layers import ResidualBlock, act, conv, conv1x1, conv3x3, norm_add_relu, norm as norm_layer


class BasicBlock(ResidualBlock):
    """Two 3x3 convs: conv1(stride) -> norm1 -> relu1 -> conv2 -> norm2, + shortcut, -> relu.
    in: (N, in_channels, H, W) -> out: (N, channels, H / stride, W / stride).
    With a GN-family norm2 the add and the ReLU run inside it (``layers.norm_add_relu``)."""

    expansion = 1
    last_norm_name = "norm2"

    def __init__(self, in_channels: int, channels: int, stride: int = 1, *, norm="bn",
                 ws: bool = False, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride, ws=ws)
        self.norm1 = norm_layer(norm, channels)
        self.relu1 = act()
        self.conv2 = conv3x3(channels, channels, ws=ws)
        self.norm2 = norm_layer(norm, channels)
        self.downsample = downsample
        self.relu = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.relu1(self.norm1(self.conv1(x))))
        if not torch.jit.is_scripting():   # TorchScript cannot compile the helper: unfused there
            return norm_add_relu(self.norm2, out, shortcut, self.relu)
        return self.relu(self.norm2(out) + shortcut)


class Bottleneck(ResidualBlock):
    """1x1 reduce -> 3x3 (stride) -> 1x1 expand (x4), each followed by a norm, + shortcut, -> relu.
    in: (N, in_channels, H, W) -> out: (N, 4 * channels, H / stride, W / stride).
    With a GN-family norm3 the add and the ReLU run inside it (``layers.norm_add_relu``)."""

    expansion = 4
    last_norm_name = "norm3"

    def __init__(self, in_channels: int, channels: int, stride: int = 1, *, norm="bn",
                 ws: bool = False, downsample: nn.Module | None = None):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = conv1x1(in_channels, channels, ws=ws)
        self.norm1 = norm_layer(norm, channels)
        self.relu1 = act()
        self.conv2 = conv3x3(channels, channels, stride, ws=ws)  # v1.5: stride on the 3x3
        self.norm2 = norm_layer(norm, channels)
        self.relu2 = act()
        self.conv3 = conv1x1(channels, out_channels, ws=ws)
        self.norm3 = norm_layer(norm, out_channels)
        self.downsample = downsample
        self.relu = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.norm1(self.conv1(x)))
        out = self.conv3(self.relu2(self.norm2(self.conv2(out))))
        if not torch.jit.is_scripting():   # TorchScript cannot compile the helper: unfused there
            return norm_add_relu(self.norm3, out, shortcut, self.relu)
        return self.relu(self.norm3(out) + shortcut)


def projection(in_channels: int, out_channels: int, stride: int, *, norm, ws: bool) -> nn.Module:
    """The projection shortcut: conv1x1(stride) -> norm (option B of He et al.)."""
    return nn.Sequential(conv1x1(in_channels, out_channels, stride, ws=ws),
                         norm_layer(norm, out_channels))


class ResNet(nn.Module):
    """ImageNet ResNet. ``block`` is BasicBlock or Bottleneck, ``layers`` the number of blocks per
    stage, e.g. (3, 4, 6, 3) with Bottleneck for ResNet-50.

    norm: a ``make_norm`` spec for every normalization layer; ws: weight-standardized convs;
    zero_init_residual: gamma = 0 for the last norm of each block (see ``init.init_weights``).
    in: (N, in_channels, H, W), H and W >= 32 -> out: (N, num_classes) logits.
    """

    def __init__(self, block: type[ResidualBlock], layers, *, num_classes: int = 1000,
                 in_channels: int = 3, norm="bn", ws: bool = False, zero_init_residual: bool = True):
        super().__init__()
        self.conv1 = conv(in_channels, 64, 7, stride=2, ws=ws)
        self.norm1 = norm_layer(norm, 64)
        self.relu = act()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = 64
        for i, (blocks, width) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
            stage, channels = make_stage(block, channels, width, blocks, stride=1 if i == 1 else 2,
                                         norm=norm, ws=ws)
            self.add_module(f"layer{i}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self, zero_init_residual=zero_init_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.norm1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def make_stage(block: type[ResidualBlock], in_channels: int, channels: int, blocks: int, *,
               stride: int, norm, ws: bool) -> tuple[nn.Sequential, int]:
    """``blocks`` blocks; the first one strides and projects when the shape changes.
    Returns the stage and its output channels."""
    out_channels = channels * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = projection(in_channels, out_channels, stride, norm=norm, ws=ws)
    stage = [block(in_channels, channels, stride, norm=norm, ws=ws, downsample=downsample)]
    stage += [block(out_channels, channels, norm=norm, ws=ws) for _ in range(blocks - 1)]
    return nn.Sequential(*stage), out_channels


def resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


def resnet34(**kwargs) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


def resnet101(**kwargs) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), **kwargs)
