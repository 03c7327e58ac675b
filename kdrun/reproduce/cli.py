"""``scripts/reproduce.py``: run the CIFAR-100 benchmark pairs x methods x seeds and compare.

    python scripts/reproduce.py [--pairs r56_r20,r32x4_r8x4|all] [--methods kd,dkd,...|all]
        [--seeds 0,1,2] [--epochs N] [--limit-train-batches N] [--dataset NAME] [--out DIR]
        [--launcher NAME] [--store DIR] [--override [METHOD:]KEY=VALUE ...]
        [--dry-run] [--report-only] [--force]

Runs what is missing with `kdrun -m` (see :mod:`kdrun.reproduce.plan`), then writes
reproduction.md, reproduction.csv and reproduction_cells.csv into --out (:mod:`kdrun.reproduce.report`).
Bad input is one line ``reproduce: error: ...`` and exit status 2; exit status 1 when runs of this
invocation did not end ok (the tables are written all the same, with gaps).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from kdrun.errors import ConfigError, KdrunError, OneLineParser
from kdrun.reproduce import catalog, report
from kdrun.reproduce import plan as planning
from kdrun.reproduce import published as published_numbers

PROG = "kdrun-reproduce"


def _positive(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} '{text}' must be an integer >= 1")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Reproduce the published CIFAR-100 distillation tables with kdrun.")
    p.add_argument("--pairs", default="all", help="comma-separated pairs, or all (default): "
                   + ", ".join(catalog.PAIR_ORDER))
    p.add_argument("--methods", default="all", help="comma-separated methods, or all (default): "
                   + ", ".join(catalog.DISTILL_METHODS) + "; teacher and vanilla rows are always there")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--epochs", type=_positive("--epochs"), default=None,
                   help="trainer.epochs (default: the recipe's 240); lr milestones, init stages and the DKD "
                        "warm-up are scaled with it")
    p.add_argument("--limit-train-batches", type=_positive("--limit-train-batches"), default=None,
                   help="trainer.limit_train_batches: stop each epoch after N batches")
    p.add_argument("--dataset", default=None, help="dataset= (default: the experiment's cifar100)")
    p.add_argument("--out", default="outputs/reproduce", help="where the sweeps and the tables go "
                   "(default outputs/reproduce)")
    p.add_argument("--launcher", default=None, help="hydra/launcher= for every sweep, e.g. parallel or slurm")
    p.add_argument("--store", default=None, help="paths.store= (trained teachers; default kdrun's outputs/teachers)")
    p.add_argument("--override", action="append", default=[], metavar="[METHOD:]KEY=VALUE",
                   help="a kdrun override for every job, or with METHOD: for that method's jobs only "
                        "(repeatable), e.g. trainer.threads=1, hydra.launcher.n_jobs=4, crd+kd:loss.kd.alpha=0.5")
    p.add_argument("--dry-run", action="store_true", help="print the kdrun commands; run and write nothing")
    p.add_argument("--report-only", action="store_true", help="run nothing; rebuild the tables from --out")
    p.add_argument("--force", action="store_true", help="run every job again, even those with an ok run in --out")
    return p


def options_from(args: argparse.Namespace) -> planning.Options:
    from kdrun.config import group_options

    if args.dataset is not None and args.dataset not in group_options("dataset"):
        raise ConfigError(f"unknown dataset '{args.dataset}'; valid: {', '.join(group_options('dataset'))}")
    if args.dry_run and args.report_only:
        raise ConfigError("--dry-run and --report-only do not combine")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file, not a directory")
    overrides, per_method = [], {}
    for text in args.override:
        method, rest = planning.split_method_override(text)
        if method is None:
            overrides.append(rest)
        else:
            per_method.setdefault(method, []).append(rest)
    return planning.Options(
        pairs=catalog.parse_pairs(args.pairs), methods=catalog.parse_methods(args.methods),
        seeds=catalog.parse_seeds(args.seeds), out=out, epochs=args.epochs,
        limit_train_batches=args.limit_train_batches, dataset=args.dataset,
        store=str(Path(args.store).resolve()) if args.store else None, launcher=args.launcher,
        overrides=overrides, method_overrides=per_method, force=args.force,
    )


def launch(sweep: planning.Sweep) -> int:
    """Run one `kdrun -m` in a child process (output goes to this terminal); its exit status."""
    sweep.sweep_dir = planning.fresh_dir(sweep.parent)
    cmd = [sys.executable, "-m", "kdrun", *sweep.command()[1:]]
    try:
        return subprocess.run(cmd, check=False).returncode
    except OSError as exc:
        print(f"{PROG}: could not start kdrun: {exc}", file=sys.stderr, flush=True)
        return 127


def run(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    opts = options_from(args)
    published = published_numbers.load()
    plan = planning.build(opts)
    matched = planning.match(plan, planning.read_job_dirs(plan.sweeps_root))
    todo = [] if args.report_only else planning.sweeps(plan, matched)

    if args.dry_run:
        skipped = len(plan.jobs) - sum(len(s.cells) for s in todo)
        print(f"{len(todo)} kdrun sweeps, {sum(len(s.cells) for s in todo)} jobs"
              + (f" ({skipped} already have an ok run in {opts.out})" if skipped else "") + ":")
        for s in todo:
            print(f"# {s.label}")
            print(s.command_text())
        return 0

    failed_sweeps = []
    for k, sweep in enumerate(todo, start=1):
        print(f"{PROG}: [{k}/{len(todo)}] {sweep.label}", flush=True)
        rc = launch(sweep)
        print(f"{PROG}: [{k}/{len(todo)}] {sweep.sweep_dir}: exit status {rc}", flush=True)
        if rc not in (0, 1):  # 1: some jobs failed (they are rows of the sweep); else it did not run
            failed_sweeps.append(f"{sweep.label} (exit status {rc})")

    matched = planning.match(plan, planning.read_job_dirs(plan.sweeps_root))
    paths, md, gaps = report.write(plan, matched, published)
    print(md, end="")
    print(f"wrote {', '.join(map(str, paths))}", flush=True)
    if failed_sweeps:
        print(f"{PROG}: error: {len(failed_sweeps)} sweep(s) did not run: {'; '.join(failed_sweeps)}",
              file=sys.stderr, flush=True)
    if gaps and not args.report_only:
        print(f"{PROG}: error: {len(gaps)} of {len(plan.jobs)} runs have no result (listed under 'Runs without "
              f"a result' in {paths[0]}); their cells are {report.GAP}", file=sys.stderr, flush=True)
        return 1
    return 1 if failed_sweeps else 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except KdrunError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except BrokenPipeError:  # e.g. `--dry-run | head`: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to go on (ok runs are kept)", file=sys.stderr)
        return 130
