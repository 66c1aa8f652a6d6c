"""`llava-harness check DIR [--base DIR] [--json] [--ignore CODE]`: a folder of any kind held to
the contract (harness/llava/check/), every finding one line with its code, severity, place,
what loaders do with it and the fix.

Exit 0 when clean or only warnings, 1 on errors, 2 when the input cannot be read at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...bench.check import bench_reads, check_bench
from ...console import print_json
from ...errors import HarnessError
from ...llava.check import catalog, check
from ..options import add_json, add_results_output, positive_int, results_target
from ..target import add_targets, resolve_all


class CheckUsageError(HarnessError):
    pass


def register(sub, bench) -> None:
    p = sub.add_parser("check", help="lint a LLaVA folder of any kind: every defect class users "
                                     "ship, named, with its fix")
    p.add_argument("folder", type=Path, nargs="?",
                   help="the folder: full LLaVA (original or llava-hf), LoRA adapter, stage-1 "
                        "projector, plain LM")
    p.add_argument("--list", action="store_true",
                   help="print every check (code, severity, kinds, fix, public report) as a "
                        "markdown table and exit")
    p.add_argument("--base", type=Path, help="the base an adapter folder is merged into")
    p.add_argument("--ignore", action="append", default=[], metavar="CODE",
                   help="leave out a check by its code (repeatable; docs/checks.md lists them)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also list the checks that could not look, and why")
    add_json(p, "the findings, the skipped checks and the exit code")
    p.set_defaults(func=cmd_check)

    b = bench.add_parser("check", help="check on a real-size folder against one read of its "
                                       "bytes, each from a cold page cache")
    add_targets(b)
    b.add_argument("--repeat", type=positive_int, default=3,
                   help="measured rounds, alternating check and read (default 3)")
    add_results_output(b, "figures")
    b.set_defaults(func=cmd_bench_check)


def cmd_bench_check(args: argparse.Namespace) -> int:
    return bench_reads([(check_bench(t.folder), t.name) for t in resolve_all(args)],
                       args.repeat, results_target(args))


def cmd_check(args: argparse.Namespace) -> int:
    if args.list:
        print(catalog(), end="")
        return 0
    if args.folder is None:
        raise CheckUsageError("check: a FOLDER is needed (or --list)")

    report = check(args.folder, args.base, tuple(args.ignore))
    for finding in report.findings:
        print(finding.line(), file=sys.stderr if args.json else sys.stdout)
    if args.verbose:
        for code, result in report.results.items():
            if result.skipped:
                print(f"skipped {code}: {result.skipped}", file=sys.stderr)
    looked = sum(1 for r in report.results.values() if not r.skipped and not r.ignored)
    summary = (f"{args.folder}: a {report.kind} folder; {looked} of {len(report.results)} "
               f"checks looked: {report.count('error')} error(s), {report.count('warning')} "
               f"warning(s), {report.count('info')} note(s)")
    print(summary, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print_json(report.to_dict())
    return report.exit_code
