"""Runs side by side (the same suites on different hardware, or before and after a change),
every difference judged against the noise the runs measured.

Runs are lettered A, B, C... in the order given; A is the reference. Each is labelled by its
run id and hardware (GPU, or CPU model with ISA level and cores). The markdown says first what
changed in outcome (a case that passed in one run and failed in another), then which cases
every run failed, then each metric with each run's value (median ± half the IQR, and n, for a
repeated measurement) and a verdict against A: "same, within noise" unless the difference
exceeds the noise the gate allows for too (run A's measured spread, for timings at least the
run-to-run shift of tolerances.toml), else the ratio, better or worse by the metric's
direction. Where both runs carry samples of 5+ values, a difference beyond the noise must also
be significant by the rank test (stats.py; the figures and the method are in the verdict); the
two sides of one `ab` run are paired round by round and judged by the signed-rank test alone
(same machine, interleaved: no run-to-run floor). A figure measured once carries no noise and
is marked so. Cost is linear in the
number of records. The chart is in chart.py; compare_folder.py writes both.
"""

from __future__ import annotations

import math
import string

from tabulate import tabulate

from ..errors import HarnessError
from .gate import run_to_run_noise, noise_of
from .results import Metric, Results, is_timing
from .single import cell, fmt_value, metric_header
from .stats import ALPHA, MANN_WHITNEY, SIGNED_RANK, Shift, paired_shift, shift

MISSING = "—"
LIST_AT_MOST = 10


class CompareError(HarnessError):
    pass


def letters(n: int) -> list[str]:
    if n > len(string.ascii_uppercase):
        raise CompareError(f"{n} runs: compare takes at most {len(string.ascii_uppercase)}")
    return list(string.ascii_uppercase[:n])


def run_label(name: str, run: Results) -> str:
    return f"{name}: {run.run_id} ({run.environment.label()})"


def case_keys(runs: list[Results]) -> list[tuple[str, str]]:
    """Every (suite, case) of every run: the first run's order, then newcomers in order."""
    return list(dict.fromkeys(r.key for run in runs for r in run.records))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def verdict(metric: Metric | None, first: Metric | None, paired: bool = False,
            figures: bool = True) -> str:
    """`metric` against the reference `first`: same within noise, or the ratio with better
    or worse; exact figures (counts) are "same" only when equal. Where both carry samples the
    rank test must agree that they differ (stats.py, the method named; its figures unless
    `figures` is False); `paired` samples (the two sides of one `ab` run, round by round)
    are judged by the paired test alone."""
    if metric is None or first is None or not (_number(metric.value) and _number(first.value)):
        return MISSING
    diff = metric.value - first.value
    if diff == 0:
        return "same"
    tested = rank_test(metric, first, paired)
    noise = 0.0 if paired and tested else noise_of(metric, first)
    if noise and abs(diff) <= noise:
        return f"same, within noise (±{fmt_value(noise)})"
    if tested is not None and not tested.significant:
        return (f"no change detected, {tested.describe()} (could have seen "
                f"{tested.detectable:.1%})")
    spreads = [m.spread for m in (metric, first) if m.spread is not None]
    if first.value == 0:
        return f"{'+' if diff > 0 else ''}{fmt_value(diff)}"
    ratio = metric.value / first.value
    shot = "" if spreads or not is_timing(metric.unit) else ", measured once"
    test = f", {tested.describe()}" if tested and figures else ""
    if metric.direction == "none":
        return f"{ratio:.3g}x{shot}{test}"
    better = diff < 0 if metric.direction == "lower" else diff > 0
    return f"{ratio:.3g}x, {'better' if better else 'worse'}{shot}{test}"


def rank_test(metric: Metric, first: Metric, paired: bool = False) -> Shift | None:
    """The rank test of two samples (None without samples of MIN_N values each)."""
    if metric.sample is None or first.sample is None:
        return None
    a, b = first.sample.values, metric.sample.values
    if paired and len(a) == len(b):
        return paired_shift(a, b)
    return shift(a, b)


def ab_pair(first: Results, other: Results) -> bool:
    """The A and B sides of one `ab` run: their samples are paired round by round."""
    return (first.settings.get("ab_side"), other.settings.get("ab_side")) == ("A", "B") \
        and first.run_id.removesuffix("-a") == other.run_id.removesuffix("-b")


def value_text(metric: Metric | None) -> str:
    if metric is None:
        return MISSING
    if metric.sample is None or metric.sample.n == 1:
        return fmt_value(metric.value)
    return f"{fmt_value(metric.value)} ±{fmt_value(metric.sample.iqr / 2)} (n={metric.sample.n})"


def _runs_table(runs: list[Results], names: list[str], sources: list[str]) -> list[str]:
    rows = []
    for name, run, source in zip(names, runs, sources):
        env = run.environment
        commit = (env.git_commit or "unknown")[:10] + ("+dirty" if env.git_dirty else "")
        rows.append([name, run.run_id, cell(env.label(), 70), commit, str(len(run.records)),
                     cell(source, 80)])
    table = tabulate(rows, headers=["run", "run id", "hardware", "commit", "cases", "file"],
                     tablefmt="github", disable_numparse=True)
    lines = ["## Runs", "", table, ""]
    for name, run in zip(names[1:], runs[1:]):
        diffs = run.environment.differences(runs[0].environment)
        if diffs:
            lines.append(f"- {name} differs from A in: " + "; ".join(diffs[:8])
                         + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else ""))
    return lines + ([""] if len(lines) > 4 else [])


