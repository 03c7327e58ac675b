"""Activation boundaries (Heo et al., AAAI 2019): pre-ReLU features on the teacher's side of zero."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.knowledge.adapters import (
    ConvRegressor,
    pool_to_common,
)
from kdrun.knowledge.base import Step, Taps, require
from kdrun.knowledge.features.stages import StagePairsTerm, init_epochs_arg

log = logging.getLogger("kdrun")


def ab_margin_loss(r: torch.Tensor, t: torch.Tensor, margin: float) -> torch.Tensor:
    """Activation-boundary loss summed over elements, averaged over the batch (fp32)::

        rho(t) * relu(margin - r)^2 + (1 - rho(t)) * relu(margin + r)^2,   rho(t) = [t > 0]
    """
    on = (t > 0).float()
    loss = on * F.relu(margin - r).pow(2) + (1.0 - on) * F.relu(margin + r).pow(2)
    return loss.sum() / r.shape[0]


class AB(StagePairsTerm):
    """Activation boundaries: Heo et al., "Knowledge Transfer via Distillation of Activation
    Boundaries Formed by Hidden Neurons", AAAI 2019.

    The student's pre-ReLU stage features r(S) should be on the same side of zero as the teacher's
    pre-ReLU features T, by a margin mu (the paper's alternative squared-hinge loss); the
    connector r is the identity where the two maps have the same shape, else a
    :class:`ConvRegressor` without ReLU (conv + BN, as the CRD benchmark's connector)::

        L_j = sum [ rho(T) relu(mu - r(S))^2 + (1 - rho(T)) relu(mu + r(S))^2 ] / batch
        L   = 3e-3 * sum_j 2^(j - n) L_j        (j = 1..n stage pairs, deepest weighted 1)

    with the layer weights and the 3e-3 scale of the CRD benchmark (RepDistiller). AB is an
    initialisation method: an init stage of ``init_epochs`` trains the connectors and the
    student's feature layers with this loss alone, then the main stage trains on labels. In
    RepDistiller's main loop the AB loss is 0 whatever its ``-b`` flag (1 in its scripts), so the
    default main-stage ``weight`` is 0; set e.g. ``loss.ab.weight=1`` to keep it in the main stage.
    The full recipe uses ``init_epochs: 30``; smoke runs should lower it (``loss.ab.init_epochs=1``).
    """

    name = "ab"
    epoch_keys = {"init_epochs": 1}
    student_preact = True
    teacher_preact = True
    scale = 3e-3

    def __init__(self, weight: float = 0.0, margin: float = 1.0, init_epochs: int = 30) -> None:
        super().__init__(weight)
        require(float(margin) > 0, self.name, "margin", margin, "must be > 0")
        self.margin = float(margin)
        self.init_epochs = init_epochs_arg(self.name, init_epochs)
        self.connectors = nn.ModuleList()

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        pairs = self.pair_stages(student_shapes, teacher_shapes)
        self.connectors = nn.ModuleList(
            nn.Identity() if tuple(student_shapes[sk]) == tuple(teacher_shapes[tk])
            else ConvRegressor(student_shapes[sk], teacher_shapes[tk], relu=False)
            for sk, tk in pairs
        )

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        n = len(self.pairs)
        total = 0.0
        for j, ((sk, tk), connector) in enumerate(zip(self.pairs, self.connectors)):
            r, target = pool_to_common(connector(s[sk]).float(), t[tk].detach().float())
            total = total + 2.0 ** (j - n + 1) * ab_margin_loss(r, target, self.margin)
        return self.scale * total
