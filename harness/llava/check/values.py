"""Every tensor's values in one streaming pass: non-finite, all-zero, empty, largest magnitude,
and the mean magnitude of norm weights.

Tensors are read from their validated offsets with plain sequential reads into one reusable
window (as `cat` reads a file: the kernel's read-ahead keeps the disk busy, where page faults
through a mapping would not), so memory stays one window whatever the checkpoint's size and a
7B is checked at about the speed its bytes can be read. One `aminmax` a window gives the lot: a
NaN or an infinity shows in the min or max, and all-zero is min == max == 0. Packed quantized
weights (integer dtypes) are bytes, not values: only their emptiness is looked at.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ...checkpoint.formats import DTYPE_BYTES
from ...checkpoint.reader import as_tensor

FLOATS = ("float16", "bfloat16", "float32", "float64")
WINDOW_BYTES = 64 << 20
FP16_MAX = 65504.0
_MEAN_AT_MOST = 1 << 16  # elements: norm-sized tensors get their mean magnitude


@dataclass(frozen=True)
class ValueStats:
    numel: int
    nonfinite: bool
    all_zero: bool
    max_abs: float
    mean_abs: float | None  # only for small (norm-sized) tensors


class _Running:
    """min, max (and, for small tensors, the sum of magnitudes) over a tensor's windows."""

    def __init__(self, numel: int):
        self.numel, self.low, self.high = numel, math.inf, -math.inf
        self.nonfinite, self.abs_sum = False, 0.0

    def add(self, window) -> bool:
        """Fold a window in; False once a non-finite value is seen (nothing more to learn)."""
        import torch  # heavy: torch

        low, high = (float(v) for v in torch.aminmax(window))
        if not (math.isfinite(low) and math.isfinite(high)):
            self.nonfinite = True
            return False
        self.low, self.high = min(self.low, low), max(self.high, high)
        if self.numel <= _MEAN_AT_MOST:
            self.abs_sum += float(window.abs().float().sum())
        return True

    def stats(self) -> ValueStats:
        if self.nonfinite:
            return ValueStats(self.numel, True, False, math.inf, None)
        if self.numel == 0:
            return ValueStats(0, False, False, 0.0, None)
        mean = self.abs_sum / self.numel if self.numel <= _MEAN_AT_MOST else None
        return ValueStats(self.numel, False, self.low == self.high == 0.0,
                          max(abs(self.low), abs(self.high)), mean)


def _windows(key: str, source, window: int):
    """(key, piece, offset, nbytes) for each window of a contiguous tensor's bytes."""
    step = window - window % DTYPE_BYTES[source.dtype]
    for piece in source.pieces:
        for start in range(0, piece.nbytes, step):
            yield key, piece, start, min(step, piece.nbytes - start)


def _read(piece, start: int, nbytes: int, buffer: bytearray) -> memoryview:
    """`nbytes` of a piece from `start`, into `buffer` (literal bytes are used as they are)."""
    view = memoryview(buffer)[:nbytes]
    if piece.data is not None:  # copied: torch reads a writable buffer only
        view[:] = piece.data[start:start + nbytes]
        return view
    with open(piece.path, "rb", buffering=0) as fh:
        fh.seek(piece.offset + start)
        got = 0
        while got < nbytes:
            n = fh.readinto(view[got:])
            if not n:
                raise OSError(f"{piece.path}: ends early; truncated while being read?")
            got += n
    return view


def _stream_stats(sources: dict) -> dict[str, ValueStats]:
    """Every contiguous float tensor's stats. One thread reads the next window into one buffer
    while the values of the last are folded in from the other: reading and arithmetic overlap,
    so the pass costs about the reading alone."""
    import torch  # heavy: torch

    windows = [w for key, source in sources.items() for w in _windows(key, source, WINDOW_BYTES)]
    running = {key: _Running(source.numel) for key, source in sources.items()}
    buffers = (bytearray(WINDOW_BYTES), bytearray(WINDOW_BYTES))
    with ThreadPoolExecutor(1) as reader:
        pending = reader.submit(_read, *windows[0][1:], buffers[0]) if windows else None
        for i, (key, _piece, _start, _nbytes) in enumerate(windows):
            view = pending.result()
            if i + 1 < len(windows):
                pending = reader.submit(_read, *windows[i + 1][1:], buffers[(i + 1) % 2])
            state = running[key]
            if not state.nonfinite and len(view):
                state.add(torch.frombuffer(view, dtype=getattr(torch, sources[key].dtype)))
    return {key: state.stats() for key, state in running.items()}


def tensor_stats(tensor) -> ValueStats:
    """Stats of a tensor already in memory (a strided `.bin` view), a window at a time."""
    flat = tensor.reshape(-1)
    running = _Running(flat.numel())
    step = max(WINDOW_BYTES // max(flat.element_size(), 1), 1)
    for start in range(0, flat.numel(), step):
        if not running.add(flat[start:start + step]):
            break
    return running.stats()


def scan_values(sources: dict) -> dict[str, ValueStats]:
    """Stats of every tensor, key by key; integer tensors get their size only."""
    out: dict[str, ValueStats] = {}
    streamed = {}
    for key, source in sources.items():
        if source.dtype not in FLOATS:
            out[key] = ValueStats(source.numel, False, False, 0.0, None)
        elif source.pieces is not None:
            streamed[key] = source
        else:  # a strided view of its storage (small tensors only ever are)
            out[key] = tensor_stats(as_tensor(source, {}))
    out.update(_stream_stats(streamed))
    return {key: out[key] for key in sources}
