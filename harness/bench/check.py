"""Benchmarks of commands that stream a folder once, each against the floor for the same bytes:
`check` and `verify-release` against one read of them, `merge-lora` against a copy of its base.

The question they answer: is the command about as fast as reading what it must read, with
bounded memory? Each round drops the folders' pages from the page cache, runs the command in a
child process (harness/bench/launcher.py: wall time, peak RSS, peak anonymous memory), drops them
again and reads every file of the folders with `cat` to /dev/null: the floor for touching every
byte. Rounds alternate which goes first. A command that finds faults (exit 1) is still a
measurement; only a refusal (exit 2) is an error.

Goals: `check` <= 1.5x the read and <= 512 MB anonymous; `verify-release` (a 7B base, adapter
and merged) <= 2x the read and <= 2 GiB anonymous; `merge-lora` (reads the base, writes as
much) <= 1.5x `cp -r` of the base plus `sync`, <= 2 GiB anonymous. Outputs are removed after
each step, outside the timing: a 7B copy and a 7B merge do not both fit on a shared disk.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..release.manifest import read_manifest
from ..report.results import make_record, save_records
from .launcher import launch_cli
from .measure import BenchError, Step, drop_cache, median_step, run_step, step


@dataclass(frozen=True)
class ReadBench:
    """One command and the folders (or files) it reads."""

    suite: str           # the records' suite: bench-check, bench-verify-release
    label: str           # how the command is named in the table
    args: list[str]      # llava-harness arguments
    reads: list[Path]    # what it reads
    ratio_goal: float
    anon_goal_mb: float
    # The floor step: (its label, its command); default one `cat` of every file read.
    floor: tuple[str, list[str]] | None = None
    outputs: tuple[Path, ...] = ()  # removed after every step


def check_bench(folder: Path) -> ReadBench:
    return ReadBench("bench-check", "llava-harness check", ["check", str(folder)], [folder],
                     1.5, 512)


def verify_release_bench(manifest: Path) -> ReadBench:
    parsed = read_manifest(manifest)
    return ReadBench("bench-verify-release", "llava-harness verify-release",
                     ["verify-release", str(manifest)], sorted(parsed.artifacts.values()), 2.0,
                     2048)


def merge_bench(adapter: Path, base: Path, work: Path) -> ReadBench:
    """merge-lora of `adapter` into `base` against `cp -r` of the base and `sync`: both read
    the base's bytes and write as many, and both end with the data on disk (merge-lora fsyncs
    every file it writes)."""
    merged, copy = work / "merged", work / "copy"
    return ReadBench("bench-merge-copy", "llava-harness merge-lora",
                     ["merge-lora", "--adapter", str(adapter), "--base", str(base), "-o",
                      str(merged)], [adapter, base], 1.5, 2048,
                     floor=("cp -r of the base + sync",
                            ["sh", "-c", 'cp -r "$0" "$1" && sync', str(base), str(copy)]),
                     outputs=(merged, copy))


def _files(paths: list[Path]) -> list[str]:
    out = []
    for path in paths:
        out += [str(path)] if path.is_file() else \
            [str(p) for p in sorted(path.rglob("*")) if p.is_file()]
    return out


def _cold(paths: list[Path]) -> None:
    for path in paths:
        drop_cache(path if path.is_dir() else path.parent)


def _command(bench: ReadBench) -> Step:
    _cold(bench.reads)
    try:
        return step("command", launch_cli(*bench.args), ok=(0, 1))
    finally:
        _remove(bench.outputs)


def _read(bench: ReadBench) -> Step:
    _cold(bench.reads)
    try:
        return run_step("read", bench.floor[1] if bench.floor else ["cat", *_files(bench.reads)])
    finally:
        _remove(bench.outputs)


def _remove(paths) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def measure(bench: ReadBench, repeat: int) -> dict:
    rounds = []
    for i in range(repeat):
        order = (_command, _read) if i % 2 == 0 else (_read, _command)
        rounds.append({s.name: s for s in (take(bench) for take in order)})
    steps = {name: median_step(rounds, name) for name in ("command", "read")}
    return {"steps": steps, "rounds": repeat,
            "bytes": sum(Path(f).stat().st_size for f in _files(bench.reads)),
            "wall_rounds": {n: [r[n].wall_s for r in rounds] for n in steps},
            "over_read": steps["command"].wall_s / steps["read"].wall_s}


def goals(bench: ReadBench, f: dict) -> list[tuple[str, float, float]]:
    floor = bench.floor[0] if bench.floor else "one read of the bytes"
    return [(f"{bench.label} wall / {floor}", f["over_read"], bench.ratio_goal),
            (f"{bench.label} peak anonymous memory, MB", f["steps"]["command"].peak_anon_mb,
             bench.anon_goal_mb)]


def record(bench: ReadBench, case: str, f: dict):
    what = bench.suite.removeprefix("bench-").replace("-", "_")
    metrics = {"bytes": (f["bytes"], "B"), f"{what}_over_read": (f["over_read"], "ratio",
                                                                   "lower")}
    for name, s in f["steps"].items():
        prefix = what if name == "command" else "read"
        metrics |= {f"{prefix}_wall_s": (f["wall_rounds"][name], "s"),
                    f"{prefix}_peak_rss": (s.peak_rss_mb, "MB"),
                    f"{prefix}_peak_anon": (s.peak_anon_mb, "MB")}
    missed = [what for what, value, goal in goals(bench, f) if value > goal]
    return make_record(bench.suite, case, metrics, outcome="failed" if missed else "passed",
                       reason=f"missed: {'; '.join(missed)}" if missed else None)


def _print(bench: ReadBench, case: str, f: dict) -> None:
    from tabulate import tabulate  # heavy: tabulate

    labels = {"command": bench.label,
              "read": bench.floor[0] if bench.floor else "cat of every file (one read)"}
    rows = [[labels[n], ", ".join(f"{w:.1f}" for w in f["wall_rounds"][n]), f"{s.wall_s:.1f}",
             f"{s.peak_rss_mb:.0f}", f"{s.peak_anon_mb:.0f}"] for n, s in f["steps"].items()]
    print(f"\n{case}: {f['bytes'] / 1e9:.2f} GB read, {f['rounds']} round(s), each step from a "
          "cold page cache")
    print(tabulate(rows, headers=["step", "wall s (rounds)", "median", "peak RSS MB",
                                  "peak anon MB"], tablefmt="github"))
    for what, value, goal in goals(bench, f):
        print(f"{what}: {value:.3f} (goal <= {goal}: {'met' if value <= goal else 'MISSED'})")


def bench_reads(benches: list[tuple[ReadBench, str]], repeat: int, out) -> int:
    records = []
    for bench, name in benches:
        try:
            figures = measure(bench, repeat)
        except BenchError as exc:
            print(f"\n{name}: {exc}", file=sys.stderr)
            records.append(make_record(bench.suite, name, outcome="error", reason=str(exc)))
            continue
        _print(bench, name, figures)
        records.append(record(bench, name, figures))
    if out:
        save_records(records, out)
        if out != "-":
            print(f"\nfigures written to {out}")
    return 1 if any(r.outcome == "error" for r in records) else 0
