"""VGG with batch norm (Simonyan & Zisserman, 2015), CIFAR variant used in CRD.

Five conv blocks of conv3x3(+bias) + BN + ReLU with widths 64, 128, 256, 512, 512
(``vgg8`` has one conv per block; 11/13/16/19 follow VGG configurations A, B, D, E),
2x2 max pools between blocks 0-1, 1-2 and 2-3, a 2x2 max pool between blocks 3 and 4
only when that feature map is at least 8x8 (i.e. inputs of 64x64 or more; at 32x32
block 4 runs at 4x4), then global average pooling and one ``Linear(512, classes)``.

Taps: ``stem`` = block 0 output, ``stage1``..``stage4`` = blocks 1..4 outputs, each after
its last ReLU; ``stageK_preact`` is the last BN output of the block.

Published CIFAR-100 parameter counts (CRD, Tian et al. 2020): vgg8 3.96M, vgg13 9.46M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.models.base import Builder, PreactBlock, Stage, ZooModel

#: convolutions per block for each depth
VGG_CONVS = {
    8: (1, 1, 1, 1, 1),
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
VGG_WIDTHS = (64, 128, 256, 512, 512)


class ConvBlock(PreactBlock):
    """``convs`` x (conv3x3 + BN + ReLU); preact is the last BN output."""

    def __init__(self, in_ch: int, out_ch: int, convs: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(convs):
            if i:
                layers.append(nn.ReLU(inplace=True))
            layers += [nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch)]
        self.layers = nn.Sequential(*layers)

    def forward_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        preact = self.layers(x)
        return F.relu(preact), preact


class MaxPoolIfLarge(nn.Module):
    """2x2 max pool applied only when the feature map is at least ``min_size`` pixels high."""

    def __init__(self, min_size: int = 8) -> None:
        super().__init__()
        self.min_size = min_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2) if x.shape[-2] >= self.min_size else x


class VGG(ZooModel):
    """CIFAR VGG-depth with BN (see the module docstring)."""

    def __init__(self, arch: str, depth: int, num_classes: int = 100, in_chans: int = 3) -> None:
        convs = VGG_CONVS[depth]
        stem = ConvBlock(in_chans, VGG_WIDTHS[0], convs[0])
        stages = []
        for k in range(1, 5):
            pool = nn.MaxPool2d(2) if k < 4 else MaxPoolIfLarge(8)
            stages.append(Stage(pool, ConvBlock(VGG_WIDTHS[k - 1], VGG_WIDTHS[k], convs[k])))
        super().__init__(arch, num_classes, in_chans, stem, stages, VGG_WIDTHS[-1])


def vgg_builders() -> dict[str, Builder]:
    """Zoo name -> ``builder(num_classes, in_chans)`` for the VGGs of the zoo."""
    return {f"vgg{depth}": _make(f"vgg{depth}", depth) for depth in VGG_CONVS}


def _make(arch: str, depth: int):
    return lambda num_classes, in_chans: VGG(arch, depth, num_classes, in_chans)
