"""The end-of-run rich table: one row per model the run trained or used."""

from __future__ import annotations

import re

from rich.console import Console
from rich.table import Table

#: shown after the scheme's rows, whatever ran: (summary key, label, key of the arch name)
BASELINE_ROW = ("student_baseline_top1", "student, labels only", "student")


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _rows(summary: dict, rows) -> list[tuple[str, str, str]]:
    """Table rows from the scheme's ``report_rows`` (``{k}`` matches 1, 2, ...; a key shown once)."""
    out, used = [], set()
    for key, label, arch in (*rows, BASELINE_ROW):
        pattern = re.compile("^" + re.escape(key).replace(r"\{k\}", r"(\d+)") + "$")
        found = sorted((int(m.group(1)) if m.groups() else 0, k) for k in summary
                       if (m := pattern.match(k)) and summary[k] is not None and k not in used)
        for k, name in found:
            used.add(name)
            arch_key = arch.replace("{k}", str(k)) if arch else None
            out.append((label.replace("{k}", str(k)), str(summary.get(arch_key, "")) if arch_key else "",
                        _pct(summary[name])))
    return out


def print_summary(summary: dict, rows=(), console: Console | None = None) -> None:
    """The end-of-run table: the scheme's ``rows`` (:attr:`kdrun.schemes.base.Scheme.report_rows`),
    the labels-only student when there is one, the student; the gain; the run dir."""
    console = console or Console()
    title = f"{summary.get('scheme')} | {summary.get('loss')} | {summary.get('dataset')} | status {summary.get('status')}"
    table = Table(title=title)
    table.add_column("model")
    table.add_column("arch")
    table.add_column("top-1", justify="right")
    for row in _rows(summary, rows):
        table.add_row(*row)
    label = "student" if summary.get("loss") in (None, "none") else f"student, {summary.get('loss')}"
    table.add_row(f"[bold]{label}[/bold] (best / last)", str(summary.get("student")),
                  f"{_pct(summary.get('student_top1_best'))} / {_pct(summary.get('student_top1_last'))}")
    console.print(table)
    if summary.get("gain_top1") is not None:
        console.print(f"gain over the labels-only student: {summary['gain_top1']:+.2f} top-1 (best epoch)")
    console.print(f"run dir: {summary.get('run_dir')}  ({summary.get('wall_seconds')} s)")


def render_summary(summary: dict, rows=(), width: int = 120) -> str:
    """The same table and lines :func:`print_summary` shows, as plain text (for kdrun.log)."""
    import io

    buffer = io.StringIO()
    print_summary(summary, rows, Console(file=buffer, width=width, no_color=True, color_system=None, highlight=False))
    return buffer.getvalue()
