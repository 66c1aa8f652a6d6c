"""`llava-harness verify-release MANIFEST [--json]`: every artifact of a release proved equal to
what it was made from (harness/release/). Exit 0 when every relation holds, 1 when one does
not, 2 when the manifest or an artifact cannot be read."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...bench.check import bench_reads, verify_release_bench
from ...console import print_json
from ...release.verify import verify_release
from ..options import add_json, add_results_output, positive_int, results_target


def register(sub, bench) -> None:
    p = sub.add_parser("verify-release", help="prove every artifact of a release (merged, "
                                              "llava-hf, stripped, quantized, projector) against "
                                              "what it was made from")
    p.add_argument("manifest", type=Path, help="release manifest (TOML; docs/release.md)")
    add_json(p, "every relation's verdict, faults, notes and figures")
    p.set_defaults(func=cmd_verify_release)

    b = bench.add_parser("verify-release", help="verify-release against one read of every "
                                                "artifact's bytes, each from a cold page cache")
    b.add_argument("manifest", type=Path, help="release manifest")
    b.add_argument("--repeat", type=positive_int, default=3,
                   help="measured rounds, alternating the command and the read (default 3)")
    add_results_output(b, "figures")
    b.set_defaults(func=cmd_bench_verify_release)


def cmd_bench_verify_release(args: argparse.Namespace) -> int:
    return bench_reads([(verify_release_bench(args.manifest), args.manifest.parent.name)],
                       args.repeat, results_target(args))


def cmd_verify_release(args: argparse.Namespace) -> int:
    report = verify_release(args.manifest)
    stream = sys.stderr if args.json else sys.stdout
    for outcome in report.outcomes:
        figures = outcome.figures
        counted = ", ".join(f"{int(figures[k])} {label}" for k, label in (
            ("tensors", "tensors compared"), ("identical", "bit-identical"),
            ("within_bound", "within the bound"), ("quantized", "quantized within the bound"))
            if figures.get(k))
        print(f"{'ok' if outcome.ok else 'FAIL'} {outcome.relation}"
              f"{': ' + counted if counted else ''} ({figures.get('wall_s', 0):.1f} s)",
              file=stream)
        for line in outcome.faults:
            print(f"  fault: {line}", file=stream)
        for line in outcome.notes:
            print(f"  note: {line}", file=stream)
    held = sum(o.ok for o in report.outcomes)
    print(f"{args.manifest}: {held} of {len(report.outcomes)} relation(s) hold", file=stream)
    if args.json:
        print_json(report.to_dict())
    return 0 if report.ok else 1
