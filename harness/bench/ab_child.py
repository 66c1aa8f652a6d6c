"""`ab`'s child: one side's measurement of every figure, in a fresh process of that side's
Python.

`harness/bench/ab.py` starts this file *by path* with side A's or side B's interpreter
(`python -P ab_child.py JOB.json`), so the code measured is the harness, torch and
transformers installed in that interpreter's environment; only this small driver comes from
the harness that runs `ab`. It uses nothing but the operations' public entry points (build,
extract, strip, count_checkpoint), which every version of the harness has.

Per figure: one warm-up call, then `calls` timed calls; the figure's value for this process is
their median time per call. The statistics happen across processes, in the parent: a process
is the unit that varies (memory layout, page cache, the VM's neighbours).

The job's `plant` is a test-only switch (`ab --plant-b`, hidden): every timed call is
stretched by that fraction of its own duration with a busy wait inside the timed interval,
so the power of `ab` can be measured against a slowdown of known size.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path


def _spin(seconds: float) -> None:
    """Busy-wait (a sleep's wake-up slack is tens of microseconds, a planted 5% of a 1.5 ms
    call is 75 microseconds)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _timed(call, calls: int, plant: float) -> list[float]:
    call()  # warm-up: first-call imports and caches are not the figure
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        if plant:
            _spin((time.perf_counter() - start) * plant)
        times.append(time.perf_counter() - start)
    return times


def _figures(job: dict) -> dict:
    """name -> the call it times; imports inside, from the side's own harness."""
    from harness.ops.counts import count_checkpoint
    from harness.ops.extract import extract
    from harness.ops.strip import strip
    from harness.synth.builder import build
    from harness.synth.presets import build_spec

    checkpoint, scratch = Path(job["checkpoint"]), Path(job["scratch"])
    spec = build_spec(job.get("preset", "tiny"))
    return {
        "build": lambda: build(spec, scratch / "built", force=True),
        "extract": lambda: extract(checkpoint, scratch / "mm_projector.bin", force=True),
        "strip": lambda: strip(checkpoint, scratch / "stripped", force=True),
        "count": lambda: count_checkpoint(checkpoint),
    }


def _environment() -> dict | None:
    try:
        from harness.report.environment import current
    except ImportError:  # a harness too old to describe its machine
        return None
    return current().to_dict()


def run(job: dict) -> dict:
    available = _figures(job)
    values = {}
    for name in job["figures"]:
        times = _timed(available[name], job["calls"], job.get("plant", 0.0))
        values[name] = statistics.median(times)
    return {"values": values, "environment": _environment()}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    Path(job["out"]).write_text(json.dumps(run(job)))


if __name__ == "__main__":
    main()
