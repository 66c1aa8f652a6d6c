"""The options of a suite run, declared once for both front ends.

`pytest --llava-preset tiny` and `llava-harness run --preset tiny` are the same option: the
plugin's flags carry the `llava-` prefix (they share pytest's namespace with every other
plugin), the CLI's do not. `add_run_options(addoption, prefix)` declares each shared option
once (name, parser, default, metavar, help) and hands it to either `addoption`: pytest's
`group.addoption` or argparse's `add_argument` (pytest-benchmark does the same with its display
options for its plugin and its CLI).

Every parser here is a `type=`: a bad value is refused at parse time, naming it, by both.
`argument_type` turns a harness check that raises HarnessError into such a parser.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from .errors import HarnessError
from .report.gate import check_arg
from .report.results import check_run_id, load_results
from .synth.presets import PRESET_NAMES

PLUGIN_PREFIX = "llava-"  # the pytest plugin's flags: --llava-preset, --llava-fail, ...
# Spelled with and without the prefix on both sides: `--realsize` came first and is in use.
BOTH_SPELLINGS = {"realsize"}


def argument_type(parse):
    """`parse(text)` as an argparse / pytest `type=`: the one-line message of a HarnessError it
    raises becomes the parse error, as it is."""
    @functools.wraps(parse)
    def parse_argument(text: str):
        try:
            return parse(text)
        except HarnessError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse_argument


def folder_to_write(text: str) -> Path:
    """A folder that exists or will be made: anything but a file in its place."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: exists and is not a folder")
    return path


def existing_folder(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: not a folder")
    return path


def existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: not a file")
    return path


run_id = argument_type(check_run_id)


@argument_type
def results_file(text: str):
    """A results file, read and checked while parsing."""
    return load_results(Path(text).expanduser())


def plugin_flag(name: str) -> str:
    """The plugin's flag for option `name`: how the main job hands its options to pytest."""
    return f"--{PLUGIN_PREFIX}{name}"


def spellings(name: str, prefix: str) -> list[str]:
    """The flags of option `name` on the side whose prefix is `prefix`, its own spelling first
    (argparse and pytest name the attribute after the first)."""
    own = f"--{prefix}{name}"
    if name not in BOTH_SPELLINGS:
        return [own]
    other = "" if prefix else PLUGIN_PREFIX
    return [own, f"--{other}{name}"]


def add_run_options(addoption, prefix: str, *, checkpoint_type=existing_folder,
                    baseline_type=results_file, baseline_help: str = "") -> None:
    """The options a suite run spells the same way in the plugin and in `llava-harness run`.

    Where a side means more by an option it passes its own parser: `llava-harness run` checks
    `--checkpoint` as every command checks an input folder (is it a checkpoint at all, one line
    naming it) before pytest starts, and its `--baseline` also takes `auto` (the committed
    baseline of this machine's class, looked up after parsing); `baseline_help` says so."""
    def add(name: str, help: str, **kwargs) -> None:
        addoption(*spellings(name, prefix), help=help.format(o=f"--{prefix}"), **kwargs)

    add("preset", "synthetic checkpoint to validate without {o}checkpoint", default="tiny",
        choices=PRESET_NAMES)
    add("checkpoint", "validate this checkpoint folder (default: a synthetic one of {o}preset)",
        type=checkpoint_type, default=None, metavar="DIR")
    add("base", "with {o}checkpoint: the base an adapter folder is merged into",
        type=existing_folder, default=None, metavar="DIR")
    add("realsize", "run real-size tests (builds real-size checkpoints into the cache)",
        action="store_true", default=False)
    add("run-id", "the run id (default: UTC time + random suffix)", type=run_id, default=None,
        metavar="ID")
    add("baseline", "results file to gate this run against (with {o}fail)" + baseline_help,
        type=baseline_type, default=None, metavar="FILE")
    add("fail", "gate check, e.g. 'peak_rss:+5%%' or 'extract_wall_s:<=0.5'; repeatable",
        type=check_arg, action="append", default=[], metavar="EXPR")


def unanchored_check(checks, baseline):
    """The first relative check (`peak_rss:+5%`) when there is no baseline for it to be
    relative to, else None; both sides refuse such a run before it starts."""
    if baseline is not None:
        return None
    return next((check for check in checks if check.needs_baseline), None)
