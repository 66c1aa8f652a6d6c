"""The options every command spells the same way, and their parse-time checks.

- `-o/--output PATH`: what the command writes. Where that is a file, `-` means stdout.
- `--json`: print the command's result as one JSON object on stdout; the usual lines go to
  stderr (harness.console), so `... --json | jq` always parses.
- Bad values are refused while parsing, naming the value (exit 2, one line); a check that
  raises HarnessError becomes a parser through `argument_type` (harness/options.py, which also
  declares the options `run` shares with the pytest plugin).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..options import argument_type
from ..synth.presets import PRESET_NAMES, build_spec
from ..synth.specs import (DTYPES, FORMATS, PLACEMENTS, QUANTIZATIONS, check_projector_type,
                           parse_size)

STDOUT = "-"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


@argument_type
def _projector(text: str) -> str:
    check_projector_type(text)
    return text


_size = argument_type(parse_size)


def _file_or_stdout(text: str) -> Path | str:
    return STDOUT if text == STDOUT else Path(text).expanduser()


def _not_stdout(text: str) -> Path:
    if text == STDOUT:
        raise argparse.ArgumentTypeError("'-' (stdout) is only for outputs that are one text "
                                         "file; this output is a folder or a checkpoint file")
    return Path(text).expanduser()


def add_output(p: argparse.ArgumentParser, help: str, *, metavar: str, stdout: bool = False,
               required: bool = False, aliases: tuple[str, ...] = (), force: bool = False) -> None:
    """`-o/--output`; `stdout=True` where the output is one text file (then `-` is stdout);
    `force=True` where an existing output is refused unless `--force` replaces it."""
    p.add_argument("-o", "--output", *aliases, dest="output", metavar=metavar,
                   required=required, type=_file_or_stdout if stdout else _not_stdout,
                   help=help + ("; - for stdout" if stdout else ""))
    if force:
        p.add_argument("--force", action="store_true", help="replace an existing output")


def add_json(p: argparse.ArgumentParser, what: str = "the result") -> None:
    p.add_argument("--json", action="store_true",
                   help=f"print {what} as one JSON object on stdout (other lines go to stderr)")


def add_results_output(p: argparse.ArgumentParser, what: str) -> None:
    """A benchmark's figures: `-o FILE` (results JSON; `-` for stdout) or `--json` (stdout)."""
    where = p.add_mutually_exclusive_group()
    add_output(where, f"write the {what} here (results JSON)", metavar="FILE", stdout=True)
    add_json(where, f"the {what} (results JSON)")


def add_work(p: argparse.ArgumentParser, what: str) -> None:
    """A benchmark's `--work DIR`: its scratch space, on the disk under test by default."""
    p.add_argument("--work", type=Path, metavar="DIR",
                   help=f"where {what} are written (default: a scratch folder beside the "
                        "input); removed afterwards")


def results_target(args: argparse.Namespace) -> Path | str | None:
    return STDOUT if args.json else args.output


def wants_machine_output(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False)) or getattr(args, "output", None) == STDOUT


def add_spec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=PRESET_NAMES)
    p.add_argument("--format", choices=FORMATS)
    shards = p.add_mutually_exclusive_group()
    shards.add_argument("--shards", type=positive_int, help="number of shards")
    shards.add_argument("--max-shard-size", type=_size, help="e.g. 5GB, 10GB, 2GiB")
    p.add_argument("--projector", type=_projector, help="linear | mlpNx_gelu | identity")
    p.add_argument("--placement", choices=PLACEMENTS)
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--seed", type=int, help="seed of the deterministic fill (default: the preset's)")
    p.add_argument("--no-legacy-buffers", action="store_true",
                   help="leave out the per-layer rotary_emb.inv_freq buffers")
    p.add_argument("--with-vision-tower", action="store_true",
                   help="also build a local CLIP tower (always on for tiny)")
    p.add_argument("--quantization", choices=QUANTIZATIONS,
                   help="store the decoder linears pre-quantized: bitsandbytes nf4 / nf4-dq / "
                        "fp4 / int8 as transformers saves them, or key-level gptq / awq")
    p.add_argument("--quant-bits", type=positive_int,
                   help="gptq / awq: bits per value, 2, 4 or 8 (default 4)")
    p.add_argument("--quant-group-size", type=positive_int,
                   help="gptq / awq: input features per scale group (default 128)")


def spec_from_args(args: argparse.Namespace):
    model, ck = {}, {}
    if args.projector:
        model["projector_type"] = args.projector
    if args.dtype:
        model["dtype"] = args.dtype
    for name in ("format", "placement", "seed", "shards", "max_shard_size", "quantization",
                 "quant_bits", "quant_group_size"):
        if getattr(args, name) is not None:
            ck[name] = getattr(args, name)
    if args.no_legacy_buffers:
        ck["legacy_buffers"] = False
    return build_spec(args.preset, model=model, checkpoint=ck,
                      with_vision_tower=True if args.with_vision_tower else None)


