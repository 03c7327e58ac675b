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


class ConvBN(nn.Sequential):
    """A ``k x k`` conv (no bias) + BN from ``c_in`` to ``c_out`` channels: the connector of AB and
    OFD (student channels -> teacher channels), He-normal (fan-out) initialised, BN scale 1 shift 0."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 1) -> None:
        conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, nn.BatchNorm2d(c_out))


class Paraphraser(nn.Module):
    """Factor transfer's teacher-side auto-encoder (Kim et al. 2018).

    Encoder: three 3x3 convs C -> C -> kC -> kC, decoder: three 3x3 transposed convs
    kC -> kC -> C -> C, each followed by BN (``bn=True``) and LeakyReLU(0.1); ``k`` is the
    paraphrase rate. The encoder output is the teacher factor; the decoder reconstructs the
    teacher features.
    """

    def __init__(self, channels: int, rate: float = 0.5, bn: bool = True) -> None:
        super().__init__()
        factor = max(1, int(channels * rate))

        def layer(conv: type[nn.Module], c_in: int, c_out: int) -> list[nn.Module]:
            norm = [nn.BatchNorm2d(c_out)] if bn else []
            return [conv(c_in, c_out, 3, padding=1, bias=not bn), *norm, nn.LeakyReLU(0.1)]

        self.encoder = nn.Sequential(
            *layer(nn.Conv2d, channels, channels), *layer(nn.Conv2d, channels, factor),
            *layer(nn.Conv2d, factor, factor),
        )
        self.decoder = nn.Sequential(
            *layer(nn.ConvTranspose2d, factor, factor), *layer(nn.ConvTranspose2d, factor, channels),
            *layer(nn.ConvTranspose2d, channels, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The factor (encoder output)."""
        return self.encoder(x)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class Translator(nn.Module):
    """Factor transfer's student-side encoder: three 3x3 conv + BN + LeakyReLU(0.1) layers
    C_s -> C_s -> k C_t -> k C_t, so the student factor has the teacher factor's channels."""

    def __init__(self, s_channels: int, t_channels: int, rate: float = 0.5) -> None:
        super().__init__()
        factor = max(1, int(t_channels * rate))
        layers: list[nn.Module] = []
        for c_in, c_out in ((s_channels, s_channels), (s_channels, factor), (factor, factor)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1)]
        self.encoder = nn.Sequential(*layers)

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
    ``(output, fused)``; ``fused`` is passed on to the next shallower level.
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
        fused = x
        if tuple(x.shape[-2:]) != self.out_hw:
            x = F.interpolate(x, size=self.out_hw, mode="nearest")
        return self.out(x), fused


class Embed(nn.Module):
    """CRD's projection head: flatten, one Linear to ``dim``, L2-normalise (in fp32)."""

    def __init__(self, c_in: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(c_in, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)).float(), dim=1)
