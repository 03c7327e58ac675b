"""The end-of-run rich table: one row per model the run trained or used."""

from __future__ import annotations

import re

from rich.console import Console
from rich.table import Table

# (summary key of the accuracy, label, summary key of the arch name) in display order; {k} is 1, 2, ...
ROWS = (
    ("teacher{k}_top1", "teacher {k}", "teacher{k}"),
    ("teacher_ensemble_top1", "teachers' ensemble", None),
    ("teacher_top1", "teacher", "teacher"),
    ("gen0_top1", "generation 0 (labels)", "student"),
    ("ta{k}_top1", "assistant {k}", "ta{k}"),
    ("gen{k}_top1", "generation {k}", "student"),
    ("peer{k}_top1_best", "peer {k}", "peer{k}"),
    ("peers_ensemble_top1_best", "peers' ensemble", None),
    ("exit{k}_top1_best", "exit {k}", "student"),
    ("ensemble_top1_best", "exits' ensemble", None),
    ("ensemble_top1", "generations' ensemble", None),
    ("student_baseline_top1", "student, labels only", "student"),
)


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _rows(summary: dict) -> list[tuple[str, str, str]]:
    out, used = [], set()
    for key, label, arch in ROWS:
        if "{k}" not in key:
            if summary.get(key) is not None and key not in used:
                if key == "teacher_top1" and "teacher_ensemble_top1" in used:
                    continue
                if key == "teacher_top1" and "gen0_top1" in summary:
                    continue
                used.add(key)
                out.append((label, str(summary.get(arch, "")) if arch else "", _pct(summary[key])))
            continue
        pattern = re.compile("^" + key.replace("{k}", r"(\d+)") + "$")
        found = sorted((int(m.group(1)), k) for k in summary if (m := pattern.match(k)) and summary[k] is not None)
        for k, name in found:
            if key == "gen{k}_top1" and k == 0:
                continue
            used.add(name)
            arch_key = arch.replace("{k}", str(k)) if arch else None
            out.append((label.replace("{k}", str(k)), str(summary.get(arch_key, "")) if arch_key else "",
                        _pct(summary[name])))
    return out


def print_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console()
    title = f"{summary.get('scheme')} | {summary.get('loss')} | {summary.get('dataset')} | status {summary.get('status')}"
    table = Table(title=title)
    table.add_column("model")
    table.add_column("arch")
    table.add_column("top-1", justify="right")
    for row in _rows(summary):
        table.add_row(*row)
    scheme = summary.get("scheme")
    label = "student" if scheme == "baseline" else f"student, {summary.get('loss')}"
    table.add_row(f"[bold]{label}[/bold] (best / last)", str(summary.get("student")),
                  f"{_pct(summary.get('student_top1_best'))} / {_pct(summary.get('student_top1_last'))}")
    console.print(table)
    if summary.get("gain_top1") is not None:
        console.print(f"gain over the labels-only student: {summary['gain_top1']:+.2f} top-1 (best epoch)")
    console.print(f"run dir: {summary.get('run_dir')}  ({summary.get('wall_seconds')} s)")


def render_summary(summary: dict, width: int = 120) -> str:
    """The same table and lines :func:`print_summary` shows, as plain text (for kdrun.log)."""
    import io

    buffer = io.StringIO()
    print_summary(summary, Console(file=buffer, width=width, no_color=True, color_system=None, highlight=False))
    return buffer.getvalue()
