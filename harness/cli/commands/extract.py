"""`llava-harness extract CKPT -o OUT [--keys mm_projector[,...]]` (also LLaVA's own
`--model-path DIR --output FILE`) and `llava-harness bench extract`.

Extraction never imports torch: the command is done in about the time Python takes to start.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ...bench.extract import bench_extract
from ...console import print_json
from ...ops.extract import extract
from ..options import add_json, add_output, add_results_output, positive_int, results_target
from ..target import add_target, resolve


def _keys(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(","))
    if not all(keys):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated key names, none "
                                         "empty")
    return keys


def register(sub, bench) -> None:
    p = sub.add_parser("extract", help="copy the projector's tensors out of a checkpoint, "
                                       "reading only the shards that hold them")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("checkpoint", nargs="?", type=Path, help="checkpoint folder")
    source.add_argument("--model-path", type=Path, dest="model_path",
                        help="the checkpoint folder (LLaVA's extract_mm_projector.py flag)")
    add_output(p, "output file: .bin (torch) or .safetensors; a folder gets "
                  "mm_projector.bin inside it", metavar="PATH", required=True, force=True)
    p.add_argument("--keys", type=_keys, default=("mm_projector",),
                   help="comma-separated substrings a tensor name must contain "
                        "(default: mm_projector)")
    add_json(p, "a summary (keys, files read, bytes, work seconds)")
    p.set_defaults(func=cmd_extract)

    b = bench.add_parser("extract", help="extraction CLI against a naive whole-shard load")
    add_target(b, folder_flag="--checkpoint",
               folder_help="benchmark this folder instead of a preset",
               preset_help="cached synthetic checkpoint to use (built into the cache if missing)")
    b.add_argument("--keys", type=_keys, default=("mm_projector",),
                   help="comma-separated substrings a tensor name must contain "
                        "(default: mm_projector)")
    b.add_argument("--repeat", type=positive_int, default=3,
                   help="measured rounds after the warm-up (default 3)")
    add_results_output(b, "figures")
    b.set_defaults(func=cmd_bench_extract)


def cmd_extract(args: argparse.Namespace) -> int:
    source = args.checkpoint or args.model_path
    result = extract(source, args.output, args.keys, args.force)
    if args.json:
        print_json(result.summary())
    print(f"extracted {len(result.keys)} tensors ({result.numel:,} elements, "
          f"{result.nbytes:,} bytes) from {len(result.files_read)} of {result.files_total} "
          f"file(s) -> {result.output}")
    return 0


def cmd_bench_extract(args: argparse.Namespace) -> int:
    target = resolve(args.checkpoint, args.preset, args.format)
    return bench_extract(target.folder, target.format, target.name, args.keys, args.repeat,
                         results_target(args))
