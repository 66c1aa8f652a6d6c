"""`llava-harness baseline RESULTS.json --name NAME`: keep a run as a committed baseline.

Written to fixtures/baselines/NAME.json (or --out FILE). Refused when the run was made from
uncommitted changes or the target's git tree has any: a baseline must be reproducible from
the commit it is stored with.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def _name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: a baseline name is letters, digits, '.', "
                                         "'_' and '-'")
    return text


def cmd_baseline(args: argparse.Namespace) -> int:
    from ...report.gate import baselines_dir, write_baseline

    target = args.out or baselines_dir() / f"{args.name}.json"
    path = write_baseline(args.results, target, force=args.force)
    print(f"baseline: {path}")
    return 0


def register(sub, bench) -> None:
    p = sub.add_parser("baseline", help="store a run's results as a baseline (clean git tree "
                                        "only)")
    p.add_argument("results", type=Path, metavar="RESULTS.json")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--name", type=_name, help="writes fixtures/baselines/NAME.json")
    where.add_argument("--out", type=Path, metavar="FILE", help="write here instead")
    p.add_argument("--force", action="store_true", help="replace an existing baseline")
    p.set_defaults(func=cmd_baseline)
