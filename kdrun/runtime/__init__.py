"""What a scheme works with during a run (:class:`RunContext`): the config, the data, the trainer,
and three objects with one job each: :class:`ModelFactory` (fresh models, placed and measured),
:class:`Distiller` (train a stage; distil a student from a frozen teacher) and
:class:`TeacherProvider` (trained models from a checkpoint or the store, a teacher's output cache)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from kdrun.config import instantiate, to_plain, trainer_factories
from kdrun.engine import distributed as dist
from kdrun.engine.progress import progress_enabled
from kdrun.engine.trainer import Trainer
from kdrun.knowledge import KnowledgeSet
from kdrun.loggers import RunLog, with_metrics_csv
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
        self.log = run_log(cfg, run_dir, world, dry)
        self.models = ModelFactory(cfg, data.info, device, world, dry)
        self.distiller = Distiller(cfg, self.trainer, self.models, run_dir, self.log, dry)
        self.teachers = TeacherProvider(cfg, self.models, self.distiller, world, dry, amp_dtype)

    def evaluate_summary(self, model, prefix: str) -> dict:
        """``<prefix>_top1`` and ``<prefix>_top5`` of ``model`` on the test split (and a log line)."""
        ev = self.trainer.evaluate(model)
        log.info("%s %s: test top-1 %.2f%%", prefix, getattr(model, "arch", ""), ev["test_top1"])
        return {f"{prefix}_top1": ev["test_top1"], f"{prefix}_top5": ev["test_top5"]}


def run_log(cfg: DictConfig, run_dir: Path, world: dist.World = dist.SINGLE, dry: bool = False) -> RunLog:
    """The run's metrics sinks: metrics.csv and the trackers of ``cfg.logger`` (each a ``_target_``
    node of conf/logger), opened on ``run_dir``. The preflight (``dry``) records nothing; under
    torchrun only rank 0 reports to trackers (the other ranks keep a metrics.csv in their scratch dir)."""
    if dry:
        return RunLog()
    nodes = cfg.get("logger") or {}
    trackers = with_metrics_csv([instantiate(nodes[name]) for name in nodes] if world.is_main else [])
    sinks = RunLog(trackers)
    sinks.open(run_dir, to_plain(cfg), bool(cfg.trainer.resume))
    return sinks
