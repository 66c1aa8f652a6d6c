"""The machine-speed probe: a fixed piece of work timed around each CPU figure, so a gate can
tell "this machine is slower today" from "this code got slower".

Two VMs of one machine class (same CPU model, same cores) are not equally fast: CI ran the
figures 1.7-1.8x slower than the committed baseline's machine with no change to the code
(count 2.82 vs 1.58 ms, the 4-bit load 67 vs 39 ms; see fixtures/tolerances.toml). No
percentage both passes that and fails a 2x regression. So each figure carries the time of
this probe, measured right before and right after it in the same process, and a relative
gate judges a timing against the baseline's at the ratio of the two probes
(`speed_scale`): a machine at 1.7x the probe's time is allowed 1.7x the baseline's time. The
scale only widens (`allowance`): a machine that runs the probe faster is still held to the
baseline as measured.

The probe does none of the harness's own work (stdlib and plain torch only), so a code
change cannot slow it, and a regression in the harness still shows at full size. It mixes
what the CPU figures spend their time on: Python dicts and JSON (headers, key maps), memory
copies (tensor bytes), small-file writes and reads through the page cache (checkpoints), and
small torch ops. torch runs single-threaded here: under contention two OpenMP threads on two
busy cores slow down 15-30x, far beyond what the figures see (measured 2-2.7x).
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

from .results import Metric, Record

PROBE_METRIC = "machine_probe_s"
PROBE_ROUNDS = 7   # per side (before and after the figure): 14 rounds pooled, quartiles solid
PROBE_CALLS = 5    # calls per round; one call is ~3.5 ms on a 2-core AMD EPYC (Zen 5)

_KEYS = tuple(f"model.layers.{i % 40}.mlp.proj_{i}.weight" for i in range(1500))
_BLOCK = bytes(range(256)) * 4096   # 1 MiB of fixed bytes


def _work(folder: Path) -> float:
    import torch  # heavy: torch

    header = {key: {"dtype": "F16", "shape": [i, 64], "data_offsets": [i, i + 64]}
              for i, key in enumerate(_KEYS)}
    parsed = json.loads(json.dumps(header))
    sorted(parsed, key=lambda k: (len(k), k))
    path = folder / "machine-probe.bin"
    with open(path, "wb") as f:
        f.write(_BLOCK[: 256 << 10])
    data = path.read_bytes()
    os.stat(path)
    bytes(bytearray(_BLOCK))
    # A bounded recurrence on fixed numbers: the same work every call, no NaN or overflow path.
    a = torch.frombuffer(bytearray(data[: 64 * 64]), dtype=torch.uint8).reshape(64, 64)
    a = a.to(torch.float32) / 255
    for _ in range(8):
        a = torch.tanh(a @ a * 0.01 + 0.5)
    return float(a.sum())


def probe_times(folder: Path, rounds: int = PROBE_ROUNDS, calls: int = PROBE_CALLS
                ) -> list[float]:
    """Seconds per call of the probe, one value per round, after one unrecorded round (first
    calls pay for imports and allocator warm-up). `folder` takes its one scratch file.

    The cyclic garbage collector is off while it runs (as in `timeit`): its pauses grow with
    the heap the process has built up, not with the machine, and in the default run's
    process one round in six took 50 ms a call instead of 3.5 ms when a collection fell in it.
    """
    import torch  # heavy: torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    collecting = gc.isenabled()
    gc.disable()
    try:
        _work(folder)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                _work(folder)
            times.append((time.perf_counter() - start) / calls)
        return times
    finally:
        if collecting:
            gc.enable()
        torch.set_num_threads(threads)
        (folder / "machine-probe.bin").unlink(missing_ok=True)


def speed_scale(record: Record, base: Record | None) -> float | None:
    """How much slower this record's machine ran the probe than the baseline record's
    (2.0: twice the time); None when either side has no probe."""
    if base is None:
        return None
    ours, theirs = record.metrics.get(PROBE_METRIC), base.metrics.get(PROBE_METRIC)
    if ours is None or theirs is None or not ours.value > 0 or not theirs.value > 0:
        return None
    return ours.value / theirs.value


def allowance(scale: float) -> float:
    """The scale a gate applies: the probe's ratio where this machine ran it slower, 1 where
    it ran it faster. A faster probe is no promise of faster figures: the writer figures
    (build, extract, strip) move 1.4-1.75x between processes on one VM while the probe stays
    put, so a baseline shrunk by a fast probe would fail unchanged code in a slow process."""
    return max(scale, 1.0)


def at_scale(metric: Metric, baseline: float, noise: float, scale: float
             ) -> tuple[float, float]:
    """A timing's (baseline, noise) as they would be on this run's machine: a duration times
    the scale, a rate (per second) divided by it."""
    factor = scale_factor(metric, scale)
    return baseline * factor, noise * factor


def scale_factor(metric: Metric, scale: float) -> float:
    """What a value of `metric` is multiplied by at `scale`: a duration by it, a rate (per
    second) by its inverse."""
    return 1 / scale if metric.unit.endswith("/s") else scale
