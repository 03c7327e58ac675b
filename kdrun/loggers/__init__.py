"""Experiment trackers: where a run's metrics go besides the console.

A tracker is one class and one YAML (``conf/logger/<name>.yaml``, ``_target_`` naming the class);
``logger=tensorboard`` or ``logger=[csv,tensorboard,mlflow]`` selects them. Each gets the run's
metrics as the trainer produces them (:class:`Tracker`): ``truncate(stage, epoch)`` when a stage
starts (a resume redoes the epochs after its checkpoint), ``append(row)`` per scored epoch (one
metrics.csv row), ``log_step(stage, step, scalars)`` every ``trainer.log_every`` steps (and the last
step of every epoch; ``step`` counts the stage's optimizer steps from 1). :class:`RunLog` is the set
of them the trainer writes to. metrics.csv is always written (:class:`kdrun.loggers.csv.CsvLogger`):
resume, sweep tables and reports read it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from kdrun.errors import require_extra

log = logging.getLogger("kdrun")


class Tracker:
    """One experiment tracker of a run. Subclasses override what they record; the defaults do nothing."""

    #: the Python module the tracker needs and the kdrun extra that installs it (None: nothing)
    requires: tuple[str, str] | None = None
    #: True: the trainer records per-step scalars for it (False: epoch rows are enough)
    wants_steps: bool = True
    #: True: a failure stops the run (metrics.csv); False: the tracker is dropped with one warning
    essential: bool = False

    @classmethod
    def check(cls, name: str, node) -> None:
        """Before anything trains (kdrun.config.checks): the tracker's package is installed and its
        settings (``node``, its config) are valid; else one ConfigError line."""
        cls.check_installed(name)

    @classmethod
    def check_installed(cls, name: str) -> None:
        """One ConfigError line naming the extra when the tracker's package is missing."""
        if cls.requires is None:
            return
        module, extra = cls.requires
        require_extra(f"logger={name}", module, extra)

    def open(self, run_dir: Path, config: dict, resume: bool) -> None:
        """Start recording the run in ``run_dir`` (``config``: the resolved run config, plain)."""

    def truncate(self, stage: str, after_epoch: int) -> None:
        """``stage`` (re)starts after epoch ``after_epoch``: what a tracker holds of later epochs is stale."""

    def append(self, row: dict) -> None:
        """One scored epoch of a stage: a metrics.csv row (stage, epoch, lr, losses, accuracies...)."""

    def log_step(self, stage: str, step: int, scalars: dict[str, float]) -> None:
        """The training loss, each term's weighted loss and the lr at optimizer step ``step``."""

    def close(self, summary: dict) -> None:
        """The run ended (``summary``: summary.json's content, with its status)."""


class RunLog:
    """A run's trackers as one metrics sink of the trainer (``append``, ``truncate``, ``log_step``).

    A non-essential tracker that fails is dropped with one warning line; the run goes on.
    """

    def __init__(self, trackers: Iterable[Tracker] = ()) -> None:
        self.trackers = list(trackers)

    @property
    def wants_steps(self) -> bool:
        return any(t.wants_steps for t in self.trackers)

    def open(self, run_dir: Path, config: dict, resume: bool) -> None:
        self._each("open", run_dir, config, resume)

    def truncate(self, stage: str, after_epoch: int) -> None:
        self._each("truncate", stage, after_epoch)

    def append(self, row: dict) -> None:
        self._each("append", row)

    def log_step(self, stage: str, step: int, scalars: dict[str, float]) -> None:
        self._each("log_step", stage, step, scalars, steps_only=True)

    def close(self, summary: dict) -> None:
        self._each("close", summary)

    def _each(self, method: str, *args, steps_only: bool = False) -> None:
        for tracker in list(self.trackers):
            if steps_only and not tracker.wants_steps:
                continue
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a tracker's trouble must not end the training
                if tracker.essential:
                    raise
                self.trackers.remove(tracker)
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                log.warning("logger %s stopped recording (%s: %s); the run goes on", type(tracker).__name__,
                            type(exc).__name__, first)


def with_metrics_csv(trackers: list[Tracker]) -> list[Tracker]:
    """The selected trackers with metrics.csv's in front when the selection left it out."""
    from kdrun.loggers.csv import CsvLogger

    return trackers if any(isinstance(t, CsvLogger) for t in trackers) else [CsvLogger(), *trackers]


def flat_params(config: dict, prefix: str = "") -> dict[str, object]:
    """``{"a.b.c": value}`` of a nested config; lists as text, None as ``null`` (what trackers take)."""
    out: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = "[" + ",".join(str(v) for v in value) + "]"
        elif value is None:
            out[name] = "null"
        else:
            out[name] = value
    return out


def row_scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics row (stage, epoch and model left out), NaN (an unscored epoch) too."""
    skip = {"stage", "epoch", "model"}
    out = {}
    for key, value in row.items():
        if key in skip or isinstance(value, bool):
            continue
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


#: numeric summary keys that are settings, not results
SETTINGS = ("seed", "epochs", "world_size")


def summary_numbers(summary: dict) -> dict[str, float]:
    """The results of a summary: its numbers, less the settings (seed, epochs, command-line overrides)."""
    return {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and "." not in k and k not in SETTINGS}
