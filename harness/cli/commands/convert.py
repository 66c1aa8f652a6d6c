"""`llava-harness convert CKPT -o OUT --to hf|original [--vision-tower DIR]`: original LLaVA
layout <-> transformers' LlavaForConditionalGeneration layout (keys, config, processor files)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...console import print_json
from ...ops.convert import convert
from ...synth.specs import FORMATS
from ..options import add_json, add_output


def register(sub, bench) -> None:
    p = sub.add_parser("convert", help="convert between the original LLaVA layout and "
                                       "llava-hf (LlavaForConditionalGeneration)")
    p.add_argument("checkpoint", type=Path, help="checkpoint folder")
    add_output(p, "output folder (written atomically)", metavar="DIR", required=True, force=True)
    p.add_argument("--to", required=True, choices=("hf", "original"), help="target layout")
    p.add_argument("--vision-tower", type=Path, metavar="DIR",
                   help="to hf: the CLIP tower folder (default: config.json's mm_vision_tower)")
    p.add_argument("--to-format", choices=FORMATS, help="default: the checkpoint's own")
    add_json(p, "a summary (tensors, format, vocabulary rows, dropped buffers)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    r = convert(args.checkpoint, args.output, args.to, vision_tower=args.vision_tower,
                to_format=args.to_format, force=args.force)
    target = "llava-hf" if r.to == "hf" else "original LLaVA"
    print(f"converted to the {target} layout: {r.tensors} tensors ({r.format}), token rows "
          f"{r.vocab[0]} -> {r.vocab[1]}, dropped {len(r.dropped)} legacy buffer(s) -> {r.out}")
    if args.json:
        print_json({"output": str(r.out), "to": r.to, "tensors": r.tensors, "format": r.format,
                    "vocab": list(r.vocab), "dropped": list(r.dropped)})
    return 0
