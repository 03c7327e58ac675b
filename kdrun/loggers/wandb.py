"""``logger=wandb``: a Weights & Biases run, offline by default (``logger.wandb.mode=offline``: written
under ``<run dir>/wandb``, never sent; upload later with ``wandb sync <run dir>/wandb/offline-run-*``).
``mode=online`` sends it (the only setting that uses the network), ``disabled`` records nothing.

The config as the run's config; ``<stage>/step/loss``, ``<stage>/step/loss_<term>``, ``<stage>/step/lr``
and ``<stage>/<column>`` per scored epoch, each stage against its own step (``<stage>/step``); the
summary's numbers as the run's summary. A resumed kdrun run continues the same W&B run (its id
comes from the run dir).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from kdrun.errors import ConfigError
from kdrun.loggers import Tracker, row_scalars, summary_numbers

MODES = ("offline", "online", "disabled")


class WandbLogger(Tracker):
    requires = ("wandb", "wandb")

    def __init__(self, project: str = "kdrun", entity: str | None = None, mode: str = "offline",
                 dir: str | None = None, tags: list | None = None) -> None:  # noqa: A002 - the config key
        self.project, self.entity, self.mode, self.dir = project, entity, mode, dir
        self.tags = [str(t) for t in (tags or [])]
        self.run = None
        self.stages: set[str] = set()

    @classmethod
    def check(cls, name: str, node) -> None:
        if node.get("mode") not in MODES:
            raise ConfigError(f"logger.{name}.mode={node.get('mode')} is not one of {', '.join(MODES)}")
        super().check(name, node)

    def open(self, run_dir: Path, config: dict, resume: bool) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run_dir = Path(run_dir).resolve()
        where = Path(self.dir).expanduser() if self.dir else run_dir
        where.mkdir(parents=True, exist_ok=True)
        run_id = hashlib.sha256(str(run_dir).encode()).hexdigest()[:16]
        self.run = wandb.init(project=self.project, entity=self.entity, name=run_dir.name, dir=str(where),
                              mode=self.mode, config=config, id=run_id, resume="allow", tags=self.tags or None)

    def _stage(self, stage: str) -> None:
        if stage not in self.stages:
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self.stages.add(stage)

    def log_step(self, stage: str, step: int, scalars: dict[str, float]) -> None:
        self._stage(stage)
        self.run.log({f"{stage}/step": step, **{f"{stage}/step/{k}": v for k, v in scalars.items()}})

    def append(self, row: dict) -> None:
        stage = str(row["stage"])
        self._stage(stage)
        suffix = f"/{row['model']}" if row.get("model") else ""
        self.run.log({f"{stage}/{k}{suffix}": v for k, v in row_scalars(row).items()} | {f"{stage}/epoch": row["epoch"]})

    def close(self, summary: dict) -> None:
        numbers = summary_numbers(summary)
        self.run.summary.update({**numbers, "status": str(summary.get("status"))})
        self.run.finish(exit_code=0 if summary.get("status") == "ok" else 1)
