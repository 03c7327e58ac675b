"""MobileNetV2 (Sandler et al., 2018), the CIFAR half-width variant used in CRD.

Width multiplier 0.5 and expansion 6: a 3x3 stride-2 conv stem to 16 channels, seven
groups of inverted residual blocks with settings (t, c, n, s) = (1,16,1,1), (6,24,2,1),
(6,32,3,2), (6,64,4,2), (6,96,3,1), (6,160,3,2), (6,320,1,1) and channels c scaled by
0.5, a 1x1 conv to 1280 channels, global pooling and ``Linear(1280, classes)``.  As in
the CRD code every inverted residual block keeps its 1x1 expansion conv, even for t=1.

Taps: ``stem`` = stem output; ``stage1`` = after group 1 (12 ch), ``stage2`` = after
group 2, ``stage3`` = after group 4, ``stage4`` = after group 6 (groups counted from 0).
Blocks end in a linear (no ReLU) projection, so ``stageK_preact`` equals ``stageK`` and
:attr:`post_activation` is False.

Published CIFAR-100 parameter count (CRD, Tian et al. 2020): 0.81M.
"""

from __future__ import annotations

import torch
from torch import nn

from kdrun.models.base import Builder, Stage, ZooModel, conv_bn

#: (expansion t, channels c, repeats n, first stride s) of the seven block groups
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
#: the tapped stages as slices of the seven groups: groups 0-1, 2, 3-4, 5-6
STAGE_GROUPS = ((0, 2), (2, 3), (3, 5), (5, 7))


class InvertedResidual(nn.Module):
    """1x1 expand + ReLU, 3x3 depthwise + ReLU, 1x1 linear projection; residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.residual = stride == 1 and in_ch == out_ch
        self.body = nn.Sequential(
            conv_bn(in_ch, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, out_ch, 1, relu=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileNetV2(ZooModel):
    """CIFAR MobileNetV2 with width multiplier 0.5 (see the module docstring)."""

    post_activation = False

    def __init__(self, arch: str = "mobilenetv2", num_classes: int = 100, in_chans: int = 3,
                 width: float = 0.5, expansion: int = 6, last_channels: int = 1280) -> None:
        in_ch = int(32 * width)
        stem = conv_bn(in_chans, in_ch, 3, stride=2)
        groups = []
        for t, c, n, s in SETTINGS:
            out_ch = int(c * width)
            ratio = 1 if t == 1 else expansion  # the first group never expands
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, ratio))
                in_ch = out_ch
            groups.append(nn.Sequential(*blocks))
        stages = [Stage(*groups[a:b]) for a, b in STAGE_GROUPS]
        head = conv_bn(in_ch, last_channels, 1)
        super().__init__(arch, num_classes, in_chans, stem, stages, last_channels, head=head)


def mobilenetv2_builders() -> dict[str, Builder]:
    """Zoo name -> ``builder(num_classes, in_chans)``."""
    return {"mobilenetv2": lambda num_classes, in_chans: MobileNetV2("mobilenetv2", num_classes, in_chans)}
