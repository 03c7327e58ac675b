"""Optimizers and learning-rate schedules (computed per step, so resuming is exact)."""

from __future__ import annotations

import logging
import math

import torch

from kdrun.errors import ConfigError

log = logging.getLogger("kdrun")

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("multistep", "cosine")


def build_optimizer(params, cfg, lr: float) -> torch.optim.Optimizer:
    name = str(cfg.name)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=float(cfg.momentum), nesterov=bool(cfg.nesterov),
            weight_decay=float(cfg.weight_decay),
        )
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), weight_decay=float(cfg.weight_decay))
    raise ConfigError(f"unknown optim '{name}'; valid: {', '.join(OPTIMIZERS)}")


class LRSchedule:
    """lr(epoch, step): optional linear warm-up, then multistep or cosine decay."""

    def __init__(self, cfg, base_lr: float, epochs: int, steps_per_epoch: int) -> None:
        self.name = str(cfg.name)
        if self.name not in SCHEDULES:
            raise ConfigError(f"unknown sched '{self.name}'; valid: {', '.join(SCHEDULES)}")
        self.base_lr, self.epochs, self.steps = float(base_lr), int(epochs), max(1, int(steps_per_epoch))
        self.warmup = float(cfg.get("warmup_epochs", 0) or 0)
        if self.name == "multistep":
            self.milestones = sorted(int(m) for m in cfg.milestones)
            self.gamma = float(cfg.gamma)
            if epochs > 0 and not any(m < epochs for m in self.milestones):
                log.info("note: no lr milestone (%s) falls within %d epochs; the lr stays at %g",
                         ",".join(map(str, self.milestones)), epochs, self.base_lr)
        else:
            self.min_lr = float(cfg.min_lr)

    def __call__(self, epoch: int, step: int) -> float:
        t = epoch + step / self.steps
        if self.warmup > 0 and t < self.warmup:
            return self.base_lr * (t + 1.0 / self.steps) / self.warmup
        if self.name == "multistep":
            return self.base_lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        span = max(self.epochs - self.warmup, 1e-8)
        frac = min(max((t - self.warmup) / span, 0.0), 1.0)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
