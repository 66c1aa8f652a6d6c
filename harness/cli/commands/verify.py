"""`llava-harness verify DIR [spec options] [--layout-only]`: a built folder against its spec.

Exit 2 when the folder cannot be read at all, 1 when it reads but differs from the spec, 0
when it matches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...checkpoint.reader import open_folder
from ...console import print_json
from ..options import add_json, add_spec_options, spec_from_args


def register(sub, bench) -> None:
    p = sub.add_parser("verify", help="check a built folder against its spec")
    p.add_argument("folder", type=Path)
    add_spec_options(p)
    p.add_argument("--layout-only", action="store_true", help="skip the tensor bytes (configs are still compared by meaning)")
    add_json(p, "the verdict and its problems")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    # heavy: torch
    from ...synth.verify import check_quantized, config_problems, data_problems, layout_problems

    spec = spec_from_args(args)
    folder = open_folder(args.folder)
    folder.check()  # unreadable or inconsistent input: CheckpointError, one line, exit 2
    check_quantized(folder)  # a broken pre-quantized layout is bad input too
    problems = layout_problems(spec, folder)
    if not problems and not args.layout_only:
        problems = data_problems(spec, folder)
    problems += config_problems(spec, folder.path)
    checked = "layout and configs" if args.layout_only else "layout, configs and data"
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print(f"{args.folder}: matches the spec ({checked})")
    if args.json:
        print_json({"folder": str(args.folder), "matches": not problems, "checked": checked,
                    "problems": problems})
    return 1 if problems else 0
