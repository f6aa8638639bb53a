"""`robust collect DIR [DIR ...]`: one tidy table per CSV kind across many runs (plain argparse, not Hydra)."""

from __future__ import annotations

import argparse
import sys

from robust_cli.core.errors import UserError


def parser() -> argparse.ArgumentParser:
    from robust_cli.results.collect import FORMATS, KINDS

    p = argparse.ArgumentParser(
        prog="robust collect",
        description=f"Walk run/sweep directories (folders holding run.json), concatenate their CSVs ({', '.join(KINDS)}) "
        "with the swept config values as columns, list failed runs, build the paper tables of experiment presets "
        "and draw the collected figures.",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run or sweep directories, searched recursively")
    p.add_argument("--out", "-o", default=None, help="where to write (default: DIR/collected for one DIR, else ./collected)")
    p.add_argument(
        "--format",
        "-f",
        default="csv",
        choices=FORMATS,
        help="file format of the tables (default csv); latex: booktabs .tex per table; robustbench: one model_info JSON per autoattack run and eps",
    )
    p.add_argument(
        "--table", default="auto", help="paper table: auto (from the runs' experiment=), none, szegedy_table, oberman_table, ibp_comparison, bell_table2"
    )
    p.add_argument("--no-figures", action="store_true", help="skip curves.png / persistence.png / train_log.png")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)  # argparse exits 2 on its own for bad flags
    from robust_cli.results.collect import collect, print_summary

    try:
        result = collect(args.dirs, out=args.out, fmt=args.format, table=args.table, figures=not args.no_figures)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_summary(result)
    return 0
