"""`llava-harness extract CKPT -o OUT [--keys mm_projector[,...]]` (also LLaVA's own
`--model-path DIR --output FILE`) and `llava-harness bench extract`.

Extraction never imports torch: the command is done in about the time Python takes to start.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _keys(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(","))
    if not all(keys):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated key names, none "
                                         "empty")
    return keys


def register(sub, bench) -> None:
    from ...synth.presets import PRESET_NAMES
    from ...synth.specs import FORMATS

    p = sub.add_parser("extract", help="copy the projector's tensors out of a checkpoint, "
                                       "reading only the shards that hold them")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("checkpoint", nargs="?", type=Path, help="checkpoint folder")
    source.add_argument("--model-path", type=Path, dest="model_path",
                        help="the checkpoint folder (LLaVA's extract_mm_projector.py flag)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output file: .bin (torch) or .safetensors; a folder gets "
                        "mm_projector.bin inside it")
    p.add_argument("--keys", type=_keys, default=("mm_projector",),
                   help="comma-separated substrings a tensor name must contain "
                        "(default: mm_projector)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="also write a JSON summary (keys, files read, bytes, work seconds); "
                        "- for stdout")
    p.set_defaults(func=cmd_extract)

    b = bench.add_parser("extract", help="extraction CLI against a naive whole-shard load")
    b.add_argument("--preset", default="llava-v1.5-7b", choices=PRESET_NAMES,
                   help="cached synthetic checkpoint to use (built into the cache if missing)")
    b.add_argument("--format", choices=FORMATS, help="default: the preset's")
    b.add_argument("--checkpoint", type=Path, metavar="DIR",
                   help="benchmark this folder instead of a preset")
    b.add_argument("--keys", type=_keys, default=("mm_projector",))
    from ..app import _positive_int

    b.add_argument("--repeat", type=_positive_int, default=3,
                   help="measured rounds after the warm-up (default 3)")
    b.add_argument("--out", type=Path, metavar="FILE", help="write the figures here (results "
                                                             "JSON)")
    b.set_defaults(func=cmd_bench_extract)


def cmd_extract(args: argparse.Namespace) -> int:
    from ...checkpoint.paths import check_side_file
    from ...ops.extract import extract, output_path
    from . import write_json

    source = args.checkpoint or args.model_path
    check_side_file(args.json, [source], output_path(args.output))
    result = extract(source, args.output, args.keys, args.force)
    if args.json:
        write_json(args.json, result.summary())
        if str(args.json) == "-":
            return 0
    print(f"extracted {len(result.keys)} tensors ({result.numel:,} elements, "
          f"{result.nbytes:,} bytes) from {len(result.files_read)} of {result.files_total} "
          f"file(s) -> {result.output}")
    return 0


def cmd_bench_extract(args: argparse.Namespace) -> int:
    from ...bench.extract import bench_extract

    if args.checkpoint is not None:
        from ...checkpoint.reader import open_folder

        folder = open_folder(args.checkpoint)
        return bench_extract(folder.path, folder.format, folder.path.name, args.keys,
                             args.repeat, args.out)
    from ...synth.cache import cache_path, cache_root, cached_build, is_valid
    from ...synth.presets import build_spec

    spec = build_spec(args.preset, checkpoint={"format": args.format} if args.format else None)
    if not is_valid(cache_path(spec, cache_root())):
        print(f"building {spec.model.name} ({spec.checkpoint.format}) into the cache at "
              f"{cache_root()} first (set LLAVA_HARNESS_CACHE to use another)", file=sys.stderr)
    folder = cached_build(spec, cache_root())
    return bench_extract(folder, spec.checkpoint.format,
                         f"{spec.model.name}-{spec.checkpoint.format}", args.keys, args.repeat,
                         args.out)
