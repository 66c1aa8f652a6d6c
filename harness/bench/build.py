"""Build benchmark: a synthetic checkpoint against a raw write of the same bytes, same run.

The raw write is `dd` from /dev/zero with `conv=fdatasync`, the fastest this disk takes the
same byte count durably; the builder fsyncs every shard too, so the ratio compares like with
like. Both run as child processes (the build through the launcher, build_child.py): their wall
time and peak RSS are theirs alone.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

from ..checkpoint.atomic import check_target
from ..report.results import make_record, save_records
from ..synth.cache import cache_root, ensure_space
from ..synth.plan import make_plan
from ..synth.specs import BuildSpec
from .build_child import build_child
from .launcher import launch
from .measure import run_measured

SUITE = "bench-build"
SPEED_GOAL = 0.70  # build speed over raw write speed
RSS_GOAL = 2**30


def _raw_write(folder: Path, nbytes: int):
    fd, name = tempfile.mkstemp(prefix=".raw-write.", dir=folder)
    os.close(fd)
    target = Path(name)
    try:
        return run_measured(["dd", "if=/dev/zero", f"of={target}", "bs=64M",
                             f"count={nbytes}", "iflag=count_bytes", "conv=fdatasync"])
    finally:
        target.unlink(missing_ok=True)


def _row(name: str, nbytes: int, m) -> dict:
    return {"step": name, "bytes": nbytes, "wall_s": round(m.wall_s, 2),
            "MB_per_s": round(nbytes / m.wall_s / 1e6, 1),
            "peak_rss_MiB": round(m.peak_rss_bytes / 2**20, 1)}


def records(spec: BuildSpec, nbytes: int, raw, built, ratio: float) -> list:
    metrics = {"raw_write_s": (raw.wall_s, "s"), "build_wall_s": (built.wall_s, "s"),
               "build_peak_rss": (built.peak_rss_bytes / 2**20, "MiB"),
               "build_MB_per_s": (nbytes / built.wall_s / 1e6, "MB/s", "higher"),
               "build_speed_ratio": (ratio, "ratio", "higher")}
    missed = [what for what, bad in (("speed ratio >= 0.70", ratio < SPEED_GOAL),
                                     ("peak RSS <= 1 GiB", built.peak_rss_bytes > RSS_GOAL))
              if bad]
    return [make_record(SUITE, f"{spec.model.name}-{spec.checkpoint.format}", metrics,
                        outcome="failed" if missed else "passed",
                        reason=f"missed: {', '.join(missed)}" if missed else None)]


def bench_build(spec: BuildSpec, work: Path | None = None, output: Path | str | None = None,
                force: bool = False) -> int:
    nbytes = make_plan(spec).total_size
    root = Path(work).absolute().parent if work else cache_root()
    target = Path(work) if work else root / f"bench-{spec.model.name}-{spec.checkpoint.format}"
    # The child builds with force (a rerun replaces its own output); a user's folder at --work
    # is only replaced when they said so.
    check_target(target, force or not work)
    ensure_space(spec, root)
    raw = _raw_write(root, nbytes)
    built = launch(build_child, dataclasses.asdict(spec), str(target))
    if not work:
        shutil.rmtree(target, ignore_errors=True)
    if raw.returncode or built.returncode:
        print(f"llava-harness: benchmark step failed:\n{raw.stderr}{built.stderr}",
              file=sys.stderr)
        return 1
    rows = [_row("raw write (dd, fdatasync)", nbytes, raw),
            _row(f"build {spec.model.name} {spec.checkpoint.format}", nbytes, built)]
    ratio = raw.wall_s / built.wall_s
    print(tabulate(rows, headers="keys", tablefmt="github"))
    print(f"\nbuild speed / raw write speed: {ratio:.2f}x (goal >= {SPEED_GOAL:.2f}x); "
          f"peak RSS {built.peak_rss_bytes / 2**30:.2f} GiB (goal <= {RSS_GOAL / 2**30:.0f} GiB)")
    if output:
        save_records(records(spec, nbytes, raw, built, ratio), output)
        if output != "-":
            print(f"figures written to {output}")
    return 0
