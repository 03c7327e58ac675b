"""Overhaul of feature distillation (Heo et al., ICCV 2019): pre-ReLU features, partial L2 with a margin."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from kdrun.knowledge.adapters import (
    ConvBN,
    pool_to_common,
)
from kdrun.knowledge.base import Step, Taps
from kdrun.knowledge.features.stages import StagePairsTerm

log = logging.getLogger("kdrun")


def gaussian_negative_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """OFD's margin: ``E[x | x < 0]`` for x ~ N(mean, std^2), i.e.
    ``mean - std * phi(mean/std) / Phi(-mean/std)``; ``-3 std`` where ``Phi(-mean/std) <= 1e-3``.
    Computed in fp64 (the difference loses digits; the authors compute it in Python floats) and
    returned in ``mean``'s dtype."""
    dtype = mean.dtype
    mean, std = mean.double(), std.double().clamp_min(1e-6)
    z = mean / std
    tail = torch.special.ndtr(-z)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    expected = mean - std * pdf / tail.clamp_min(1e-3)
    return torch.where(tail > 1e-3, expected, -3.0 * std).to(dtype)


def partial_l2(s: torch.Tensor, t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """OFD's partial L2 summed over elements, averaged over the batch: with ``T = max(t, margin)``,
    ``(s - T)^2`` everywhere except where ``s <= T <= 0`` (fp32)."""
    target = torch.maximum(t, margin)
    keep = (s > target) | (target > 0)
    return ((s - target).pow(2) * keep).sum() / s.shape[0]


class OFD(StagePairsTerm):
    """Overhaul of feature distillation: Heo et al., "A Comprehensive Overhaul of Feature
    Distillation", ICCV 2019.

    Student and teacher pre-ReLU stage features; the student's go through a connector (1x1 conv +
    BN to the teacher's channels); the teacher's are clipped from below by a per-channel margin
    m = E[x | x < 0] under a Gaussian model of the teacher's pre-ReLU responses::

        T' = max(T, m),  d_p = sum [ (T' - r(S))^2  unless  r(S) <= T' <= 0 ]
        L  = sum_j d_p^j / (batch * 2^(n - j))      (j = 1..n stage pairs, deepest weighted 1)

    Given the same margin this equals the authors' Distiller loss divided by the batch size
    (clovaai/overhaul-distillation, CIFAR-100 distiller.py: distillation_loss, Distiller.forward;
    mdistiller's OFD.ofd_loss gives the same). The margin's source differs: the authors (and
    mdistiller) read the Gaussian's mean and std off the teacher's BN before the ReLU (its bias
    and |weight|); kdrun has no such BN for every tap, so the per-channel mean and std of the
    teacher's tap are accumulated over the training batches (fp64 buffers ``t_mean<j>`` and
    ``t_var<j>``, merged batch by batch, saved with the run) and the margin is computed from them.
    The authors' CIFAR-100 code divides by 1000: ``weight: 1.0e-3`` (also mdistiller's CIFAR
    default).
    """

    name = "ofd"
    student_preact = True
    teacher_preact = True

    def __init__(self, weight: float = 1e-3) -> None:
        super().__init__(weight)
        self.connectors = nn.ModuleList()
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        pairs = self.pair_stages(student_shapes, teacher_shapes)
        self.connectors = nn.ModuleList(ConvBN(student_shapes[sk][0], teacher_shapes[tk][0]) for sk, tk in pairs)
        for j, (_, tk) in enumerate(pairs):
            c = teacher_shapes[tk][0]
            self.register_buffer(f"t_mean{j}", torch.zeros(c, dtype=torch.float64))
            self.register_buffer(f"t_var{j}", torch.zeros(c, dtype=torch.float64))
        self.seen = torch.zeros((), dtype=torch.float64)

    def margin(self, j: int) -> torch.Tensor:
        """The current per-channel margin of pair j (fp32), shaped (1, C, 1, 1)."""
        mean, var = getattr(self, f"t_mean{j}"), getattr(self, f"t_var{j}")
        return gaussian_negative_mean(mean, var.clamp_min(0).sqrt()).float().view(1, -1, 1, 1)

    @torch.no_grad()
    def _update_stats(self, j: int, target: torch.Tensor) -> None:
        """Merge the batch's per-channel mean and (population) variance into the running ones:
        with f = batch / (seen + batch) and d = batch mean - mean::

            mean += f d,   var += f (batch var - var) + f (1 - f) d^2
        """
        frac = target.shape[0] / (self.seen + target.shape[0])  # a tensor: no host sync
        var_b, mean_b = torch.var_mean(target, dim=(0, 2, 3), correction=0)
        mean, var = getattr(self, f"t_mean{j}"), getattr(self, f"t_var{j}")
        delta = mean_b.double() - mean
        var += (var_b.double() - var) * frac + delta * delta * (frac * (1 - frac))
        mean += delta * frac

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        n = len(self.pairs)
        feats = []
        for j, ((sk, tk), connector) in enumerate(zip(self.pairs, self.connectors)):
            r, target = pool_to_common(connector(s[sk]).float(), t[tk].detach().float())
            if self.training:
                self._update_stats(j, target)
            feats.append((r, target))
        if self.training:
            self.seen += feats[0][0].shape[0]
        total = 0.0
        for j, (r, target) in enumerate(feats):
            total = total + partial_l2(r, target, self.margin(j)) / 2.0 ** (n - 1 - j)
        return total
