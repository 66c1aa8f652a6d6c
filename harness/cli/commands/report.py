"""`llava-harness report RESULTS.json [-o DIR] [--format md|csv]`: re-render a run's report."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...report.results import load_results
from ..options import add_output


def cmd_report(args: argparse.Namespace) -> int:
    from ...report.single import csv_text, render_report, write_report  # heavy: tabulate

    results = load_results(args.results)
    if args.output is not None:
        paths = write_report(results, args.output, with_json=False)
        print(f"report: {paths['markdown']}\ncsv: {paths['csv']}")
        return 0
    print(render_report(results) if args.format == "md" else csv_text(results), end="")
    return 0


def register(sub, bench) -> None:
    p = sub.add_parser("report", help="re-render the report of a results.json")
    p.add_argument("results", type=Path, metavar="RESULTS.json")
    add_output(p, "write report.md and results.csv here instead of printing", metavar="DIR")
    p.add_argument("--format", choices=("md", "csv"), default="md",
                   help="what to print without -o (default: md)")
    p.set_defaults(func=cmd_report)
