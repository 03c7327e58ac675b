"""The published CIFAR-100 numbers (``published_cifar100.csv``, shipped inside the package).

One row per (method, pair) with a number: ``method, pair, top1, source, epoch_kind, runs, note``.
``top1`` is empty where a table has a cell but no number (RepDistiller's FSP on wrn_40_2 ->
wrn_40_1). ``epoch_kind`` says whether the number is the accuracy after the last epoch or the best
over epochs; ``runs`` how many runs it averages (empty: not stated). ``source`` names the repository
file and table (or paper and table), ``note`` how the number was read and what it means.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kdrun.errors import ConfigError

COLUMNS = ("method", "pair", "top1", "source", "epoch_kind", "runs", "note")
EPOCH_KINDS = ("best", "last")
FILE_NAME = "published_cifar100.csv"


@dataclass(frozen=True)
class Published:
    method: str
    pair: str
    top1: float | None
    source: str
    epoch_kind: str
    runs: int | None
    note: str


def default_text() -> str:
    return resources.files("kdrun.reproduce").joinpath(FILE_NAME).read_text(encoding="utf-8")


def _optional(text: str, cast, what: str, kind: str):
    """``cast(text)``, or None for an empty cell; a bad value is a ConfigError ``<what> '<text>' is not <kind>``."""
    text = text.strip()
    try:
        return cast(text) if text else None
    except ValueError:
        raise ConfigError(f"{what} '{text}' is not {kind}") from None


def parse(text: str, where: str = FILE_NAME) -> dict[tuple[str, str], Published]:
    """(method, pair) -> row; a malformed file is one ConfigError naming the line and the value."""
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise ConfigError(f"{where}: columns are {', '.join(reader.fieldnames or [])}; expected {', '.join(COLUMNS)}")
    rows: dict[tuple[str, str], Published] = {}
    for line, r in enumerate(reader, start=2):
        method, pair = r["method"].strip(), r["pair"].strip()
        if not method or not pair:
            raise ConfigError(f"{where}:{line}: method and pair must not be empty")
        value = _optional(r["top1"], float, f"{where}:{line}: top1", "a number")
        if value is not None and not 0.0 <= value <= 100.0:
            raise ConfigError(f"{where}:{line}: top1 {value} is outside [0, 100]")
        kind = r["epoch_kind"].strip()
        if kind not in EPOCH_KINDS:
            raise ConfigError(f"{where}:{line}: epoch_kind '{kind}'; valid: {', '.join(EPOCH_KINDS)}")
        runs = _optional(r["runs"], int, f"{where}:{line}: runs", "an integer")
        if not r["source"].strip():
            raise ConfigError(f"{where}:{line}: source is empty (every number needs one)")
        if (method, pair) in rows:
            raise ConfigError(f"{where}:{line}: a second row for method {method}, pair {pair}")
        rows[(method, pair)] = Published(method, pair, value, r["source"].strip(), kind, runs, r["note"].strip())
    return rows


def load(path: str | Path | None = None) -> dict[tuple[str, str], Published]:
    """The shipped table, or the CSV at ``path``."""
    if path is None:
        return parse(default_text())
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read published numbers '{path}': {exc.strerror or exc}") from None
    return parse(text, str(path))
