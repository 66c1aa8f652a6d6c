"""`llava-harness litgpt setup | status`: litgpt in an environment of its own (cache folder),
for loading `strip --layout litgpt` exports with `litgpt.GPT` (the export never needs it)."""

from __future__ import annotations

import argparse

from ...console import print_json
from ...ops.litgpt_env import PINNED, env_folder, python, setup
from ..options import add_json


def register(sub, bench) -> None:
    p = sub.add_parser("litgpt", help="litgpt's own environment, to load litgpt exports")
    act = p.add_subparsers(dest="litgpt_command", required=True, parser_class=type(p))
    actions = {"setup": ("create it (litgpt 0.5.13 and its pins, --no-deps) in the cache folder",
                         cmd_setup),
               "status": ("where the environment is, and whether it is ready", cmd_status)}
    for name, (help_text, func) in actions.items():
        action = act.add_parser(name, help=help_text)
        action.set_defaults(func=func)
        if name == "setup":
            action.add_argument("--force", action="store_true",
                                help="recreate it even if it is ready")
        else:
            add_json(action, "the environment's folder and state")


def cmd_setup(args: argparse.Namespace) -> int:
    setup(force=args.force)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    ready = python() is not None
    print(f"litgpt environment {'ready' if ready else 'not made'} at {env_folder()}")
    if args.json:
        print_json({"folder": str(env_folder()), "ready": ready, "packages": list(PINNED)})
    return 0
