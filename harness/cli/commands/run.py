"""`llava-harness run [--checkpoint DIR] [-o DIR] [-- PYTEST_ARGS]`: the main job (harness/cli/
run.py): the suites through pytest, then the report, and the gate when checks are given."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...options import add_run_options, argument_type
from ..options import add_json, add_output, positive_int
from ..run import (CHECKPOINT_SUITES, DEFAULT_SUITES, SUITES, RunOptions, parse_suite_names,
                   run_suites)

_suite_names = argument_type(parse_suite_names)


def register(sub, bench) -> None:
    p = sub.add_parser("run", help="run the suites (tiny default or --checkpoint DIR) and "
                                   "write a report")
    # The run's options as the pytest plugin has them (its --llava-preset, ...), but for two
    # that mean more here: --checkpoint is checked as every command checks an input folder
    # (run.py: is it a checkpoint at all) before pytest starts, and --baseline takes 'auto',
    # which is looked up after parsing.
    add_run_options(p.add_argument, "", checkpoint_type=Path, baseline_type=Path,
                    baseline_help="; 'auto': the committed baseline of this machine's class "
                                  "(fixtures/baselines/<class>.json), skipped if none")
    p.add_argument("--suites", type=_suite_names, metavar="A,B",
                   help=f"comma-separated, of {', '.join(SUITES)}; or 'all' (default: "
                        f"{', '.join(DEFAULT_SUITES)}; with --checkpoint: "
                        f"{', '.join(CHECKPOINT_SUITES)})")
    add_output(p, "reports go to DIR/<run-id>/ (default: reports)", metavar="DIR")
    p.add_argument("--suites-dir", type=Path, metavar="DIR",
                   help="the suites folder (default: the installed harness.suites)")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="spread the tests over N processes (pytest-xdist); results and "
                        "verdicts are those of a serial run")
    p.add_argument("-k", dest="select", metavar="EXPR", help="pytest -k selection")
    add_json(p, "the run's verdict, counts and where its report is")
    p.add_argument("pytest_args", nargs="*", metavar="-- PYTEST_ARGS",
                   help="after --, passed to pytest as they are (e.g. -- --junitxml out.xml)")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    return run_suites(RunOptions(
        suites=args.suites, preset=args.preset, checkpoint=args.checkpoint, base=args.base,
        report_dir=args.output or Path("reports"), suites_dir=args.suites_dir,
        realsize=args.realsize, select=args.select, baseline=args.baseline, checks=args.fail,
        run_id=args.run_id, pytest_args=tuple(args.pytest_args), workers=args.workers,
        as_json=args.json))
