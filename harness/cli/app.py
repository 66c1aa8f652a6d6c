"""`llava-harness` command line: build, verify, run, bench build here; the other commands live
one module each in `harness/commands/` and register themselves.

Bad input ends in one line on stderr naming the file or value and what was wrong, and a
non-zero exit; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import HarnessError
from ..synth.presets import PRESET_NAMES, build_spec
from ..synth.specs import DTYPES, FORMATS, PLACEMENTS, SpecError, check_projector_type, parse_size

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (no usage dump), exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _projector(text: str) -> str:
    try:
        check_projector_type(text)
    except SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def _add_spec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=PRESET_NAMES)
    p.add_argument("--format", choices=FORMATS)
    shards = p.add_mutually_exclusive_group()
    shards.add_argument("--shards", type=_positive_int, help="number of shards")
    shards.add_argument("--max-shard-size", type=_size, help="e.g. 5GB, 10GB, 2GiB")
    p.add_argument("--projector", type=_projector, help="linear | mlpNx_gelu | identity")
    p.add_argument("--placement", choices=PLACEMENTS)
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-legacy-buffers", action="store_true",
                   help="leave out the per-layer rotary_emb.inv_freq buffers")
    p.add_argument("--with-vision-tower", action="store_true",
                   help="also build a local CLIP tower (always on for tiny)")


def spec_from_args(args: argparse.Namespace):
    model, ck = {}, {}
    if args.projector:
        model["projector_type"] = args.projector
    if args.dtype:
        model["dtype"] = args.dtype
    for name in ("format", "placement", "seed", "shards", "max_shard_size"):
        if getattr(args, name) is not None:
            ck[name] = getattr(args, name)
    if args.no_legacy_buffers:
        ck["legacy_buffers"] = False
    return build_spec(args.preset, model=model, checkpoint=ck,
                      with_vision_tower=True if args.with_vision_tower else None)


def cmd_build(args: argparse.Namespace) -> int:
    from ..synth.plan import make_plan

    spec = spec_from_args(args)
    if args.plan:
        print(json.dumps(make_plan(spec).describe(), indent=2))
        return 0
    if args.out is None:
        raise SpecError("--out is required unless --plan is given")
    from ..synth.builder import build

    plan = build(spec, args.out, force=args.force)
    print(f"built {spec.model.name} ({plan.format}, {len(plan.shards)} shard(s), "
          f"{len(plan.tensors)} tensors, {plan.total_size:,} bytes) at {args.out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 2 when the folder cannot be read at all, 1 when it reads but differs from the
    spec, 0 when it matches."""
    from ..checkpoint.reader import open_folder
    from ..synth.verify import data_problems, layout_problems

    spec = spec_from_args(args)
    folder = open_folder(args.folder)
    folder.check()  # unreadable or inconsistent input: CheckpointError, one line, exit 2
    problems = layout_problems(spec, folder)
    if not problems and not args.layout_only:
        problems = data_problems(spec, folder)
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print(f"{args.folder}: matches the spec ({'layout' if args.layout_only else 'layout and data'})")
    return 1 if problems else 0


def cmd_run(args: argparse.Namespace) -> int:
    from .run import RunOptions, run_suites

    return run_suites(RunOptions(
        suites=args.suites, preset=args.preset, checkpoint=args.checkpoint,
        report_dir=args.report_dir, suites_dir=args.suites_dir, realsize=args.realsize,
        select=args.select, baseline=args.baseline, checks=args.fail, run_id=args.run_id,
        pytest_args=tuple(args.pytest_args)))


