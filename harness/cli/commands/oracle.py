"""`llava-harness oracle setup | compute | check | status`: the original-LLaVA oracle.

`setup` makes the oracle environment (LLaVA's released wheel under its pinned transformers
4.37, in the cache folder); `compute` has LLaVA's code compute the oracle on this machine
(into the cache, or `-o DIR`, e.g. to refresh a stored copy); `check` runs the harness's model
on every case and compares (live: bit for bit; stored: bit for bit on the machine that made it,
else within the ulp bounds of tolerances.toml); `status` says what is there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from ...console import print_json, quiet_transformers
from ...oracle import live, source
from ...oracle.venv import default_env, setup
from ...report.environment import numeric_fingerprint
from ..options import add_json, add_output


def register(sub, bench) -> None:
    p = sub.add_parser("oracle", help="the original-LLaVA oracle: set up, compute, check")
    act = p.add_subparsers(dest="oracle_command", required=True, parser_class=type(p))
    s = act.add_parser("setup", help="create the oracle environment (llava-torch 1.2.2.post1, "
                                     "transformers 4.37.2) in the cache folder")
    s.add_argument("--force", action="store_true", help="recreate it even if it is ready")
    s.set_defaults(func=cmd_setup)
    c = act.add_parser("compute", help="compute the oracle on this machine with LLaVA's code")
    add_output(c, "write it here (default: the cache, reused while nothing changed)",
               metavar="DIR")
    c.add_argument("--force", action="store_true", help="replace an existing --output")
    c.set_defaults(func=cmd_compute)
    k = act.add_parser("check", help="compare the harness's model with the oracle, case by case")
    k.add_argument("--oracle", choices=("live", "stored"), default="live",
                   help="live (default; needs setup) or the stored copy")
    add_json(k, "the verdict of every case")
    k.set_defaults(func=cmd_check)
    t = act.add_parser("status", help="where the environment and oracles are, and this machine")
    add_json(t, "the environment, this machine and the stored copies")
    t.set_defaults(func=cmd_status)


def cmd_setup(args: argparse.Namespace) -> int:
    setup(force=args.force, log=lambda line: print(line, file=sys.stderr))
    return 0


def cmd_compute(args: argparse.Namespace) -> int:
    folder = live.compute(args.output, force=args.force) if args.output else live.cached()
    manifest = json.loads((folder / live.MANIFEST).read_text())
    print(f"oracle: {len(manifest['cases'])} cases computed by llava-torch "
          f"{manifest['llava']['package']} in {manifest['compute_seconds']} s "
          f"({len(manifest['failures'])} known failures of the original code) at {folder}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from ...oracle import replay  # heavy: torch

    quiet_transformers()

    with tempfile.TemporaryDirectory(prefix="llava-oracle-check-") as tmp:
        folders = live.build_checkpoints(Path(tmp) / "ckpt")
        oracle = source.live(folders) if args.oracle == "live" else source.stored()
        verdicts = {case["id"]: replay.case_problems(oracle, case, folders, Path(tmp))
                    for case in oracle.cases}
    bad = sum(1 for problems in verdicts.values() if problems)
    print(oracle.describe())
    for case_id, problems in verdicts.items():
        print(f"  {'ok  ' if not problems else 'FAIL'} {case_id}")
        for line in problems:
            print(f"       {line}")
    print(f"{len(verdicts) - bad}/{len(verdicts)} cases match")
    if args.json:
        print_json({"oracle": oracle.describe(), "exact": oracle.exact, "cases": verdicts})
    return 1 if bad else 0


def cmd_status(args: argparse.Namespace) -> int:
    env = default_env()
    print(f"environment: {env.folder} ({'ready' if env.is_ready() else 'not set up'})")
    print(f"this machine: {json.dumps(numeric_fingerprint(), sort_keys=True)}")
    copies = source.stored_copies()
    for copy in copies:
        same = copy.exact and " (this machine: bit for bit)" or ""
        print(f"stored: {copy.folder.name}: {source.describe_machine(copy.manifest)}{same}")
    if args.json:
        print_json({"environment": str(env.folder), "ready": env.is_ready(),
                    "machine": numeric_fingerprint(),
                    "stored": {c.folder.name: {"machine": source.describe_machine(c.manifest),
                                               "exact": c.exact} for c in copies}})
    return 0
