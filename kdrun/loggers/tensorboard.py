"""``logger=tensorboard``: TensorBoard event files under ``<run dir>/tensorboard`` (torch.utils.tensorboard).

One TensorBoard run per stage (``tensorboard/<stage>/``: teacher, student, init_ab...), so a resumed
stage can drop its own stale events: its writer opens with ``purge_step`` at the first step it
logs again. Tags: ``step/loss``, ``step/loss_<term>``, ``step/lr`` every ``trainer.log_every`` steps;
``epoch/<column>`` for each number of the stage's metrics.csv row (``epoch/test_top1``...; with
several scored models ``epoch/test_top1/<model>``), at the step that ended the epoch. The run's
config is the text ``config`` and the hparams of ``tensorboard/`` itself, with the summary's
results as the hparams' metrics when the run ends. ``tensorboard --logdir outputs/runs`` shows them.
"""

from __future__ import annotations

from pathlib import Path

from kdrun.loggers import Tracker, flat_params, row_scalars

#: summary keys shown as the hparams' metrics (those the run has)
RESULT_KEYS = ("student_top1_best", "student_top1_last", "student_top5_best", "teacher_top1",
               "student_baseline_top1", "gain_top1")


class TensorBoardLogger(Tracker):
    requires = ("tensorboard", "tensorboard")

    def __init__(self, dir: str = "tensorboard", flush_secs: int = 30) -> None:  # noqa: A002 - the config key
        self.dir, self.flush_secs = dir, int(flush_secs)
        self.root: Path | None = None
        self.config: dict = {}
        self.writers: dict = {}  # stage -> SummaryWriter
        self.last_step: dict[str, int] = {}  # stage -> its last logged step (an epoch row is logged there)

    def open(self, run_dir: Path, config: dict, resume: bool) -> None:
        self.root = Path(run_dir) / self.dir
        self.config = config
        import yaml

        text = yaml.safe_dump(config, sort_keys=False)
        self._writer(None, 0).add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)

    def _writer(self, stage: str | None, step: int):
        """The stage's writer (None: the run's own, ``tensorboard/``); opened at its first event,
        dropping the stage's events from ``step`` on (those of an interrupted attempt)."""
        if stage not in self.writers:
            from torch.utils.tensorboard import SummaryWriter

            where = self.root if stage is None else self.root / stage
            self.writers[stage] = SummaryWriter(str(where), flush_secs=self.flush_secs,
                                                purge_step=None if stage is None else step)
        return self.writers[stage]

    def truncate(self, stage: str, after_epoch: int) -> None:
        writer = self.writers.pop(stage, None)
        if writer is not None:  # the stage trains again in this run: its next writer purges
            writer.close()
        self.last_step.pop(stage, None)

    def log_step(self, stage: str, step: int, scalars: dict[str, float]) -> None:
        writer = self._writer(stage, step)
        for key, value in scalars.items():
            writer.add_scalar(f"step/{key}", value, step)
        self.last_step[stage] = step

    def append(self, row: dict) -> None:
        stage = str(row["stage"])
        step = self.last_step.get(stage, int(row["epoch"]))
        writer = self._writer(stage, step)
        suffix = f"/{row['model']}" if row.get("model") else ""
        for key, value in row_scalars(row).items():
            writer.add_scalar(f"epoch/{key}{suffix}", value, step)
        writer.flush()

    def close(self, summary: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        metrics = {f"result/{k}": float(summary[k]) for k in RESULT_KEYS if isinstance(summary.get(k), (int, float))}
        params = {k: v for k, v in flat_params(self.config).items() if not k.startswith("hydra")}
        params["status"] = str(summary.get("status"))
        writer = self._writer(None, 0)
        for event in hparams(params, metrics):
            writer.file_writer.add_summary(event)
        for key, value in metrics.items():
            writer.add_scalar(key, value, 0)
        for w in self.writers.values():
            w.close()
        self.writers.clear()
