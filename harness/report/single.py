"""One run as a report: report.md (readable on its own) and results.csv (one row per metric).

The markdown opens with what the run was and how it ended, then a summary per suite (passed,
failed, skipped with the reasons, which say what a skipped suite needed), then one metrics
table per suite, then the full environment. Tables are tabulate's `github` format.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from pathlib import Path

from tabulate import tabulate

from ..checkpoint.atomic import atomic_file
from ..checkpoint.problems import shown
from .results import OUTCOMES, Record, Results, write_results

ARROWS = {"lower": "↓", "higher": "↑", "none": ""}
CSV_FIELDS = ("run_id", "suite", "case", "outcome", "reason", "metric", "value", "unit",
              "direction")
# Wider than this many metrics, a suite's table turns long (one row per case and metric).
WIDE_METRICS = 6
REASON_CHARS = 200


def fmt_value(value) -> str:
    """Integers exactly with separators; floats to 4 significant digits (more when large)."""
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def cell(text: str | None, limit: int = REASON_CHARS) -> str:
    """One line, pipes escaped, cut to `limit` characters: safe inside a markdown table."""
    if not text:
        return ""
    line = shown(" ".join(str(text).split()))  # an escape sequence would drive a terminal
    if len(line) > limit:
        line = line[: limit - 1] + "…"
    return line.replace("|", "\\|")


def metric_header(name: str, unit: str, direction: str) -> str:
    arrow = ARROWS.get(direction, "")
    inside = ", ".join(part for part in (unit, arrow) if part)
    return f"{name} ({inside})" if inside else name


def _table(rows: list, headers: list[str]) -> str:
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def outcome_counts(records) -> Counter:
    return Counter(r.outcome for r in records)


def _headline(results: Results) -> str:
    counts = outcome_counts(results.records)
    parts = [f"{counts[o]} {o}" for o in OUTCOMES if counts[o]]
    verdict = "FAILED" if counts["failed"] or counts["error"] else "passed"
    return f"**{verdict}**: {len(results.records)} cases, {', '.join(parts) or 'none run'}."


def _summary(results: Results) -> list[str]:
    rows = []
    for suite in results.suites:
        counts = outcome_counts(r for r in results.records if r.suite == suite)
        rows.append([suite] + [str(counts[o]) for o in OUTCOMES])
    lines = ["## Summary per suite", "", _table(rows, ["suite", *OUTCOMES]), ""]
    described = [f"- **{suite}**: {cell(results.suite_descriptions[suite], 600)}"
                 for suite in results.suites if suite in results.suite_descriptions]
    return lines + (["What each suite checks:", ""] + described + [""] if described else [])


def _cases(results: Results) -> list[str]:
    """Every case and its outcome, folded per suite (GitHub renders <details> collapsed)."""
    lines = ["## Cases", ""]
    for suite in results.suites:
        records = [r for r in results.records if r.suite == suite]
        rows = [[cell(r.case, 160), r.outcome] for r in records]
        count = f"{len(records)} case{'' if len(records) == 1 else 's'}"
        lines += [f"<details><summary>{suite}: {count}</summary>", "",
                  _table(rows, ["case", "outcome"]), "", "</details>", ""]
    return lines


def _failures(results: Results) -> list[str]:
    bad = [r for r in results.records if r.outcome in ("failed", "error")]
    if not bad:
        return []
    rows = [[r.suite, cell(r.case, 120), r.outcome, cell(r.reason)] for r in bad]
    return ["## Failures", "", _table(rows, ["suite", "case", "outcome", "reason"]), ""]


def _skips(results: Results) -> list[str]:
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in results.records:
        if r.outcome == "skipped":
            groups.setdefault((r.suite, r.reason or "(no reason given)"), []).append(r)
    if not groups:
        return []
    rows = [[suite, cell(reason), str(len(recs)), cell(recs[0].case, 80)]
            for (suite, reason), recs in groups.items()]
    return ["## Skipped, and why", "",
            _table(rows, ["suite", "reason", "cases", "for example"]), ""]


def _suite_metrics(suite: str, records: list[Record]) -> list[str]:
    columns: dict[tuple[str, str], str] = {}
    for r in records:
        for name, m in r.metrics.items():
            columns.setdefault((name, m.unit), m.direction)
    if not columns:
        return []
    with_metrics = [r for r in records if r.metrics]
    if len(columns) <= WIDE_METRICS:
        headers = ["case"] + [metric_header(n, u, d) for (n, u), d in columns.items()]
        rows = [[cell(r.case, 120)] + [fmt_value(r.metrics[n].value)
                                       if n in r.metrics and r.metrics[n].unit == u else ""
                                       for (n, u) in columns]
                for r in with_metrics]
    else:
        headers = ["case", "metric", "value", "unit", "better"]
        rows = [[cell(r.case, 120), name, fmt_value(m.value), m.unit, ARROWS[m.direction]]
                for r in with_metrics for name, m in r.metrics.items()]
    return [f"### {suite}", "", _table(rows, headers), ""]


def _metrics(results: Results) -> list[str]:
    body: list[str] = []
    for suite in results.suites:
        body += _suite_metrics(suite, [r for r in results.records if r.suite == suite])
    if not body:
        return []
    return ["## Metrics", "", "↓: lower is better, ↑: higher is better.", ""] + body


def environment_rows(results: Results) -> list[list[str]]:
    env = results.environment.to_dict()
    libraries = env.pop("libraries")
    rows = [[name, "" if value is None else str(value)] for name, value in env.items()]
    rows += [[lib, version or "not installed"] for lib, version in libraries.items()]
    return rows


def render_report(results: Results) -> str:
    env = results.environment
    commit = (env.git_commit or "unknown")[:12] + (" (uncommitted changes)" if env.git_dirty
                                                    else "")
    lines = [f"# llava-harness report: run {results.run_id}", "",
             _headline(results), "",
             (f"Made {results.created or 'at an unknown time'} on {env.label()}; harness "
             f"commit {commit}. Each case is one pytest test (`suite::case`); a skipped case "
             "says what it needed. The full records, environment included, are in "
             f"`results.json` (schema version {results.schema_version}); one row per metric "
             "is in `results.csv`."), ""]
    if results.settings:
        lines += [_table([[k, cell(v, 300)] for k, v in results.settings.items()],
                         ["setting", "value"]), ""]
    lines += _summary(results) + _failures(results) + _skips(results) + _metrics(results)
    lines += _cases(results)
    lines += ["## Environment", "", _table(environment_rows(results), ["field", "value"]), ""]
    return "\n".join(lines)


def csv_text(results: Results) -> str:
    """One row per metric; a case with no metric gets one row with the metric fields empty."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for r in results.records:
        base = [r.run_id, r.suite, r.case, r.outcome, r.reason or ""]
        if not r.metrics:
            writer.writerow(base + ["", "", "", ""])
        for name, m in r.metrics.items():
            writer.writerow(base + [name, repr(m.value) if isinstance(m.value, float)
                                    else str(m.value), m.unit, m.direction])
    return buf.getvalue()


def _write(path: Path, text: str) -> Path:
    with atomic_file(path, force=True) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_csv(results: Results, path: Path) -> Path:
    return _write(Path(path), csv_text(results))


def write_report(results: Results, folder: Path, with_json: bool = True) -> dict[str, Path]:
    """results.json (unless `with_json` is False), report.md and results.csv in `folder`."""
    folder = Path(folder)
    markdown = render_report(results)  # before the folder: a failure here leaves nothing
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    if with_json:
        paths["json"] = write_results(results, folder / "results.json")
    paths["markdown"] = _write(folder / "report.md", markdown)
    paths["csv"] = write_csv(results, folder / "results.csv")
    return paths
