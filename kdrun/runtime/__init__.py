"""What a scheme works with during a run (:class:`RunContext`): the config, the data, the trainer,
and three objects with one job each: :class:`ModelFactory` (fresh models, placed and measured),
:class:`Distiller` (train a stage; distil a student from a frozen teacher) and
:class:`TeacherProvider` (trained models from a checkpoint or the store, a teacher's output cache)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from kdrun.config import trainer_factories
from kdrun.engine import distributed as dist
from kdrun.engine.metrics import MetricsWriter
from kdrun.engine.progress import progress_enabled
from kdrun.engine.trainer import Trainer
from kdrun.knowledge import KnowledgeSet
from kdrun.runtime.distiller import Distiller
from kdrun.runtime.models import ModelFactory
from kdrun.runtime.teachers import TeacherProvider, file_digest

__all__ = ["Distiller", "ModelFactory", "RunContext", "TeacherProvider", "file_digest"]

log = logging.getLogger("kdrun")


class RunContext:
    """A run's config, data, trainer, models, distiller and teachers.

    ``dry``: the preflight: models are built (checkpoints loaded and checked) but never trained nor
    stored, every stage takes one step on two images, nothing is written.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, data, device: torch.device, amp_dtype,
                 knowledge: KnowledgeSet, world: dist.World = dist.SINGLE, dry: bool = False) -> None:
        self.cfg, self.data, self.run_dir, self.dry = cfg, data, run_dir, dry
        self.knowledge = knowledge  # built at start-up (its checks ran there); schemes build fresh copies
        self.trainer = Trainer(cfg, data, device, amp_dtype, **trainer_factories(cfg),
                               progress=progress_enabled(cfg.trainer.progress), world=world, dry=dry)
        metrics = MetricsWriter(None if dry else run_dir / "metrics.csv")
        if not bool(cfg.trainer.resume):
            metrics.rows = []
        self.models = ModelFactory(cfg, data.info, device, world, dry)
        self.distiller = Distiller(cfg, self.trainer, self.models, run_dir, metrics, dry)
        self.teachers = TeacherProvider(cfg, self.models, self.distiller, world, dry, amp_dtype)

    def evaluate_summary(self, model, prefix: str) -> dict:
        """``<prefix>_top1`` and ``<prefix>_top5`` of ``model`` on the test split (and a log line)."""
        ev = self.trainer.evaluate(model)
        log.info("%s %s: test top-1 %.2f%%", prefix, getattr(model, "arch", ""), ev["test_top1"])
        return {f"{prefix}_top1": ev["test_top1"], f"{prefix}_top5": ev["test_top5"]}
