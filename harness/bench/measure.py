"""Process-level measurements: wall time, peak RSS and peak anonymous memory of a child; and,
inside a process, its own RSS peaks and its device memory.

Benchmarks run the measured work in a child process so the parent's imports and caches never
count (a harness function or command through launcher.py; a tool such as cat or dd directly). Peak RSS is the child's `VmHWM`, which the kernel resets at exec (the rusage max RSS
does not: it inherits the forking parent's high-water mark). RSS counts file-backed mmap
pages too, so lazy readers are also judged by anonymous memory (`RssAnon`). Both are sampled
from /proc while the child runs; VmHWM is a high-water mark, so sampling loses nothing but
the last few milliseconds.

Inside the child, a phase's own RSS peak is VmHWM after resetting it just before the phase
(`reset_peak_rss`); device memory as the driver sees it comes from NVML (`NvmlSampler`).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import HarnessError
from ..report.nvml import driver

MIB = 2**20


class BenchError(HarnessError):
    """A benchmark refused its options, a step of it failed (the message carries the tail of
    the child's stderr), or there is no room for its output: the one error of bench/."""


@dataclass(frozen=True)
class Measured:
    wall_s: float
    peak_rss_bytes: int
    peak_anon_bytes: int | None
    returncode: int
    stderr: str


def status_bytes(*names: str, pid: int | str = "self") -> dict[str, int]:
    """The named kB fields of /proc/<pid>/status (VmRSS, VmHWM, RssAnon...), in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in names:
                out[key] = int(line.split()[1]) * 1024
    return out


def _status_bytes(pid: int) -> dict[str, int]:
    """VmHWM and RssAnon of a live process, in bytes (empty once it has exited)."""
    try:
        return status_bytes("VmHWM", "RssAnon", pid=pid)
    except OSError:
        return {}


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_measured(cmd: list[str], env: dict | None = None, sample_s: float = 0.02,
                 stdout: Path | None = None, timeout_s: float | None = None) -> Measured:
    """Run `cmd` and measure its wall time, peak RSS and peak anonymous memory; its stdout
    goes to the file `stdout` (a command's --json, say), else nowhere. A child still running
    after `timeout_s` is killed; its stderr then ends in a line saying so."""
    with open(stdout, "wb") if stdout else open(os.devnull, "wb") as sink:
        return _measured(cmd, env, sample_s, sink, timeout_s)


def _measured(cmd: list[str], env: dict | None, sample_s: float, sink,
              timeout_s: float | None) -> Measured:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.PIPE, text=True)
    peaks = {"VmHWM": 0, "RssAnon": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for name, value in _status_bytes(proc.pid).items():
                peaks[name] = max(peaks[name], value)
            done.wait(sample_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
        stderr += f"\ntimed out after {timeout_s:g} s: killed\n"
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    return Measured(wall, peaks["VmHWM"], peaks["RssAnon"] or None, proc.returncode,
                    stderr[-4000:])


def checked(what: str, measured: Measured, ok: tuple[int, ...] = (0,)) -> Measured:
    """`measured` itself; an exit code outside `ok` is a BenchError naming `what` and the last
    line of the child's stderr (its exception, or the timeout)."""
    if measured.returncode not in ok:
        last = measured.stderr.strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"{what}: exit {measured.returncode}: {last[0]}")
    return measured


def checked_figures(what: str, measured: Measured, figures: Path) -> tuple[Measured, dict]:
    """`checked(what, measured)`, and the JSON figures file the child wrote, read once."""
    return checked(what, measured), json.loads(figures.read_text())


def self_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class NvmlSampler:
    """Peak device memory from NVML (the driver's view: CUDA context and allocator slack
    included), sampled every few milliseconds on a thread.

    Source "process": this process's entry in the driver's list of compute processes. In a
    container the driver lists host PIDs, so the entry is not found; then source "device": the
    device's used memory minus what it used before this process started CUDA (exact on a GPU
    nobody else uses). Without NVML, peak() is (None, "none"). `nvml` (pynvml's API) is for
    tests.
    """

    def __init__(self, nvml=None, interval_s: float = 0.005):
        self.nvml = nvml if nvml is not None else driver()
        self.interval_s = interval_s
        self.source, self.handle = "none", None
        self._peak = self._baseline = 0
        self._stopped = threading.Event()
        # Every device's used memory now, before this process has a CUDA context.
        self._before = self._all_devices_used() if self.nvml is not None else {}

    def _all_devices_used(self) -> dict[int, int | None]:
        try:
            handles = {i: self.nvml.nvmlDeviceGetHandleByIndex(i)
                       for i in range(self.nvml.nvmlDeviceGetCount())}
        except self.nvml.NVMLError:
            return {}
        return {i: self._device_used(handle) for i, handle in handles.items()}

    def _device_used(self, handle) -> int | None:
        try:
            return self.nvml.nvmlDeviceGetMemoryInfo(handle).used
        except self.nvml.NVMLError:
            return None

    def _process_used(self, handle) -> int | None:
        try:
            processes = self.nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except self.nvml.NVMLError:
            return None
        pid = os.getpid()
        # usedGpuMemory is None where the driver cannot tell (NVML_VALUE_NOT_AVAILABLE).
        used = [p.usedGpuMemory for p in processes if p.pid == pid]
        return used[0] if used and used[0] is not None else None

    def _handle(self, uuid: str):
        text = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        try:
            return self.nvml.nvmlDeviceGetHandleByUUID(text)
        except self.nvml.NVMLError:
            pass
        if len(self._before) == 1:  # one GPU: no doubt which one it is
            try:
                return self.nvml.nvmlDeviceGetHandleByIndex(0)
            except self.nvml.NVMLError:
                return None
        return None

    def start(self, uuid: str) -> None:
        """Begin sampling the device with this UUID (torch's `get_device_properties().uuid`),
        after this process's CUDA context exists."""
        if self.nvml is None:
            return
        handle = self._handle(uuid)
        if handle is None:
            return
        try:
            index = self.nvml.nvmlDeviceGetIndex(handle)
        except self.nvml.NVMLError:
            return
        self.handle = handle
        self.source = "process" if self._process_used(handle) is not None else "device"
        if self.source == "device":
            self._baseline = self._before.get(index) or 0
        threading.Thread(target=self._loop, daemon=True).start()

    def read(self) -> int | None:
        used = (self._process_used(self.handle) if self.source == "process"
                else self._device_used(self.handle))
        return None if used is None else max(used - self._baseline, 0)

    def _loop(self) -> None:
        while not self._stopped.wait(self.interval_s):
            used = self.read()
            if used is not None:
                self._peak = max(self._peak, used)

    def stop(self) -> None:
        self._stopped.set()

    def reset(self) -> None:
        if self.source != "none":
            self._peak = self.read() or 0

    def peak(self) -> tuple[int | None, str]:
        if self.source == "none":
            return None, "none"
        return max(self._peak, self.read() or 0), self.source


@dataclass(frozen=True)
class Step:
    """One measured child process of a benchmark round: wall time, peak RSS and anonymous."""

    name: str
    wall_s: float
    peak_rss_mb: float
    peak_anon_mb: float


def step(name: str, measured: Measured, ok: tuple[int, ...] = (0,)) -> Step:
    """A finished child as a round's step (checked: see `checked`)."""
    m = checked(name, measured, ok)
    return Step(name, m.wall_s, m.peak_rss_bytes / 1e6, (m.peak_anon_bytes or 0) / 1e6)


def run_step(name: str, cmd: list[str], ok: tuple[int, ...] = (0,)) -> Step:
    """`cmd` (a tool: cat, cp, dd) measured as a step."""
    return step(name, run_measured(cmd), ok)


def median_step(rounds: list[dict[str, Step]], name: str) -> Step | None:
    """The median wall time of a step over rounds, with its highest memory peaks."""
    steps = [r[name] for r in rounds if name in r]
    if not steps:
        return None
    return Step(name, statistics.median(s.wall_s for s in steps),
                max(s.peak_rss_mb for s in steps), max(s.peak_anon_mb for s in steps))


def drop_cache(folder: Path) -> None:
    """Drop the clean pages of every file under `folder` from the page cache, so the next step
    reads them cold (`posix_fadvise(DONTNEED)` on those files only: no root needed, and other
    users' caches are left alone)."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
