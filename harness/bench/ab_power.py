"""`llava-harness bench ab-power`: how often `ab` catches a slowdown of known size on this
machine, and how often it cries wolf; and the stored-baseline gate on the same data.

One long session of rounds, each running five arms as fresh processes, in an order that
rotates and reverses from round to round: A, A again (the A/A control), and A with 5%, 10% and
20% planted (`ab_child.py`'s test-only switch: every timed call stretched by that fraction
with a busy wait). Then `ab` runs of the default size are drawn from the session's rounds
(`draws` subsets of `size` rounds each, seeded, so the table is reproducible from the stored
pool) and each is judged as `ab` would judge it:

- detection rate: the planted arm against A is significant and slower;
- false-alarm rate: the A/A control is significant either way.

The current gate is judged on the same pool, as it is used (report/gate.evaluate): a baseline
from one set of rounds of A, the run from a disjoint set of the planted arm, `METRIC:+5%`
with its noise allowance and its rank test.
The subsets overlap, so the rates are estimates from one session, not independent runs; the
raw pool is written beside the table so anyone can redo the analysis.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.atomic import atomic_dir
from ..console import write_text
from ..report.environment import current
from ..report.gate import evaluate, parse_check
from ..report.results import Metric, Record, Results, ResultsError, load_json
from ..report.stats import ALPHA, paired_shift
from .ab import AbError, Side, measure_side, metric_name

ARMS = (("A", 0.0), ("A/A", 0.0), ("+5%", 0.05), ("+10%", 0.10), ("+20%", 0.20))
DRAWS = 400
SEED = 20261207
GATE_CHECK = "+5%"


def collect(python: Path, checkpoint: Path, figures: tuple[str, ...], rounds: int,
            scratch: Path, progress=None) -> dict[str, dict[str, list[float]]]:
    """arm -> figure -> one value per round."""
    pool = {arm: {f: [] for f in figures} for arm, _ in ARMS}
    for i in range(rounds):
        order = list(ARMS[i % len(ARMS):] + ARMS[:i % len(ARMS)])
        for arm, plant in order if i % 2 == 0 else reversed(order):
            got = measure_side(Side("A", python, checkpoint, plant), figures, scratch)
            for figure in figures:
                pool[arm][figure].append(float(got["values"][figure]))
        if progress is not None:
            progress(i + 1)
    return pool


@dataclass(frozen=True)
class Rate:
    hits: int
    draws: int

    def __str__(self) -> str:
        return f"{self.hits / self.draws:.1%}"


def _gate_fails(baseline: list[float], run: list[float], figure: str, environment) -> bool:
    """The gate itself (report/gate.evaluate: its noise allowance and its rank test) on one
    figure, a baseline of some rounds against a run of others."""
    name = metric_name(figure)

    def run_of(values: list[float]) -> Results:
        record = Record("ab", figure, metrics={name: Metric.of(values, "s")})
        return Results("power", environment, (record,))

    return not evaluate([parse_check(f"{name}:{GATE_CHECK}")], run_of(run),
                        run_of(baseline)).ok


def power_table(pool: dict, size: int, draws: int = DRAWS, alpha: float = ALPHA) -> list[dict]:
    """One row per (figure, arm): `ab`'s rate of significant verdicts over `draws` subsets of
    `size` rounds, and the gate's rate of failures over pairs of disjoint subsets."""
    rounds = len(next(iter(pool["A"].values())))
    if rounds < 2 * size:
        raise ValueError(f"{rounds} rounds: the gate's comparison needs at least {2 * size}")

    rng, environment = random.Random(SEED), current()
    rows = []
    for figure in pool["A"]:
        for arm, _ in ARMS[1:]:
            ab_hits = gate_hits = 0
            for _ in range(draws):
                picked = rng.sample(range(rounds), 2 * size)
                first, second = sorted(picked[:size]), sorted(picked[size:])
                a = [pool["A"][figure][i] for i in first]
                b = [pool[arm][figure][i] for i in first]
                shift = paired_shift(a, b, alpha)
                control = arm == "A/A"
                ab_hits += bool(shift and shift.significant and (control or shift.ratio > 1))
                gate_hits += _gate_fails([pool["A"][figure][i] for i in second], b, figure,
                                         environment)
            rows.append({"figure": figure, "planted": arm, "ab": Rate(ab_hits, draws),
                         "gate": Rate(gate_hits, draws)})
    return rows


