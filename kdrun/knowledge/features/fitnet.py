"""FitNets (Romero et al., ICLR 2015): a regressor maps the student's hint layer onto the teacher's."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from kdrun.knowledge.adapters import (
    ConvRegressor,
)
from kdrun.knowledge.base import KnowledgeTerm, Step, Taps

log = logging.getLogger("kdrun")


class FitNet(KnowledgeTerm):
    """Hints: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.

    A regressor r (:class:`ConvRegressor`: one conv chosen by the two spatial sizes, BN, ReLU;
    trained with the student) maps the student's hint tap onto the teacher's::

        L = mean_{b,c,h,w} ( r(S_hint) - T_hint )^2

    Default hint: ``stage2`` on both sides (the CRD benchmark's ``hint_layer 2``).
    """

    name = "fitnet"

    def __init__(self, weight: float = 100.0, student_tap: str = "stage2", teacher_tap: str = "stage2") -> None:
        super().__init__(weight)
        self.s_tap, self.t_tap = student_tap, teacher_tap
        self.regressor: ConvRegressor | None = None

    def student_taps(self) -> set[str]:
        return {self.s_tap}

    def teacher_taps(self) -> set[str]:
        return {self.t_tap}

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        self.regressor = ConvRegressor(student_shapes[self.s_tap], teacher_shapes[self.t_tap])

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        hint = self.regressor(s[self.s_tap])
        return F.mse_loss(hint.float(), t[self.t_tap].detach().float())
