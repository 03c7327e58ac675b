"""reproduction.md and reproduction.csv: our accuracies beside the published ones.

Rows are methods (teacher and vanilla student first), columns are pairs. Every cell reads
``ours mean ± std (n) | published | delta`` (delta = ours - published), once for the accuracy after
the last epoch and once for the best epoch. A number that is not there (no ok run, no published
value) is ``–``; a published number whose epoch kind is not the table's is marked ``†``.
``reproduction_cells.csv`` has the same cells as numbers, one row per (method, pair, epoch kind).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from kdrun.engine.io import write_text
from kdrun.reproduce.catalog import BY_NAME
from kdrun.reproduce.plan import Cell, JobDir, Plan
from kdrun.reproduce.published import Published

GAP = "–"
OTHER_KIND = "†"
KINDS = ("last", "best")
KIND_TITLE = {"last": "Last-epoch top-1 (%)", "best": "Best-epoch top-1 (%)"}
MD_FILE, CSV_FILE, CELLS_FILE = "reproduction.md", "reproduction.csv", "reproduction_cells.csv"


@dataclass
class Ours:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass
class Entry:
    method: str
    pair: str
    kind: str
    ours: Ours
    published: Published | None

    @property
    def published_top1(self) -> float | None:
        return self.published.top1 if self.published is not None else None

    @property
    def delta(self) -> float | None:
        if self.ours.mean is None or self.published_top1 is None:
            return None
        return self.ours.mean - self.published_top1


# ---------------------------------------------------------------------------- collecting
def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _teacher_best(summary: dict) -> float | None:
    """The stored teacher's best-epoch accuracy (its store entry's summary.json), if it has one."""
    source = summary.get("teacher_source")
    if not source:
        return None
    try:
        stored = json.loads((Path(str(source)).parent / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return _num(stored.get("model_top1_best")) if isinstance(stored, dict) else None


def collect(plan: Plan, matched: dict[Cell, list[JobDir]], published: dict) -> list[Entry]:
    """One entry per (method, pair, epoch kind) of the report."""
    opts = plan.options
    entries = []
    for method in opts.methods:
        for pair in opts.pairs:
            per_kind: dict[str, list[float]] = {k: [] for k in KINDS}
            for seed in opts.seeds:
                if method == "teacher":
                    last = best = None
                    for m in opts.distill_methods:  # the teacher is the same in every job of the seed
                        for job in matched.get(Cell(pair, m, seed), []):
                            s = job.summary or {}
                            last = _num(s.get("teacher_top1"))
                            if last is not None:
                                best = _teacher_best(s)
                                best = last if best is None else best
                                break
                        if last is not None:
                            break
                else:
                    ok = [j for j in matched.get(Cell(pair, method, seed), []) if j.status == "ok"]
                    s = ok[0].summary if ok else {}
                    last, best = _num(s.get("student_top1_last")), _num(s.get("student_top1_best"))
                if last is not None:
                    per_kind["last"].append(last)
                if best is not None:
                    per_kind["best"].append(best)
            for kind in KINDS:
                entries.append(Entry(method, pair, kind, Ours(per_kind[kind]), published.get((method, pair))))
    return entries


def missing(plan: Plan, matched: dict[Cell, list[JobDir]]) -> list[str]:
    """One line per planned run without an ok job dir: what happened to it."""
    lines = []
    for cell in plan.jobs:
        runs = matched.get(cell, [])
        if any(j.status == "ok" for j in runs):
            continue
        if runs:
            job = runs[0]
            why = f"{job.status}: {job.error}".rstrip(": ") + f" ({job.path})"
        else:
            why = "not run"
        lines.append(f"{cell.pair} {cell.method} seed {cell.seed}: {why}")
    return lines


# ---------------------------------------------------------------------------- formatting
def fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return GAP
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def fmt_ours(o: Ours) -> str:
    if o.mean is None:
        return GAP
    return f"{fmt(o.mean)} ± {fmt(o.std)} ({o.n})"


def fmt_published(e: Entry) -> str:
    if e.published_top1 is None:
        return GAP
    mark = OTHER_KIND if e.published is not None and e.published.epoch_kind != e.kind else ""
    return fmt(e.published_top1) + mark


def cell_text(e: Entry, sep: str = " | ") -> str:
    return sep.join((fmt_ours(e.ours), fmt_published(e), fmt(e.delta, signed=True)))


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(plan: Plan, entries: list[Entry], gaps: list[str], published: dict) -> str:
    opts = plan.options
    by = {(e.method, e.pair, e.kind): e for e in entries}
    rec = plan.recipe
    dataset = next((o.split("=", 1)[1] for o in plan.common if o.startswith("dataset=")), "cifar100")
    lines = ["# CIFAR-100 benchmark: kdrun against the published numbers", ""]
    lines.append(f"Pairs: {', '.join(opts.pairs)}. Seeds: {', '.join(map(str, opts.seeds))}. "
                 f"Dataset: {dataset}. Epochs: {rec.epochs} (the published recipe: {rec.full_epochs}).")
    if plan.common:
        lines.append("")
        lines.append("Overrides on every job: `" + " ".join(plan.common) + "`")
    if dataset != "cifar100" or rec.scaled or any(o.startswith("trainer.limit_train_batches=") for o in plan.common):
        lines += ["", ("**Not the published recipe** (other data, fewer epochs or batches): the ours columns "
                       "check the machinery and are not comparable with the published numbers.")]
    lines += ["",
              (f"Each cell: ours mean ± std ({GAP} for one run) (n runs) \\| published \\| delta = ours - published. "
               f"{GAP}: no number (no ok run, or nothing published). {OTHER_KIND}: the published number is "
               "of the other epoch kind (DKD numbers are best-epoch, the RepDistiller/CRD ones last-epoch), so "
               "the like-for-like comparison is in the other table. Teacher: the teacher each seed's jobs used "
               "(kdrun trains one per seed).")]
    for kind in KINDS:
        lines += ["", f"## {KIND_TITLE[kind]}", ""]
        lines.append(_md_row(["method", *opts.pairs]))
        lines.append(_md_row(["---"] * (len(opts.pairs) + 1)))
        for method in opts.methods:
            row = [BY_NAME[method].label]
            for pair in opts.pairs:
                row.append(cell_text(by[(method, pair, kind)], sep=" \\| "))
            lines.append(_md_row(row))
    lines += ["", "## Pairs", ""]
    for pair in opts.pairs:
        info = plan.pairs[pair]
        ran = "" if (info.teacher, info.student) == (info.recipe_teacher, info.recipe_student) else \
            f"; this run used {info.teacher} -> {info.student} (pass-through overrides)"
        lines.append(f"- {pair}: {info.recipe_teacher} -> {info.recipe_student} ({info.family} family), "
                     f"DKD beta {info.dkd_beta:g}{ran}")
    lines += ["", "## Runs without a result", ""]
    lines += [f"- {g}" for g in gaps] if gaps else ["None: every planned run ended ok."]
    sources = sorted({p.source for (m, pair), p in published.items() if m in opts.methods and pair in opts.pairs})
    lines += ["", "## Sources of the published numbers", ""]
    lines += [f"- {s}" for s in sources]
    lines += ["", ("Every number with its epoch kind, runs and notes: kdrun/reproduce/published_cifar100.csv "
                   f"(the published columns of {CELLS_FILE}).")]
    return "\n".join(lines) + "\n"


def wide_csv(plan: Plan, entries: list[Entry]) -> str:
    opts = plan.options
    by = {(e.method, e.pair, e.kind): e for e in entries}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", *(f"{kind}: {pair}" for kind in KINDS for pair in opts.pairs)])
    for method in opts.methods:
        w.writerow([method, *(cell_text(by[(method, pair, kind)]) for kind in KINDS for pair in opts.pairs)])
    return buf.getvalue()


def cells_csv(plan: Plan, entries: list[Entry]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "pair", "teacher", "student", "epoch_kind", "ours_mean", "ours_std", "ours_n",
                "published_top1", "published_epoch_kind", "published_runs", "delta", "published_source"])

    def num(v):
        return "" if v is None else f"{v:.4f}"

    for e in entries:
        info = plan.pairs[e.pair]
        p = e.published
        w.writerow([e.method, e.pair, info.teacher, info.student, e.kind, num(e.ours.mean), num(e.ours.std),
                    e.ours.n, num(e.published_top1), p.epoch_kind if p else "",
                    "" if p is None or p.runs is None else p.runs, num(e.delta), p.source if p else ""])
    return buf.getvalue()


def write(plan: Plan, matched: dict[Cell, list[JobDir]], published: dict) -> tuple[list[Path], str, list[str]]:
    """Write the three files into --out; return their paths, the markdown and the missing runs."""
    entries = collect(plan, matched, published)
    gaps = missing(plan, matched)
    md = markdown(plan, entries, gaps, published)
    out = plan.options.out
    paths = [out / MD_FILE, out / CSV_FILE, out / CELLS_FILE]
    write_text(paths[0], md)
    write_text(paths[1], wide_csv(plan, entries))
    write_text(paths[2], cells_csv(plan, entries))
    return paths, md, gaps
