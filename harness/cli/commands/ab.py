"""`llava-harness ab`: the same figures in two environments on this machine, interleaved; for
each figure B/A with its confidence interval and a paired rank test (harness/bench/ab.py).

Exit 0, or 1 when a `--fail` check sees a significant change beyond its limit; 2 on bad
input (a side that is not a Python, a folder that is not a checkpoint, a side whose harness
cannot run the figures).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

from ...bench.ab import (DEFAULT_FIGURES, FIGURES, AbError, Side, applicable, check_rounds,
                         checkpoint, interpreter, render, run_ab, side_results, verdicts)
from ...bench.ab_power import bench_ab_power, reanalyse
from ...checkpoint.atomic import atomic_dir, check_target
from ...console import print_json, write_text
from ...report.gate import check_arg
from ...report.results import new_run_id, write_results
from ...report.stats import ALPHA
from ...synth.presets import build_spec
from ..options import add_json, positive_int


def _number(text: str, ok, expected: str) -> float:
    """A float that `ok` accepts (NaN never is), else a parse-time error naming the text."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
    return value


def _fraction(text: str) -> float:
    return _number(text, lambda v: 0 < v < 0.5, "a level between 0 and 0.5")


def _plant(text: str) -> float:
    return _number(text, lambda v: 0 <= v <= 10, "a fraction from 0 to 10")


