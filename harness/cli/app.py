"""`llava-harness`: the parser and the dispatch; each command is one module in `commands/`
that registers itself. Options common to all are in `options.py`.

Bad input ends in one line on stderr naming the file or value and what was wrong, and a
non-zero exit; never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from importlib import metadata

from ..checkpoint.problems import shown
from ..console import machine_output, quiet_third_party
from ..errors import HarnessError
from .commands import register_all
from .options import wants_machine_output

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (no usage dump), exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _version() -> str:
    try:
        return metadata.version("llava-harness")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llava-harness",
                     description="Benchmark and validation harness for LLaVA checkpoints. "
                                 "Every command: -o/--output for what it writes ('-' for "
                                 "stdout where that is one text file), --json for its result "
                                 "as one JSON object on stdout.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("bench", help="benchmarks: whole-process figures, written as results JSON")
    bench = p.add_subparsers(dest="bench", required=True, parser_class=_Parser)

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
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, _raise_terminated)
        except (ValueError, OSError):  # not the main thread, or not on this platform
            pass
    return previous


def _stopped(signum: int) -> int:
    print(f"llava-harness: {signal.Signals(signum).name}: stopped; nothing was left behind",
          file=sys.stderr)
    return 128 + signum


def _error(text: str) -> int:
    # Names and keys come from untrusted files: escaped, the message stays one line.
    print(f"llava-harness: error: {shown(text)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    _received.clear()
    previous = _install_signal_handlers()
    try:
        with machine_output(wants_machine_output(args)), quiet_third_party():
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
        if _received:  # the signal, surfacing as another error (a C extension's import, say)
            return _stopped(_received[-1])

        if os.environ.get("LLAVA_HARNESS_DEBUG"):
            raise
        print(f"llava-harness: internal error: {type(exc).__name__}: {shown(exc)} (a bug, or "
              "input nothing checks yet; LLAVA_HARNESS_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL
    except Terminated as exc:
        return _stopped(exc.signum)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
