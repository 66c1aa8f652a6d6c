"""`llava-harness build [spec options] -o DIR | --plan` and `llava-harness bench build`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ...console import print_json, write_machine
from ...synth.plan import make_plan
from ...synth.specs import SpecError
from ..options import (add_json, add_output, add_results_output, add_spec_options, results_target,
                       spec_from_args)


def register(sub, bench) -> None:
    p = sub.add_parser("build", help="write a synthetic LLaVA checkpoint")
    add_spec_options(p)
    add_output(p, "the checkpoint folder to write (atomically)", metavar="DIR", force=True)
    p.add_argument("--plan", action="store_true",
                   help="print the index it would write, as JSON, and write nothing")
    add_json(p, "what was built")
    p.set_defaults(func=cmd_build)

    b = bench.add_parser("build", help="build speed and memory against a raw disk write")
    add_spec_options(b)
    add_results_output(b, "figures")
    b.add_argument("--work", type=Path, metavar="DIR",
                   help="the folder to build (default: in the cache folder)")
    b.add_argument("--force", action="store_true", help="replace an existing --work folder")
    b.set_defaults(func=cmd_bench_build)


def cmd_build(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    if args.plan:
        write_machine(json.dumps(make_plan(spec).describe(), indent=2) + "\n")
        return 0
    if args.output is None:
        raise SpecError("-o/--output is required unless --plan is given")
    from ...synth.builder import build  # heavy: torch

    plan = build(spec, args.output, force=args.force)
    print(f"built {spec.model.name} ({plan.format}, {len(plan.shards)} shard(s), "
          f"{len(plan.tensors)} tensors, {plan.total_size:,} bytes) at {args.output}")
    if args.json:
        print_json({"output": str(args.output), "model": spec.model.name,
                    "format": plan.format, "shards": len(plan.shards),
                    "tensors": len(plan.tensors), "total_size": plan.total_size})
    return 0


def cmd_bench_build(args: argparse.Namespace) -> int:
    from ...bench.build import bench_build  # heavy: tabulate

    return bench_build(spec_from_args(args), work=args.work, output=results_target(args),
                       force=args.force)
