"""Runs side by side (typically the same suites on different hardware), with ratios to the first.

Runs are lettered A, B, C... in the order given; A is the reference. Case sets need not
match: the markdown says which cases each run lacks or adds, a missing value shows as "—",
and ratios are only given where both runs have the metric. The PNG chart shows, for a few key
metrics, each run's value as a ratio to A per case (1.0 = same as A).
"""

from __future__ import annotations

import math
import string
from pathlib import Path

from tabulate import tabulate

from ..checkpoint.atomic import atomic_file
from ..errors import HarnessError
from .results import Results
from .single import cell, fmt_value, metric_header

MISSING = "—"
LIST_AT_MOST = 10
CHART_METRICS = 6
CHART_CASES = 12


class CompareError(HarnessError):
    pass


def letters(n: int) -> list[str]:
    if n > len(string.ascii_uppercase):
        raise CompareError(f"{n} runs: compare takes at most {len(string.ascii_uppercase)}")
    return list(string.ascii_uppercase[:n])


def case_keys(runs: list[Results]) -> list[tuple[str, str]]:
    """Every (suite, case) of every run: the first run's order, then newcomers in order."""
    return list(dict.fromkeys(r.key for run in runs for r in run.records))


def ratio_text(value, first, direction: str) -> str:
    if not isinstance(first, (int, float)) or not isinstance(value, (int, float)) \
            or first == 0 or not math.isfinite(first) or not math.isfinite(value):
        return MISSING
    ratio = value / first
    if abs(ratio - 1) < 0.005 or direction == "none":
        return f"{ratio:.3g}x"
    better = ratio < 1 if direction == "lower" else ratio > 1
    return f"{ratio:.3g}x, {'better' if better else 'worse'}"