def _figures(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in FIGURES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: expected figures from {', '.join(FIGURES)}")
    return tuple(dict.fromkeys(names))


def register(sub, bench) -> None:
    p = sub.add_parser("ab", help="the same figures in two environments on this machine, "
                                  "interleaved, with a rank test per figure")
    p.add_argument("--a", default=sys.executable, metavar="PYTHON",
                   help="side A's Python or venv folder (default: this one)")
    p.add_argument("--b", default=sys.executable, metavar="PYTHON",
                   help="side B's Python or venv folder (default: this one)")
    p.add_argument("--checkpoint", type=Path, metavar="DIR",
                   help="the checkpoint both sides measure (default: the tiny synthetic one)")
    p.add_argument("--checkpoint-a", type=Path, metavar="DIR", help="side A's checkpoint")
    p.add_argument("--checkpoint-b", type=Path, metavar="DIR", help="side B's checkpoint")
    p.add_argument("--figures", type=_figures, default=DEFAULT_FIGURES, metavar="LIST",
                   help=f"comma-separated (default {','.join(DEFAULT_FIGURES)}; also build)")
    p.add_argument("--rounds", type=positive_int, default=30,
                   help="rounds, each one fresh process per side (default 30)")
    p.add_argument("--budget", type=positive_int, default=300, metavar="SECONDS",
                   help="stop starting rounds after this long (default 300)")
    p.add_argument("--alpha", type=_fraction, default=ALPHA,
                   help=f"significance level of the test (default {ALPHA})")
    p.add_argument("--fail", type=check_arg, action="append", default=[], metavar="EXPR",
                   help="METRIC:LIMIT (+5%%, -5%%, ±5%%, 5%%): exit 1 when the change is "
                        "beyond the limit and significant; repeatable")
    p.add_argument("-o", "--output", type=Path, metavar="DIR",
                   help="write a.json, b.json (results files) and ab.md here (default "
                        "reports/ab-<time>)")
    p.add_argument("--plant-b", type=_plant, default=0.0, help=argparse.SUPPRESS)
    add_json(p, "every figure's verdict")
    p.set_defaults(func=cmd_ab)

    b = bench.add_parser("ab-power", help="how often ab catches a planted 5/10/20%% slowdown "
                                          "and how often it cries wolf, on this machine")
    b.add_argument("--rounds", type=positive_int, default=100,
                   help="rounds of the session, five processes each (default 100)")
    b.add_argument("--size", type=positive_int, default=30,
                   help="rounds per emulated ab run (default 30, ab's default)")
    b.add_argument("--figures", type=_figures, default=DEFAULT_FIGURES, metavar="LIST",
                   help=f"comma-separated (default {','.join(DEFAULT_FIGURES)})")
    b.add_argument("--alpha", type=_fraction, default=ALPHA, help=f"default {ALPHA}")
    b.add_argument("-o", "--output", type=Path, metavar="DIR",
                   help="write pool.json (every value) and power.md (the table) here "
                        "(default reports/ab-power-<time>)")
    b.add_argument("--pool", type=Path, metavar="POOL.json",
                   help="measure nothing: the table again from a stored pool.json, for "
                        "another --size or --alpha")
    b.set_defaults(func=cmd_bench_ab_power)


def _sides(args, scratch: Path):
    if args.checkpoint and (args.checkpoint_a or args.checkpoint_b):
        raise AbError("--checkpoint is both sides' folder: give it, or --checkpoint-a and "
                      "--checkpoint-b, not both")
    folders, names = {}, {}
    for label, own in (("A", args.checkpoint_a), ("B", args.checkpoint_b)):
        folders[label] = own or args.checkpoint
        if folders[label] is None:
            folders[label] = _tiny(scratch)
            names[label] = "the tiny synthetic checkpoint (built for this run)"
    return (Side("A", interpreter(args.a), checkpoint(folders["A"]), 0.0, names.get("A")),
            Side("B", interpreter(args.b), checkpoint(folders["B"]), args.plant_b,
                 names.get("B")))


def _tiny(scratch: Path) -> Path:
    from ...synth.builder import build  # heavy: torch

    out = scratch / "tiny"
    if not out.exists():
        build(build_spec("tiny"), out)
    return out


def cmd_ab(args: argparse.Namespace) -> int:
    applicable(args.fail, args.figures)
    check_rounds(args.rounds, args.alpha)

    run_id = new_run_id()
    output = args.output or Path("reports") / f"ab-{run_id}"
    check_target(output, force=False)  # refused now, not after minutes of rounds
    with tempfile.TemporaryDirectory(prefix="llava-ab-") as tmp:
        a, b = _sides(args, Path(tmp))
        print(f"{a.describe()}\n{b.describe()}", file=sys.stderr)
        run = run_ab(a, b, args.figures, args.rounds, args.budget, Path(tmp) / "work",
                     progress=_progress(args.rounds), alpha=args.alpha)
    found = verdicts(run, args.fail, args.alpha)
    _write(output, run, found, run_id, args)
    for verdict in found:
        print(verdict.line())
    print(f"ab: {run.rounds} rounds in {run.wall_s:.0f} s; results: {output}")
    if args.json:
        print_json({"rounds": run.rounds, "wall_s": run.wall_s, "output": str(output),
                    "ok": not any(v.failed_checks for v in found),
                    "figures": [v.to_dict() for v in found]})
    return 1 if any(v.failed_checks for v in found) else 0


def _progress(total: int):
    start = time.perf_counter()

    def report(done: int, *_) -> None:
        print(f"round {done}/{total}: {time.perf_counter() - start:.0f} s", file=sys.stderr,
              flush=True)
    return report


def _write(output: Path, run, found, run_id: str, args) -> None:
    """a.json, b.json and ab.md, all or nothing."""
    settings = {"ab_rounds": str(run.rounds), "ab_alpha": str(args.alpha),
                "ab_figures": ",".join(run.figures)}
    if run.b.plant:
        settings["ab_planted_b"] = f"{run.b.plant:g}"
    with atomic_dir(output) as tmp:
        for side in (run.a, run.b):
            write_results(side_results(run, side, run_id, settings),
                          tmp / f"{side.label.lower()}.json")
        write_text(tmp / "ab.md", render(run, found))


def cmd_bench_ab_power(args: argparse.Namespace) -> int:
    check_rounds(args.size, args.alpha)
    if args.pool is not None:
        print(reanalyse(args.pool, args.size, args.alpha), end="")
        return 0
    if args.rounds < 2 * args.size:
        raise AbError(f"--rounds {args.rounds}: the gate's comparison draws two disjoint sets "
                      f"of --size {args.size}, so at least {2 * args.size}")
    with tempfile.TemporaryDirectory(prefix="llava-ab-power-") as tmp:
        table = bench_ab_power(Path(sys.executable), _tiny(Path(tmp)), args.figures,
                               args.rounds, args.size, Path(tmp) / "work",
                               args.output or Path("reports") / f"ab-power-{new_run_id()}",
                               args.alpha, progress=_progress(args.rounds))
    print(table, end="")
    return 0
