"""The end-of-run rich table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _m(v) -> str:
    return "-" if v is None else f"{v / 1e6:.2f}M"


def print_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console()
    title = f"{summary.get('scheme')} | {summary.get('loss')} | {summary.get('dataset')} | status {summary.get('status')}"
    table = Table(title=title)
    table.add_column("model")
    table.add_column("arch")
    table.add_column("top-1 best", justify="right")
    table.add_column("top-1 last", justify="right")
    table.add_column("params", justify="right")
    if summary.get("teacher_top1") is not None:
        table.add_row("teacher", str(summary.get("teacher")), _pct(summary["teacher_top1"]),
                      _pct(summary["teacher_top1"]), _m(summary.get("teacher_params")))
    if summary.get("student_baseline_top1") is not None:
        table.add_row("student, labels only", str(summary.get("student")), _pct(summary["student_baseline_top1"]),
                      _pct(summary.get("student_baseline_top1_last")), _m(summary.get("student_params")))
    label = "student" if summary.get("scheme") == "baseline" else f"student, {summary.get('loss')}"
    table.add_row(label, str(summary.get("student")), _pct(summary.get("student_top1_best")),
                  _pct(summary.get("student_top1_last")), _m(summary.get("student_params")))
    console.print(table)
    if summary.get("gain_top1") is not None:
        console.print(f"gain over the labels-only student: {summary['gain_top1']:+.2f} top-1 (best epoch)")
    console.print(f"run dir: {summary.get('run_dir')}  ({summary.get('wall_seconds')} s)")
