"""Training a run's stages: a stage of the run itself, or a student distilled from a frozen teacher
(its terms' init stages first, then the main stage), through one Trainer."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from omegaconf import DictConfig

from kdrun.config import build_knowledge
from kdrun.engine.trainer import FitResult, Trainer
from kdrun.knowledge import KnowledgeSet
from kdrun.runtime.models import ModelFactory

log = logging.getLogger("kdrun")


class Distiller:
    """Fits stages with the run's trainer, checkpoints (``<run dir>/checkpoints``) and metrics."""

    def __init__(self, cfg: DictConfig, trainer: Trainer, models: ModelFactory, run_dir: Path,
                 metrics, dry: bool = False) -> None:
        """``metrics``: the run's metrics sink (:class:`kdrun.loggers.RunLog`: metrics.csv and trackers)."""
        self.cfg, self.trainer, self.models, self.dry = cfg, trainer, models, dry
        self.run_dir, self.metrics = run_dir, metrics

    @property
    def ckpt_dir(self) -> Path | None:
        return None if self.dry else self.run_dir / "checkpoints"

    def fit(self, stage, node: DictConfig, *, label: str | None = None, data=None) -> FitResult:
        """Train a stage of this run at ``node``'s lr for trainer.epochs. ``data``: training batches
        of the stage's own instead of the run's (a data-free scheme's latent codes; the trainer still
        scores on ``data.eval_batches()``)."""
        trainer = self.trainer
        if data is not None:
            trainer = copy.copy(trainer)
            trainer.data = data
        return trainer.fit(stage, epochs=int(self.cfg.trainer.epochs), lr=self.models.lr_for(node),
                                ckpt_dir=self.ckpt_dir, metrics=[self.metrics],
                                resume=bool(self.cfg.trainer.resume), label=label)

    def new_knowledge(self, student, teacher) -> KnowledgeSet:
        """A fresh knowledge set from cfg.loss (own adapters) set up for this student/teacher edge."""
        knowledge = build_knowledge(self.cfg.loss, self.cfg.get("ce_weight", "auto"))
        self.setup_knowledge(knowledge, student, teacher)
        return knowledge

    def setup_knowledge(self, knowledge: KnowledgeSet, student, teacher) -> None:
        """Build the terms' adapters from the probed shapes and move them to the device."""
        knowledge.setup(self.models.shapes(student), self.models.shapes(teacher), self.models.info)
        self.models.place(knowledge)

    def distill(self, student, teacher, node: DictConfig, *, name: str = "student", epochs: int | None = None,
                ckpt_dir: Path | None = None, metrics=None, resume: bool | None = None,
                label: str | None = None, cache=None) -> FitResult:
        """Train ``student`` from the frozen ``teacher`` with cfg.loss: init stages, then the main stage.

        Defaults: this run's checkpoints, metrics, epochs and resume flag. Init stages are skipped
        when resuming a stage that has already started (its checkpoint holds the initialised weights).
        ``cache``: a teacher-output cache, or a function of the teacher taps that gives one.
        """
        from kdrun.schemes.stages import DistillStage

        ckpt_dir = self.ckpt_dir if ckpt_dir is None else ckpt_dir
        metrics = [self.metrics] if metrics is None else metrics
        resume = (bool(self.cfg.trainer.resume) if resume is None else resume) and ckpt_dir is not None
        epochs = int(self.cfg.trainer.epochs) if epochs is None else epochs
        knowledge = self.new_knowledge(student, teacher)
        if not (resume and (ckpt_dir / "last.pt").is_file()):  # a resumed main stage was initialised
            self._init_stages(student, teacher, knowledge, node, name, metrics, label)
        cache = cache(knowledge.teacher_taps() | {"logits"}) if callable(cache) else cache
        fit = self.trainer.fit(DistillStage(student, teacher, knowledge, name, cache=cache), epochs=epochs,
                               lr=self.models.lr_for(node), ckpt_dir=ckpt_dir, metrics=metrics, resume=resume,
                               label=label or name)
        if cache is not None:
            log.info("teacher cache: %d batches read, %d computed (%s)", cache.hits, cache.misses, cache.size_note())
            fit.counts.update(teacher_batches_cached=cache.hits, teacher_batches_computed=cache.misses)
        return fit

    def _init_stages(self, student, teacher, knowledge: KnowledgeSet, node: DictConfig, name: str, metrics,
                     label: str | None) -> None:
        """Each term's initialisation stage (AB connectors, FT paraphraser, FSP...), in order."""
        from kdrun.schemes.stages import InitStage

        for term in knowledge.terms.values():
            if term.init_epochs > 0:
                log.info("init stage of %s: %d epochs", term.name, term.init_epochs)
                self.trainer.fit(
                    InitStage(student, teacher, term, owner=name), epochs=int(term.init_epochs),
                    lr=float(term.init_lr) if term.init_lr is not None else self.models.lr_for(node),
                    ckpt_dir=None, metrics=metrics, label=f"{label or name}: init {term.name}",
                )
