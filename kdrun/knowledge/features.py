"""Intermediate-feature knowledge: terms on stage outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.knowledge.adapters import ConvRegressor
from kdrun.knowledge.base import KnowledgeTerm, Step, Taps


class FitNet(KnowledgeTerm):
    """Romero et al. 2015: MSE between regressor(student hint) and the teacher's hint features."""

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
        return F.mse_loss(hint.float(), t[self.t_tap].float())
