"""Response-based knowledge: terms on the logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.knowledge.base import KnowledgeTerm, Step, Taps


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher_T || student_T) summed over classes, averaged over the batch, times T^2 (fp32)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * (t * t)


class KD(KnowledgeTerm):
    """Hinton et al. 2015. Weight is ``alpha``; label cross-entropy gets ``1 - alpha``."""

    name = "kd"

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0) -> None:
        alpha, temperature = float(alpha), float(temperature)
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"loss.kd.alpha={alpha} is outside [0, 1]")
        if temperature <= 0:
            raise ConfigError(f"loss.kd.temperature={temperature} must be > 0")
        super().__init__(weight=alpha)
        self.temperature = temperature

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        return kd_divergence(s["logits"], t["logits"], self.temperature)
