"""``python -m kdrun.report DIR...``: rebuild each sweep dir's results.csv from its job dirs."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from kdrun.errors import KdrunError, OneLineParser
from kdrun.report.sweep import refresh_results

PROG = "kdrun-report"


def main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineParser(prog=PROG, description="Rebuild <DIR>/results.csv (one row per job) from the job dirs "
                                                  "under DIR; safe while a sweep is still writing to it.")
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="a sweep dir (or any dir holding kdrun run dirs)")
    args = parser.parse_args(argv)
    try:
        for d in args.dirs:
            table = refresh_results(d)
            print(f"{table.path}: {table.counts_text()}", flush=True)
    except KdrunError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