def _listing(keys: list[tuple[str, str]]) -> str:
    shown = ", ".join(f"`{s}::{c}`" for s, c in keys[:LIST_AT_MOST])
    more = f" and {len(keys) - LIST_AT_MOST} more" if len(keys) > LIST_AT_MOST else ""
    return shown + more


def _outcomes(runs: list[Results], names: list[str], keys) -> list[str]:
    """Outcome changes first: they matter more than any figure."""
    changed, failed_everywhere = [], []
    for key in keys:
        found = [run.record(*key) for run in runs]
        outcomes = [r.outcome if r else MISSING for r in found]
        present = {o for o in outcomes if o != MISSING}
        if len(present) > 1:
            changed.append([cell(f"{key[0]}::{key[1]}", 100)] + outcomes)
        elif present <= {"failed", "error"} and present and MISSING not in outcomes:
            failed_everywhere.append(key)
    lines = ["## Outcome changes", ""]
    if changed:
        lines += [f"{len(changed)} case(s) have different outcomes across the runs:", "",
                  tabulate(changed, headers=["case", *names], tablefmt="github",
                           disable_numparse=True), ""]
    else:
        lines += ["No case changed outcome between the runs.", ""]
    if failed_everywhere:
        lines += [f"**{len(failed_everywhere)} case(s) failed in every run**: "
                  f"{_listing(failed_everywhere)}.", ""]
    return lines


def _case_sets(runs: list[Results], names: list[str], keys) -> list[str]:
    sets = [{r.key for r in run.records} for run in runs]
    if all(s == sets[0] for s in sets):
        return [f"All {len(runs)} runs have the same {len(sets[0])} cases.", ""]
    every = set.intersection(*sets)
    lines = [f"The case sets differ: {len(every)} cases are in every run; values a run lacks "
             f"show as {MISSING}.", ""]
    for name, have in zip(names, sets):
        missing = [k for k in keys if k not in have]
        if missing:
            lines.append(f"- {name} lacks {len(missing)}: {_listing(missing)}")
    return lines + [""]


def metric_rows(runs: list[Results], keys=None) -> list[tuple[tuple[str, str], str, str, str]]:
    """(case key, metric, unit, direction) for every metric any run has, in order."""
    seen: dict = {}
    for key in keys if keys is not None else case_keys(runs):
        for run in runs:
            record = run.record(*key)
            for name, m in (record.metrics.items() if record else ()):
                seen.setdefault((key, name), (m.unit, m.direction))
    return [(key, name, unit, direction) for (key, name), (unit, direction) in seen.items()]


def metric_of(run: Results, key, name) -> Metric | None:
    record = run.record(*key)
    return record.metrics.get(name) if record else None


def _metrics(runs: list[Results], names: list[str], keys) -> list[str]:
    rows_by_suite: dict[str, list] = {}
    counts = {"same": 0, "differ": 0}
    for key, name, unit, direction in metric_rows(runs, keys):
        metrics = [metric_of(run, key, name) for run in runs]
        row = [cell(key[1], 80), metric_header(name, unit, direction), value_text(metrics[0])]
        for run, metric in zip(runs[1:], metrics[1:]):
            said = verdict(metric, metrics[0], ab_pair(runs[0], run))
            counts["same" if said.startswith(("same", "no change")) else "differ"] += \
                said != MISSING
            row += [value_text(metric), said]
        rows_by_suite.setdefault(key[0], []).append(row)
    if not rows_by_suite:
        return ["## Metrics", "", "No run recorded any metric.", ""]
    headers = ["case", "metric", names[0]]
    for name in names[1:]:
        headers += [name, f"{name} vs {names[0]}"]
    lines = ["## Metrics", "",
             f"Values are medians ± half the IQR over n rounds where a figure was measured "
             f"repeatedly. Against run {names[0]}: {counts['same']} same (equal, or within "
             f"the noise: run {names[0]}'s measured spread (IQR), for timings at least the "
             f"run-to-run shift "
             f"of {run_to_run_noise():.0%} stated in tolerances.toml; or, where both carry "
             f"samples of 5+ values, not significantly different by the rank test: "
             f"{MANN_WHITNEY}, or {SIGNED_RANK} for the two sides of one `ab` run, alpha "
             f"{ALPHA:g}), {counts['differ']} different. ↓: lower is better, ↑: higher is "
             "better.", ""]
    for suite, rows in rows_by_suite.items():
        lines += [f"### {suite}", "", tabulate(rows, headers=headers, tablefmt="github",
                                               disable_numparse=True), ""]
    return lines


def render_comparison(runs: list[Results], sources: list[str] | None = None) -> str:
    if len(runs) < 2:
        raise CompareError("compare needs at least two results files")
    names = letters(len(runs))
    sources = sources or [""] * len(runs)
    keys = case_keys(runs)
    lines = [f"# llava-harness comparison of {len(runs)} runs", "",
             *(f"- {run_label(n, r)}" for n, r in zip(names, runs)), "",
             f"Run {names[0]} is the reference.", ""]
    lines += _outcomes(runs, names, keys)
    lines += _runs_table(runs, names, sources) + _case_sets(runs, names, keys)
    lines += _metrics(runs, names, keys)
    return "\n".join(lines)
