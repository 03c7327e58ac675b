"""Wide residual networks (Zagoruyko & Komodakis, 2016), CIFAR variant used in CRD.

WRN-d-k: a 3x3 conv stem with 16 channels, three stages of n = (d-4)/6 pre-activation
basic blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3) with widths 16k, 32k, 64k and strides
1, 2, 2, then a final BN + ReLU before global pooling.  A 1x1 conv shortcut (no BN) is
used where the width or stride changes; it reads the pre-activated input.

Taps (a documented choice): ``stem`` is the raw first-conv output; ``stageK`` is the
raw residual sum at the end of stage K (there is no ReLU at a stage boundary in a
pre-activation net), including ``stage3``, which is taken *before* the final BN+ReLU.
``stageK_preact`` is therefore the same tensor as ``stageK`` for every stage, and
:attr:`post_activation` is False.

Published CIFAR-100 parameter counts (CRD, Tian et al. 2020): wrn_16_1 0.18M,
wrn_16_2 0.70M, wrn_40_1 0.57M, wrn_40_2 2.26M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.models.base import Builder, PreactBlock, Stage, ZooModel


class PreActBlock(PreactBlock):
    """Pre-activation basic block; output is the raw residual sum (no final ReLU)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        identity = x if self.shortcut is None else self.shortcut(act)
        out = out + identity
        return out, out


class WideResNet(ZooModel):
    """WRN-depth-k for CIFAR-sized inputs (see the module docstring)."""

    post_activation = False

    def __init__(self, arch: str, depth: int, widen: int, num_classes: int = 100, in_chans: int = 3) -> None:
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        stem = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        stages = []
        in_ch = 16
        for width, stride in zip((16 * widen, 32 * widen, 64 * widen), (1, 2, 2)):
            blocks = [PreActBlock(in_ch if i == 0 else width, width, stride if i == 0 else 1) for i in range(n)]
            stages.append(Stage(*blocks))
            in_ch = width
        head = nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU())
        super().__init__(arch, num_classes, in_chans, stem, stages, in_ch, head=head)


def wrn_builders() -> dict[str, Builder]:
    """Zoo name -> ``builder(num_classes, in_chans)`` for the WRNs of the zoo."""
    builders = {}
    for depth, widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
        arch = f"wrn_{depth}_{widen}"
        builders[arch] = _make(arch, depth, widen)
    return builders


def _make(arch: str, depth: int, widen: int):
    return lambda num_classes, in_chans: WideResNet(arch, depth, widen, num_classes, in_chans)
