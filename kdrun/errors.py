"""User-facing errors: one line that names the bad value and the valid choices or the fix."""

from __future__ import annotations

import argparse


class KdrunError(Exception):
    """An error the user can fix. The CLI prints ``kdrun: error: <message>`` and no traceback."""

    exit_code = 1


class ConfigError(KdrunError):
    """Bad configuration or command-line input (unknown name, value out of range, missing file)."""

    exit_code = 2


class DataError(KdrunError):
    """A dataset that cannot be found or read."""

    exit_code = 2


class CheckpointError(KdrunError):
    """A checkpoint that is truncated, foreign, or does not fit the model it is loaded into."""

    exit_code = 2


class DivergedError(KdrunError):
    """Training diverged (non-finite weights, outputs or loss, or an exploding loss): the run's
    status is ``diverged``; the checkpoints keep the last finite epoch."""

    exit_code = 1
    status = "diverged"


class Interrupted(KeyboardInterrupt):
    """SIGTERM (``timeout``, SLURM preemption, Kubernetes) handled like Ctrl-C: the run stops, its
    summary says ``interrupted``, the CLI prints the resume command and exits 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum


def require_extra(what: str, module: str, extra: str, needs: str | None = None) -> None:
    """A ConfigError line unless ``module`` can be imported: ``<what> needs <needs>: pip install 'kdrun[<extra>]'``
    (``needs``: by default "the <module> package, which is not installed")."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package, or a module without a spec
        found = False
    if not found:
        needs = needs or f"the {module} package, which is not installed"
        raise ConfigError(f"{what} needs {needs}: pip install 'kdrun[{extra}]'")


def choices_text(choices) -> str:
    """Render valid choices for an error message: ``a, b, c``."""
    return ", ".join(sorted(str(c) for c in choices))


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is the single line ``<prog>: error: <message>`` (exit 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")
