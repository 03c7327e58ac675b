"""ShuffleNet V1 (Zhang et al., 2018) and V2 (Ma et al., 2018), CIFAR variants used in CRD.

Both start with a 1x1 conv stem to 24 channels (stride 1, no max pool) and have three
stages that each halve the resolution.

* ``shufflenetv1``: groups 3, stage widths 240, 480, 960 with 4, 8, 4 bottleneck units.
  A unit is grouped 1x1 conv -> channel shuffle -> 3x3 depthwise -> grouped 1x1 conv at
  a quarter of the output width (the first unit's first 1x1 is ungrouped, since its
  24-channel input is too narrow).  Stride-2 units concatenate a 3x3 average-pooled
  shortcut, the others add an identity shortcut; ReLU follows the merge.
* ``shufflenetv2`` (net size 1x): stage widths 116, 232, 464, each stage a stride-2
  down-sampling unit followed by 3, 7, 3 basic units (channel split, one branch
  1x1 -> 3x3 depthwise -> 1x1, concat, shuffle), then a 1x1 conv to 1024 channels.

Taps: ``stem``, ``stage1``..``stage3`` (stage outputs, post-ReLU; for V2 ``stage3`` is
before the 1x1 conv to 1024).  ``stageK_preact`` is the merged output before the final
ReLU (V1) or the shuffled concat with the branch taken before its last ReLU (V2).

Published CIFAR-100 parameter counts (CRD, Tian et al. 2020): shufflenetv1 0.95M,
shufflenetv2 1.36M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.models.base import Builder, PreactBlock, Stage, ZooModel, channel_shuffle, conv_bn


class ShuffleV1Unit(PreactBlock):
    """ShuffleNet V1 bottleneck unit; stride 2 concatenates an avg-pooled shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int, first_groups: int) -> None:
        super().__init__()
        self.stride = stride
        branch_ch = out_ch - in_ch if stride == 2 else out_ch
        mid = branch_ch // 4
        self.shuffle_groups = first_groups
        self.reduce = conv_bn(in_ch, mid, 1, groups=first_groups)
        self.depthwise = conv_bn(mid, mid, 3, stride, groups=mid)
        self.expand = conv_bn(mid, branch_ch, 1, groups=groups, relu=False)

    def forward_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = channel_shuffle(self.reduce(x), self.shuffle_groups)
        out = self.expand(self.depthwise(out))
        if self.stride == 2:
            preact = torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
        else:
            preact = out + x
        return F.relu(preact), preact


class ShuffleNetV1(ZooModel):
    """CIFAR ShuffleNet V1, g=3 (see the module docstring)."""

    def __init__(self, arch: str = "shufflenetv1", num_classes: int = 100, in_chans: int = 3,
                 widths: tuple[int, ...] = (240, 480, 960), depths: tuple[int, ...] = (4, 8, 4),
                 groups: int = 3) -> None:
        in_ch = 24
        stem = conv_bn(in_chans, in_ch, 1)
        stages = []
        for k, (width, depth) in enumerate(zip(widths, depths)):
            units = []
            for i in range(depth):
                first_groups = 1 if (k == 0 and i == 0) else groups
                units.append(ShuffleV1Unit(in_ch, width, 2 if i == 0 else 1, groups, first_groups))
                in_ch = width
            stages.append(Stage(*units))
        super().__init__(arch, num_classes, in_chans, stem, stages, in_ch)


class ShuffleV2Down(nn.Module):
    """ShuffleNet V2 stride-2 unit: two branches, each producing half the output channels."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        half = out_ch // 2
        self.left = nn.Sequential(
            conv_bn(in_ch, in_ch, 3, 2, groups=in_ch, relu=False),
            conv_bn(in_ch, half, 1),
        )
        self.right = nn.Sequential(
            conv_bn(in_ch, half, 1),
            conv_bn(half, half, 3, 2, groups=half, relu=False),
            conv_bn(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleV2Basic(PreactBlock):
    """ShuffleNet V2 stride-1 unit: split channels, transform one half, concat, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            conv_bn(half, half, 1),
            conv_bn(half, half, 3, groups=half, relu=False),
            conv_bn(half, half, 1, relu=False),
        )

    def forward_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep, transform = x.chunk(2, dim=1)
        branch = self.branch(transform)
        out = channel_shuffle(torch.cat([keep, F.relu(branch)], 1), 2)
        # ``keep`` is itself post-ReLU, so relu(preact) == out
        preact = channel_shuffle(torch.cat([keep, branch], 1), 2)
        return out, preact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, transform = x.chunk(2, dim=1)
        branch = F.relu(self.branch(transform))
        return channel_shuffle(torch.cat([keep, branch], 1), 2)


class ShuffleNetV2(ZooModel):
    """CIFAR ShuffleNet V2 1x (see the module docstring)."""

    def __init__(self, arch: str = "shufflenetv2", num_classes: int = 100, in_chans: int = 3,
                 widths: tuple[int, ...] = (116, 232, 464), depths: tuple[int, ...] = (3, 7, 3),
                 last_channels: int = 1024) -> None:
        in_ch = 24
        stem = conv_bn(in_chans, in_ch, 1)
        stages = []
        for width, depth in zip(widths, depths):
            stages.append(Stage(ShuffleV2Down(in_ch, width), *[ShuffleV2Basic(width) for _ in range(depth)]))
            in_ch = width
        head = conv_bn(in_ch, last_channels, 1)
        super().__init__(arch, num_classes, in_chans, stem, stages, last_channels, head=head)


def shufflenet_builders() -> dict[str, Builder]:
    """Zoo name -> ``builder(num_classes, in_chans)``."""
    return {
        "shufflenetv1": lambda num_classes, in_chans: ShuffleNetV1("shufflenetv1", num_classes, in_chans),
        "shufflenetv2": lambda num_classes, in_chans: ShuffleNetV2("shufflenetv2", num_classes, in_chans),
    }
