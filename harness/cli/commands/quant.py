"""`llava-harness bench quant (--checkpoint DIR | --preset NAME) --modes fp16,bf16,int8,nf4,
nf4-dq,fp4 --device cuda|cpu [--prompt-tokens N] [--new-tokens M] [--batch B] [--repeat K]
[-o FILE]`: memory and speed of a quantized load per mode, each mode in a fresh process;
and `llava-harness bench session -o DIR [--dry-run]`: the whole GPU-machine run in one go."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...bench.measure import BenchError
from ...bench.quant import QuantBench, bench_quant
from ...bench.session import run_session
from ...data import suites_dir
from ...ops.quant import parse_modes
from ...options import argument_type
from ...synth.presets import PRESET_NAMES
from ...synth.specs import FORMATS
from ..options import add_output, add_results_output, positive_int, results_target
from ..target import resolve

DEFAULT_MODES = "fp16,bf16,int8,nf4,nf4-dq,fp4"


@argument_type
def _modes(text: str) -> tuple[str, ...]:
    return parse_modes(text)


def register(sub, bench) -> None:
    b = bench.add_parser("quant", help="quantized load per mode: load time, peak memory, "
                                       "footprint vs theory, prefill/decode speed, drift")
    source = b.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, metavar="DIR", help="a LLaVA folder")
    source.add_argument("--preset", choices=PRESET_NAMES,
                        help="a synthetic checkpoint from the cache (built there if missing)")
    b.add_argument("--format", choices=FORMATS, help="with --preset: default the preset's")
    b.add_argument("--modes", type=_modes, default=_modes(DEFAULT_MODES),
                   help=f"comma-separated, of fp32,{DEFAULT_MODES} (default: {DEFAULT_MODES})")
    b.add_argument("--device", choices=("cuda", "cpu"),
                   help="default: cuda when available, else cpu")
    b.add_argument("--prompt-tokens", type=positive_int, default=64, metavar="N",
                   help="text tokens per prompt, besides one image (default 64)")
    b.add_argument("--new-tokens", type=positive_int, default=64, metavar="M",
                   help="tokens generated per prompt, at least 2 (default 64)")
    b.add_argument("--batch", type=positive_int, default=1, metavar="B",
                   help="prompts per forward (default 1)")
    b.add_argument("--repeat", type=positive_int, default=5, metavar="K",
                   help="timed rounds after one warm-up (default 5)")
    b.add_argument("--compute-dtype", choices=("float16", "bfloat16"), default="float16",
                   help="dtype of the unquantized parts and 4-bit compute in quantized modes")
    b.add_argument("--vision-tower", type=Path, metavar="DIR",
                   help="local CLIP folder overriding the config's mm_vision_tower")
    add_results_output(b, "records")
    b.set_defaults(func=cmd_bench_quant)

    s = bench.add_parser("session", help="what a lent GPU machine runs in one go: build the "
                                         "7B, the GPU suites, bench quant, a baseline")
    add_output(s, "session.json, the report, the records and the baseline go here",
               metavar="DIR", required=True)
    s.add_argument("--dry-run", action="store_true",
                   help="every step on CPU with tiny-quant (GPU tests skip): rehearse here")
    s.add_argument("--suites-dir", type=Path, metavar="DIR",
                   help="the suites folder (default: the installed harness.suites)")
    s.set_defaults(func=cmd_bench_session)


def _device(requested: str | None) -> str:
    import torch  # heavy: torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available here")
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def _checkpoint(args: argparse.Namespace) -> tuple[Path, str]:
    """The folder and the name records carry: the user's folder, or the cached preset (built
    with its vision tower: the benchmark loads and runs the whole model)."""
    preset = args.preset
    if preset == "tiny":
        # tiny's 172-wide MLP fails bitsandbytes' CPU 4-bit kernel (out_features % 32), which
        # would leave nf4/nf4-dq/fp4 unmeasured; tiny-quant differs only in that width.
        preset = "tiny-quant"
        print("bench quant: measuring tiny-quant (tiny with a 192-wide MLP, so that every mode "
              "runs on bitsandbytes' CPU kernels)", file=sys.stderr)
    target = resolve(args.checkpoint, preset, args.format, with_vision_tower=True)
    # Quant's records have always named a preset by its model alone (`tiny-quant-int8-cpu`);
    # keeping that keeps them comparable with earlier runs' records and baselines.
    return target.folder, target.spec.model.name if target.spec else target.name


def cmd_bench_quant(args: argparse.Namespace) -> int:
    folder, name = _checkpoint(args)
    bench = QuantBench(checkpoint=folder, name=name, modes=args.modes,
                       device=_device(args.device), prompt_tokens=args.prompt_tokens,
                       new_tokens=args.new_tokens, batch=args.batch, repeat=args.repeat,
                       compute_dtype=args.compute_dtype, vision_tower=args.vision_tower)
    return bench_quant(bench, results_target(args))


def cmd_bench_session(args: argparse.Namespace) -> int:
    return run_session(args.output, args.suites_dir or suites_dir(), args.dry_run)