def _runs_table(runs: list[Results], names: list[str], sources: list[str]) -> list[str]:
    rows = []
    for name, run, source in zip(names, runs, sources):
        env = run.environment
        commit = (env.git_commit or "unknown")[:10] + ("+dirty" if env.git_dirty else "")
        rows.append([name, cell(env.label(), 60), run.run_id, commit, str(len(run.records)),
                     cell(source, 80)])
    table = tabulate(rows, headers=["run", "hardware", "run id", "commit", "cases", "file"],
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


def _case_sets(runs: list[Results], names: list[str]) -> list[str]:
    sets = [{r.key for r in run.records} for run in runs]
    every = set.intersection(*sets)
    if all(s == sets[0] for s in sets):
        return ["## Case sets", "", f"All {len(runs)} runs have the same {len(every)} cases.", ""]
    lines = ["## Case sets", "",
             (f"The runs' case sets differ: {len(every)} cases are in every run. Values a run "
             f"lacks show as {MISSING}, and no ratio is given for them."), ""]
    order = case_keys(runs)
    for name, keys in zip(names, sets):
        missing = [k for k in order if k not in keys]
        if missing:
            lines.append(f"- {name} lacks {len(missing)}: {_listing(missing)}")
    return lines + [""]


def _outcomes(runs: list[Results], names: list[str]) -> list[str]:
    rows = []
    for key in case_keys(runs):
        found = [run.record(*key) for run in runs]
        outcomes = [r.outcome if r else MISSING for r in found]
        present = {o for o in outcomes if o != MISSING}
        if len(present) > 1:
            rows.append([cell(f"{key[0]}::{key[1]}", 100)] + outcomes)
    if not rows:
        return []
    table = tabulate(rows, headers=["case", *names], tablefmt="github", disable_numparse=True)
    return ["## Outcomes that differ", "", table, ""]


def metric_rows(runs: list[Results]) -> list[tuple[tuple[str, str], str, str, str]]:
    """(case key, metric, unit, direction) for every metric any run has, in order."""
    seen: dict = {}
    for key in case_keys(runs):
        for run in runs:
            record = run.record(*key)
            for name, m in (record.metrics.items() if record else ()):
                seen.setdefault((key, name), (m.unit, m.direction))
    return [(key, name, unit, direction) for (key, name), (unit, direction) in seen.items()]


def _value(run: Results, key, name):
    record = run.record(*key)
    metric = record.metrics.get(name) if record else None
    return None if metric is None else metric.value


def _metrics(runs: list[Results], names: list[str]) -> list[str]:
    rows_by_suite: dict[str, list] = {}
    for key, name, unit, direction in metric_rows(runs):
        values = [_value(run, key, name) for run in runs]
        row = [cell(key[1], 80), metric_header(name, unit, direction),
               MISSING if values[0] is None else fmt_value(values[0])]
        for value in values[1:]:
            row += [MISSING if value is None else fmt_value(value),
                    ratio_text(value, values[0], direction)]
        rows_by_suite.setdefault(key[0], []).append(row)
    if not rows_by_suite:
        return ["## Metrics", "", "No run recorded any metric.", ""]
    headers = ["case", "metric", names[0]]
    for name in names[1:]:
        headers += [name, f"{name}/{names[0]}"]
    lines = ["## Metrics", "",
             f"Ratios are against run {names[0]}; ↓: lower is better, ↑: higher is better.", ""]
    for suite, rows in rows_by_suite.items():
        lines += [f"### {suite}", "", tabulate(rows, headers=headers, tablefmt="github",
                                               disable_numparse=True), ""]
    return lines


def render_comparison(runs: list[Results], sources: list[str] | None = None) -> str:
    if len(runs) < 2:
        raise CompareError("compare needs at least two results files")
    names = letters(len(runs))
    sources = sources or [""] * len(runs)
    lines = [f"# llava-harness comparison of {len(runs)} runs", "",
             f"Each run's figures side by side; run {names[0]} is the reference for ratios.", ""]
    lines += _runs_table(runs, names, sources) + _case_sets(runs, names)
    lines += _outcomes(runs, names) + _metrics(runs, names)
    return "\n".join(lines)


def key_metrics(runs: list[Results], wanted: list[str] | None = None) -> list[str]:
    """The metrics to chart: those asked for, else the ones with a better direction that most
    cases have, at most CHART_METRICS."""
    rows = metric_rows(runs)
    if wanted:
        present = {name for _, name, _, _ in rows}
        unknown = [w for w in wanted if w not in present]
        if unknown:
            raise CompareError(f"--metric {unknown[0]!r}: no run has this metric")
        return list(wanted)
    counts: dict[str, int] = {}
    for _, name, _, direction in rows:
        if direction != "none":
            counts[name] = counts.get(name, 0) + 1
    return sorted(counts, key=lambda n: -counts[n])[:CHART_METRICS]


def comparison_chart(runs: list[Results], path: Path, metrics: list[str] | None = None) \
        -> Path | None:
    """A PNG of each key metric as a ratio to run A per case; None when there is nothing to
    chart (no metric both A and another run have)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = letters(len(runs))
    panels = []
    for metric in key_metrics(runs, metrics):
        rows = [(key, unit, direction) for key, name, unit, direction in metric_rows(runs)
                if name == metric]
        cases, ratios = [], []
        for key, unit, direction in rows:
            first = _value(runs[0], key, metric)
            if not isinstance(first, (int, float)) or first == 0 or not math.isfinite(first):
                continue
            values = [_value(run, key, metric) for run in runs]
            label = f"{key[0]}::{key[1]}"
            cases.append(label if len(label) <= 48 else "…" + label[-47:])
            ratios.append([v / first if isinstance(v, (int, float)) else math.nan
                           for v in values])
        if cases:
            panels.append((metric, rows[0][1], rows[0][2], cases[:CHART_CASES],
                           ratios[:CHART_CASES]))
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(10, 1.2 + sum(0.45 * len(p[3]) + 0.8 for p in panels)))
    height = 0.8 / len(runs)
    for ax, (metric, unit, direction, cases, ratios) in zip(axes[:, 0], panels):
        for i, name in enumerate(names):
            ys = [c + i * height for c in range(len(cases))]
            label = f"{name}: {runs[i].environment.label()}"[:60]
            bars = ax.barh(ys, [r[i] for r in ratios], height=height, label=label)
            ax.bar_label(bars, labels=["" if math.isnan(r[i]) else f"{r[i]:.3g}x"
                                       for r in ratios], fontsize=6, padding=2)
        ax.axvline(1.0, color="black", linewidth=0.8)
        finite = [v for r in ratios for v in r if math.isfinite(v)]
        ax.set_xlim(0, max(finite + [1.0]) * 1.12)  # room for the bar labels
        ax.set_yticks([c + 0.4 - height / 2 for c in range(len(cases))], cases, fontsize=7)
        ax.invert_yaxis()
        better = {"lower": "lower is better", "higher": "higher is better"}.get(direction, "")
        ax.set_title(f"{metric} ({', '.join(p for p in (unit, better) if p)}): ratio to run "
                     f"{names[0]}", fontsize=9)
    # One legend above the panels, so it never covers a bar.
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(3, len(runs)), fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    path = Path(path)
    with atomic_file(path, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def write_comparison(runs: list[Results], folder: Path, sources: list[str] | None = None,
                     metrics: list[str] | None = None) -> dict[str, Path | None]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    markdown = render_comparison(runs, sources)
    chart = comparison_chart(runs, folder / "compare.png", metrics)
    if chart is not None:
        markdown += f"\n![key metrics, ratio to run A]({chart.name})\n"
    md = folder / "compare.md"
    with atomic_file(md, force=True) as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    return {"markdown": md, "chart": chart}
