"""The `kdrun` command (also `python -m kdrun`): Hydra entrypoint around :func:`kdrun.run.run`.

Before Hydra composes, group choices on the command line are checked (an unknown name is one line
listing the valid ones) and `loss=a+b` combinations are registered as configs whose defaults list
is [a, b], so they work unquoted in single runs and multirun sweeps alike.

In a multirun (`kdrun -m`) each job refreshes the sweep table `<sweep dir>/results.csv` when it
ends, ok or failed, so the table is current under any launcher (the task function is what every
launcher runs: in this process, in joblib workers, on SLURM nodes). A failed job does not stop the
sweep; after Hydra returns, `kdrun -m` exits 1 when any of its jobs did not end ok.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile

import hydra
from omegaconf import DictConfig

from kdrun import __version__
from kdrun.config import CONF_DIR, check_overrides, component_class, normalize_argv, register_resolvers, set_search_path
from kdrun.config.command_line import EXCLUDE_KEYS, check_command_line, job_dirname_override, split_argv
from kdrun.errors import Interrupted, KdrunError, require_extra

# Jobs of parallel and cluster launchers run in other processes; whichever way they load the task
# function from this module, the resolver of the run-dir name must exist there as well.
register_resolvers()

#: launcher/sweeper choices that come from optional plugins: name -> (plugin module, kdrun extra)
PLUGIN_CHOICES = {
    "hydra/launcher": {
        "parallel": ("hydra_plugins.hydra_joblib_launcher", "joblib"),
        "joblib": ("hydra_plugins.hydra_joblib_launcher", "joblib"),
        "slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
        "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
        "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    },
    "hydra/sweeper": {
        "kd_optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
        "optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    },
}


def _error(message: str) -> None:
    print(f"kdrun: error: {message}", file=sys.stderr, flush=True)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def check_plugins(argv: list[str]) -> None:
    """A launcher or sweeper from a plugin that is not installed: one line naming the extra."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        choices = PLUGIN_CHOICES.get(key.lstrip("+~"))
        if not sep or choices is None or value.strip() not in choices:
            continue
        module, extra = choices[value.strip()]
        require_extra(f"{key.lstrip('+~')}={value}", module, extra, needs="a Hydra plugin that is not installed")


def pin_job_device(cfg: DictConfig, job_num: int | None = None, device_count: int | None = None) -> str | None:
    """Spread a multirun's jobs over the visible GPUs: job k gets ``cuda:(k % count)``.

    Only when ``trainer.device=auto`` and at least two CUDA devices are visible; otherwise (CPU, one
    GPU, an explicit device) the config is left alone and None is returned. With a parallel
    launcher, n_jobs equal to the GPU count then puts one job on each GPU.
    """
    if str(cfg.trainer.get("device") or "auto") != "auto":
        return None
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count()
    if device_count < 2:
        return None
    if job_num is None:
        from hydra.core.hydra_config import HydraConfig

        job_num = int(HydraConfig.get().job.num)
    device = f"cuda:{job_num % device_count}"
    cfg.trainer.device = device
    logging.getLogger("kdrun").info("job %d: trainer.device=auto -> %s (%d CUDA devices)", job_num, device,
                                    device_count)
    return device


def _refresh_sweep_table() -> None:
    """Rebuild results.csv of this job's sweep; a problem there is one line, never a failed job."""
    try:
        from hydra.core.hydra_config import HydraConfig

        from kdrun.report.sweep import refresh_results

        refresh_results(HydraConfig.get().sweep.dir)
    except Exception as exc:  # noqa: BLE001
        _error(f"could not refresh the sweep table: {exc}".splitlines()[0])


