"""Optimizers and learning-rate schedules (computed per step, so resuming is exact).

Both come from their config group: ``conf/optim/<name>.yaml`` is a partial optimizer
(``{_target_: torch.optim.SGD, _partial_: true, lr: ..., momentum: ...}``) and
``conf/sched/<name>.yaml`` a partial :class:`LRSchedule` subclass, built by
:func:`kdrun.config.optimizer_factory` / :func:`kdrun.config.schedule_factory`; a stage's own lr
replaces ``optim.lr``. Another optimizer or schedule is its class and one YAML.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger("kdrun")


class LRSchedule:
    """lr(epoch, step): a linear warm-up per step from 0 to ``base_lr`` over ``warmup_epochs``,
    then :meth:`decay` (a subclass's) of the time ``t = epoch + step / steps_per_epoch``."""

    def __init__(self, base_lr: float, epochs: int, steps_per_epoch: int, *, warmup_epochs: float = 0.0) -> None:
        self.base_lr, self.epochs, self.steps = float(base_lr), int(epochs), max(1, int(steps_per_epoch))
        self.warmup = float(warmup_epochs or 0)

    def __call__(self, epoch: int, step: int) -> float:
        t = epoch + step / self.steps
        if self.warmup > 0 and t < self.warmup:
            return self.base_lr * (t + 1.0 / self.steps) / self.warmup
        return self.decay(epoch, t)

    def decay(self, epoch: int, t: float) -> float:
        raise NotImplementedError


class MultiStep(LRSchedule):
    """lr = base_lr * gamma ** (number of ``milestones`` <= epoch)."""

    def __init__(self, base_lr: float, epochs: int, steps_per_epoch: int, *, milestones, gamma: float,
                 warmup_epochs: float = 0.0) -> None:
        super().__init__(base_lr, epochs, steps_per_epoch, warmup_epochs=warmup_epochs)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        if epochs > 0 and not any(m < epochs for m in self.milestones):
            log.info("note: no lr milestone (%s) falls within %d epochs; the lr stays at %g",
                     ",".join(map(str, self.milestones)), epochs, self.base_lr)

    def decay(self, epoch: int, t: float) -> float:
        return self.base_lr * self.gamma ** sum(epoch >= m for m in self.milestones)


class Cosine(LRSchedule):
    """lr = min_lr + (base_lr - min_lr) * (1 + cos(pi * f)) / 2, f the fraction of the epochs after
    the warm-up that has passed (per step)."""

    def __init__(self, base_lr: float, epochs: int, steps_per_epoch: int, *, min_lr: float,
                 warmup_epochs: float = 0.0) -> None:
        super().__init__(base_lr, epochs, steps_per_epoch, warmup_epochs=warmup_epochs)
        self.min_lr = float(min_lr)

    def decay(self, epoch: int, t: float) -> float:
        span = max(self.epochs - self.warmup, 1e-8)
        frac = min(max((t - self.warmup) / span, 0.0), 1.0)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
