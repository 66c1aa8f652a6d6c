"""`llava-harness ab`: the same figures in two environments on one machine, interleaved, with a
paired rank test for each.

A side is a Python interpreter (a venv: today's stack, a candidate stack, another commit of
the harness installed into it) and a checkpoint folder. Round i runs one fresh process per
side (`ab_child.py`, started by path with the side's interpreter), A then B in even rounds and
B then A in odd ones (ABBA), so neither side always goes first and a pair shares the VM's
phase. Rounds go on until `rounds` are done or `budget_s` has passed (at least MIN_N rounds).

Each figure's verdict comes from the per-round ratios (harness/report/stats.paired_shift):
"slower" or "faster" when the change is significant at alpha, else "no change detected" with
the smallest change this run could have seen. A `--fail` check fails only when the change is
beyond its limit and significant. Each side's figures are written as an ordinary results file
(a.json, b.json), so `report` and `compare` read them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from ..llava.kinds import detect_kind
from ..report.environment import Environment, current
from ..report.results import Metric, Results, make_record, now
from ..report.stats import ALPHA, Shift, min_pairs, paired_shift
from .measure import BenchError

CHILD = Path(__file__).with_name("ab_child.py")
FIGURES = ("extract", "strip", "count", "build")
DEFAULT_FIGURES = ("extract", "strip", "count")
# Calls per figure in one child: its median is the child's value. More calls do not reduce
# the between-process noise, which dominates on a VM (measured: ~15% across processes with 5
# or 30 calls alike); they only cost time.
CALLS = 5
CHILD_TIMEOUT_S = 600
# Every child hashes strings the same way: a random seed per process changes dict layouts and
# with them the figures (measured here, 40 processes: 20% less spread between processes).
HASH_SEED = "0"
SUITE = "ab"


class AbError(BenchError):
    """A side that cannot be measured, or a check `ab` cannot apply."""


@dataclass(frozen=True)
class Side:
    label: str              # "A" or "B"
    python: Path
    checkpoint: Path
    plant: float = 0.0      # test-only: stretch every timed call by this fraction
    checkpoint_name: str | None = None  # how to name a checkpoint built for this run

    def describe(self) -> str:
        return f"{self.label}: {self.python} on {self.checkpoint_name or self.checkpoint}"


def interpreter(text: str) -> Path:
    """A Python to run a side with: an executable, or a venv folder (its bin/python)."""
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "bin" / "python"
    if not path.is_file() or not os.access(path, os.X_OK):
        raise AbError(f"{text}: not a Python interpreter or a venv folder with bin/python")
    return path


def checkpoint(path: Path) -> Path:
    """A folder the figures can run on: a full LLaVA checkpoint (extract, strip and count
    need its projector and language model)."""
    found = detect_kind(path).kind
    if found != "llava":
        raise AbError(f"{path}: a {found} folder; ab's figures need a full LLaVA checkpoint")
    return Path(path)


def metric_name(figure: str) -> str:
    return f"{figure}_s"


@dataclass
class AbRun:
    a: Side
    b: Side
    figures: tuple[str, ...]
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # side->fig->[]
    environments: dict[str, dict | None] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def rounds(self) -> int:
        return len(self.values.get("A", {}).get(self.figures[0], []))

    def shift(self, figure: str, alpha: float = ALPHA) -> Shift | None:
        return paired_shift(self.values["A"][figure], self.values["B"][figure], alpha)


def measure_side(side: Side, figures: tuple[str, ...], scratch: Path) -> dict:
    """One fresh process of `side`: {"values": {figure: seconds per call}, "environment"}."""
    work = scratch / side.label
    work.mkdir(parents=True, exist_ok=True)
    job = {"checkpoint": str(side.checkpoint), "scratch": str(work), "figures": list(figures),
           "calls": CALLS, "plant": side.plant, "out": str(work / "out.json")}
    (work / "job.json").write_text(json.dumps(job))
    (work / "out.json").unlink(missing_ok=True)
    try:
        done = subprocess.run([str(side.python), "-P", str(CHILD), str(work / "job.json")],
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                              env={**os.environ, "PYTHONHASHSEED": HASH_SEED})
    except subprocess.TimeoutExpired:
        raise AbError(f"{side.describe()}: a round took over {CHILD_TIMEOUT_S} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise AbError(f"{side.describe()}: the measuring process failed: {last}")
    return json.loads((work / "out.json").read_text())


def check_rounds(rounds: int, alpha: float) -> None:
    """Refuse a round count with which no change could ever be significant."""
    if rounds < min_pairs(alpha):
        raise AbError(f"{rounds} rounds can never show a change at alpha {alpha:g}: the test "
                      f"needs at least {min_pairs(alpha)}")


def run_ab(a: Side, b: Side, figures: tuple[str, ...], rounds: int, budget_s: float,
           scratch: Path, progress=None, alpha: float = ALPHA) -> AbRun:
    """Interleaved rounds (ABBA) until `rounds` or `budget_s`, never fewer than the test
    needs to reach `alpha` at all."""
    check_rounds(rounds, alpha)
    run = AbRun(a, b, figures, {"A": {f: [] for f in figures}, "B": {f: [] for f in figures}})
    start = time.perf_counter()
    for i in range(rounds):
        if i >= min_pairs(alpha) and time.perf_counter() - start > budget_s:
            break
        for side in (a, b) if i % 2 == 0 else (b, a):
            got = measure_side(side, figures, scratch)
            run.environments.setdefault(side.label, got.get("environment"))
            for figure in figures:
                run.values[side.label][figure].append(float(got["values"][figure]))
        if progress is not None:
            progress(i + 1, run)
    run.wall_s = time.perf_counter() - start
    return run


# -- verdicts ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    figure: str
    metric: str
    shift: Shift | None
    failed_checks: tuple[str, ...] = ()

    @property
    def word(self) -> str:
        """For a timing (lower is better): B/A above 1 is slower."""
        if self.shift is None:
            return "too few rounds for a test"
        if not self.shift.significant:
            return (f"no change detected (the smallest change this run could have seen: "
                    f"{self.shift.detectable:.1%})")
        return "slower" if self.shift.ratio > 1 else "faster"

    def line(self) -> str:
        figures = "" if self.shift is None else f"  {self.shift.describe()}"
        fails = "".join(f"  FAIL {c}" for c in self.failed_checks)
        return f"{self.metric}: B/A {self.word}{figures}{fails}"

    def to_dict(self) -> dict:
        s = self.shift
        out = {"figure": self.figure, "metric": self.metric, "verdict": self.word,
               "failed_checks": list(self.failed_checks)}
        if s is not None:
            out |= {"ratio": s.ratio, "ci_low": s.low, "ci_high": s.high, "p": s.p,
                    "alpha": s.alpha, "pairs": s.n_a, "detectable": s.detectable,
                    "significant": s.significant, "method": s.method}
        return out


def breaks(check, shift: Shift | None) -> bool:
    """A relative check (gate syntax) fails only on a significant change beyond its limit:
    the gate's own range test, on B/A against a baseline of 1 (the figures are timings, so
    'worse' is a rise)."""
    if shift is None or not shift.significant:
        return False
    return not check.passes(Metric(shift.ratio, "s", "lower"), 1.0)


def applicable(checks, figures: tuple[str, ...]) -> None:
    """Refuse, before anything runs, a check `ab` cannot apply: absolute limits (no baseline
    is involved here) and checks that match none of the figures' metrics."""
    names = [metric_name(f) for f in figures]
    for check in checks:
        if check.kind != "relative":
            raise AbError(f"check {check.text!r}: ab compares B with A; use a relative limit "
                          "(+5%, -5%, ±5%, 5%)")
        if not any(fnmatchcase(n, check.metric) for n in names):
            raise AbError(f"check {check.text!r}: matches none of {', '.join(names)}")


