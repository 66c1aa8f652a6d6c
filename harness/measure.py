"""Process-level measurements: wall time, peak RSS and peak anonymous memory of a child.

Benchmarks run the measured work in a child process so the parent's imports and caches never
count. Peak RSS is the child's `VmHWM`, which the kernel resets at exec (the rusage max RSS
does not: it inherits the forking parent's high-water mark). RSS counts file-backed mmap
pages too, so lazy readers are also judged by anonymous memory (`RssAnon`). Both are sampled
from /proc while the child runs; VmHWM is a high-water mark, so sampling loses nothing but
the last few milliseconds.
"""

from __future__ import annotations

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


def _status_bytes(pid: int) -> dict[str, int]:
    """VmHWM and RssAnon of a live process, in bytes (empty once it has exited)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name = line.split(":", 1)[0]
                if name in ("VmHWM", "RssAnon"):
                    out[name] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def run_measured(cmd: list[str], env: dict | None = None, sample_s: float = 0.02) -> Measured:
    """Run `cmd` and measure its wall time, peak RSS and peak anonymous memory."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    peaks = {"VmHWM": 0, "RssAnon": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for name, value in _status_bytes(proc.pid).items():
                peaks[name] = max(peaks[name], value)
            done.wait(sample_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr_chunks = proc.stderr.read()
    proc.wait()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    return Measured(wall, peaks["VmHWM"], peaks["RssAnon"] or None, proc.returncode,
                    stderr_chunks[-4000:])


def self_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
