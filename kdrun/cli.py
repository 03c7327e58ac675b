"""The `kdrun` command (also `python -m kdrun`): Hydra entrypoint around :func:`kdrun.run.run`.

Before Hydra composes, group choices on the command line are checked (an unknown name is one line
listing the valid ones) and `loss=a+b` combinations are registered as configs whose defaults list
is [a, b], so they work unquoted in single runs and multirun sweeps alike.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from kdrun.config import CONF_DIR, check_overrides, register_resolvers
from kdrun.errors import KdrunError


def _error(message: str) -> None:
    print(f"kdrun: error: {message}", file=sys.stderr, flush=True)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _hydra_entry(cfg: DictConfig):
    from kdrun.run import run

    try:
        summary = run(cfg)
    except KeyboardInterrupt:
        _error("interrupted; summary.json says status failed")
        sys.exit(130)
    except KdrunError as exc:
        _error(str(exc))
        if _is_multirun():
            return None  # a failed job is a row in the sweep table; the sweep goes on
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - the traceback goes to kdrun.log, the user gets one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _error(f"{type(exc).__name__}: {first} (traceback in the run dir's kdrun.log)")
        if _is_multirun():
            return None
        sys.exit(1)
    from kdrun.report.console import print_summary

    print_summary(summary)
    metric = cfg.get("optimize_metric")
    return summary.get(str(metric)) if metric else None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not sys.stdout.isatty():
        os.environ.setdefault("COLUMNS", "160")  # rich wraps at 80 columns in logs and pipes otherwise
    register_resolvers()
    try:
        check_overrides(argv)
    except KdrunError as exc:
        _error(str(exc))
        sys.exit(exc.exit_code)
    sys.argv = [sys.argv[0] if sys.argv else "kdrun"] + argv
    _hydra_entry()


if __name__ == "__main__":
    main()