def _run_id(text: str) -> str:
    from ..report.results import ResultsError, check_run_id

    try:
        return check_run_id(text)
    except ResultsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _suite_names(text: str) -> tuple[str, ...]:
    from .run import RunError, parse_suite_names

    try:
        return parse_suite_names(text)
    except RunError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench.build import bench_build

    return bench_build(spec_from_args(args), out=args.out, json_path=args.json,
                       force=args.force)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("llava-harness")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llava-harness",
                                     description="Benchmark and validation harness for LLaVA "
                                                 "checkpoints.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("build", help="write a synthetic LLaVA checkpoint")
    _add_spec_options(p)
    p.add_argument("--out", type=Path)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--plan", action="store_true",
                   help="print the index it would write, as JSON, and write nothing")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("verify", help="check a built folder against its spec")
    p.add_argument("folder", type=Path)
    _add_spec_options(p)
    p.add_argument("--layout-only", action="store_true", help="skip the tensor bytes")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("run", help="run the suites (tiny default or --checkpoint DIR) and "
                                   "write a report")
    p.add_argument("--preset", default="tiny", choices=PRESET_NAMES,
                   help="synthetic checkpoint to validate without --checkpoint")
    p.add_argument("--checkpoint", type=Path, metavar="DIR",
                   help="validate this checkpoint folder instead (default suites: checkpoint)")
    from .run import DEFAULT_SUITES

    p.add_argument("--suites", type=_suite_names, metavar="A,B",
                   help="suite names, comma-separated, or 'all' (default: "
                        f"{', '.join(DEFAULT_SUITES)})")
    p.add_argument("--report-dir", type=Path, default=Path("reports"), metavar="DIR",
                   help="reports go to DIR/<run-id>/ (default: reports)")
    p.add_argument("--suites-dir", type=Path, metavar="DIR",
                   help="the suites folder (default: the installed harness.suites)")
    p.add_argument("--realsize", "--llava-realsize", dest="realsize", action="store_true",
                   help="also run real-size tests")
    p.add_argument("-k", dest="select", metavar="EXPR", help="pytest -k selection")
    p.add_argument("--run-id", type=_run_id, help="run id (default: UTC time + random suffix)")
    from ..report.gate import check_arg

    p.add_argument("--baseline", type=Path, metavar="FILE", help="results file to gate against")
    p.add_argument("--fail", type=check_arg, action="append", default=[], metavar="EXPR",
                   help="gate check, e.g. 'peak_rss:+5%%'; repeatable")
    p.add_argument("pytest_args", nargs="*", metavar="-- PYTEST_ARGS",
                   help="after --, passed to pytest as they are (e.g. -- --junitxml out.xml)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    b = bench.add_parser("build", help="build speed and memory against a raw disk write")
    _add_spec_options(b)
    b.add_argument("--out", type=Path, help="where to build (default: the cache folder)")
    b.add_argument("--json", type=Path, help="write the figures here")
    b.add_argument("--force", action="store_true", help="replace an existing --out")
    b.set_defaults(func=cmd_bench)

    from .commands import register_all

    register_all(sub, bench)
    return parser


class Terminated(BaseException):
    """SIGTERM or SIGHUP (what CI runners, `timeout` and `docker stop` send): unwinds like
    Ctrl-C, so atomic outputs remove their temporary files on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_received: list[int] = []  # signals delivered to this process, newest last


def _raise_terminated(signum, _frame):
    _received.append(signum)
    raise Terminated(signum)


def _install_signal_handlers() -> dict:
    """Our handlers for SIGTERM and SIGHUP; returns the previous ones, to restore."""
    import signal

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, _raise_terminated)
        except (ValueError, OSError):  # not the main thread, or not on this platform
            pass
    return previous


def _stopped(signum: int) -> int:
    import signal

    print(f"llava-harness: {signal.Signals(signum).name}: stopped; nothing was left behind",
          file=sys.stderr)
    return 128 + signum


def _error(text: str) -> int:
    from ..checkpoint.problems import shown

    # Names and keys come from untrusted files: escaped, the message stays one line.
    print(f"llava-harness: error: {shown(text)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    import signal

    args = make_parser().parse_args(argv)
    _received.clear()
    previous = _install_signal_handlers()
    try:
        return args.func(args)
    except HarnessError as exc:
        return _error(str(exc))
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _error(f"{where}{exc.strerror or exc}")
    except KeyboardInterrupt:
        print("llava-harness: interrupted; nothing was left behind", file=sys.stderr)
        return 130
    except Exception as exc:  # a fault the harness did not foresee: still one line
        import os

        if _received:  # the signal, surfacing as another error (a C extension's import, say)
            return _stopped(_received[-1])

        if os.environ.get("LLAVA_HARNESS_DEBUG"):
            raise
        from ..checkpoint.problems import shown

        print(f"llava-harness: internal error: {type(exc).__name__}: {shown(exc)} (a bug, or "
              "input nothing checks yet; LLAVA_HARNESS_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL
    except Terminated as exc:
        return _stopped(exc.signum)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