def verdicts(run: AbRun, checks=(), alpha: float = ALPHA) -> list[Verdict]:
    out = []
    for figure in run.figures:
        metric, shift = metric_name(figure), run.shift(figure, alpha)
        failed = tuple(c.text for c in checks
                       if fnmatchcase(metric, c.metric) and breaks(c, shift))
        out.append(Verdict(figure, metric, shift, failed))
    return out


def side_results(run: AbRun, side: Side, run_id: str, settings: dict):
    """One side's figures as an ordinary results file: suite `ab`, a case per figure, every
    round's value as the metric's sample."""
    # The side's own environment (its torch, transformers, harness), as its child saw it.
    raw = run.environments.get(side.label)
    environment = Environment.from_dict(raw, f"side {side.label}") if raw else current()
    records = tuple(make_record(SUITE, figure, {metric_name(figure): Metric.of(
        run.values[side.label][figure], "s")}, environment=environment)
        for figure in run.figures)
    return Results(run_id=f"{run_id}-{side.label.lower()}", environment=environment,
                   records=records, created=now(),
                   settings={**settings, "ab_side": side.label, "python": str(side.python),
                             "checkpoint": str(side.checkpoint)})


def render(run: AbRun, found: list[Verdict]) -> str:
    """ab.md: the sides, every figure's verdict with its figures, and how it was decided."""
    alpha = found[0].shift.alpha if found and found[0].shift else ALPHA
    lines = ["# llava-harness ab", "", f"- {run.a.describe()}", f"- {run.b.describe()}", "",
             f"{run.rounds} rounds in {run.wall_s:.0f} s, each a fresh process per side, "
             "in ABBA order. B/A per figure from the per-round ratios: Hodges-Lehmann "
             f"estimate, {1 - alpha:.0%} interval, Wilcoxon signed-rank p (two-sided).", ""]
    if run.b.plant:
        lines += [f"**Test run: B carries a planted slowdown of {run.b.plant:.0%}.**", ""]
    lines += ["| metric | A median | B median | B/A | interval | p | verdict |",
              "|---|---|---|---|---|---|---|"]
    for v in found:
        a, b = (statistics.median(run.values[s][v.figure]) for s in ("A", "B"))
        s = v.shift
        cells = ["", "", ""] if s is None else [f"{s.ratio:.3f}", f"{s.low:.3f}-{s.high:.3f}",
                                               f"{s.p:.2g}"]
        word = v.word + "".join(f"; FAIL {c}" for c in v.failed_checks)
        lines.append(f"| {v.metric} | {a * 1e3:.3f} ms | {b * 1e3:.3f} ms | "
                     + " | ".join(cells) + f" | {word} |")
    return "\n".join(lines) + "\n"
