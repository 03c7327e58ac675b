"""``kdrun-compare``: a metric from sweep tables, averaged over seeds: mean ± std (n) per cell.

    kdrun-compare PATH... [--pivot ROW_KEY COL_KEY] [--metric student_top1_best]
                  [--group-by KEY...] [--out DIR] [--plot]

PATH is a sweep dir (its results.csv, rebuilt from the job dirs when missing) or a results CSV;
rows of several PATHs are concatenated with a ``source`` column. Only rows with status ok count.
The table goes to the terminal (rich), ``compare.md`` and ``compare.csv`` (mean, std, n columns),
and with --plot to ``compare.png``: a heatmap for --pivot, otherwise the metric against the first
key with one line per combination of the other keys (error bars: std).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kdrun.engine.io import atomic_write, write_text
from kdrun.errors import ConfigError, KdrunError, OneLineParser
from kdrun.report.sweep import (
    BOOKKEEPING_KEYS,
    IDENTITY_KEYS,
    RESULTS_FILE,
    refresh_results,
)

DEFAULT_METRIC = "student_top1_best"
#: never grouped by unless asked: what differs between seeds, jobs and machines rather than configs
NOT_GROUPED = {"seed", "job", "job_dir", "source", "status", *BOOKKEEPING_KEYS}
PLOT_HINT = "pip install 'kdrun[plot]'"


# ---------------------------------------------------------------------------- loading
def _read_csv(path: Path) -> pd.DataFrame:
    try:
        # only empty cells are missing: a model or loss named "none" or "NA" stays a string
        return pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot read '{path}' as a results CSV: {first}") from None


def load(paths: Sequence[str | Path]) -> pd.DataFrame:
    """The rows of every PATH (a sweep dir or a CSV file), with a ``source`` column naming the PATH."""
    frames = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            csv_path = path / RESULTS_FILE
            if not csv_path.is_file():
                refresh_results(path)  # ConfigError when the dir holds no jobs either
        elif path.is_file():
            csv_path = path
        else:
            raise ConfigError(f"'{p}' is neither a sweep dir nor a results CSV file")
        df = _read_csv(csv_path)
        df["source"] = str(p)
        frames.append(df)
    return pd.concat(frames, ignore_index=True, sort=False) if len(frames) > 1 else frames[0]


# ---------------------------------------------------------------------------- columns
def _is_numeric(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s) and s.notna().any()


def _override_keys(df: pd.DataFrame) -> set[str]:
    keys: set[str] = set()
    if "overrides" in df.columns:
        for text in df["overrides"].dropna().astype(str):
            keys.update(tok.split("=", 1)[0].lstrip("+~") for tok in text.split() if "=" in tok)
    return keys


def config_columns(df: pd.DataFrame) -> list[str]:
    """Columns that describe a job's configuration (candidates for grouping).

    The identity keys, the command-line override keys (from the ``overrides`` column), dotted
    config paths, and any other text column that is not bookkeeping. Other numeric columns are
    results (metrics).
    """
    known = set(IDENTITY_KEYS) | _override_keys(df)
    out = []
    for c in df.columns:
        if c in NOT_GROUPED or str(c).endswith("_source"):
            continue
        if c in known or "." in str(c) or not _is_numeric(df[c]):
            out.append(c)
    return out


def numeric_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if _is_numeric(df[c])]


def _check_keys(df: pd.DataFrame, keys: Sequence[str], what: str) -> None:
    for k in keys:
        if k not in df.columns:
            raise ConfigError(f"unknown {what} '{k}'; available columns: {', '.join(map(str, df.columns))}")


def _check_metric(df: pd.DataFrame, metric: str) -> None:
    numeric = numeric_columns(df)
    if metric not in df.columns:
        raise ConfigError(f"unknown metric '{metric}'; available numeric columns: {', '.join(numeric)}")
    if metric not in numeric:
        raise ConfigError(f"metric '{metric}' has no numbers; available numeric columns: {', '.join(numeric)}")


# ---------------------------------------------------------------------------- formatting
def fmt_key(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.10g}"
    return str(v)


def fmt_num(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    a = abs(float(v))
    return f"{v:.2f}" if a == 0 or 0.01 <= a < 1e5 else f"{v:.3g}"


def fmt_cell(mean: float, std: float, n: int) -> str:
    return f"{fmt_num(mean)} ± {fmt_num(std)} ({n})"


# ---------------------------------------------------------------------------- the comparison
@dataclass
class Comparison:
    metric: str
    keys: list[str]  # group keys; with a pivot: [row key, col key]
    pivot: bool
    table: pd.DataFrame  # keys..., mean, std, n (sorted)
    sources: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"{self.metric}: mean ± std over seeds (n)"


def _sort(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    if not keys:
        return df.reset_index(drop=True)

    def key(col: pd.Series) -> pd.Series:
        return col if _is_numeric(col) else col.map(fmt_key)

    return df.sort_values(keys, key=key, na_position="last", kind="stable").reset_index(drop=True)


def aggregate(df: pd.DataFrame, keys: list[str], metric: str) -> pd.DataFrame:
    """keys..., mean, std (ddof=1; NaN where n=1), n per combination of the keys."""
    vals = df.dropna(subset=[metric])
    if keys:
        grouped = vals.groupby(keys, dropna=False, sort=False)[metric]
        out = grouped.agg(["mean", "std", "count"]).reset_index().rename(columns={"count": "n"})
    else:
        s = vals[metric]
        out = pd.DataFrame({"mean": [s.mean()], "std": [s.std(ddof=1)], "n": [int(s.count())]})
    out["n"] = out["n"].astype(int)
    return _sort(out, keys)


def compare(df: pd.DataFrame, *, metric: str = DEFAULT_METRIC, pivot: Sequence[str] | None = None,
            group_by: Sequence[str] | None = None, sources: Sequence[str] = ()) -> Comparison:
    _check_metric(df, metric)
    if pivot and group_by:
        raise ConfigError("--pivot and --group-by do not combine: pivot on two keys, or group by any number")
    pivot = list(pivot or [])
    if pivot and len(set(pivot)) != 2:
        raise ConfigError(f"--pivot needs two different keys, got {' '.join(pivot)}")
    _check_keys(df, pivot, "pivot key")
    _check_keys(df, list(group_by or []), "group-by key")
    notes = []
    if "status" in df.columns:
        bad = df[df["status"].astype(str) != "ok"]
        if len(bad):
            counts = bad["status"].astype(str).value_counts()
            parts = ", ".join(f"{n} {s}" for s, n in counts.items())
            notes.append(f"left out {len(bad)} row{'s' if len(bad) != 1 else ''} that did not end ok ({parts})")
        df = df[df["status"].astype(str) == "ok"]
    if df.empty or df[metric].notna().sum() == 0:
        raise ConfigError(f"no ok rows with a value of {metric} in {', '.join(sources) or 'the input'}")
    candidates = [c for c in config_columns(df) if df[c].nunique(dropna=False) > 1]
    if pivot:
        keys = pivot
    elif group_by:
        keys = list(group_by)
    else:
        keys = candidates
    pooled = [c for c in candidates if c not in keys]
    if pooled:
        notes.append(f"cells also pool rows that differ in {', '.join(pooled)}"
                     + ("" if pivot else " (add them to --group-by to split them)"))
    return Comparison(metric, keys, bool(pivot), aggregate(df, keys, metric), list(sources), notes)


# ---------------------------------------------------------------------------- output
def _pivot_grid(c: Comparison) -> tuple[list, list, dict]:
    rk, ck = c.keys
    rows = list(dict.fromkeys(fmt_key(v) for v in c.table[rk]))
    cols = list(dict.fromkeys(fmt_key(v) for v in _sort(c.table, [ck])[ck]))
    cells = {(fmt_key(r[rk]), fmt_key(r[ck])): r for r in c.table.to_dict("records")}
    return rows, cols, cells


def table_rows(c: Comparison) -> tuple[list[str], list[list[str]]]:
    """Header and body of the displayed table (the same in the terminal and in compare.md)."""
    if c.pivot:
        rk, ck = c.keys
        rows, cols, cells = _pivot_grid(c)
        header = [f"{rk} ↓  {ck} →", *cols]
        body = []
        for r in rows:
            line = [r]
            for col in cols:
                cell = cells.get((r, col))
                line.append(fmt_cell(cell["mean"], cell["std"], int(cell["n"])) if cell is not None else "")
            body.append(line)
        return header, body
    header = [*c.keys, f"{c.metric} mean ± std", "n"]
    body = [[*(fmt_key(r[k]) for k in c.keys), f"{fmt_num(r['mean'])} ± {fmt_num(r['std'])}", str(int(r["n"]))]
            for r in c.table.to_dict("records")]
    if not c.keys:
        header[0:0] = ["rows"]
        body = [["all", *b] for b in body]
    return header, body


def to_markdown(c: Comparison) -> str:
    header, body = table_rows(c)

    def esc(s: str) -> str:
        return str(s).replace("|", "\\|")

    lines = [f"## {c.title}", "", f"sources: {', '.join(c.sources)}", ""]
    lines += [f"- {n}" for n in c.notes]
    if c.notes:
        lines.append("")
    lines.append("| " + " | ".join(esc(h) for h in header) + " |")
    lines.append("| " + " | ".join("---" if i < (1 if c.pivot else max(len(c.keys), 1)) else "---:"
                                   for i in range(len(header))) + " |")
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def to_csv(c: Comparison) -> str:
    out = c.table.copy()
    out.insert(len(c.keys), "metric", c.metric)
    return out.to_csv(index=False, lineterminator="\n")


def print_table(c: Comparison, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    header, body = table_rows(c)
    key_cols = 1 if c.pivot else max(len(c.keys), 1)
    table = Table(title=c.title, min_width=len(c.title) + 4)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < key_cols else "right")
    for row in body:
        table.add_row(*row)
    console.print(table)
    for n in c.notes:
        console.print(f"note: {n}")


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise ConfigError(f"--plot needs matplotlib, which is not installed: {PLOT_HINT}") from None


def plot(c: Comparison, path: str | Path) -> Path:
    """compare.png: a heatmap for a pivot, lines (metric vs the first key) otherwise."""
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if c.pivot:
        rows, cols, _ = _pivot_grid(c)
        fig = Figure(figsize=(max(4.5, 1.4 * len(cols) + 2.5), max(3.2, 0.8 * len(rows) + 1.8)))
        FigureCanvasAgg(fig)
        _heatmap(c, fig)
    else:
        fig = Figure(figsize=(6.4, 4.2))
        FigureCanvasAgg(fig)
        _lines(c, fig)
    fig.axes[0].set_title(f"{c.metric}, mean ± std over seeds")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write(path, lambda f: f.write(buf.getvalue()), mode="wb")
    return path


def _heatmap(c: Comparison, fig) -> None:
    """One annotated cell per (row key, column key) of a pivot, coloured by the mean."""
    import numpy as np

    rk, ck = c.keys
    rows, cols, cells = _pivot_grid(c)
    means = np.full((len(rows), len(cols)), np.nan)
    for (r, col), cell in cells.items():
        means[rows.index(r), cols.index(col)] = cell["mean"]
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(means), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), labels=cols)
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.set_xlabel(ck)
    ax.set_ylabel(rk)
    for (r, col), cell in cells.items():
        i, j = rows.index(r), cols.index(col)
        text = fmt_num(cell["mean"]) + (f"\n± {fmt_num(cell['std'])}" if int(cell["n"]) > 1 else "")
        text += f"\nn={int(cell['n'])}"
        dark = im.norm(cell["mean"]) < 0.5 if np.isfinite(im.norm(cell["mean"])) else True
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    fig.colorbar(im, ax=ax, label=c.metric)


def _lines(c: Comparison, fig) -> None:
    """The metric against the first key, one line per combination of the other keys, std as error bars."""
    ax = fig.add_subplot()
    t = c.table
    if not c.keys:
        ax.errorbar([0], t["mean"], yerr=t["std"].fillna(0), marker="o", capsize=3)
        ax.set_xticks([0], labels=["all rows"])
    else:
        xk, line_keys = c.keys[0], c.keys[1:]
        numeric_x = _is_numeric(t[xk])
        categories = list(dict.fromkeys(fmt_key(v) for v in _sort(t, [xk])[xk]))
        groups = t.groupby(line_keys, dropna=False, sort=False) if line_keys else [((), t)]
        for combo, sub in groups:
            sub = _sort(sub, [xk])
            xs = sub[xk].astype(float) if numeric_x else [categories.index(fmt_key(v)) for v in sub[xk]]
            combo = combo if isinstance(combo, tuple) else (combo,)
            label = ", ".join(f"{k}={fmt_key(v)}" for k, v in zip(line_keys, combo)) or None
            ax.errorbar(xs, sub["mean"], yerr=sub["std"].fillna(0), marker="o", capsize=3, label=label)
        if not numeric_x:
            ax.set_xticks(range(len(categories)), labels=categories)
        ax.set_xlabel(xk)
        if line_keys:
            ax.legend(fontsize=8)
    ax.set_ylabel(c.metric)
    ax.grid(alpha=0.3)


# ---------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="kdrun-compare",
        description="Average a metric over seeds from kdrun sweep tables: mean ± std (n) per cell.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="a sweep dir or a results CSV (several: concatenated)")
    p.add_argument("--pivot", nargs=2, metavar=("ROW_KEY", "COL_KEY"), help="a two-key table (heatmap with --plot)")
    p.add_argument("--metric", default=DEFAULT_METRIC, help=f"a numeric column (default {DEFAULT_METRIC})")
    p.add_argument("--group-by", nargs="+", metavar="KEY", dest="group_by",
                   help="keys of the rows (default: every config column that varies, except seed)")
    p.add_argument("--out", type=Path, help="where compare.md/.csv/.png go (default: the first PATH if a dir, else .)")
    p.add_argument("--plot", action="store_true", help=f"also write compare.png (needs matplotlib: {PLOT_HINT})")
    return p


def run_compare(argv: Sequence[str] | None = None, console=None) -> Comparison:
    args = build_parser().parse_args(argv)
    if args.plot:
        _require_matplotlib()
    df = load(args.paths)
    c = compare(df, metric=args.metric, pivot=args.pivot, group_by=args.group_by, sources=args.paths)
    first = Path(args.paths[0])
    out = args.out if args.out is not None else (first if first.is_dir() else Path.cwd())
    print_table(c, console)
    write_text(out / "compare.md", to_markdown(c))
    write_text(out / "compare.csv", to_csv(c))
    written = ["compare.md", "compare.csv"]
    if args.plot:
        plot(c, out / "compare.png")
        written.append("compare.png")
    print(f"wrote {', '.join(str(out / w) for w in written)}", flush=True)
    return c


def main(argv: Sequence[str] | None = None) -> None:
    if not sys.stdout.isatty():
        os.environ.setdefault("COLUMNS", "160")  # rich wraps at 80 columns in pipes otherwise
    try:
        run_compare(argv)
    except KdrunError as exc:
        print(f"kdrun-compare: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
