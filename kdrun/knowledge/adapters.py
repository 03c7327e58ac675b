"""Adapters that map student features into the teacher's feature space (trained with the student)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvRegressor(nn.Module):
    """Map a student feature map (C_s, H_s, W_s) onto the teacher's (C_t, H_t, W_t).

    A 3x3 conv + BN + ReLU when the spatial sizes agree; when the student map is larger it is
    resized by adaptive average pooling first, when smaller by bilinear upsampling.
    """

    def __init__(self, s_shape: tuple, t_shape: tuple) -> None:
        super().__init__()
        self.out_hw = tuple(t_shape[1:])
        self.conv = nn.Conv2d(s_shape[0], t_shape[0], kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(t_shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.out_hw:
            if x.shape[-1] > self.out_hw[-1]:
                x = F.adaptive_avg_pool2d(x, self.out_hw)
            else:
                x = F.interpolate(x, size=self.out_hw, mode="bilinear", align_corners=False)
        return F.relu(self.bn(self.conv(x)))
