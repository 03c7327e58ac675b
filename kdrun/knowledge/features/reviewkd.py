"""Knowledge review (Chen et al., CVPR 2021): attention-based fusion of the student's levels, HCL."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.knowledge.adapters import (
    ABF,
)
from kdrun.knowledge.base import Step, Taps, require
from kdrun.knowledge.features.stages import StagePairsTerm

log = logging.getLogger("kdrun")


def hcl(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """ReviewKD's hierarchical context loss (fp32): MSE of the maps plus the MSE of their 4x4, 2x2
    and 1x1 average pools (those smaller than the map), weighted 1, 1/2, 1/4, 1/8 and normalised
    by the sum of the weights used."""
    fs, ft = fs.float(), ft.float()
    loss, total, w = F.mse_loss(fs, ft), 1.0, 1.0
    for size in (4, 2, 1):
        if size >= min(fs.shape[-2:]):
            continue
        w /= 2.0
        loss = loss + w * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
        total += w
    return loss / total


class ReviewKD(StagePairsTerm):
    """Knowledge review: Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021.

    Levels: the paired stages plus the pooled ``embedding`` (as a 1x1 map). Student features
    (post-ReLU stage taps) are fused from the deepest level down by attention-based fusion (ABF)
    modules, so each level's output "reviews" the deeper ones; each output is matched to the
    teacher's feature at that level (pre-ReLU stage taps, as in the authors' code, unless
    ``teacher_preact: false``; the pooled embedding) with the hierarchical context loss HCL (MSE
    at full size plus 4x4/2x2/1x1 pooled MSEs)::

        L = min(1, e / warmup_epochs) * sum_levels HCL(ABF_l(S_l, fused_{l+1}), T_l)

    with ``e`` the 0-based number of the current epoch (a step per epoch: 0 in the first epoch),
    as the authors' CIFAR-100 train.py (mdistiller counts epochs from 1, one epoch ahead). The
    default equals the authors' ReviewKD + hcl (dvlab-research/ReviewKD, CIFAR-100
    model/reviewkd.py). The ABF middle width is min(max_mid_channels, student embedding width).
    Defaults: weight 1, warm-up 20 epochs (the authors' and mdistiller's defaults); the authors'
    CIFAR-100 scripts use weight 5 for resnet32x4->resnet8x4 and the wrn_40_2 pairs, 8 for
    resnet32x4->ShuffleNetV2, 0.6 for resnet56->resnet20 and 1 for resnet110->resnet32.
    """

    name = "reviewkd"
    epoch_keys = {"warmup_epochs": 0}

    def __init__(self, weight: float = 1.0, warmup_epochs: float = 20.0, teacher_preact: bool = True,
                 max_mid_channels: int = 512) -> None:
        super().__init__(weight)
        require(float(warmup_epochs) >= 0, self.name, "warmup_epochs", warmup_epochs, "must be >= 0")
        require(isinstance(max_mid_channels, int) and max_mid_channels >= 1, self.name,
                "max_mid_channels", max_mid_channels, "must be an integer >= 1")
        self.warmup_epochs = float(warmup_epochs)
        self.teacher_preact = bool(teacher_preact)
        self.max_mid_channels = int(max_mid_channels)
        self.abfs = nn.ModuleList()

    def student_taps(self) -> set[str]:
        return super().student_taps() | {"embedding"}

    def teacher_taps(self) -> set[str]:
        return super().teacher_taps() | {"embedding"}

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        pairs = self.pair_stages(student_shapes, teacher_shapes)
        s_shapes = [student_shapes[sk] for sk, _ in pairs] + [(student_shapes["embedding"][0], 1, 1)]
        t_shapes = [teacher_shapes[tk] for _, tk in pairs] + [(teacher_shapes["embedding"][0], 1, 1)]
        mid = min(self.max_mid_channels, student_shapes["embedding"][0])
        deepest = len(s_shapes) - 1
        self.abfs = nn.ModuleList(
            ABF(ss[0], mid, ts[0], ts[1:], fuse=i < deepest) for i, (ss, ts) in enumerate(zip(s_shapes, t_shapes))
        )

    def warmup(self, step: Step) -> float:
        """``min(1, floor(epoch) / warmup_epochs)``: constant within an epoch (1 without warm-up)."""
        return 1.0 if self.warmup_epochs <= 0 else min(1.0, math.floor(step.epoch) / self.warmup_epochs)

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        s_feats = [s[sk] for sk, _ in self.pairs] + [s["embedding"][:, :, None, None]]
        t_feats = [t[tk].detach() for _, tk in self.pairs] + [t["embedding"].detach()[:, :, None, None]]
        total, fused = 0.0, None
        for level in reversed(range(len(s_feats))):
            out, fused = self.abfs[level](s_feats[level], fused)
            total = total + hcl(out, t_feats[level])
        return self.warmup(step) * total
