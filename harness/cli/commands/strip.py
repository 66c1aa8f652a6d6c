"""`llava-harness strip CKPT -o OUT [--keep-legacy-buffers] [--to-format bin|safetensors]`
and `llava-harness bench strip`.

Stripping itself never imports torch; the strict check that follows it (on by default, before
the output appears) builds the target class on the meta device, which costs transformers'
import (a few seconds). `--no-verify` skips it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ...bench.strip import bench_strip
from ...console import print_json
from ...ops.litgpt import export_litgpt
from ...ops.strip import StripError, strip
from ...synth.specs import FORMATS
from ..options import (add_json, add_output, add_results_output, add_work, positive_int,
                       results_target)
from ..target import add_targets, resolve_all


def register(sub, bench) -> None:
    p = sub.add_parser("strip", help="write the plain Llama/Mistral language model of a LLaVA "
                                     "checkpoint (original or llava-hf layout)")
    p.add_argument("checkpoint", type=Path, help="LLaVA checkpoint folder")
    add_output(p, "output folder (written atomically)", metavar="DIR", required=True, force=True)
    p.add_argument("--keep-legacy-buffers", action="store_true",
                   help="keep the per-layer rotary_emb.inv_freq buffers (then shards holding "
                        "only language-model tensors are hard-linked, not rewritten)")
    p.add_argument("--to-format", choices=FORMATS, help="default: the checkpoint's own")
    p.add_argument("--layout", choices=("hf", "litgpt"), default="hf",
                   help="hf (default): a transformers Llama/Mistral folder; litgpt: "
                        "lit_model.pth + model_config.yaml as litgpt.GPT loads them, streamed")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the strict check against the target class (meta device)")
    add_json(p, "a summary (layout, kept and dropped tensors, shards)")
    p.set_defaults(func=cmd_strip)

    b = bench.add_parser("strip", help="streaming strip against a naive load/filter/save and "
                                       "a raw copy of the output's bytes")
    add_targets(b)
    b.add_argument("--legacy", choices=("drop", "keep", "both"), default="both",
                   help="run without and/or with --keep-legacy-buffers (default both)")
    b.add_argument("--layout", choices=("hf", "litgpt"), default="hf",
                   help="benchmark strip's hf output (default) or the litgpt export")
    add_work(b, "the outputs")
    b.add_argument("--repeat", type=positive_int, default=1,
                   help="measured rounds; medians are reported (default 1)")
    b.add_argument("--no-naive", dest="naive", action="store_false",
                   help="skip the naive load/filter/save (it needs ~10 GB of memory at 7B)")
    add_results_output(b, "figures")
    b.set_defaults(func=cmd_bench_strip)


def cmd_export_litgpt(args: argparse.Namespace) -> int:
    if args.keep_legacy_buffers or args.to_format:
        raise StripError("--keep-legacy-buffers and --to-format are for --layout hf; a litgpt "
                         "export is lit_model.pth without legacy buffers")
    r = export_litgpt(args.checkpoint, args.output, force=args.force)
    print(f"exported {r.layout} {r.arch} checkpoint to litgpt: {r.tensors} tensors "
          f"({r.total_size:,} bytes); key set and shapes checked against litgpt's GPT -> {r.out}")
    if args.json:
        print_json({"output": str(r.out), "layout": "litgpt", "source_layout": r.layout,
                    "architecture": r.arch, "tensors": r.tensors, "total_size": r.total_size,
                    "files": r.files})
    return 0


def cmd_strip(args: argparse.Namespace) -> int:
    if args.layout == "litgpt":
        return cmd_export_litgpt(args)

    r = strip(args.checkpoint, args.output, keep_legacy_buffers=args.keep_legacy_buffers,
              to_format=args.to_format, force=args.force, verify=args.verify)
    how = {}
    for state in r.shards.values():
        how[state] = how.get(state, 0) + 1
    shards = ", ".join(f"{n} {state}" for state, n in sorted(how.items()))
    check = "strict check passed" if r.verified else "strict check skipped (--no-verify)"
    print(f"stripped {r.layout} {r.arch} checkpoint: kept {r.kept} tensors "
          f"({r.total_size:,} bytes, {r.format}), dropped {len(r.dropped)}; shards: {shards}; "
          f"{check} -> {r.out}")
    if args.json:
        print_json({"output": str(r.out), "layout": r.layout, "architecture": r.arch,
                    "format": r.format, "kept": r.kept, "dropped": list(r.dropped),
                    "total_size": r.total_size, "shards": dict(r.shards),
                    "verified": r.verified})
    return 0


def cmd_bench_strip(args: argparse.Namespace) -> int:
    keeps = {"drop": (False,), "keep": (True,), "both": (False, True)}[args.legacy]
    folders = [(t.folder, t.name) for t in resolve_all(args)]
    return bench_strip(folders, keeps, args.repeat, args.work, args.naive,
                       results_target(args), args.layout)
