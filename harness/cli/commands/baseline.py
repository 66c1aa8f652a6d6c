"""`llava-harness baseline RESULTS.json [MORE.json ...] [-o FILE | --name NAME]`: keep a run
(or several runs of one commit, pooled) as a baseline.

Written beside the run (`baseline.json` next to RESULTS.json) unless `-o FILE` (`-` for stdout)
or, in a checkout, `--name NAME` (fixtures/baselines/NAME.json, to commit with the code).
Refused when the run was made from uncommitted changes, or when the target would be committed
from a git tree that has any: a baseline must be reproducible from the commit it describes.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ...report.gate import baselines_dir, machine_class, write_baseline
from ...report.results import load_results
from ..options import add_output


def _name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: a baseline name is letters, digits, '.', "
                                         "'_' and '-'")
    return text


def cmd_baseline(args: argparse.Namespace) -> int:
    if args.name is not None:
        name = args.name
        if name == "auto":  # the run's machine class, the name `run --baseline auto` finds

            name = machine_class(load_results(args.results[0]).environment)
        target = baselines_dir() / f"{name}.json"
    else:
        target = args.output or args.results[0].parent / "baseline.json"
    path = write_baseline(args.results, target, force=args.force)
    print(f"baseline: {path}")
    return 0


def register(sub, bench) -> None:
    p = sub.add_parser("baseline", help="store a run's results as a baseline (from committed "
                                        "code only)")
    p.add_argument("results", type=Path, nargs="+", metavar="RESULTS.json",
                   help="a run; several runs of one commit on one machine are pooled (their "
                        "samples merged, so the baseline's spread shows the noise between "
                        "runs)")
    where = p.add_mutually_exclusive_group()
    add_output(where, "write here (default: baseline.json beside RESULTS.json)",
               metavar="FILE", stdout=True)
    where.add_argument("--name", type=_name,
                       help="in a checkout: write fixtures/baselines/NAME.json, to commit; "
                            "'auto' names it after the run's machine class (what run "
                            "--baseline auto looks for)")
    p.add_argument("--force", action="store_true", help="replace an existing baseline")
    p.set_defaults(func=cmd_baseline)
