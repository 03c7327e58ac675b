"""``kdrun-zoo``: list the zoo networks with their parameter and MAC counts."""

from __future__ import annotations

import argparse
import csv
import sys

from kdrun.errors import KdrunError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdrun-zoo",
        description="List kdrun's zoo networks with parameter and multiply-accumulate (MAC) counts.",
    )
    parser.add_argument("--num-classes", type=int, default=100, help="classifier outputs (default: 100)")
    parser.add_argument("--image-size", type=int, default=32, help="input side in pixels (default: 32)")
    parser.add_argument("--in-chans", type=int, default=3, help="input channels (default: 3)")
    parser.add_argument("--csv", action="store_true", help="print CSV (name,params,macs; integers) instead of a table")
    return parser


def zoo_rows(num_classes: int, in_chans: int, image_size: int) -> list[tuple[str, int, int]]:
    """``(name, params, macs)`` for every zoo model."""
    from kdrun.models.factory import ZOO, count_macs, count_params, create_model

    rows = []
    for name in ZOO:
        model = create_model(name, num_classes=num_classes, in_chans=in_chans, image_size=image_size)
        rows.append((name, count_params(model), count_macs(model, in_chans, image_size)))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = zoo_rows(args.num_classes, args.in_chans, args.image_size)
    except KdrunError as exc:
        print(f"kdrun-zoo: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["name", "params", "macs"])
        writer.writerows(rows)
        return 0

    from rich.console import Console
    from rich.table import Table

    table = Table()
    table.add_column("name")
    table.add_column("params", justify="right")
    table.add_column("MACs", justify="right")
    for name, params, macs in rows:
        table.add_row(name, f"{params / 1e6:.2f}M", f"{macs / 1e6:.1f}M")
    console = Console()
    console.print(f"kdrun zoo: {args.in_chans}x{args.image_size}x{args.image_size} input, "
                  f"{args.num_classes} classes (MACs: convolutions and matrix products, per image)")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
