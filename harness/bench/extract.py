"""Extraction benchmark: the `extract` CLI against LLaVA's naive whole-shard load, same run.

Both run as child processes on the same folder, alternating, after one untimed warm-up each
so both read from the page cache (dropping caches would need root and disturb other users).
The naive child (naive.whole_shard_extract) does what `scripts/extract_mm_projector.py` does:
read the index, load every shard that holds a match whole (`torch.load`, weights-only; for
safetensors `load_file`, the whole-shard API), keep the matches, `torch.save` them. Each child
reports its own work time (after its imports); wall time, peak RSS and peak anonymous memory
come from the launcher.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..report.results import make_record, save_records
from .launcher import launch, launch_cli
from .measure import Measured, checked_figures
from .naive import whole_shard_extract

SUITE = "bench-extract"
GOALS = {"work_s": 0.2, "wall_ratio": 0.4, "rss_ratio": 0.1}

@dataclass(frozen=True)
class Run:
    measured: Measured
    work_s: float


def _run(what: str, measured: Measured, stats: Path) -> Run:
    measured, figures = checked_figures(what, measured, stats)
    return Run(measured, figures["work_s"])


def _cli(folder: Path, patterns: tuple[str, ...], work: Path, i: int) -> Run:
    out, stats = work / f"cli-{i}.bin", work / f"cli-{i}.json"
    measured = launch_cli("extract", str(folder), "-o", str(out), "--keys", ",".join(patterns),
                          "--json", "--force", stdout=stats)
    return _run("extract CLI", measured, stats)


def _naive(folder: Path, fmt: str, patterns: tuple[str, ...], work: Path, i: int) -> Run:
    out, stats = work / f"naive-{i}.bin", work / f"naive-{i}.json"
    measured = launch(whole_shard_extract, str(folder), fmt, list(patterns), str(out),
                      str(stats))
    return _run("naive whole-shard load", measured, stats)


def _same_tensors(a: Path, b: Path) -> bool:
    import torch  # heavy: torch

    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return x.keys() == y.keys() and all(
        x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
        and torch.equal(x[k].view(torch.uint8), y[k].view(torch.uint8)) for k in x)


def _summary(runs: list[Run]) -> dict:
    return {"wall_s": statistics.median(r.measured.wall_s for r in runs),
            "work_s": statistics.median(r.work_s for r in runs),
            # every round, for the records (a sample: its median is the figure above)
            "wall_rounds": [r.measured.wall_s for r in runs],
            "work_rounds": [r.work_s for r in runs],
            "peak_rss_MiB": max(r.measured.peak_rss_bytes for r in runs) / 2**20,
            "peak_anon_MiB": max(r.measured.peak_anon_bytes or 0 for r in runs) / 2**20}


def measure(folder: Path, fmt: str, patterns: tuple[str, ...], repeat: int) -> dict:
    """Median wall and work time, worst peak memory, of each side over `repeat` rounds."""
    with tempfile.TemporaryDirectory(prefix="llava-bench-extract-") as tmp:
        work = Path(tmp)
        _cli(folder, patterns, work, 0)
        _naive(folder, fmt, patterns, work, 0)  # warm-ups: both read from the page cache
        cli, naive = [], []
        for i in range(1, repeat + 1):
            cli.append(_cli(folder, patterns, work, i))
            naive.append(_naive(folder, fmt, patterns, work, i))
        identical = _same_tensors(work / "cli-1.bin", work / "naive-1.bin")
    figures = {"cli": _summary(cli), "naive": _summary(naive), "identical": identical}
    figures["wall_ratio"] = figures["cli"]["wall_s"] / figures["naive"]["wall_s"]
    figures["rss_ratio"] = figures["cli"]["peak_rss_MiB"] / figures["naive"]["peak_rss_MiB"]
    figures["anon_ratio"] = figures["cli"]["peak_anon_MiB"] / figures["naive"]["peak_anon_MiB"]
    return figures


def _checks(f: dict) -> list[tuple[str, float, str]]:
    """(goal name, measured value, how it reads) for each goal in the issue."""
    return [("work_s", f["cli"]["work_s"], "work inside the process, s"),
            ("wall_ratio", f["wall_ratio"], "CLI wall / naive wall"),
            ("rss_ratio", f["rss_ratio"], "CLI peak RSS / naive peak RSS")]


def goal_lines(f: dict) -> list[str]:
    lines = []
    for name, value, text in _checks(f):
        verdict = "met" if value <= GOALS[name] else "MISSED"
        lines.append(f"{text}: {value:.3f} (goal <= {GOALS[name]}: {verdict})")
    return [*lines, f"outputs bit-identical: {f['identical']}"]


def records(case: str, f: dict) -> list:
    metrics = {}
    for side, name in (("cli", "extract"), ("naive", "naive")):
        s = f[side]
        metrics |= {f"{name}_wall_s": (s["wall_rounds"], "s"),
                    f"{name}_work_s": (s["work_rounds"], "s"),
                    f"{name}_peak_rss": (s["peak_rss_MiB"], "MiB"),
                    f"{name}_peak_anon": (s["peak_anon_MiB"], "MiB")}
    metrics |= {"wall_ratio": (f["wall_ratio"], "ratio", "lower"),
                "rss_ratio": (f["rss_ratio"], "ratio", "lower"),
                "anon_ratio": (f["anon_ratio"], "ratio", "lower")}
    missed = [name for name, value, _ in _checks(f) if value > GOALS[name]]
    if not f["identical"]:
        missed.append("outputs differ")
    reason = f"missed: {', '.join(missed)}" if missed else None
    return [make_record(SUITE, case, metrics, outcome="failed" if missed else "passed",
                        reason=reason)]


def bench_extract(folder: Path, fmt: str, case: str, patterns: tuple[str, ...], repeat: int,
                  out: Path | None) -> int:
    from tabulate import tabulate  # heavy: tabulate

    figures = measure(folder, fmt, patterns, repeat)
    rows = [[name, f"{s['wall_s']:.3f}", f"{s['work_s']:.3f}", f"{s['peak_rss_MiB']:.1f}",
             f"{s['peak_anon_MiB']:.1f}"]
            for name, s in (("extract CLI", figures["cli"]), ("naive whole-shard load",
                                                               figures["naive"]))]
    print(f"{case}: {folder} (median of {repeat}, page cache warm)")
    print(tabulate(rows, headers=["step", "wall s", "work s", "peak RSS MiB",
                                  "peak anon MiB"], tablefmt="github"))
    print("\n" + "\n".join(goal_lines(figures)))
    if out:
        save_records(records(case, figures), out)
        if out != "-":
            print(f"figures written to {out}")
    return 0
