"""Variational information distillation (Ahn et al., CVPR 2019): a Gaussian likelihood of the teacher's features."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.knowledge.adapters import (
    VIDRegressor,
    pool_to_common,
)
from kdrun.knowledge.base import Step, Taps, require
from kdrun.knowledge.features.stages import StagePairsTerm

log = logging.getLogger("kdrun")


class VID(StagePairsTerm):
    """Variational information distillation: Ahn et al., "Variational Information Distillation for
    Knowledge Transfer", CVPR 2019.

    Maximises a variational lower bound on I(T; S) by modelling each teacher stage feature as a
    Gaussian whose mean mu(S) a regressor (three 1x1 convs) predicts from the student's and whose
    variance is learned per channel, ``sigma_c^2 = softplus(alpha_c) + eps``::

        L = sum_j mean_{b,c,h,w} 0.5 * [ (t - mu(s))^2 / sigma_c^2 + log sigma_c^2 ]

    (the negative log-likelihood up to a constant). alpha starts where sigma^2 = init_pred_var and
    trains with the student, as in RepDistiller's VIDLoss (mdistiller's vid_loss has the same
    formula but keeps its variances in a plain list, so they never train).
    """

    name = "vid"

    def __init__(self, weight: float = 1.0, init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__(weight)
        require(float(eps) > 0, self.name, "eps", eps, "must be > 0")
        require(float(init_pred_var) > float(eps), self.name, "init_pred_var", init_pred_var,
                f"must be > eps ({eps})")
        self.init_pred_var, self.eps = float(init_pred_var), float(eps)
        self.regressors = nn.ModuleList()
        self.alphas = nn.ParameterList()

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        pairs = self.pair_stages(student_shapes, teacher_shapes)
        self.regressors = nn.ModuleList(VIDRegressor(student_shapes[sk][0], teacher_shapes[tk][0]) for sk, tk in pairs)
        v = self.init_pred_var - self.eps
        alpha0 = v + math.log(-math.expm1(-v))  # softplus^-1(v)
        self.alphas = nn.ParameterList(
            nn.Parameter(torch.full((teacher_shapes[tk][0],), alpha0)) for _, tk in pairs
        )

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        total = 0.0
        for (sk, tk), regressor, alpha in zip(self.pairs, self.regressors, self.alphas):
            x, target = pool_to_common(s[sk], t[tk].detach())
            mu = regressor(x).float()
            var = (F.softplus(alpha.float()) + self.eps).view(1, -1, 1, 1)
            total = total + (0.5 * ((mu - target.float()).pow(2) / var + var.log())).mean()
        return total
