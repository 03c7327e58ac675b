"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017): spatial attention maps of every stage pair."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from kdrun.knowledge.adapters import (
    pool_to_common,
)
from kdrun.knowledge.base import Step, Taps, require
from kdrun.knowledge.features.stages import StagePairsTerm

log = logging.getLogger("kdrun")


def attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    """``vec(mean_c |f_c|^p)``, L2-normalised per sample: (B, H*W), fp32."""
    return F.normalize(f.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)


class AT(StagePairsTerm):
    """Attention transfer: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.

    For every stage pair j, with the spatial attention map ``Q^j = vec(mean_c |A_c|^p)`` of a
    feature map A (C, H, W)::

        L = sum_j mean_{b,i} ( Q_s^j / ||Q_s^j||_2 - Q_t^j / ||Q_t^j||_2 )^2

    (the authors' and the CRD benchmark's mean-squared form; the paper's beta = 1000 is the
    weight). The CRD benchmark raises A_c to the power p without the absolute value, which agrees
    with this for the default p = 2 (even p). Invariant to a positive scale of either feature map;
    needs no adapter, so any channel counts pair.
    """

    name = "at"

    def __init__(self, weight: float = 1000.0, p: float = 2.0) -> None:
        super().__init__(weight)
        require(float(p) > 0, self.name, "p", p, "must be > 0")
        self.p = float(p)

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        self.pair_stages(student_shapes, teacher_shapes)

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        total = 0.0
        for sk, tk in self.pairs:
            fs, ft = pool_to_common(s[sk], t[tk].detach())
            total = total + (attention_map(fs, self.p) - attention_map(ft, self.p)).pow(2).mean()
        return total
