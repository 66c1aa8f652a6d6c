"""Reports a reader can act on: one run as markdown and CSV, several runs side by side.

`render_report(results)` -> report.md text; `write_report(results, folder)` writes
results.json, report.md and results.csv; `render_comparison(runs)` and `comparison_chart(...)`
put runs from different machines side by side with ratios against the first.
"""

from .compare import comparison_chart, render_comparison, write_comparison
from .single import render_report, write_csv, write_report

__all__ = ["comparison_chart", "render_comparison", "render_report", "write_comparison",
           "write_csv", "write_report"]
