"""Adapters that map student features into the teacher's feature space (trained with the student),
plus the small shape helpers the feature terms share.

Every adapter is an ``nn.Module`` owned by its term; none is part of the saved student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def full_precision(t: torch.Tensor):
    """A context that turns autocast off on ``t``'s device, so matrix products of KD math stay fp32."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def pool_to_common(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool whichever of two NCHW maps is larger so both have the smaller H and W."""
    h, w = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
    if tuple(a.shape[-2:]) != (h, w):
        a = F.adaptive_avg_pool2d(a, (h, w))
    if tuple(b.shape[-2:]) != (h, w):
        b = F.adaptive_avg_pool2d(b, (h, w))
    return a, b


class ConvRegressor(nn.Module):
    """Map a student feature map (C_s, H_s, W_s) onto the teacher's (C_t, H_t, W_t): one conv
    (with bias) whose kind follows the two sizes, then BN, then ReLU (``relu=False``: no ReLU)::

        H_s = 2 H_t:   3x3 conv, stride 2, padding 1
        2 H_s = H_t:   4x4 transposed conv, stride 2, padding 1
        H_s >= H_t:    (1 + H_s - H_t) x (1 + W_s - W_t) conv (1x1 for equal sizes)

    (the rule of the CRD benchmark's FitNet regressor and AB connector). A student map smaller
    than half the teacher's, which that rule does not cover, is upsampled (bilinear) to the
    teacher's size and goes through a 1x1 conv. Convs keep PyTorch's default initialisation.
    """

    def __init__(self, s_shape: tuple, t_shape: tuple, relu: bool = True) -> None:
        super().__init__()
        (c_s, h_s, w_s), (c_t, h_t, w_t) = tuple(s_shape), tuple(t_shape)
        self.out_hw = (h_t, w_t)
        self.upsample = False
        if (h_s, w_s) == (2 * h_t, 2 * w_t):
            self.conv = nn.Conv2d(c_s, c_t, 3, stride=2, padding=1)
        elif (2 * h_s, 2 * w_s) == (h_t, w_t):
            self.conv = nn.ConvTranspose2d(c_s, c_t, 4, stride=2, padding=1)
        elif h_s >= h_t and w_s >= w_t:
            self.conv = nn.Conv2d(c_s, c_t, (1 + h_s - h_t, 1 + w_s - w_t))
        else:
            self.upsample = True
            self.conv = nn.Conv2d(c_s, c_t, 1)
        self.bn = nn.BatchNorm2d(c_t)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, size=self.out_hw, mode="bilinear", align_corners=False)
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class ConvBN(nn.Sequential):
    """A ``k x k`` conv (no bias) + BN from ``c_in`` to ``c_out`` channels: OFD's connector (student
    channels -> teacher channels), He-normal (fan-out) initialised, BN scale 1 shift 0."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 1) -> None:
        conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, nn.BatchNorm2d(c_out))


def _factor_layers(conv: type[nn.Module], widths: tuple, bn: bool) -> list[nn.Module]:
    """3x3 convs (or transposed convs; with bias, stride 1, padding 1) through ``widths``, each
    followed by BN (when ``bn``) and LeakyReLU(0.1)."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        layers += [conv(c_in, c_out, 3, padding=1), *([nn.BatchNorm2d(c_out)] if bn else []), nn.LeakyReLU(0.1)]
    return layers


class Paraphraser(nn.Module):
    """Factor transfer's teacher-side auto-encoder (Kim et al. 2018).

    Encoder: three 3x3 convs C -> C -> kC -> kC, decoder: three 3x3 transposed convs
    kC -> kC -> C -> C (``k`` the paraphrase rate, kC rounded down), each with a bias and followed
    by BN when ``bn`` (the CRD benchmark has none) and LeakyReLU(0.1). The encoder output is the
    teacher factor; the decoder reconstructs the teacher features.
    """

    def __init__(self, channels: int, rate: float = 0.5, bn: bool = False) -> None:
        super().__init__()
        factor = max(1, int(channels * rate))
        self.encoder = nn.Sequential(*_factor_layers(nn.Conv2d, (channels, channels, factor, factor), bn))
        self.decoder = nn.Sequential(*_factor_layers(nn.ConvTranspose2d, (factor, factor, channels, channels), bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The factor (encoder output)."""
        return self.encoder(x)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class Translator(nn.Module):
    """Factor transfer's student-side encoder: three 3x3 conv (with bias) + BN + LeakyReLU(0.1)
    layers C_s -> C_s -> k C_t -> k C_t, so the student factor has the teacher factor's channels."""

    def __init__(self, s_channels: int, t_channels: int, rate: float = 0.5) -> None:
        super().__init__()
        factor = max(1, int(t_channels * rate))
        self.encoder = nn.Sequential(*_factor_layers(nn.Conv2d, (s_channels, s_channels, factor, factor), True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class VIDRegressor(nn.Module):
    """VID's mean predictor: three 1x1 convs C_s -> C_t -> C_t -> C_t with ReLUs between (the
    middle width is the teacher's channel count, as in the CRD benchmark's VID)."""

    def __init__(self, s_channels: int, t_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(s_channels, t_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(t_channels, t_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(t_channels, t_channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ABF(nn.Module):
    """ReviewKD's attention-based fusion (Chen et al. 2021) for one level.

    ``x`` (a student feature) goes through a 1x1 conv + BN to ``mid`` channels. When a deeper
    level's fused feature ``residual`` is given (``fuse=True``), it is upsampled (nearest) to x's
    size and the two are mixed with two sigmoid attention maps predicted by a 1x1 conv from their
    concatenation: ``x * a0 + residual * a1``. The fused map is resized (nearest) to the teacher's
    spatial size and a 3x3 conv + BN gives the teacher's channel count. Returns
    ``(output, fused)``; ``fused``, the fused map at the teacher's size (as the authors' code
    passes it on), goes to the next shallower level.
    """

    def __init__(self, c_in: int, mid: int, c_out: int, out_hw: tuple[int, int], fuse: bool) -> None:
        super().__init__()
        self.out_hw = tuple(out_hw)
        self.reduce = nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.out = nn.Sequential(nn.Conv2d(mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.out[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        x = self.reduce(x)
        if self.attention is not None and residual is not None:
            residual = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            att = self.attention(torch.cat([x, residual], dim=1))
            x = x * att[:, 0:1] + residual * att[:, 1:2]
        if tuple(x.shape[-2:]) != self.out_hw:
            x = F.interpolate(x, size=self.out_hw, mode="nearest")
        return self.out(x), x


class Embed(nn.Module):
    """CRD's projection head: flatten, one Linear to ``dim`` (PyTorch's default initialisation),
    L2-normalise (in fp32): ``v = W x + b, v / ||v||_2``, as RepDistiller's crd.criterion.Embed."""

    def __init__(self, c_in: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(c_in, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)).float(), dim=1)
