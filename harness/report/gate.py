"""Regression checks of a run against a baseline: per metric, relative or absolute, either way.

A check is `METRIC[@CASE]:LIMIT`; METRIC and CASE are shell-style globs (CASE matches
`suite::case` or the bare case id). LIMIT is one of

    +5%     fail when the value rose more than 5% above the baseline (beyond the noise)
    -10%    fail when it fell more than 10% below the baseline
    ±5%     (or ~5%) fail when it moved more than 5% either way
    5%      fail when it got more than 5% worse, in the metric's own direction (lower/higher
            is better); two-sided for a metric without a direction
    <=0.5   absolute (also <, >=, >, ==): needs no baseline

Relative limits apply beyond the noise: the range widens by the baseline's measured spread
(its IQR; the run's where the baseline has no sample), for timings at least the run-to-run
shift stated in tolerances.toml (one run's rounds do not show the noise between runs; a
baseline pooled from several runs does, and its IQR counts where it is the larger). So two runs of the same code on the
same machine pass a `±5%` gate and a 2x regression still fails it. A percentage above 1000% is refused (a limit that cannot fail is no limit).

Timings of a case that carries the machine-speed probe (the figures suite measures it around
each figure; speed.py), as its baseline record does, are judged at this machine's speed: the
baseline's value and noise times the ratio of the two probes where this machine ran it slower
(never below the baseline as measured). Two VMs of one class differ by up to 1.8x; the code
does not change the probe, so a regression still shows at full size.

Where the baseline's metric and the run's both carry a sample of at least 5 values, a value
beyond its limit fails only if the two samples also differ significantly (Mann-Whitney U at
alpha 0.01, stats.py): the limit says how big a change matters, the test that it is not the
noise. The failure line carries the test's figures; a value passed by the test is noted.

Checks are parsed when the arguments are (argparse and pytest `type=`), so a typo fails
before any work, naming the bad text. Evaluation gives one failure line per (check, case,
metric) with the baseline, the value and the limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import statistics
import subprocess
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from ..checkpoint.atomic import check_target
from ..data import fixtures_dir
from ..errors import HarnessError
from ..tolerances import tolerance
from .environment import harness_repo
from .results import Metric, Record, Results, is_timing, load_results, write_results
from .speed import PROBE_METRIC, allowance, at_scale, scale_factor, speed_scale
from .stats import ALPHA, MANN_WHITNEY, Shift, shift

_RELATIVE = re.compile(r"^(?P<sign>[+\-±~]?)(?P<num>\d{1,4}(?:\.\d{1,6})?)%$")
MAX_PERCENT = 1000
_ABSOLUTE = re.compile(r"^(?P<op><=|>=|==|<|>)(?P<num>[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
                       r"(?:[eE][+-]?\d+)?)$")
_SIGNS = {"+": "rise", "-": "fall", "±": "both", "~": "both", "": "worse"}


class GateError(HarnessError, ValueError):
    """A check expression that cannot be parsed, or a gate that cannot be evaluated."""


@dataclass(frozen=True)
class Check:
    text: str
    metric: str
    case: str | None
    kind: str        # "relative" or "absolute"
    op: str          # relative: rise | fall | both | worse; absolute: <= < >= > ==
    amount: float    # relative: a fraction (0.05 for 5%); absolute: the bound

    @property
    def needs_baseline(self) -> bool:
        return self.kind == "relative"

    def matches(self, record: Record, metric: str) -> bool:
        if not fnmatchcase(metric, self.metric):
            return False
        return self.case is None or fnmatchcase(record.id, self.case) \
            or fnmatchcase(record.case, self.case)

    def bounds(self, metric: Metric, baseline: float | None,
               noise: float = 0.0) -> tuple[float, float]:
        """(lowest allowed, highest allowed) for this metric; `noise` widens a relative
        range by the measured spread."""
        if self.kind == "absolute":
            return {"<=": (-math.inf, self.amount), "<": (-math.inf, self.amount),
                    ">=": (self.amount, math.inf), ">": (self.amount, math.inf),
                    "==": (self.amount, self.amount)}[self.op]
        slack = abs(baseline) * self.amount + noise
        op = self.op
        if op == "worse":
            op = {"lower": "rise", "higher": "fall"}.get(metric.direction, "both")
        low = baseline - slack if op in ("fall", "both") else -math.inf
        high = baseline + slack if op in ("rise", "both") else math.inf
        return low, high

    def passes(self, metric: Metric, baseline: float | None, noise: float = 0.0) -> bool:
        value = metric.value
        if isinstance(value, float) and math.isnan(value):
            return False
        low, high = self.bounds(metric, baseline, noise)
        if self.kind == "absolute" and self.op in ("<", ">"):
            return value < high if self.op == "<" else value > low
        return low <= value <= high


def parse_check(text: str) -> Check:
    """`'peak_rss:+5%'` -> Check; a GateError naming the text and what was wrong."""
    if not isinstance(text, str) or ":" not in text:
        raise GateError(f"check {text!r}: expected METRIC[@CASE]:LIMIT, e.g. "
                        "'peak_rss:+5%' or 'extract_wall_s:<=0.5'")
    target, limit = (part.strip() for part in text.rsplit(":", 1))
    metric, _, case = target.partition("@")
    metric, case = metric.strip(), case.strip() or None
    if not metric:
        raise GateError(f"check {text!r}: no metric name before ':'")
    if "@" in target and case is None:
        raise GateError(f"check {text!r}: no case pattern after '@'")
    if match := _RELATIVE.match(limit):
        amount = float(match["num"]) / 100
        if amount * 100 > MAX_PERCENT:
            raise GateError(f"check {text!r}: {match['num']}% is above {MAX_PERCENT}%; a limit "
                            "that wide cannot catch a regression")
        return Check(text, metric, case, "relative", _SIGNS[match["sign"]], amount)
    if match := _ABSOLUTE.match(limit):
        amount = float(match["num"])
        if not math.isfinite(amount):
            raise GateError(f"check {text!r}: bound {match['num']!r} is not a finite number")
        return Check(text, metric, case, "absolute", match["op"], amount)
    raise GateError(f"check {text!r}: limit {limit!r} is neither relative (+5%, -10%, ±5%, "
                    f"5%; at most {MAX_PERCENT}%, 4 digits) nor absolute (<=0.5, <0.5, >=10, >10, "
                    "==0)")


def check_arg(text: str) -> Check:
    """argparse / pytest `type=`: a bad check fails at parse time, naming the text."""
    try:
        return parse_check(text)
    except GateError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _number(value) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.6g}"


def _limit_text(check: Check, metric: Metric, baseline: float | None,
                noise: float = 0.0) -> str:
    if check.kind == "absolute":
        return f"{check.op} {_number(check.amount)}"
    low, high = check.bounds(metric, baseline, noise)
    parts = []
    if low > -math.inf:
        parts.append(f">= {_number(low)}")
    if high < math.inf:
        parts.append(f"<= {_number(high)}")
    noted = f" ({check.amount:.0%} + noise {_number(noise)})" if noise else ""
    return " and ".join(parts) + noted


def noise_of(metric: Metric, base: Metric | None) -> float:
    """How far two figures may differ by noise alone: the reference's measured spread (IQR;
    the new figure's where the reference has none), for a timing at least the run-to-run
    shift stated in tolerances.toml ([noise.run_to_run.timing]) times the reference value.
    A single run's rounds do not show the noise between runs, so the floor; a baseline pooled
    from several runs shows it in its IQR, and adding the floor on top would count it twice
    (a planted 2x build regression passed the gate that way: 14.4 ms, IQR 7.9 ms)."""
    # The reference's own spread where it has one: a regression that also makes the new run
    # noisier must not widen the range it is judged by.
    spreads = [m.spread for m in ((base,) if base is not None and base.spread is not None
                                  else (metric, base)) if m is not None and m.spread is not None]
    noise = max(spreads, default=0.0)
    reference = base if base is not None else metric
    if is_timing(metric.unit) and math.isfinite(reference.value):
        noise = max(noise, run_to_run_noise() * abs(reference.value))
    return noise


def run_to_run_noise() -> float:
    return tolerance("noise.run_to_run.timing").rtol


@dataclass(frozen=True)
class Failure:
    check: Check
    case: str            # suite::case
    metric: str
    value: float | None
    baseline: float | None
    unit: str
    limit: str           # the allowed range, e.g. "<= 0.2625"
    note: str = ""

    def line(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        value = "missing" if self.value is None else f"{_number(self.value)}{unit}"
        base = "" if self.baseline is None else f", baseline {_number(self.baseline)}{unit}"
        note = f" ({self.note})" if self.note else ""
        return (f"FAIL {self.case} {self.metric}: value {value}{base}, limit {self.limit} "
                f"[{self.check.text}]{note}")


@dataclass
class GateResult:
    failures: list[Failure | str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: int = 0
    # check text -> "case metric" values a relative check could not compare (new cases).
    unchecked: dict[str, list[str]] = field(default_factory=dict)
    # case -> machine-speed scale its timings were judged at (speed.py).
    scales: dict[str, float] = field(default_factory=dict)
    # "case metric: figures" of values beyond their limit that the rank test did not find
    # significant, so passed.
    not_significant: list[str] = field(default_factory=list)

    @property
    def notes(self) -> list[str]:
        """What the verdict rests on, beyond the checks: the machine-speed scales applied, and
        the values passed because their difference is not significant."""
        notes = []
        if self.not_significant:
            notes.append(f"{len(self.not_significant)} value(s) beyond their limit passed: "
                         f"the samples do not differ significantly ({MANN_WHITNEY}, alpha "
                         f"{ALPHA:g}), e.g. {self.not_significant[0]}")
        return notes + self._scale_notes()

    def _scale_notes(self) -> list[str]:
        if not self.scales:
            return []
        values = sorted(self.scales.values())
        spread = "" if len(values) == 1 else f", {values[0]:.3g}-{values[-1]:.3g} by case"
        faster = sum(1 for v in values if v < 1)
        held = (f"; {faster} case(s) where it ran faster are held to the baseline as measured"
                if faster else "")
        return [f"timings of {len(values)} case(s) judged at this machine's speed: the probe "
                f"took x{statistics.median(values):.3g} the baseline's time{spread}{held}"]

    @property
    def ok(self) -> bool:
        return not self.failures

    def printed(self, checks: int) -> tuple[list[str], list[str]]:
        """What every front end (the gate command, the main job, the pytest plugin) shows:
        (warnings, for stderr; the verdict's lines: notes, failures, or that all passed)."""
        lines = [f"gate: {n}" for n in self.notes] + self.lines()
        if self.ok:
            lines.append(f"gate: all {checks} check(s) passed ({self.checked} values)")
        return [f"warning: {w}" for w in self.warnings], lines

    def lines(self) -> list[str]:
        return [f if isinstance(f, str) else f.line() for f in self.failures]


def _check_record(check: Check, record: Record, base: Record | None, out: GateResult) -> int:
    """Apply one check to one record's matching metrics; returns how many it matched. A
    timing of a record that carries the machine-speed probe, as its baseline record does, is
    judged at this machine's speed (speed.py)."""
    scale = speed_scale(record, base)
    names = [n for n in record.metrics if check.matches(record, n)]
    if base is not None:
        # A metric the baseline had and this run lost (a skipped case, a dropped figure).
        names += [n for n in base.metrics if n not in record.metrics and check.matches(base, n)]
    for name in names:
        metric = record.metrics.get(name)
        base_metric = base.metrics.get(name) if base is not None else None
        if metric is None:
            out.failures.append(Failure(check, record.id, name, None, base_metric.value,
                                        base_metric.unit, "a value", note=f"case "
                                        f"{record.outcome} in this run"))
            continue
        if check.needs_baseline and base_metric is None:
            out.unchecked.setdefault(check.text, []).append(f"{record.id} {name}")
            continue
        out.checked += 1
        base_value = base_metric.value if base_metric is not None else None
        noise = noise_of(metric, base_metric) if check.needs_baseline else 0.0
        note, applied = "", 1.0
        if check.needs_baseline and name != PROBE_METRIC and scale is not None \
                and is_timing(metric.unit):
            applied = allowance(scale)
            base_value, noise = at_scale(metric, base_value, noise, applied)
            out.scales[record.id] = scale
            note = f"baseline at this machine's speed: probe x{scale:.3g}" + (
                "" if applied == scale else f", applied as x{applied:.3g}")
        if check.passes(metric, base_value, noise):
            continue
        tested = rank_test(metric, base_metric, applied) if check.needs_baseline else None
        if tested is not None and not tested.significant:
            out.not_significant.append(f"{record.id} {name}: {tested.describe()}")
            continue
        note = "; ".join(n for n in (note, tested and tested.describe()) if n)
        out.failures.append(Failure(check, record.id, name, metric.value, base_value,
                                    metric.unit, _limit_text(check, metric, base_value, noise),
                                    note=note))
    return len(names)


def rank_test(metric: Metric, base: Metric | None, scale: float = 1.0) -> Shift | None:
    """Mann-Whitney U between the baseline's sample (at this machine's speed) and the run's,
    where both carry one of at least MIN_N values; None where they do not."""
    if base is None or metric.sample is None or base.sample is None:
        return None
    factor = scale_factor(metric, scale)
    return shift([v * factor for v in base.sample.values], metric.sample.values)


def evaluate(checks: list[Check], results: Results, baseline: Results | None = None,
             outcomes: bool = True) -> GateResult:
    """Every check against every matching (case, metric) of `results`.

    With `outcomes`, a failed or errored case is a failure too (a release gate must not pass
    a run whose tests failed). A check that matches nothing fails: a gate that silently checks
    nothing is worse than none.
    """
    out = GateResult()
    if baseline is None and any(c.needs_baseline for c in checks):
        first = next(c for c in checks if c.needs_baseline)
        raise GateError(f"check {first.text!r} is relative and needs a baseline")
    if baseline is not None:
        out.warnings += [f"environments differ: {line}"
                         for line in results.environment.differences(baseline.environment)]
        missing = [r.id for r in baseline.records if results.record(*r.key) is None]
        if missing:
            out.warnings.append(f"{len(missing)} baseline case(s) not in this run, e.g. "
                                f"{missing[0]}")
    if outcomes:
        for record in results.records:
            if record.outcome in ("failed", "error"):
                out.failures.append(f"FAIL {record.id}: {record.outcome}"
                                    f"{': ' + record.reason if record.reason else ''}")
    for check in checks:
        matched = 0
        for record in results.records:
            base = baseline.record(*record.key) if baseline is not None else None
            matched += _check_record(check, record, base, out)
        if not matched:
            out.failures.append(f"FAIL {check.text}: matches no metric in the results")
    if baseline is not None:
        unscaled = _unscaled_timings(checks, results, baseline)
        if unscaled:
            out.warnings.append(f"{unscaled} case(s) carry the machine-speed probe but their "
                                "baseline records do not: their timings are compared unscaled "
                                "(record a new baseline)")
    for text, values in out.unchecked.items():
        out.warnings.append(f"{text}: {len(values)} value(s) not in the baseline, not checked "
                            f"(e.g. {values[0]})")
    return out


def _unscaled_timings(checks: list[Check], results: Results, baseline: Results) -> int:
    """Cases whose probe has no counterpart in the baseline, under a relative check."""
    if not any(c.needs_baseline for c in checks):
        return 0
    return sum(1 for r in results.records if PROBE_METRIC in r.metrics
               and speed_scale(r, baseline.record(*r.key)) is None)


# -- baselines ---------------------------------------------------------------------------------

def machine_class(environment) -> str:
    """A baseline's name for the hardware its figures belong to: timings are only comparable
    within one class. `gpu-1x-nvidia-h200`, or `cpu-2core-amd-epyc-avx512-bf16`."""
    def slug(text: str) -> str:
        return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "unknown"

    if environment.gpu_name:
        return f"gpu-{max(environment.gpu_count, 1)}x-{slug(environment.gpu_name)}"
    isa = f"-{slug(environment.cpu_isa)}" if environment.cpu_isa else ""
    return f"cpu-{environment.cpu_count or 0}core-{slug(environment.cpu_model or '')}{isa}"


def baseline_for(environment) -> Path | None:
    """The committed baseline of this machine class (fixtures/baselines/<class>.json), if any."""
    path = fixtures_dir() / "baselines" / f"{machine_class(environment)}.json"
    return path if path.is_file() else None


def baselines_dir() -> Path:
    """`fixtures/baselines/` of the checkout the package lives in (committed with the code it
    describes); an installed harness has no checkout to commit to, and writes nowhere in
    site-packages."""
    if harness_repo() is None:
        raise GateError("baseline --name writes into a checkout's fixtures/baselines/, and this "
                        "harness is installed, not a checkout: pass -o FILE")
    return fixtures_dir() / "baselines"


def _git(folder: Path, *args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(folder), *args], check=True,
                              capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def pool_runs(runs: list[Results]) -> Results:
    """One baseline from several runs of the same code on the same machine: every repeated
    measurement's samples pooled (so its IQR shows the noise between runs, not only within
    one), other figures and outcomes from the first run."""
    first = runs[0]
    records = []
    for record in first.records:
        metrics = dict(record.metrics)
        for name, metric in record.metrics.items():
            if metric.sample is None:
                continue
            values = list(metric.sample.values)
            for other in runs[1:]:
                found = other.record(*record.key)
                theirs = found.metrics.get(name) if found is not None else None
                if theirs is not None and theirs.sample is not None:
                    values += theirs.sample.values
            metrics[name] = Metric.of(values, metric.unit, metric.direction)
        records.append(dataclasses.replace(record, metrics=metrics))
    pooled = ", ".join(r.run_id for r in runs)
    return dataclasses.replace(first, records=tuple(records),
                               settings={**first.settings, "pooled_from": pooled})


def write_baseline(results_paths, target: Path | str, force: bool = False) -> Path:
    """Write the run at `results_paths` (or several runs of it, pooled) to `target` (`-`:
    stdout) as a baseline, refusing what cannot be reproduced: a run made from uncommitted
    changes, runs of different commits, or a target that git would commit from a work tree
    with uncommitted changes (the baseline goes in alone, beside its code)."""
    paths = [results_paths] if isinstance(results_paths, (str, Path)) else list(results_paths)
    runs = [load_results(path) for path in paths]
    for path, run in zip(paths, runs):
        if run.environment.git_dirty:
            raise GateError(f"{path}: run {run.run_id} was made from a harness tree with "
                            f"uncommitted changes (commit {run.environment.git_commit}); a "
                            "baseline must come from a committed tree")
    commits = {run.environment.git_commit for run in runs}
    if len(commits) > 1:
        raise GateError(f"{paths[1]}: pooled runs must be of one commit, not {len(commits)} "
                        f"({', '.join(sorted(str(c)[:10] for c in commits))})")
    classes = {machine_class(run.environment) for run in runs}
    if len(classes) > 1:
        raise GateError(f"{paths[1]}: pooled runs must be of one machine class, not "
                        f"{', '.join(sorted(classes))}")
    results = pool_runs(runs) if len(runs) > 1 else runs[0]
    if str(target) == "-":
        return write_results(results, "-")
    target = Path(target)
    check_target(target, force)
    parent = next((p for p in [target.parent, *target.parent.parents] if p.exists()), Path("."))
    if _git(parent, "rev-parse", "--show-toplevel") is not None and not _ignored(target):
        status = _git(parent, "status", "--porcelain", "--untracked-files=normal")
        if status is None or status.strip():
            first = (status or "git status failed").strip().splitlines()[0]
            raise GateError(f"{parent}: the git tree has uncommitted changes ({first.strip()}"
                            "...); commit or discard them before writing a baseline")
    return write_results(results, target)


def _ignored(target: Path) -> bool:
    """A target git ignores (reports/, say) is never committed: the tree's state is moot."""
    parent = next((p for p in [target.parent, *target.parent.parents] if p.exists()), Path("."))
    try:
        return subprocess.run(["git", "-C", str(parent), "check-ignore", "-q",
                               str(target.absolute())], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
