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
        help="file format (default csv: every table); summary.csv and summary.md are always written. latex / markdown: the summary "
        "as a paper's table (booktabs, caption, label; mean ± sd, best in bold) and the paper tables; latex-raw / markdown-raw: "
        "every collected table; robustbench: one model_info JSON per autoattack run and eps",
    )
    p.add_argument("--rows", default=None, help="the summary's row keys, comma-separated (default: the config keys that vary); the others are pooled")
    p.add_argument(
        "--columns", default=None, help="the summary's metrics, comma-separated (default: every headline metric), e.g. clean_accuracy,robust_accuracy@0.1"
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
        split = lambda text: [t.strip() for t in text.split(",") if t.strip()] if text is not None else None
        result = collect(
            args.dirs, out=args.out, fmt=args.format, table=args.table, figures=not args.no_figures, rows=split(args.rows), columns=split(args.columns)
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_summary(result)
    return 0
