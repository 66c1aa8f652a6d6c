"""`llava-harness report RESULTS.json [--out DIR] [--format md|csv]`: re-render a run's report."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_report(args: argparse.Namespace) -> int:
    from ...report.single import render_report, write_report
    from ...report.results import load_results
    from ...report.single import csv_text

    results = load_results(args.results)
    if args.out is not None:
        paths = write_report(results, args.out, with_json=False)
        print(f"report: {paths['markdown']}\ncsv: {paths['csv']}")
        return 0
    print(render_report(results) if args.format == "md" else csv_text(results), end="")
    return 0


def register(sub, bench) -> None:
    p = sub.add_parser("report", help="re-render the report of a results.json")
    p.add_argument("results", type=Path, metavar="RESULTS.json")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write report.md and results.csv here instead of printing")
    p.add_argument("--format", choices=("md", "csv"), default="md",
                   help="what to print without --out (default: md)")
    p.set_defaults(func=cmd_report)
