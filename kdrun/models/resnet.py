"""CIFAR ResNets (He et al., 2016), as used in the CRD benchmark (Tian et al., 2020).

* ``resnet{8,14,20,32,44,56,110}``: basic-block ResNet of depth 6n+2 -- 3x3 conv stem
  (16 ch) + BN + ReLU, then three stages of n basic blocks with widths 16, 32, 64 and
  strides 1, 2, 2.  Shortcuts are identity, or 1x1 conv + BN where the shape changes.
* ``resnet8x4`` / ``resnet32x4``: the same with 4x wider stages (stem 32, stages
  64, 128, 256).
* ``resnet50``: the CIFAR bottleneck ResNet-50 -- 3x3 stride-1 stem with 64 ch and no
  max pool, bottleneck stages [3, 4, 6, 3] with 64, 128, 256, 512 planes, expansion 4,
  strides 1, 2, 2, 2.

Taps: ``stem`` (after the stem ReLU), ``stage1``..``stage3`` (``stage4`` for resnet50),
each the output of the stage's last block after its ReLU; ``stageK_preact`` is the
residual sum before that ReLU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.models.base import Builder, PreactBlock, Stage, ZooModel, conv_bn


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """Identity when the shape is kept, else a 1x1 conv + BN projection."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return conv_bn(in_ch, out_ch, kernel=1, stride=stride, relu=False)


class BasicBlock(PreactBlock):
    """Two 3x3 conv+BN layers with a residual connection, ReLU after the sum."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_ch, out_ch, 3, stride)
        self.conv2 = conv_bn(out_ch, out_ch, 3, 1, relu=False)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        preact = self.conv2(self.conv1(x)) + self.shortcut(x)
        return F.relu(preact), preact


class Bottleneck(PreactBlock):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4; ReLU after the sum."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.reduce = conv_bn(in_ch, planes, 1)
        self.conv = conv_bn(planes, planes, 3, stride)
        self.expand = conv_bn(planes, out_ch, 1, relu=False)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        preact = self.expand(self.conv(self.reduce(x))) + self.shortcut(x)
        return F.relu(preact), preact


class CifarResNet(ZooModel):
    """Basic-block CIFAR ResNet of depth 6n+2.

    Published CIFAR-100 parameter counts (CRD, Tian et al. 2020): resnet8 0.08M,
    resnet14 0.17M, resnet20 0.28M, resnet32 0.47M, resnet44 0.67M, resnet56 0.86M,
    resnet110 1.74M, resnet8x4 1.23M, resnet32x4 7.43M.
    """

    def __init__(self, arch: str, depth: int, widths: tuple[int, int, int, int],
                 num_classes: int = 100, in_chans: int = 3) -> None:
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        stem_width, *stage_widths = widths
        stages = []
        in_ch = stem_width
        for width, stride in zip(stage_widths, (1, 2, 2)):
            blocks = [BasicBlock(in_ch if i == 0 else width, width, stride if i == 0 else 1) for i in range(n)]
            stages.append(Stage(*blocks))
            in_ch = width
        super().__init__(arch, num_classes, in_chans, conv_bn(in_chans, stem_width, 3), stages, in_ch)


class CifarResNet50(ZooModel):
    """Bottleneck ResNet-50 for 32x32 inputs (3x3 stride-1 stem, no max pool).

    Published CIFAR-100 parameter count (CRD, Tian et al. 2020): 23.71M.
    """

    def __init__(self, arch: str = "resnet50", num_classes: int = 100, in_chans: int = 3,
                 layers: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        stages = []
        in_ch = 64
        for i, (num_blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(num_blocks):
                blocks.append(Bottleneck(in_ch, planes, stride if j == 0 else 1))
                in_ch = planes * Bottleneck.expansion
            stages.append(Stage(*blocks))
        super().__init__(arch, num_classes, in_chans, conv_bn(in_chans, 64, 3), stages, in_ch)


def resnet_builders() -> dict[str, Builder]:
    """Zoo name -> ``builder(num_classes, in_chans)`` for the ResNets of this module."""
    builders = {}
    for depth in (8, 14, 20, 32, 44, 56, 110):
        builders[f"resnet{depth}"] = _basic(f"resnet{depth}", depth, (16, 16, 32, 64))
    builders["resnet8x4"] = _basic("resnet8x4", 8, (32, 64, 128, 256))
    builders["resnet32x4"] = _basic("resnet32x4", 32, (32, 64, 128, 256))
    builders["resnet50"] = lambda num_classes, in_chans: CifarResNet50("resnet50", num_classes, in_chans)
    return builders


def _basic(arch: str, depth: int, widths: tuple[int, int, int, int]):
    return lambda num_classes, in_chans: CifarResNet(arch, depth, widths, num_classes, in_chans)
