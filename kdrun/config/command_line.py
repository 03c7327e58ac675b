"""Checks of a `kdrun` command line before Hydra starts (so a rejected command creates no run dir).

After the names (:func:`kdrun.config.check_overrides`): the syntax of every override, that every
key exists (did-you-mean for near misses), every value of a run (:func:`kdrun.run.validate_run_config`),
a resume against the run dir's config, and that the output location can be written. A sweep of up
to :data:`MAX_CHECKED_JOBS` jobs has each job checked: when every job is rejected the sweep is;
when only some are, those run and fail on their own (a failed row each in results.csv). Each
failure is one ConfigError.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

from kdrun.errors import ConfigError

#: Hydra's flags that take the next word as their value
VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc"}
INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
#: flags with which Hydra shows something and runs nothing
SHOW_FLAGS = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion",
              "-sc", "--resolve", "--package", "-p"}
#: Hydra's flags of which one command may give only one (flag -> its long name)
MODE_FLAGS = {"--run": "--run", "-r": "--run", "--multirun": "--multirun", "-m": "--multirun", "--cfg": "--cfg",
              "-c": "--cfg", "--info": "--info", "-i": "--info", "--shell-completion": "--shell-completion",
              "-sc": "--shell-completion"}
#: sweeps up to this many jobs have every job's config checked before the first job starts
MAX_CHECKED_JOBS = 16


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags with their values, overrides)."""
    flags, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            flags.append(arg)
            takes = arg in VALUE_FLAGS or (arg in ("--info", "-i") and i + 1 < len(argv) and argv[i + 1] in INFO_VALUES)
            if takes and i + 1 < len(argv) and "=" not in arg:
                flags.append(argv[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides


def key_of(text: str) -> str:
    return text.split("=", 1)[0].lstrip("+~")


def is_hydra(text: str) -> bool:
    key = key_of(text)
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def parse(overrides: list[str]) -> list:
    """Hydra's parse of every override; a syntax error is one line naming the override."""
    from kdrun.config import parse_override

    return [parse_override(text) for text in overrides]


def jobs_of(overrides: list[str], parsed: list) -> list[list[str]] | None:
    """The override lists of a sweep's jobs (Hydra's basic sweeper: the product of every sweep's
    values, :func:`kdrun.config.sweep_values`); None when a value cannot be listed (e.g. interval())."""
    from kdrun.config import sweep_values

    axes = []
    for text, ov in zip(overrides, parsed):
        if not ov.is_sweep_override():
            axes.append([text])
            continue
        values = sweep_values(ov)
        if values is None:  # sweeps only a sweeper plugin understands
            return None
        key = text.split("=", 1)[0]
        axes.append([f"{key}={v}" for v in values])
    return [list(job) for job in itertools.product(*axes)]


#: Hydra's list of the keys its ``${hydra.job.override_dirname}`` leaves out
EXCLUDE_KEYS = "hydra.job.config.override_dirname.exclude_keys"


def job_dirname_override(overrides: list[str]) -> list[str]:
    """The override that makes each sweep job's folder name show its swept values: Hydra's
    ``override_dirname`` (used by ``hydra.sweep.subdir`` in conf/train.yaml) then leaves out every
    key the command line gives one value. [] when there is none, or the command line sets the list."""
    from kdrun.config import parse_override

    fixed: list[str] = []
    for text in overrides:
        if key_of(text) == EXCLUDE_KEYS:
            return []
        try:
            ov = None if is_hydra(text) else parse_override(text)
        except ConfigError:  # only where nothing runs (--cfg, --help): Hydra says what it cannot read
            continue
        if ov is not None and not ov.is_sweep_override() and ov.key_or_group not in fixed:
            fixed.append(ov.key_or_group)
    return [f"{EXCLUDE_KEYS}=[{','.join(repr(k) for k in fixed)}]"] if fixed else []


def check_command_line(argv: list[str]) -> None:
    """Everything about a command that can be known before Hydra starts (see the module docstring)."""
    from kdrun.config import compose, config_groups

    global OUTPUT_BASE
    OUTPUT_BASE = None
    flags, overrides = split_argv(argv)
    modes = sorted({MODE_FLAGS[f.split("=", 1)[0]] for f in flags if f.split("=", 1)[0] in MODE_FLAGS})
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} cannot be combined (Hydra runs one of --run, --multirun, --cfg, "
                          "--info, --shell-completion); drop all but one")
    if any(f.split("=", 1)[0] in SHOW_FLAGS for f in flags):
        return
    multirun = "-m" in flags or "--multirun" in flags
    mine = [o for o in overrides if not is_hydra(o)]
    parsed = parse(mine)
    if not multirun:
        for text, ov in zip(mine, parsed):
            if ov.is_sweep_override():
                key = text.split("=", 1)[0]
                raise ConfigError(f"{text} gives several values, which is a sweep: run each with kdrun -m {text}; "
                                  f"for one list value write {key}='[{text.split('=', 1)[1]}]'")
    groups = set(config_groups())
    jobs = jobs_of(mine, parsed) if multirun else [mine]
    if jobs is None:  # a sweeper's own syntax: check the keys of one job only
        jobs, full = [[o for o, p in zip(mine, parsed) if not p.is_sweep_override()]], False
    else:
        full = len(jobs) <= MAX_CHECKED_JOBS
    rejected = []
    for k, job in enumerate(jobs if full else jobs[:1]):
        try:
            cfg = check_job(job, groups, full, compose)
        except ConfigError as exc:
            if not multirun:
                raise
            rejected.append(f"job {k} ({' '.join(job)}): {exc}")
            continue
        if cfg is not None and not multirun:
            OUTPUT_BASE = check_run_dir(cfg, _flag_value(overrides, "hydra.run.dir"))
    if rejected and (len(rejected) == len(jobs) or not full):
        # nothing of this sweep could run (where only some jobs are bad, those become failed rows)
        raise ConfigError(f"every job of this sweep is rejected, e.g. {rejected[0]}")
    if multirun:
        sweep_dir = _flag_value(overrides, "hydra.sweep.dir")
        if sweep_dir:
            _not_a_file("hydra.sweep.dir", sweep_dir)
            check_writable(Path(sweep_dir).parent)


def check_run_dir(cfg, run_dir: str | None) -> Path:
    """A single run's places: the run dir (and a resume's config), the output root, the store and the
    cache can be folders and written; returns the deepest existing folder above the output root."""
    if run_dir:
        _not_a_file("hydra.run.dir", run_dir)
    if cfg.trainer.resume is True:
        _check_resume_dir(run_dir)
    if run_dir and cfg.trainer.resume is True and (Path(run_dir) / "config.yaml").is_file():
        from kdrun.run import check_resume

        check_resume(cfg, Path(run_dir))
    root = Path(run_dir).parent if run_dir else Path(str(cfg.paths.output_root))
    _folder_possible("hydra.run.dir" if run_dir else "paths.output_root", str(run_dir or root))
    for key in ("paths.store", "paths.cache"):
        _folder_possible(key, str(_resolved(cfg, key)))
    base = _deepest_existing(root)
    check_writable(root)
    return base


#: the deepest folder above a single run's output location that existed before this command: a run
#: rejected after Hydra made its run dir removes the empty folders below it (:func:`remove_empty_dirs`)
OUTPUT_BASE: Path | None = None


def _deepest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def remove_empty_dirs(run_dir: str | Path, base: Path | None = None) -> None:
    """Remove ``run_dir`` and the folders above it when empty, up to (not including) ``base``, by
    default the folder that existed before this command (:data:`OUTPUT_BASE`): a rejected run
    leaves nothing behind."""
    base = OUTPUT_BASE if base is None else base
    path = Path(run_dir).absolute()
    if base is None or base not in path.parents:
        return
    while path != base:
        if path.exists():
            try:
                path.rmdir()  # only when empty
            except OSError:
                return
        path = path.parent


def _check_resume_dir(run_dir: str | None) -> None:
    """trainer.resume=true continues a run in its own run dir: it must be named and exist."""
    if not run_dir:
        raise ConfigError("trainer.resume=true needs the run dir of the interrupted run: add hydra.run.dir=DIR "
                          "(kdrun printed the whole resume command when the run stopped)")
    if not Path(run_dir).exists():
        raise ConfigError(f"trainer.resume=true: hydra.run.dir={run_dir} does not exist; give the run dir of the "
                          "interrupted run, or drop trainer.resume to start a new run")


def _resolved(cfg, key: str):
    from kdrun.config.checks import _get

    return _get(cfg, key)


def _folder_possible(key: str, value: str) -> None:
    """``value`` is a folder or can become one: no file on its way, and the deepest existing
    folder above it writable. Nothing is created (the store and the cache are made when used)."""
    path = Path(value).absolute()
    base = _deepest_existing(path)
    if not base.is_dir():
        where = "is a file" if base == path else f"lies under {base}, a file"
        raise ConfigError(f"{key}={value} {where}, not a folder; give a folder with {key}=DIR")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={value}: cannot write to {base}; give a writable folder with {key}=DIR")


def _not_a_file(key: str, value: str) -> None:
    if Path(value).exists() and not Path(value).is_dir():
        raise ConfigError(f"{key}={value} is a file, not a folder; give a folder for the run's outputs")


def check_job(job: list[str], groups: set[str], full: bool, compose):
    """Keys of one run's overrides; with ``full`` every value too (returns the composed config)."""
    from kdrun.config.checks import check_keys

    choices = [o for o in job if key_of(o) in groups and "." not in key_of(o)]
    keys = [o for o in job if o not in choices]
    base = compose(choices)
    plain = []
    for text in keys:
        key = key_of(text)
        if text.startswith("~"):
            plain.append(key)
        elif text.startswith("+") and not text.startswith("++"):
            if "." not in key:
                continue  # a new root key (a tag for the sweep table): kdrun stores it, reads nothing from it
            if _exists(base, key):
                raise ConfigError(f"{text}: {key} exists already; set it without '+': {text.lstrip('+')}")
            plain.append(key)
        else:
            plain.append(key)
    check_keys(base, plain)
    if not full:
        return None
    try:
        cfg = compose(job)
    except Exception as exc:  # noqa: BLE001 - Hydra's composition errors span several lines
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot compose the config: {first}") from None
    from kdrun.run import validate_run_config

    validate_run_config(cfg)
    return cfg


def _exists(cfg, key: str) -> bool:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default="<missing>", throw_on_missing=False) != "<missing>"


def _flag_value(overrides: list[str], key: str) -> str | None:
    for text in overrides:
        if key_of(text) == key and "=" in text:
            return text.split("=", 1)[1]
    return None


def check_writable(root: Path) -> None:
    """The output location must take a file: one line naming it and the fix, never a traceback."""
    created = _deepest_existing(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".kdrun-write-check-"):
            pass
    except OSError as exc:
        remove_empty_dirs(root, created)
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot write to the output location {root} ({reason}); choose a writable place "
                          "with paths.output_root=DIR") from None
    if not os.access(root, os.W_OK):
        raise ConfigError(f"cannot write to the output location {root}; choose one with paths.output_root=DIR")
