"""Flow of solution procedure (Yim et al., CVPR 2017): Gram matrices between consecutive layers."""

from __future__ import annotations

import logging

import torch
from torch import nn

from kdrun.errors import ConfigError
from kdrun.knowledge.adapters import (
    full_precision,
    pool_to_common,
)
from kdrun.knowledge.base import KnowledgeTerm, Step, Taps
from kdrun.knowledge.features.stages import init_epochs_arg, stage_names

log = logging.getLogger("kdrun")


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``G[i, j] = mean over positions of a_i * b_j``: (B, C_a, C_b), fp32; the larger map is
    average-pooled to the smaller one's size."""
    a, b = pool_to_common(a.float(), b.float())
    with full_precision(a):
        return a.flatten(2) @ b.flatten(2).transpose(1, 2) / (a.shape[-2] * a.shape[-1])


class FSP(KnowledgeTerm):
    """Flow of solution procedure: Yim et al., "A Gift from Knowledge Distillation: Fast
    Optimization, Network Minimization and Transfer Learning", CVPR 2017.

    The FSP matrix of two consecutive layers F1 (C1, h, w), F2 (C2, h, w) is
    ``G[i, j] = 1/(h w) sum_{x,y} F1_i(x, y) F2_j(x, y)``; the student matches the teacher's::

        L = sum_l mean (G_s^l - G_t^l)^2        (l over consecutive layer pairs)

    Layers: ``stem`` plus every stage when both networks have as many stages (RepDistiller's
    ``feat[:-1]``), else the last min(K_s, K_t) stages; the larger of two consecutive maps is
    average-pooled to the smaller one's size (as RepDistiller's FSP does). The paper needs equal
    channel counts; where a student layer's differ, a 1x1 conv maps it to the teacher's (a kdrun
    extension; identity otherwise). FSP is an
    initialisation method: the init stage trains the student's feature layers with this loss,
    then the main stage trains on labels; RepDistiller's main loop adds 0 for FSP (its ``-b 50``
    is inert), so the default main-stage ``weight`` is 0. Full recipe: ``init_epochs: 30``;
    smoke runs should lower it (``loss.fsp.init_epochs=1``). Zero for identical features.
    """

    name = "fsp"
    epoch_keys = {"init_epochs": 1}

    def __init__(self, weight: float = 0.0, init_epochs: int = 30) -> None:
        super().__init__(weight)
        self.init_epochs = init_epochs_arg(self.name, init_epochs)
        self.s_layers: list[str] = []
        self.t_layers: list[str] = []
        self.connectors = nn.ModuleList()

    def student_taps(self) -> set[str]:
        return set(self.s_layers) or {"stage1"}

    def teacher_taps(self) -> set[str]:
        return set(self.t_layers) or {"stage1"}

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        s_stages, t_stages = stage_names(student_shapes), stage_names(teacher_shapes)
        n = min(len(s_stages), len(t_stages))
        s_layers, t_layers = s_stages[len(s_stages) - n:], t_stages[len(t_stages) - n:]
        if len(s_stages) == len(t_stages) and "stem" in student_shapes and "stem" in teacher_shapes:
            s_layers, t_layers = ["stem"] + s_layers, ["stem"] + t_layers
        if len(s_layers) < 2:
            raise ConfigError("loss.fsp needs at least two feature layers (stem/stage taps) on both models")
        self.s_layers, self.t_layers = s_layers, t_layers
        self.connectors = nn.ModuleList(
            nn.Identity() if student_shapes[sk][0] == teacher_shapes[tk][0]
            else nn.Conv2d(student_shapes[sk][0], teacher_shapes[tk][0], 1, bias=False)
            for sk, tk in zip(s_layers, t_layers)
        )

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        fs = [c(s[k]) for k, c in zip(self.s_layers, self.connectors)]
        ft = [t[k].detach() for k in self.t_layers]
        total = 0.0
        for i in range(len(fs) - 1):
            total = total + (fsp_matrix(fs[i], fs[i + 1]) - fsp_matrix(ft[i], ft[i + 1])).pow(2).mean()
        return total
