"""`llava-harness count CKPT | --preset NAME [--json]`: projector parameters three ways
(formula, meta-device module, tensor shapes), the projector type from the config and from the
tensors, total and stage-1 trainable parameters. Exit 1 when the three counts differ."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...console import print_json
from ...ops.counts import count, count_checkpoint
from ...synth.configs import llava_config_json
from ...synth.layout import model_tensors
from ...synth.presets import PRESET_NAMES, preset
from ..options import add_json


def register(sub, bench) -> None:
    p = sub.add_parser("count", help="projector and model parameter counts of a checkpoint or "
                                     "preset")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("checkpoint", nargs="?", type=Path, help="checkpoint folder")
    source.add_argument("--preset", choices=PRESET_NAMES)
    add_json(p, "the counts")
    p.set_defaults(func=cmd_count)


def _table(counts) -> str:
    from tabulate import tabulate  # heavy: tabulate

    d = counts.to_dict()
    rows = [["projector type (config / tensors)",
             f"{d['projector_type']['config']} / {d['projector_type']['inferred']}"],
            ["mm_hidden_size -> hidden_size", f"{counts.mm_hidden_size} -> {counts.hidden_size}"]]
    rows += [[f"projector params ({way})", f"{n:,}"]
             for way, n in d["projector_params"].items()]
    rows += [[f"params: {group}", f"{n:,}"] for group, n in d["params"].items()]
    rows += [["buffer elements (not parameters)", f"{counts.buffer_elements:,}"],
             ["trainable in stage 1 (projector only)", f"{counts.trainable_stage1:,}"]]
    quant = counts.quantization
    if quant:
        rows.append(["quantization (params above are logical)",
                     f"{quant['scheme']}: {quant['quantized_linears']} linears, "
                     f"{quant['quantized_params']:,} params"])
        rows += [[f"stored bytes: {kind}", f"{n:,}"] for kind, n in quant["stored_bytes"].items()]
    return tabulate(rows, tablefmt="github", headers=[counts.source, ""])


def count_preset(name: str):
    """Counts for a named preset: the config its build writes and the tensors it plans (the
    builder's side; the counting is the operation's)."""
    spec = preset(name)
    shapes = {t.key: t.shape for t in model_tensors(spec.model, spec.checkpoint.legacy_buffers)}
    config = llava_config_json(spec.model, spec.model.vision.tower_name)
    return count(config, shapes, f"preset {name}", f"preset {name} config",
                 f"preset {name} layout", "planned_layout")


def cmd_count(args: argparse.Namespace) -> int:
    counts = count_preset(args.preset) if args.preset else count_checkpoint(args.checkpoint)
    print(_table(counts))
    if args.json:
        print_json(counts.to_dict())
    if not counts.agree:
        print(f"llava-harness: projector counts disagree: formula {counts.formula:,}, module "
              f"{counts.module:,}, tensors {counts.tensors:,}", file=sys.stderr)
        return 1
    return 0
