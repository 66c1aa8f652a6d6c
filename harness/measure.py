"""Process-level measurements: wall time, peak RSS and peak anonymous memory of a child.

Benchmarks run the measured work in a child process so the parent's imports and caches never
count. Max RSS (from the kernel, exact) counts file-backed mmap pages too, so lazy readers are
also judged by anonymous memory (`RssAnon`), sampled from /proc while the child runs.
"""

from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Measured:
    wall_s: float
    peak_rss_bytes: int
    peak_anon_bytes: int | None
    returncode: int
    stderr: str


def _rss_anon(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_measured(cmd: list[str], env: dict | None = None, sample_s: float = 0.02) -> Measured:
    """Run `cmd` and measure it; peak RSS comes from wait4's rusage of that very child."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    peak_anon: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            value = _rss_anon(proc.pid)
            if value is not None:
                peak_anon.append(value)
            done.wait(sample_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr_chunks = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(wall, usage.ru_maxrss * 1024, max(peak_anon) if peak_anon else None,
                    proc.returncode, stderr_chunks[-4000:])


def self_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