def render(rows: list[dict], size: int, rounds: int, alpha: float, wall_s: float) -> str:
    lines = [f"`ab` runs of {size} rounds drawn from one session of {rounds} rounds "
             f"({wall_s / 60:.0f} min); alpha {alpha:g}; gate `METRIC:{GATE_CHECK}` against a "
             "baseline of other rounds.", "",
             "| figure | planted | ab: caught | gate: caught |", "|---|---|---|---|"]
    for row in rows:
        what = "false alarms" if row["planted"] == "A/A" else "caught"
        lines.append(f"| {row['figure']} | {row['planted']} | {row['ab']} {what} | "
                     f"{row['gate']} {what} |")
    return "\n".join(lines) + "\n"


def read_pool(pool_file: Path) -> tuple[dict, float]:
    """A stored pool.json (untrusted: it may come from another machine), checked whole: every
    arm, the same figures in each, one positive finite value per round. (pool, wall_s)."""
    try:
        data = load_json(pool_file)
    except ResultsError as exc:
        raise AbError(str(exc)) from None
    pool = data.get("pool") if isinstance(data, dict) else None
    wall_s = data.get("wall_s") if isinstance(data, dict) else None
    arms = [arm for arm, _ in ARMS]
    if not isinstance(pool, dict) or sorted(pool) != sorted(arms) \
            or not isinstance(wall_s, (int, float)):
        raise AbError(f"{pool_file}: not a pool written by bench ab-power (arms "
                      f"{', '.join(arms)}, wall_s)")
    figures = pool["A"] if isinstance(pool["A"], dict) else {}
    rounds = len(next(iter(figures.values()), []))
    for arm in arms:
        values = pool[arm]
        if not isinstance(values, dict) or sorted(values) != sorted(figures) or not figures:
            raise AbError(f"{pool_file}: arm {arm!r} does not hold the figures of arm 'A'")
        for figure, series in values.items():
            if not isinstance(series, list) or len(series) != rounds or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool)
                    and 0 < v < math.inf for v in series):
                raise AbError(f"{pool_file}: {arm} {figure}: expected {rounds} positive "
                              "finite values")
    return pool, float(wall_s)


def reanalyse(pool_file: Path, size: int, alpha: float = ALPHA) -> str:
    """The table again from a stored pool.json, for another run size or alpha."""
    pool, wall_s = read_pool(pool_file)
    rounds = len(next(iter(pool["A"].values())))
    if rounds < 2 * size:
        raise AbError(f"{pool_file}: {rounds} rounds; --size {size} needs {2 * size}")
    return render(power_table(pool, size, alpha=alpha), size, rounds, alpha, wall_s)


def bench_ab_power(python: Path, checkpoint: Path, figures: tuple[str, ...], rounds: int,
                   size: int, scratch: Path, out: Path, alpha: float = ALPHA,
                   progress=None) -> str:
    """Collect the pool, write it (pool.json) and the table (power.md) into `out`."""
    start = time.perf_counter()
    pool = collect(python, checkpoint, figures, rounds, scratch, progress)
    wall_s = time.perf_counter() - start
    table = render(power_table(pool, size, alpha=alpha), size, rounds, alpha, wall_s)
    with atomic_dir(out) as tmp:
        write_text(tmp / "pool.json", json.dumps({"arms": dict(ARMS), "size": size,
                                                  "alpha": alpha, "wall_s": wall_s,
                                                  "pool": pool}, indent=1))
        write_text(tmp / "power.md", table)
    return table
