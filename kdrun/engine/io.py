"""Atomic file writes: a temp file in the same directory, fsync, then rename over the target."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import filelock

from kdrun.faults import fault_point


@lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Call ``write(fileobj)`` on a temp file next to ``path`` and rename it into place.

    The file gets the permissions a plain ``open()`` would give it (0666 less the umask), not the
    private 0600 of a temp file, so colleagues on a shared machine can read results.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"write {path.name}")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@contextlib.contextmanager
def file_lock(path: str | Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (``filelock``; created if missing) for the ``with`` body;
    ``waiting`` is logged when another process holds it. A killed holder releases it (the OS
    drops its lock), so a lock is never left stale."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        if waiting:
            logging.getLogger("kdrun").info(waiting)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def clean_temp_files(root: str | Path) -> list[Path]:
    """Remove the temp files :func:`atomic_write` leaves behind when a process is killed mid-write
    (``.<name>.<random>.tmp``) under ``root``; call it only where no other process writes."""
    removed = []
    for tmp in Path(root).rglob(".*.tmp"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def recipe_hash(recipe: dict) -> str:
    """A short stable hash of a JSON-able recipe (sorted keys): the name of a store or cache entry."""
    blob = json.dumps(recipe, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
