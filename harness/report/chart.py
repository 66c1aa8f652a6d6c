"""The comparison chart: one panel per family of figures (load, prefill, decode tokens/s, peak
memory, footprint against theory, operation wall times), each run's absolute value with error
bars over its IQR, and each run's verdict against run A written beside its bar. The legend
names each run by its letter, run id and hardware."""

from __future__ import annotations

import math
from pathlib import Path

from ..checkpoint.atomic import atomic_file
from .compare import CompareError, ab_pair, letters, metric_of, metric_rows, run_label, verdict
from .results import Metric, Results

PANEL_ENTRIES = 12
_MEMORY_UNITS = {"B": 2**-20, "bytes": 2**-20, "KiB": 2**-10, "MiB": 1.0, "GiB": 2**10,
                 "MB": 1e6 / 2**20, "GB": 1e9 / 2**20}


def family(name: str, unit: str) -> str | None:
    """Which panel a metric belongs to; None for figures not charted (counts, flags)."""
    low = name.lower()
    if "theory" in low or "footprint" in low:
        return "footprint vs theory"
    if "decode" in low and unit.endswith("/s"):
        return "decode (tokens/s)"
    if unit in _MEMORY_UNITS and any(w in low for w in ("peak", "rss", "anon", "memory")):
        return "peak memory (MiB)"
    if unit == "s" and "prefill" in low:
        return "prefill (s)"
    if unit == "s" and "load" in low:
        return "load (s)"
    if unit == "s":
        return "operation wall time (s)"
    return None


FAMILIES = ("load (s)", "prefill (s)", "decode (tokens/s)", "peak memory (MiB)",
            "footprint vs theory", "operation wall time (s)")


def _scale(unit: str) -> float:
    return _MEMORY_UNITS.get(unit, 1.0)


def _entries(runs: list[Results], wanted: list[str] | None):
    """{panel title: [(label, key, metric name, unit)]}, each panel at most PANEL_ENTRIES."""
    panels: dict[str, list] = {}
    present = set()
    for key, name, unit, _direction in metric_rows(runs):
        present.add(name)
        title = (name if name in wanted else None) if wanted else family(name, unit)
        first = metric_of(runs[0], key, name)
        if title is None or first is None or not math.isfinite(first.value):
            continue
        if not any(metric_of(run, key, name) is not None for run in runs[1:]):
            continue
        case = key[1].removeprefix("test_")
        label = f"{case} · {name}" if not wanted else case
        label = label if len(label) <= 60 else label[:59] + "…"
        panels.setdefault((title, _kind(unit)), []).append((label, key, name, unit))
    if wanted:
        unknown = [w for w in wanted if w not in present]
        if unknown:
            raise CompareError(f"--metric {unknown[0]!r}: no run has this metric")
        order = list(wanted)
    else:
        order = [f for f in FAMILIES if any(title == f for title, _ in panels)]
    # One panel per family and kind of unit: bytes and a ratio never share an axis.
    out = {}
    for title in order:
        kinds = [kind for t, kind in panels if t == title]
        for kind in kinds:
            name = title if len(kinds) == 1 else f"{title}, {kind}"
            out[name] = panels[(title, kind)][:PANEL_ENTRIES]
    return out


def _kind(unit: str) -> str:
    """Units drawn on one axis: every memory unit as MiB; any other unit as itself."""
    return "MiB" if unit in _MEMORY_UNITS else unit


def _bar(metric: Metric | None, scale: float) -> tuple[float, float, float]:
    """(value, error below, error above) in the panel's unit; NaN where the run lacks it.
    A memory figure is scaled from its own unit to MiB first."""
    if metric is None or not math.isfinite(metric.value):
        return math.nan, 0.0, 0.0
    scale = scale * _scale(metric.unit)
    value = metric.value * scale
    if metric.sample is None or metric.sample.n < 2:
        return value, 0.0, 0.0
    return value, value - metric.sample.q1 * scale, metric.sample.q3 * scale - value


def comparison_chart(runs: list[Results], path: Path, metrics: list[str] | None = None) \
        -> Path | None:
    """The PNG, or None when there is nothing to chart (no figure A and another run share)."""
    import matplotlib  # heavy: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib

    panels = _entries(runs, metrics)
    if not panels:
        return None
    names = letters(len(runs))
    rows = sum(len(entries) for entries in panels.values())
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(11, 1.4 + 0.32 * rows * len(runs) + 0.9 * len(panels)))
    height = 0.8 / len(runs)
    for ax, (title, entries) in zip(axes[:, 0], panels.items()):
        _panel(ax, title, entries, runs, names, height)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=1, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.25 + 0.18 * len(runs)) / fig.get_figheight()))
    path = Path(path)
    with atomic_file(path, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _short_verdict(metric: Metric | None, first: Metric | None, paired: bool) -> str:
    """The ratio to run A and whether it is within the noise (the markdown has the detail)."""
    said = verdict(metric, first, paired, figures=False)
    if metric is None or first is None or not first.value or said == "—":
        return said
    ratio = f"{metric.value / first.value:.3g}x"
    if said.startswith("no change"):
        return f"{ratio}, not significant"
    return f"{ratio}, same within noise" if said.startswith("same") else said


def _panel(ax, title: str, entries, runs, names, height) -> None:
    unit = _kind(entries[0][3])  # one kind per panel (see _entries)
    scale = 1000.0 if unit == "s" and _all_below_a_second(entries, runs) else 1.0
    shown_unit = "ms" if unit == "s" and scale == 1000.0 else unit
    low, top = math.inf, 0.0
    for i, (name, run) in enumerate(zip(names, runs)):
        bars = [_bar(metric_of(run, key, metric), scale) for _, key, metric, _ in entries]
        ys = [row + i * height for row in range(len(entries))]
        values = [b[0] for b in bars]
        ax.barh(ys, values, height=height, xerr=[[b[1] for b in bars], [b[2] for b in bars]],
                error_kw={"elinewidth": 0.8, "capsize": 2}, label=run_label(name, run))
        for y, (label, key, metric, _), (value, _, above) in zip(ys, entries, bars):
            if math.isnan(value):
                continue
            low, top = min(low, value), max(top, value + above)
            said = "" if i == 0 else "  " + _short_verdict(
                metric_of(run, key, metric), metric_of(runs[0], key, metric),
                ab_pair(runs[0], run))
            ax.text(value + above, y, f" {value:.3g}{said}", va="center", fontsize=6)
    if top > 0 and 0 < low < top / 100:  # values across decades: a log axis shows them all
        ax.set_xscale("log")
        ax.set_xlim(low / 3, top * 30)
    else:
        ax.set_xlim(0, top * 1.45 or 1.0)  # room for the values and verdicts
    ax.set_yticks([row + 0.4 - height / 2 for row in range(len(entries))],
                  [e[0] for e in entries], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(shown_unit + (" (log scale)" if ax.get_xscale() == "log" else ""), fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(f"{title}: median, error bars over the IQR; ratio to run A and its verdict",
                 fontsize=9)


def _all_below_a_second(entries, runs) -> bool:
    values = [m.value for _, key, name, _ in entries for run in runs
              if (m := metric_of(run, key, name)) is not None and math.isfinite(m.value)]
    return bool(values) and max(values) < 1.0
