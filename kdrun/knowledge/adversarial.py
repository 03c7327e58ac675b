"""Adversarial distillation: a discriminator learns to tell the teacher's outputs from the student's,
and the student learns to fool it (Shen et al., AAAI 2019, "MEAL: Multi-Model Ensemble via
Adversarial Learning").

The discriminator is the term's own adapter, trained by its own optimizer step inside the training
step (:meth:`Adversarial.own_parameters` keeps it out of the stage's optimizer); its parameters do
not ask for gradients outside that step, so the student's backward pass never reaches them.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from kdrun.knowledge.adapters import full_precision
from kdrun.knowledge.base import KnowledgeTerm, Step, Taps, require

#: the discriminator's targets per row: [1, 0] for a student's output, [0, 1] for a teacher's (MEAL's)
STUDENT, TEACHER = (1.0, 0.0), (0.0, 1.0)


class MealDiscriminator(nn.Module):
    """MEAL's discriminator on one vector per sample (logits, or a pooled feature map): three linear
    maps of widths ``C -> C // K -> C // K^2 -> 2`` with a ReLU after each, the last one included, as
    in the authors' ``Discriminator.forward`` (they write the maps as 1x1 convolutions on a 1x1 map:
    the same function and the same default initialisation as ``nn.Linear``)."""

    def __init__(self, in_features: int, reduction: int = 2, final_relu: bool = True) -> None:
        super().__init__()
        mid, low = in_features // reduction, in_features // reduction ** 2
        self.layers = nn.ModuleList([nn.Linear(in_features, mid), nn.Linear(mid, low), nn.Linear(low, 2)])
        self.final_relu = final_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1 or self.final_relu:
                x = F.relu(x)
        return x


def rows_of(label: tuple[float, float], n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(label, device=like.device, dtype=torch.float32).expand(n, 2)


class Adversarial(KnowledgeTerm):
    """The student fools a discriminator that tells teacher from student outputs (MEAL's adversarial loss).

    Each training step, first the discriminator ``D`` takes one step of its own optimizer (SGD) on
    MEAL's ``discriminatorLoss``: ``BCE(D([v_s; v_t]), [[1,0]*B; [0,1]*B])``, the mean over the
    2B x 2 entries, both inputs detached. Then the term is the student's adversarial loss against
    the updated ``D``: ``BCE(D(v_s), [0,1])``, mean over B x 2, i.e. the student's outputs taken for
    the teacher's (the non-saturating generator loss). ``v`` is the ``tap`` (logits by default; a
    feature map is averaged over space) of each network, in fp32.

    MEAL's code trains ``D`` and the student with one SGD step on the sum of both losses (the
    student's gradient reversed only with its ``--grl``); here ``D`` has its own step, so the student
    never trains it and it never trains the student.
    """

    name = "adv"

    def __init__(self, weight: float = 1.0, tap: str = "logits", reduction: int = 2, final_relu: bool = True,
                 d_lr: float = 1e-3, d_momentum: float = 0.9, d_weight_decay: float = 5e-4) -> None:
        super().__init__(weight)
        require(isinstance(tap, str) and bool(tap), self.name, "tap", tap, "must be a tap name (logits, embedding, stage3...)")
        require(isinstance(reduction, int) and not isinstance(reduction, bool) and reduction >= 1, self.name,
                "reduction", reduction, "must be an integer >= 1")
        require(isinstance(final_relu, bool), self.name, "final_relu", final_relu, "must be true or false")
        require(float(d_lr) > 0, self.name, "d_lr", d_lr, "must be > 0")
        require(0 <= float(d_momentum) < 1, self.name, "d_momentum", d_momentum, "must be in [0, 1)")
        require(float(d_weight_decay) >= 0, self.name, "d_weight_decay", d_weight_decay, "must be >= 0")
        self.tap, self.reduction, self.final_relu = tap, reduction, final_relu
        self.d_lr, self.d_momentum, self.d_weight_decay = float(d_lr), float(d_momentum), float(d_weight_decay)
        self.discriminator: MealDiscriminator | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._d_loss: torch.Tensor | None = None

    def student_taps(self) -> set[str]:
        return {self.tap}

    def teacher_taps(self) -> set[str]:
        return {self.tap}

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        width_s, width_t = student_shapes[self.tap][0], teacher_shapes[self.tap][0]
        require(width_s == width_t, self.name, "tap", self.tap,
                f"has {width_s} channels in the student and {width_t} in the teacher; the discriminator reads "
                "both: choose a tap of equal width (logits)")
        require(width_s // self.reduction ** 2 >= 1, self.name, "reduction", self.reduction,
                f"leaves no unit of the {width_s}-wide tap {self.tap} after two layers; lower it")
        self.discriminator = MealDiscriminator(width_s, self.reduction, self.final_relu)
        self.discriminator.requires_grad_(False)  # only its own step asks for gradients

    def own_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters()) if self.discriminator is not None else []

    def optimizer(self) -> torch.optim.Optimizer:
        """The discriminator's SGD (built on first use, after the term is on its device)."""
        if self._optimizer is None:
            self._optimizer = torch.optim.SGD(self.own_parameters(), lr=self.d_lr, momentum=self.d_momentum,
                                              weight_decay=self.d_weight_decay)
        return self._optimizer

    def discriminator_loss(self, v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
        """MEAL's ``discriminatorLoss``: BCE of D on the student rows (target [1, 0]) then the teacher rows ([0, 1])."""
        out = self.discriminator(torch.cat([v_s, v_t]))
        target = torch.cat([rows_of(STUDENT, v_s.shape[0], out), rows_of(TEACHER, v_t.shape[0], out)])
        return F.binary_cross_entropy_with_logits(out, target)

    def discriminator_step(self, v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
        """One step of the discriminator's own optimizer on detached outputs; its gradients are
        averaged over the processes of a torchrun job. Returns its loss."""
        params = self.own_parameters()
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            try:
                loss = self.discriminator_loss(v_s.detach(), v_t.detach())
                grads = torch.autograd.grad(loss, params)
            finally:
                for p in params:
                    p.requires_grad_(False)
        if torch_dist.is_available() and torch_dist.is_initialized():
            for g in grads:
                torch_dist.all_reduce(g)
                g /= torch_dist.get_world_size()
        optimizer = self.optimizer()
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def vector(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        with full_precision(s[self.tap]):
            v_s, v_t = self.vector(s[self.tap]), self.vector(t[self.tap].detach())
            if self.training and torch.is_grad_enabled():
                self._d_loss = self.discriminator_step(v_s, v_t)
            out = self.discriminator(v_s)
            return F.binary_cross_entropy_with_logits(out, rows_of(TEACHER, v_s.shape[0], out))

    def extra_logs(self) -> dict[str, torch.Tensor]:
        """``adv_d_loss``: the discriminator's own loss of this step (not part of the student's)."""
        return {"adv_d_loss": self._d_loss} if self._d_loss is not None else {}

    def get_extra_state(self) -> dict:
        """The discriminator's optimizer state (momentum), saved with the term for resuming."""
        return {"d_optimizer": self.optimizer().state_dict()} if self.discriminator is not None else {}

    def set_extra_state(self, state: dict) -> None:
        if state and self.discriminator is not None:
            self.optimizer().load_state_dict(state["d_optimizer"])
