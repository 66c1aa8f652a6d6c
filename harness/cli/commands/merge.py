"""`llava-harness merge-lora --adapter DIR --base DIR -o OUT [--dtype D]` (also LLaVA's own
`--model-path DIR --model-base DIR --save-model-path OUT`) and `llava-harness bench merge`."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ...bench.check import bench_reads, merge_bench
from ...bench.merge import MergeBench, bench_merge
from ...console import print_json, quiet_transformers
from ...errors import HarnessError
from ..options import (add_json, add_output, add_results_output, add_work, positive_int,
                       results_target)
from ..target import add_target, resolve

DTYPE_NAMES = ("float16", "bfloat16", "float32")


def register(sub, bench) -> None:
    p = sub.add_parser("merge-lora", help="merge a LLaVA LoRA (adapter + non_lora_trainables) "
                                          "into its base: a full LLaVA checkpoint, streamed")
    p.add_argument("--adapter", "--model-path", dest="adapter", type=Path, required=True,
                   help="the LoRA folder (adapter_config.json, adapter weights, "
                        "non_lora_trainables.bin, config.json)")
    p.add_argument("--base", "--model-base", dest="base", type=Path, required=True,
                   help="the base checkpoint folder the LoRA was trained on")
    add_output(p, "output folder (written atomically)", metavar="DIR", required=True,
               aliases=("--save-model-path",), force=True)
    p.add_argument("--dtype", choices=DTYPE_NAMES,
                   help="dtype of the merged weights (default: the base's)")
    p.add_argument("--device", default="cpu",
                   help="where the updates are computed: cpu (default) or cuda")
    add_json(p, "a summary (layers merged, tensors, bytes, seconds)")
    p.set_defaults(func=cmd_merge)

    b = bench.add_parser("merge", help="streamed LoRA merge into a real-size checkpoint: wall "
                                       "time and peak memory (optionally vs loading it all)")
    add_target(b, folder_flag="--base", folder_help="merge into this folder instead",
               preset_help="cached synthetic base to merge into (built into the cache if missing)")
    b.add_argument("--rank", type=positive_int, default=128, help="LoRA rank (default 128)")
    b.add_argument("--alpha", type=positive_int, default=256, help="LoRA alpha (default 256)")
    b.add_argument("--targets", choices=("attention", "all-linear"), default="all-linear")
    b.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16",
                   help="merge dtype (default bfloat16)")
    b.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    add_work(b, "the adapter and the outputs")
    b.add_argument("--naive", action="store_true",
                   help="also time LLaVA's way (load the whole model, merge_and_unload, "
                        "save_pretrained) when there is memory for it")
    add_results_output(b, "figures")
    b.set_defaults(func=cmd_bench_merge)

    c = bench.add_parser("merge-copy", help="merge-lora against cp -r of its base + sync, "
                                            "alternating, each from a cold page cache")
    c.add_argument("--adapter", type=Path, required=True, help="the LoRA folder")
    c.add_argument("--base", type=Path, required=True, help="the base checkpoint folder")
    c.add_argument("--repeat", type=positive_int, default=3,
                   help="measured rounds, alternating which goes first (default 3)")
    add_work(c, "the merge and the copy, one at a time,")
    add_results_output(c, "figures")
    c.set_defaults(func=cmd_bench_merge_copy)


def cmd_bench_merge_copy(args: argparse.Namespace) -> int:
    parent = args.work or args.base.resolve().parent
    with tempfile.TemporaryDirectory(prefix=".llava-merge-copy-", dir=parent) as work:
        bench = merge_bench(args.adapter, args.base, Path(work))
        return bench_reads([(bench, args.base.name)], args.repeat, results_target(args))


def _device(text: str) -> str:
    if text == "cpu" or text.startswith("cuda"):
        if text != "cpu":
            import torch  # heavy: torch

            if not torch.cuda.is_available():
                raise HarnessError(f"--device {text}: no CUDA device is available")
        return text
    raise HarnessError(f"--device {text!r}: expected cpu or cuda[:N]")


def cmd_merge(args: argparse.Namespace) -> int:
    from ...ops.merge import merge_lora  # heavy: torch

    quiet_transformers()

    result = merge_lora(args.adapter, args.base, args.output, dtype=args.dtype,
                        force=args.force, device=_device(args.device))
    if args.json:
        print_json(result.summary())
    for note in result.dropped:
        print(f"note: dropped vision-tower adapter {note}")
    print(f"merged {result.merged} layer(s), {result.biases} bias(es), {result.trainables} "
          f"non-LoRA tensor(s) -> {result.tensors} tensors, {result.nbytes:,} bytes "
          f"({result.dtype}) at {result.output} in {result.work_s:.1f} s")
    return 0


def cmd_bench_merge(args: argparse.Namespace) -> int:
    device = _device(args.device)
    base = resolve(args.base, args.preset, args.format, flag="--base")
    bench = MergeBench(base=base.folder, case=base.name, rank=args.rank, alpha=args.alpha,
                       targets=args.targets, dtype=args.dtype, device=device, work=args.work,
                       naive=args.naive)
    return bench_merge(bench, results_target(args))
