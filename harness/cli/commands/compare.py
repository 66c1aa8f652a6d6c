"""`llava-harness compare A.json B.json [C.json ...]`: runs side by side, ratios against A.

Writes compare.md and compare.png (key metrics as ratios to A) into -o DIR (default
reports/compare-<time>/) and prints the markdown.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from ...console import print_json
from ...report.results import load_results
from ..options import add_json, add_output


def cmd_compare(args: argparse.Namespace) -> int:
    from ...report.compare_folder import write_comparison  # heavy: tabulate

    runs = [load_results(path) for path in args.results]
    out = args.output or Path("reports") / ("compare-" + datetime.now(UTC)
                                         .strftime("%Y%m%d-%H%M%S"))
    paths = write_comparison(runs, out, [str(p) for p in args.results], args.metric or None)
    print(paths["markdown"].read_text(encoding="utf-8"))
    print(f"comparison: {paths['markdown']}")
    print(f"chart: {paths['chart']}" if paths["chart"] else
          "chart: none (no metric that run A and another run both have)")
    if args.json:
        print_json({"runs": [r.run_id for r in runs], "results": [str(p) for p in args.results],
                    "markdown": str(paths["markdown"]),
                    "chart": str(paths["chart"]) if paths["chart"] else None})
    return 0


def register(sub, bench) -> None:
    p = sub.add_parser("compare", help="put runs side by side (e.g. the same suites on "
                                       "different hardware) with ratios against the first")
    p.add_argument("results", type=Path, nargs="+", metavar="RESULTS.json")
    add_output(p, "where compare.md and compare.png go (default: reports/compare-<time>)",
               metavar="DIR")
    p.add_argument("--metric", action="append", metavar="NAME",
                   help="a metric to chart (repeatable; default: the most common ones with a "
                        "better direction)")
    add_json(p, "the runs compared and where the comparison is")
    p.set_defaults(func=cmd_compare)
