"""The sweep table: ``results.csv`` in a sweep dir, one row per job, rebuilt from the job dirs.

Every job of a multirun writes ``<job dir>/summary.json``. :func:`refresh_results` walks the sweep
dir, turns each job dir into a row and writes the table atomically while holding a lock file, so
jobs that finish at the same time under a parallel launcher each rebuild the whole table from
what is on disk and the last writer always saw every finished job. A job dir that has Hydra's
``.hydra/overrides.yaml`` but no ``summary.json`` yet (still running, or killed) is a row with
status ``incomplete``.

Columns, in order: ``job`` (Hydra's job number), the swept keys (named by config path, a group
choice by its group: ``loss``), the identity keys, ``status``, the summary's numeric results,
``error``, the fixed command-line overrides, the remaining summary fields, ``job_dir``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from kdrun.config import parse_overrides
from kdrun.engine.io import file_lock, write_text
from kdrun.errors import ConfigError

RESULTS_FILE = "results.csv"
LOCK_FILE = ".results.csv.lock"
#: every row has these, whatever was swept
IDENTITY_KEYS = ("scheme", "teacher", "student", "loss", "dataset", "seed", "epochs")
#: summary fields that describe how a job ran, not what it measured or how it was configured
BOOKKEEPING_KEYS = ("error", "wall_seconds", "device", "amp", "git_sha", "host", "overrides", "run_dir")
INCOMPLETE = "incomplete"
_INCOMPLETE_ERROR = "no summary.json: still running, or stopped before it finished"


# ---------------------------------------------------------------------------- job dirs
def _is_job_dir(names: set[str]) -> bool:
    return "summary.json" in names or ".hydra" in names


def find_job_dirs(root: str | Path) -> list[Path]:
    """Every dir under ``root`` (itself included) with a ``summary.json`` or a ``.hydra/`` dir.

    Job dirs are not searched further (their checkpoints/ and .hydra/ hold no jobs).
    """
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if _is_job_dir(set(filenames) | set(dirnames)):
            found.append(Path(dirpath))
            dirnames[:] = []
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return found


def _read_yaml(path: Path) -> Any:
    """The parsed YAML file (safe loader), or None when it is missing or unreadable."""
    if not path.is_file():
        return None
    import yaml

    try:
        return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, yaml.YAMLError):
        return None


def _read_overrides(job_dir: Path) -> list[str] | None:
    data = _read_yaml(job_dir / ".hydra" / "overrides.yaml")
    return [str(x) for x in data] if isinstance(data, list) else None


def _job_number(job_dir: Path) -> int | None:
    m = re.match(r"(\d+)_", job_dir.name) or re.fullmatch(r"(\d+)", job_dir.name)
    if m:
        return int(m.group(1))
    path = job_dir / ".hydra" / "hydra.yaml"
    if path.is_file():
        m = re.search(r"^\s+num:\s*(\d+)\s*$", path.read_text(), re.MULTILINE)
        if m:
            return int(m.group(1))
    return None


@dataclass
class JobRow:
    """One job: its row values, and the config keys that came from its command line."""

    values: dict[str, Any]
    override_keys: list[str] = field(default_factory=list)


def read_job(job_dir: str | Path) -> JobRow | None:
    """The row of one job dir, or None where the dir is not a kdrun run (e.g. a teacher store entry)."""
    job_dir = Path(job_dir)
    texts = _read_overrides(job_dir)
    summary_path = job_dir / "summary.json"
    summary: dict[str, Any] | None = None
    error = None
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError) as exc:
            error = f"summary.json unreadable: {exc}".splitlines()[0]
        if summary is not None and not (isinstance(summary, dict) and "scheme" in summary):
            return None  # another kind of summary.json (a stored teacher)
    elif texts is None:
        return None
    if texts is None and summary is not None:
        texts = str(summary.get("overrides") or "").split()
    items = parse_overrides(texts or [])
    if summary is None:  # the job has not written its summary yet: its overrides are all we know
        values: dict[str, Any] = {"status": INCOMPLETE, "error": error or _INCOMPLETE_ERROR}
        values.update(items)
    else:
        values = dict(summary)
        for key, value in items:
            values.setdefault(key, value)
    values.pop("run_dir", None)
    values["job"] = _job_number(job_dir)
    values["job_dir"] = str(job_dir.resolve())
    return JobRow(values, [k for k, _ in items])


# ---------------------------------------------------------------------------- table
def swept_keys(sweep_dir: str | Path) -> list[str] | None:
    """The keys a multirun swept (several values), from Hydra's ``multirun.yaml``; None without one."""
    from kdrun.config import parse_override

    data = _read_yaml(Path(sweep_dir) / "multirun.yaml")
    if data is None:
        return None
    try:
        task = data["hydra"]["overrides"]["task"]
    except (KeyError, TypeError):
        return None
    keys = []
    for text in task or []:
        try:
            ov = parse_override(str(text))
        except ConfigError:
            continue
        if ov.is_sweep_override() and not ov.key_or_group.startswith("hydra"):
            keys.append(ov.key_or_group)
    return keys


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class SweepTable:
    path: Path
    columns: list[str]
    rows: list[dict[str, Any]]

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r.get("status") == status)

    def counts_text(self) -> str:
        by_status: dict[str, int] = {}
        for r in self.rows:
            by_status[str(r.get("status"))] = by_status.get(str(r.get("status")), 0) + 1
        parts = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items(), key=lambda kv: kv[0] != "ok"))
        return f"{len(self.rows)} jobs" + (f": {parts}" if parts else "")


