"""``logger=csv``: metrics.csv, one row per (stage, epoch), always written (resume, sweep tables and
reports read it), whatever other trackers are chosen."""

from __future__ import annotations

from pathlib import Path

from kdrun.engine.metrics import MetricsWriter
from kdrun.loggers import Tracker


class CsvLogger(Tracker):
    wants_steps = False
    essential = True  # the run's own record: a write that fails (a full disk) ends the run

    def __init__(self) -> None:
        self.writer = MetricsWriter(None)

    def open(self, run_dir: Path, config: dict, resume: bool) -> None:
        self.writer = MetricsWriter(Path(run_dir) / "metrics.csv")
        if not resume:  # a fresh run in a used dir starts a fresh table
            self.writer.rows = []

    def truncate(self, stage: str, after_epoch: int) -> None:
        self.writer.truncate(stage, after_epoch)

    def append(self, row: dict) -> None:
        self.writer.append(row)
