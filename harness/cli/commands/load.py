"""`llava-harness load PATH [--base PATH] [--name NAME] [--4bit|--8bit] [--dtype D]
[--device cpu|cuda] [--json]`: load a model folder the way `load_pretrained_model` does and
print what was detected and loaded."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ...bench.measure import self_peak_rss_bytes
from ...console import print_json, quiet_transformers
from ..options import add_json

DTYPE_NAMES = ("float16", "bfloat16", "float32")


def register(sub, bench) -> None:
    p = sub.add_parser("load", help="load a model folder like load_pretrained_model and "
                                    "report what was loaded")
    p.add_argument("path", type=Path)
    p.add_argument("--base", type=Path, help="base model folder (LoRA / projector-only)")
    p.add_argument("--name", help="model name, for the original's name-based rule "
                                  "(default: the folder name)")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--4bit", dest="load_4bit", action="store_true",
                       help="NF4, double quant, float16 compute")
    quant.add_argument("--8bit", dest="load_8bit", action="store_true",
                       help="LLM.int8 (bitsandbytes), float16 for the rest")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float16")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--detect", choices=("files", "name"), default="files",
                   help="pick the load path from the folder's files (default) or, as the "
                        "original does, from its name")
    p.add_argument("--vision-tower", type=Path, help="local CLIP folder overriding the "
                                                     "config's mm_vision_tower")
    add_json(p, "what was detected and loaded")
    p.set_defaults(func=cmd_load)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def describe(loaded, device: str, peak_bytes: int) -> dict:
    """The facts the CLI prints about a load."""
    from ...model.projector import projector_type_of_config  # heavy: torch

    model = loaded.model
    inner = model.get_model() if hasattr(model, "get_model") else None
    projector = getattr(inner, "mm_projector", None)
    tower = getattr(inner, "vision_tower", None)
    tower_module = getattr(tower, "vision_tower", None)
    lm_params = _count(model) - _count(tower_module)
    return {
        "kind": loaded.kind,
        "architecture": loaded.arch,
        "parameters_language_and_projector": lm_params,
        "parameters_projector": _count(projector),
        "parameters_vision_tower": _count(tower_module),
        "projector_type": projector_type_of_config(model.config) if projector is not None
        else None,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "quantization": loaded.quantization,
        "device": device,
        "memory_footprint_bytes": model.get_memory_footprint(),
        "peak_memory_bytes": peak_bytes,
        "load_s": round(loaded.load_s, 3),
        "context_len": loaded.context_len,
        "notes": loaded.notes,
    }


def cmd_load(args: argparse.Namespace) -> int:
    import torch  # heavy: torch

    from ...ops.load import LoadWarning  # heavy: torch, transformers

    quiet_transformers()

    warnings.filterwarnings("ignore", category=LoadWarning)  # printed below, as notes

    from ...ops.load import load  # heavy: torch, transformers

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load(args.path, args.base, args.name or args.path.resolve().name,
                  load_8bit=args.load_8bit, load_4bit=args.load_4bit, device=device,
                  dtype=args.dtype, detect=args.detect, vision_tower=args.vision_tower)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else self_peak_rss_bytes())
    facts = describe(loaded, device, peak)
    if args.json:
        print_json(facts)
    for key, value in facts.items():
        if key == "notes":
            for note in value:
                print(f"note: {note}", file=sys.stderr)
            continue
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        print(f"{key:36s} {shown}")
    return 0