def build_table(sweep_dir: str | Path) -> SweepTable:
    """Rows (sorted by job number, then job dir) and ordered columns of every job under ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    jobs = [j for j in (read_job(d) for d in find_job_dirs(sweep_dir)) if j is not None]
    jobs.sort(key=lambda j: (j.values["job"] is None, j.values["job"] or 0, j.values["job_dir"]))
    rows = [j.values for j in jobs]

    seen: list[str] = []  # every key, first-seen order
    for r in rows:
        seen.extend(k for k in r if k not in seen)
    override_keys: list[str] = []
    for j in jobs:
        override_keys.extend(k for k in j.override_keys if k not in override_keys)
    swept = swept_keys(sweep_dir)
    if swept is None:  # no multirun.yaml: the overrides whose value differs between jobs
        swept = [k for k in override_keys if len({json.dumps(r.get(k), default=str) for r in rows}) > 1]

    config_keys = set(override_keys) | set(IDENTITY_KEYS)
    metrics = [k for k in seen if k not in config_keys and k not in BOOKKEEPING_KEYS
               and k not in ("job", "job_dir", "status")
               and any(_is_number(r.get(k)) for r in rows)
               and all(r.get(k) is None or _is_number(r.get(k)) for r in rows)]
    front = ["job", *[k for k in swept if k not in IDENTITY_KEYS], *IDENTITY_KEYS, "status", *metrics, "error"]
    fixed = [k for k in override_keys if k not in front]
    columns: list[str] = []
    for k in [*front, *fixed, *[k for k in seen if k != "job_dir"], "job_dir"]:
        if k not in columns:
            columns.append(k)
    return SweepTable(sweep_dir / RESULTS_FILE, columns, rows)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ""
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def table_csv(table: SweepTable) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.columns)
    for r in table.rows:
        writer.writerow([_cell(r.get(c)) for c in table.columns])
    return buf.getvalue()


def refresh_results(sweep_dir: str | Path) -> SweepTable:
    """Rebuild ``<sweep_dir>/results.csv`` from its job dirs under the lock; write it atomically."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"sweep dir '{sweep_dir}' does not exist")
    with file_lock(sweep_dir / LOCK_FILE):
        table = build_table(sweep_dir)
        if not table.rows:
            raise ConfigError(f"no job dirs (summary.json or .hydra/) under '{sweep_dir}'")
        write_text(table.path, table_csv(table))
    return table


# ---------------------------------------------------------------------------- Hydra callback
@dataclass
class SweepOutcome:
    """What the last multirun of this process did: read by ``kdrun -m`` for its exit code."""

    sweep_dir: Path
    table: SweepTable | None
    jobs: list[dict[str, Any]]  # the rows of the jobs this multirun ran (not older ones in a reused dir)

    @property
    def not_ok(self) -> list[dict[str, Any]]:
        return [r for r in self.jobs if r.get("status") != "ok"]


LAST_OUTCOME: SweepOutcome | None = None


def _job_stamps(sweep_dir: Path) -> dict[tuple[str, str], int]:
    """(job dir, file) -> mtime of the files a job writes (summary.json, .hydra/overrides.yaml)."""
    stamps = {}
    if sweep_dir.is_dir():
        for d in find_job_dirs(sweep_dir):
            for name in ("summary.json", ".hydra/overrides.yaml"):
                try:
                    stamps[(str(d.resolve()), name)] = (d / name).stat().st_mtime_ns
                except OSError:
                    pass
    return stamps


class SweepTableCallback(Callback):
    """Hydra callback (``hydra.callbacks.sweep_table`` in train.yaml), in the launching process.

    Each job refreshes results.csv itself when it ends (in the task function, which every launcher
    runs). This callback adds the final rebuild after the sweep and records which jobs of *this*
    multirun did not end ok, for the exit code of ``kdrun -m``. Jobs are told apart from older
    ones in a reused sweep dir by whether their files changed during the sweep (each file's own
    mtime before and after, so clocks of other machines do not matter).
    """

    def __init__(self) -> None:
        super().__init__()
        self._before: dict[tuple[str, str], int] = {}
        self._dir: Path | None = None

    def _sweep_dir(self, config) -> Path | None:
        try:
            return Path(str(config.hydra.sweep.dir))
        except Exception:  # noqa: BLE001 - an unresolvable sweep dir is Hydra's error to report
            return None

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        global LAST_OUTCOME
        LAST_OUTCOME = None
        self._dir = self._sweep_dir(config)
        self._before = _job_stamps(self._dir) if self._dir is not None else {}

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        global LAST_OUTCOME
        sweep_dir = self._dir or self._sweep_dir(config)
        if sweep_dir is None or not sweep_dir.is_dir():
            return
        try:
            table = refresh_results(sweep_dir)
        except ConfigError:
            LAST_OUTCOME = SweepOutcome(sweep_dir, None, [])
            return
        changed = {d for (d, name), mtime in _job_stamps(sweep_dir).items() if self._before.get((d, name)) != mtime}
        jobs = [r for r in table.rows if r["job_dir"] in changed]
        LAST_OUTCOME = SweepOutcome(sweep_dir, table, jobs)
