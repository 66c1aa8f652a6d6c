"""`compare`'s output folder: compare.md (compare.py) and compare.png (chart.py), written all at
once. Above both, since the markdown names the chart."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..checkpoint.atomic import atomic_dir, atomic_file
from .chart import comparison_chart
from .compare import render_comparison
from .results import Results


def write_comparison(runs: list[Results], folder: Path, sources: list[str] | None = None,
                     metrics: list[str] | None = None) -> dict[str, Path | None]:
    folder = Path(folder)
    markdown = render_comparison(runs, sources)
    # A new folder appears complete or not at all; into an existing one, each file is atomic.
    with contextlib.ExitStack() as stack:
        out = folder if folder.is_dir() else stack.enter_context(atomic_dir(folder))
        chart = comparison_chart(runs, out / "compare.png", metrics)
        if chart is not None:
            markdown += f"\n![figures per family, with error bars]({chart.name})\n"
        with atomic_file(out / "compare.md", force=True) as tmp:
            tmp.write_text(markdown, encoding="utf-8")
    return {"markdown": folder / "compare.md", "chart": folder / chart.name if chart else None}
