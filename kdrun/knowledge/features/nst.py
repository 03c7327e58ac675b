"""Neuron selectivity transfer (Huang & Wang, 2017): MMD between the channels' spatial maps."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from kdrun.knowledge.adapters import (
    full_precision,
    pool_to_common,
)
from kdrun.knowledge.base import Step, Taps, require
from kdrun.knowledge.features.stages import StagePairsTerm

log = logging.getLogger("kdrun")


def nst_mmd(fs: torch.Tensor, ft: torch.Tensor, degree: int = 2, constant: float = 0.0) -> torch.Tensor:
    """Squared MMD between the channel "selectivity" distributions of two maps (fp32).

    Each channel's spatial map is L2-normalised; with the polynomial kernel
    ``k(x, y) = (x.y + c)^d``: ``mean k(t, t') + mean k(s, s') - 2 mean k(s, t)`` over all
    channel pairs (and the batch).
    """
    fs, ft = pool_to_common(fs.float(), ft.float())
    a = F.normalize(fs.flatten(2), dim=2)
    b = F.normalize(ft.flatten(2), dim=2)

    def kernel(x, y):
        return (x @ y.transpose(1, 2) + constant).pow(degree)

    with full_precision(a):
        return kernel(b, b).mean() + kernel(a, a).mean() - 2 * kernel(a, b).mean()


class NST(StagePairsTerm):
    """Neuron selectivity transfer: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron
    Selectivity Transfer", 2017.

    Treats each channel's L2-normalised spatial map f^i (H*W) as a sample and matches the
    student's and the teacher's sample distributions with the squared MMD, polynomial kernel
    ``k(x, y) = (x^T y + c)^d`` (d = 2, c = 0 in the paper and the CRD benchmark)::

        L = sum_j [ 1/C_t^2 sum k(f_t^i, f_t^i') + 1/C_s^2 sum k(f_s^i, f_s^i')
                    - 2/(C_s C_t) sum k(f_s^i, f_t^i') ]

    over all stage pairs j. Zero when the student's features equal the teacher's.
    """

    name = "nst"

    def __init__(self, weight: float = 50.0, degree: int = 2, constant: float = 0.0) -> None:
        super().__init__(weight)
        require(isinstance(degree, int) and not isinstance(degree, bool) and degree >= 1,
                self.name, "degree", degree, "must be an integer >= 1")
        require(float(constant) >= 0, self.name, "constant", constant, "must be >= 0")
        self.degree, self.constant = int(degree), float(constant)

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        self.pair_stages(student_shapes, teacher_shapes)

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        return sum(nst_mmd(s[sk], t[tk].detach(), self.degree, self.constant) for sk, tk in self.pairs)
