"""Console progress: a live rich bar on a terminal, one log line per epoch everywhere."""

from __future__ import annotations

import logging
import sys

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger("kdrun")


def progress_enabled(mode: str) -> bool:
    mode = str(mode or "auto")
    if mode == "on":
        return True
    if mode == "off":
        return False
    return sys.stdout.isatty()


class EpochProgress:
    """``with EpochProgress(enabled) as p: p.start(desc, total); p.update(n, text); p.finish()``."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> "EpochProgress":
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=True,
            )
            self._progress.start()
        return self

    def start(self, description: str, total: int) -> None:
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(description, total=total, stats="")

    def update(self, completed: int, stats: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=completed, stats=stats)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
