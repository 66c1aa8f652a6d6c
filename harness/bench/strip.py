"""Strip benchmark: the streaming `strip` CLI against a naive load/filter/save of the same
folder, and against a raw copy of the output's bytes, in the same run.

Every step is a child process (harness/bench/launcher.py: wall time, peak RSS, peak
anonymous memory), every step ends with its files fsynced, and every step starts cold: the
input's pages are dropped from the page cache first (`posix_fadvise(DONTNEED)` on those files
only, which needs no root and leaves other users' caches alone). All three read the same input
files, so they meet the disk in the same state. That matters: a raw copy that re-reads the
freshly written strip output instead was measured here at ~0.5-0.8x the time of one reading
the input (recent writes are still cached below the guest, on the host), which says nothing
about stripping.

- naive (naive.whole_shard_strip): what a hand-written script does, shard by shard: load it
  whole (`torch.load`, weights-only; safetensors `load_file`), drop the multimodal keys by
  substring, save the rest under the same name.
- strip: `llava-harness strip` as users run it, with its strict check (the target class built
  on the meta device, overlapped with the copy); and `--no-verify`, the copy alone.
- raw copy (floors.raw_copy): for each file of the strip output, `copy_file_range` of that
  many bytes from the input file of the same name: the floor for putting the output's bytes on
  disk. (The strip
  output is deleted first, so a round needs the disk space of one output, not two.) Rounds
  alternate which of strip and raw copy goes first.

- `--layout litgpt`: the litgpt export (one `lit_model.pth`) against a raw copy of as many
  bytes of the input shards, in order, into one file (floors.raw_concat).
Goals: strip peak anonymous memory <= 300 MB; strip wall, with its strict check, <= 1.1x the
raw copy's; with --keep-legacy-buffers (shards linkable) strip wall <= 0.35x the naive
approach's.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from ..report.results import make_record, save_records
from .floors import raw_concat, raw_copy
from .launcher import launch, launch_cli
from .measure import BenchError, Step, drop_cache, median_step, step
from .naive import whole_shard_strip

SUITE = "bench-strip"
ANON_GOAL_MB = 300
RAW_GOAL = 1.1
NAIVE_GOAL_KEEP = 0.35

def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _read_all(folder: Path) -> None:
    """Read every file once (untimed), so every step follows a full read of the input."""
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with open(path, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def _need_space(work: Path, nbytes: int) -> None:
    free = shutil.disk_usage(work).free
    if free < nbytes + 2 * 2**30:
        raise BenchError(f"{work}: {free / 1e9:.1f} GB free, the next step writes "
                         f"{nbytes / 1e9:.1f} GB (plus 2 GiB headroom)")


def _strip(src: Path, out: Path, keep: bool, verify: bool, layout: str = "hf"
           ) -> tuple[Step, dict[str, int]]:
    """One strip from a cold cache; returns its step and the output's file sizes."""
    drop_cache(src)
    args = ["strip", str(src), "-o", str(out)]
    if layout == "litgpt":
        args += ["--layout", "litgpt"]
    args += ([] if verify else ["--no-verify"]) + (["--keep-legacy-buffers"] if keep else [])
    try:
        stripped = step("strip" if verify else "strip --no-verify", launch_cli(*args))
        return stripped, {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _raw(src: Path, out: Path, sizes: dict[str, int], layout: str = "hf") -> Step:
    drop_cache(src)
    copy = raw_concat if layout == "litgpt" else raw_copy
    if layout == "litgpt":  # the big file only: config and tokenizer are noise
        sizes = {name: n for name, n in sizes.items() if name.endswith(".pth")}
    try:
        return step("raw copy", launch(copy, str(src), sizes, str(out)))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _round(src: Path, work: Path, keep: bool, naive: bool, sizes: dict[str, int] | None,
           raw_first: bool, layout: str = "hf") -> tuple[dict[str, Step], dict[str, int]]:
    """One round. Odd rounds copy before they strip (with the sizes an earlier round's strip
    wrote), so neither step always follows the other's reading of the input. A litgpt
    export has no --no-verify (its check reads headers only) and no naive counterpart."""
    size = _folder_bytes(src)
    _need_space(work, size)
    steps = {}
    if raw_first and sizes:
        steps["raw"] = _raw(src, work / "raw-copy", sizes, layout)
    steps["strip"], sizes = _strip(src, work / "strip", keep, verify=True, layout=layout)
    if layout == "hf":
        steps["copy"], _ = _strip(src, work / "strip", keep, verify=False)
    if "raw" not in steps:
        steps["raw"] = _raw(src, work / "raw-copy", sizes, layout)
    naive = naive and layout == "hf"
    if naive:
        out = work / "naive"
        drop_cache(src)
        try:
            steps["naive"] = step("naive", launch(whole_shard_strip, str(src), str(out), keep))
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return steps, sizes


def measure(src: Path, work: Path, keep: bool, repeat: int, naive: bool,
            layout: str = "hf") -> dict:
    _read_all(src)
    rounds, sizes = [], None
    for i in range(repeat):
        steps, sizes = _round(src, work, keep, naive, sizes, raw_first=i % 2 == 1,
                              layout=layout)
        rounds.append(steps)
    steps = {name: median_step(rounds, name) for name in ("naive", "strip", "copy", "raw")}
    figures = {"steps": {k: v for k, v in steps.items() if v is not None}, "rounds": repeat,
               "bytes": _folder_bytes(src),
               # every round's wall time per step, for the records' samples
               "wall_rounds": {name: [r[name].wall_s for r in rounds if name in r]
                               for name in steps if steps[name] is not None}}
    strip = steps["strip"]
    figures["strip_over_raw"] = strip.wall_s / steps["raw"].wall_s
    if steps["copy"] is not None:
        figures["copy_over_raw"] = steps["copy"].wall_s / steps["raw"].wall_s
    if steps["naive"] is not None:
        figures["strip_over_naive"] = strip.wall_s / steps["naive"].wall_s
    return figures


def goals(f: dict, keep: bool) -> list[tuple[str, float, float]]:
    """(what, measured, goal) for each goal this case has; all read 'measured <= goal'."""
    out = [("strip peak anonymous memory, MB", f["steps"]["strip"].peak_anon_mb, ANON_GOAL_MB),
           ("strip wall (with its strict check) / raw copy wall", f["strip_over_raw"],
            RAW_GOAL)]
    if keep and "strip_over_naive" in f:
        out.append(("strip wall / naive wall", f["strip_over_naive"], NAIVE_GOAL_KEEP))
    return out


def record(case: str, f: dict, keep: bool):
    metrics = {"bytes": (f["bytes"], "B")}
    for name, s in f["steps"].items():
        metrics |= {f"{name}_wall_s": (f.get("wall_rounds", {}).get(name) or s.wall_s, "s"),
                    f"{name}_peak_rss": (s.peak_rss_mb, "MB"),
                    f"{name}_peak_anon": (s.peak_anon_mb, "MB")}
    metrics["strip_over_raw"] = (f["strip_over_raw"], "ratio", "lower")
    if "copy_over_raw" in f:
        metrics["copy_over_raw"] = (f["copy_over_raw"], "ratio", "lower")
    if "strip_over_naive" in f:
        metrics["strip_over_naive"] = (f["strip_over_naive"], "ratio", "lower")
    missed = [what for what, value, goal in goals(f, keep) if value > goal]
    return make_record(SUITE, case, metrics, outcome="failed" if missed else "passed",
                       reason=f"missed: {'; '.join(missed)}" if missed else None)


def _print(case: str, src: Path, f: dict, keep: bool) -> None:
    from tabulate import tabulate  # heavy: tabulate

    labels = {"naive": "naive load/filter/save", "strip": "strip (with its strict check)"
              if "litgpt" not in case else "strip --layout litgpt (with its key/shape check)",
              "copy": "strip --no-verify (the copy alone)",
              "raw": "raw copy of the output's bytes"}
    rows = [[labels[n], f"{s.wall_s:.1f}", f"{s.peak_rss_mb:.0f}", f"{s.peak_anon_mb:.0f}"]
            for n, s in f["steps"].items()]
    print(f"\n{case}: {src} ({f['bytes'] / 1e9:.2f} GB, median of {f['rounds']} round(s), "
          "each step from a cold page cache)")
    print(tabulate(rows, headers=["step", "wall s", "peak RSS MB", "peak anon MB"],
                   tablefmt="github"))
    for what, value, goal in goals(f, keep):
        print(f"{what}: {value:.3f} (goal <= {goal}: {'met' if value <= goal else 'MISSED'})")


def bench_strip(folders: list[tuple[Path, str]], keeps: tuple[bool, ...], repeat: int,
                work: Path | None, naive: bool, out: Path | None, layout: str = "hf") -> int:
    records = []
    for src, name in folders:
        where = Path(work) if work else src.parent
        where.mkdir(parents=True, exist_ok=True)
        scratch = where / f".bench-strip-{os.getpid()}"
        scratch.mkdir()
        try:
            for keep in keeps if layout == "hf" else (False,):
                case = f"{name}-{'keep' if keep else 'drop'}-legacy" if layout == "hf" \
                    else f"{name}-litgpt"
                try:
                    figures = measure(src, scratch, keep, repeat, naive, layout)
                except BenchError as exc:  # record it and go on with the other cases
                    print(f"\n{case}: {exc}", file=sys.stderr)
                    records.append(_error_record(case, str(exc)))
                    continue
                _print(case, src, figures, keep)
                records.append(record(case, figures, keep))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if out:
        save_records(records, out)
        if out != "-":
            print(f"\nfigures written to {out}")
    return 1 if any(r.outcome == "error" for r in records) else 0


def _error_record(case: str, reason: str):
    return make_record(SUITE, case, outcome="error", reason=reason)
