"""`llava-harness run [--checkpoint DIR] [-o DIR] [-- PYTEST_ARGS]`: the main job (harness/cli/
run.py): the suites through pytest, then the report, and the gate when checks are given."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..options import add_json, add_output, positive_int, run_id


def _suite_names(text: str) -> tuple[str, ...]:
    from ..run import RunError, parse_suite_names

    try:
        return parse_suite_names(text)
    except RunError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub, bench) -> None:
    from ...report.gate import check_arg
    from ...synth.presets import PRESET_NAMES
    from ..run import DEFAULT_SUITES, SUITES

    p = sub.add_parser("run", help="run the suites (tiny default or --checkpoint DIR) and "
                                   "write a report")
    p.add_argument("--preset", default="tiny", choices=PRESET_NAMES,
                   help="synthetic checkpoint to validate without --checkpoint")
    p.add_argument("--checkpoint", type=Path, metavar="DIR",
                   help="validate this checkpoint folder instead (default suites: checkpoint, "
                        "rules)")
    p.add_argument("--base", type=Path, metavar="DIR",
                   help="with --checkpoint: the base an adapter folder is merged into")
    p.add_argument("--suites", type=_suite_names, metavar="A,B",
                   help=f"comma-separated, of {', '.join(SUITES)}; or 'all' (default: "
                        f"{', '.join(DEFAULT_SUITES)})")
    add_output(p, "reports go to DIR/<run-id>/ (default: reports)", metavar="DIR")
    p.add_argument("--suites-dir", type=Path, metavar="DIR",
                   help="the suites folder (default: the installed harness.suites)")
    p.add_argument("--realsize", "--llava-realsize", dest="realsize", action="store_true",
                   help="also run real-size tests")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="spread the tests over N processes (pytest-xdist); results and "
                        "verdicts are those of a serial run")
    p.add_argument("-k", dest="select", metavar="EXPR", help="pytest -k selection")
    p.add_argument("--run-id", type=run_id, help="run id (default: UTC time + random suffix)")
    p.add_argument("--baseline", type=Path, metavar="FILE",
                   help="results file to gate against; 'auto': the committed baseline of this "
                        "machine's class (fixtures/baselines/<class>.json), skipped if none")
    p.add_argument("--fail", type=check_arg, action="append", default=[], metavar="EXPR",
                   help="gate check, e.g. 'peak_rss:+5%%'; repeatable")
    add_json(p, "the run's verdict, counts and where its report is")
    p.add_argument("pytest_args", nargs="*", metavar="-- PYTEST_ARGS",
                   help="after --, passed to pytest as they are (e.g. -- --junitxml out.xml)")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from ..run import RunOptions, run_suites

    return run_suites(RunOptions(
        suites=args.suites, preset=args.preset, checkpoint=args.checkpoint, base=args.base,
        report_dir=args.output or Path("reports"), suites_dir=args.suites_dir,
        realsize=args.realsize, select=args.select, baseline=args.baseline, checks=args.fail,
        run_id=args.run_id, pytest_args=tuple(args.pytest_args), workers=args.workers,
        as_json=args.json))
