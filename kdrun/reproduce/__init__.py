"""Reproduce the published CIFAR-100 distillation tables (CRD benchmark pairs) with kdrun.

The pairs are the experiment files conf/experiment/cifar100/*.yaml; the published numbers ship in
published_cifar100.csv (:mod:`kdrun.reproduce.published`); :mod:`kdrun.reproduce.plan` turns pairs x
methods x seeds and the budget flags into `kdrun -m` sweeps; :mod:`kdrun.reproduce.report` writes
the comparison tables. ``scripts/reproduce.py`` calls :func:`main`. Guide: the README section "Reproducing the published CIFAR-100 tables".
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default sys.argv[1:]), run, write the tables; the exit status."""
    from kdrun.reproduce.cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
