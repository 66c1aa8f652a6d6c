"""`llava-harness gate [--baseline BASE.json] RESULTS.json --fail EXPR ...`: regression checks.

Exit 0 when every check passes, 1 with one line per failed check (metric, case, baseline,
value, limit), 2 on bad input. Warns on stderr when the two runs' environments differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...console import print_json
from ...report.gate import check_arg, evaluate
from ...report.results import load_results
from ..options import add_json


def cmd_gate(args: argparse.Namespace) -> int:
    results = load_results(args.results)
    baseline = load_results(args.baseline) if args.baseline is not None else None
    outcome = evaluate(args.fail, results, baseline, outcomes=not args.ignore_outcomes)
    warnings, lines = outcome.printed(len(args.fail))
    print(*warnings, sep="\n", file=sys.stderr, end="\n" if warnings else "")
    print(*lines, sep="\n")
    if args.json:
        print_json({"ok": outcome.ok, "checks": [c.text for c in args.fail],
                    "checked": outcome.checked, "failures": outcome.lines(),
                    "warnings": outcome.warnings, "unchecked": outcome.unchecked,
                    "speed_scales": outcome.scales})
    return 0 if outcome.ok else 1


def register(sub, bench) -> None:
    p = sub.add_parser("gate", help="check a run's metrics against a baseline; exit 1 on a "
                                    "regression")
    p.add_argument("results", type=Path, metavar="RESULTS.json")
    p.add_argument("--baseline", type=Path, metavar="BASE.json",
                   help="results file to compare against (needed by relative checks)")
    p.add_argument("--fail", type=check_arg, action="append", default=[], required=True,
                   metavar="EXPR", help="METRIC[@CASE]:LIMIT with LIMIT +5%%, -10%%, ±5%%, 5%% "
                                        "(worse), <=0.5, <0.5, >=10, >10, ==0; repeatable")
    p.add_argument("--ignore-outcomes", action="store_true",
                   help="do not fail on failed or errored cases, only on the checks")
    add_json(p, "the verdict, each failed check and the warnings")
    p.set_defaults(func=cmd_gate)