def _job(cfg: DictConfig, multirun: bool):
    from kdrun.run import run

    try:
        summary = run(cfg, keep_rejected=multirun)
    except KeyboardInterrupt as exc:
        _interrupted(exc, multirun)
    except KdrunError as exc:
        _error(str(exc))
        if multirun:
            # a failed job is a row in the sweep table; the sweep goes on. None, not NaN: the Optuna
            # sweeper records a None as a failed trial and goes on (a NaN makes Optuna 2.x raise)
            return None
        if exc.exit_code == 2:  # rejected input: run() removed its run dir; the empty folders above go too
            _remove_empty_run_dirs()
        sys.exit(exc.exit_code)
    except OSError as exc:  # the output location filled up or went away while running
        _error(_os_error_text(exc))
        if multirun:
            return None
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - the traceback goes to kdrun.log, the user gets one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _error(f"{type(exc).__name__}: {first} (traceback in the run dir's kdrun.log)")
        if multirun:
            return None
        sys.exit(1)
    from kdrun.report.console import print_summary

    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for the run
        print_summary(summary, component_class(cfg.scheme).report_rows)
    metric = cfg.get("optimize_metric")
    if not metric:
        return None
    if str(metric) not in summary:  # every job would fail the same way: stop here
        numeric = [k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        _error(f"optimize_metric={metric} is not a summary.json key; valid: {', '.join(numeric)}")
        sys.exit(2)
    return summary[str(metric)]


def _remove_empty_run_dirs() -> None:
    from hydra.core.hydra_config import HydraConfig

    from kdrun.config.command_line import remove_empty_dirs

    try:
        remove_empty_dirs(HydraConfig.get().runtime.output_dir)
    except (ValueError, OSError):
        pass


def _os_error_text(exc: OSError) -> str:
    where = f" {exc.filename}" if exc.filename else ""
    return (f"cannot write{where}: {exc.strerror or exc}; free space there or write elsewhere with "
            "paths.output_root=DIR")


def resume_command(argv: list[str], run_dir: str, multirun: bool) -> str:
    """The command that continues an interrupted run (or sweep) where it stopped."""
    import shlex

    dir_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    # kdrun's own list of the keys left out of the job folders' names goes too: it is derived again
    # (with trainer.resume in it), so that the resumed jobs find their folders
    drop = (dir_key, "trainer.resume", EXCLUDE_KEYS)
    keep = [a for a in argv if a.split("=", 1)[0].lstrip("+~") not in drop]
    return shlex.join(["kdrun", *keep, f"{dir_key}={run_dir}", "trainer.resume=true"])


def _interrupted(exc: KeyboardInterrupt, multirun: bool) -> None:
    """Ctrl-C or SIGTERM: say where the run stopped and how to resume it; exit 130 / 143."""
    import signal as signals

    from hydra.core.hydra_config import HydraConfig

    signum = getattr(exc, "signum", signals.SIGINT)
    hc = HydraConfig.get()
    where = hc.sweep.dir if multirun else hc.runtime.output_dir
    command = resume_command(sys.argv[1:], str(where), multirun)
    name = signals.Signals(signum).name
    _error(f"interrupted by {name}; summary.json says status interrupted; resume with:")
    print(command, file=sys.stderr, flush=True)
    try:
        with open(os.path.join(hc.runtime.output_dir, "kdrun.log"), "a") as log_file:
            log_file.write(f"kdrun: interrupted by {name}; resume with:\n{command}\n")
    except OSError:
        pass
    sys.exit(128 + int(signum))


def _sweeper_optimises() -> bool:
    from hydra.core.hydra_config import HydraConfig

    target = str(HydraConfig.get().sweeper.get("_target_", "")).lower()
    return any(name in target for name in ("optuna", "nevergrad", "ax_sweeper"))


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _hydra_entry(cfg: DictConfig):
    if not _is_multirun():
        return _job(cfg, multirun=False)
    if not cfg.get("optimize_metric") and _sweeper_optimises():
        _error("this sweeper optimises the value each job returns: set optimize_metric to a summary.json key, "
               "e.g. optimize_metric=student_top1_best")
        sys.exit(2)
    try:
        pin_job_device(cfg)
        return _job(cfg, multirun=True)
    finally:
        _refresh_sweep_table()


def _report_sweep() -> None:
    """After a multirun: where its table is; exit 1 when any of its jobs did not end ok."""
    from kdrun.report import sweep

    outcome, sweep.LAST_OUTCOME = sweep.LAST_OUTCOME, None
    if outcome is None or outcome.table is None:
        return
    older = len(outcome.table.rows) - len(outcome.jobs)
    extra = f"; {older} from an earlier sweep into this dir" if older > 0 else ""
    print(f"sweep table: {outcome.table.path} ({outcome.table.counts_text()}{extra})", flush=True)
    cached, computed = (sum(_count(r.get(key)) for r in outcome.jobs)
                        for key in ("teacher_batches_cached", "teacher_batches_computed"))
    if cached:
        print(f"teacher outputs: {cached} of {cached + computed} batches read from the cache, computed for "
              f"{computed} (teacher.cache; per job in the teacher_batches_* columns)", flush=True)
    bad = outcome.not_ok
    if bad:
        nums = ", ".join(str(r.get("job")) for r in bad)
        _error(f"{len(bad)} of {len(outcome.jobs)} jobs did not end ok (job {nums}); "
               f"see the status and error columns of {outcome.table.path}")
        sys.exit(1)


def _count(value) -> int:
    """A results.csv count (a number, or empty / NaN / None for a job that has none) as an int."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0
    return int(number) if number == number else 0


def _on_sigterm(signum, frame) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _main(argv)
    except BrokenPipeError:  # `kdrun --help | head -1`: the reader left; no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    except KeyboardInterrupt as exc:  # before or after any run (a run's own interrupt is handled in _job)
        sys.exit(getattr(exc, "exit_code", 130))


def _main(argv: list[str]) -> None:
    if not sys.stdout.isatty():
        os.environ.setdefault("COLUMNS", "160")  # rich wraps at 80 columns in logs and pipes otherwise
    if "--version" in split_argv(argv)[0]:  # kdrun's version, not Hydra's
        print(f"kdrun {__version__}", flush=True)
        return
    register_resolvers()
    set_search_path(argv)
    try:
        argv = normalize_argv(argv)
        check_overrides(argv)
        check_plugins(argv)
        check_command_line(argv)
    except KdrunError as exc:
        _error(str(exc))
        sys.exit(exc.exit_code)
    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and rank != 0:
        # torchrun: only rank 0 keeps a run dir; the other ranks' Hydra output goes to a scratch dir
        scratch = tempfile.mkdtemp(prefix=f"kdrun-rank{rank}-hydra-")
        argv = argv + [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]
    flags, overrides = split_argv(argv)  # Hydra's parser takes its flags only before the overrides
    if "-m" in flags or "--multirun" in flags:  # job folders named by their swept values
        overrides += job_dirname_override(overrides)
    sys.argv = [sys.argv[0] if sys.argv else "kdrun"] + flags + overrides
    try:
        _hydra_entry()
        sys.stdout.flush()
    finally:
        if rank != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            shutil.rmtree(scratch, ignore_errors=True)
    _report_sweep()


if __name__ == "__main__":
    main()
