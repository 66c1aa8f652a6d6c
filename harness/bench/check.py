"""Check benchmark: `llava-harness check` on a real-size folder against one read of its bytes.

The issue it answers: a 7B is checked in about the time it takes to read it once, with bounded
memory. Each round drops the folder's pages from the page cache, runs the check in a child
process (harness/bench/measure.py: wall time, peak RSS, peak anonymous memory), drops them
again and reads every file of the folder with `cat` to /dev/null: the floor for touching every
byte. Rounds alternate which goes first. A check that finds defects (exit 1) is still a
measurement; only a refusal (exit 2) is an error.

Goals: check wall <= 1.5x the read's; check peak anonymous memory <= 512 MB.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .measure import BenchError, Step, drop_cache, median_step, run_step

SUITE = "bench-check"
RATIO_GOAL = 1.5
ANON_GOAL_MB = 512


def _files(folder: Path) -> list[str]:
    return [str(p) for p in sorted(folder.rglob("*")) if p.is_file()]


def _check(folder: Path) -> Step:
    drop_cache(folder)
    return run_step("check", [sys.executable, "-m", "harness.cli", "check", str(folder)],
                    ok=(0, 1))


def _read(folder: Path) -> Step:
    drop_cache(folder)
    return run_step("read", ["cat", *_files(folder)])


def measure(folder: Path, repeat: int) -> dict:
    rounds = []
    for i in range(repeat):
        order = (_check, _read) if i % 2 == 0 else (_read, _check)
        steps = [step(folder) for step in order]
        rounds.append({s.name: s for s in steps})
    steps = {name: median_step(rounds, name) for name in ("check", "read")}
    return {"steps": steps, "rounds": repeat,
            "bytes": sum(Path(f).stat().st_size for f in _files(folder)),
            "wall_rounds": {n: [r[n].wall_s for r in rounds] for n in steps},
            "check_over_read": steps["check"].wall_s / steps["read"].wall_s}


def goals(f: dict) -> list[tuple[str, float, float]]:
    return [("check wall / one read of the bytes", f["check_over_read"], RATIO_GOAL),
            ("check peak anonymous memory, MB", f["steps"]["check"].peak_anon_mb, ANON_GOAL_MB)]


def record(case: str, f: dict):
    from ..report.results import make_record

    metrics = {"bytes": (f["bytes"], "B"),
               "check_over_read": (f["check_over_read"], "ratio", "lower")}
    for name, step in f["steps"].items():
        metrics |= {f"{name}_wall_s": (f["wall_rounds"][name], "s"),
                    f"{name}_peak_rss": (step.peak_rss_mb, "MB"),
                    f"{name}_peak_anon": (step.peak_anon_mb, "MB")}
    missed = [what for what, value, goal in goals(f) if value > goal]
    return make_record(SUITE, case, metrics, outcome="failed" if missed else "passed",
                       reason=f"missed: {'; '.join(missed)}" if missed else None)


def _print(case: str, folder: Path, f: dict) -> None:
    from tabulate import tabulate

    labels = {"check": "llava-harness check", "read": "cat of every file (one read)"}
    rows = [[labels[n], ", ".join(f"{w:.1f}" for w in f["wall_rounds"][n]), f"{s.wall_s:.1f}",
             f"{s.peak_rss_mb:.0f}", f"{s.peak_anon_mb:.0f}"] for n, s in f["steps"].items()]
    print(f"\n{case}: {folder} ({f['bytes'] / 1e9:.2f} GB, {f['rounds']} round(s), each step "
          "from a cold page cache)")
    print(tabulate(rows, headers=["step", "wall s (rounds)", "median", "peak RSS MB",
                                  "peak anon MB"], tablefmt="github"))
    for what, value, goal in goals(f):
        print(f"{what}: {value:.3f} (goal <= {goal}: {'met' if value <= goal else 'MISSED'})")


def bench_check(folders: list[tuple[Path, str]], repeat: int, out) -> int:
    from ..report.results import make_record, save_records

    records = []
    for folder, name in folders:
        try:
            figures = measure(folder, repeat)
        except BenchError as exc:
            print(f"\n{name}: {exc}", file=sys.stderr)
            records.append(make_record(SUITE, name, outcome="error", reason=str(exc)))
            continue
        _print(name, folder, figures)
        records.append(record(name, figures))
    if out:
        save_records(records, out)
        if out != "-":
            print(f"\nfigures written to {out}")
    return 1 if any(r.outcome == "error" for r in records) else 0
