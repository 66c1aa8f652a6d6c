"""Every tensor's values in one streaming pass: non-finite, all-zero, empty, largest magnitude,
and the mean magnitude of norm weights.

Tensors are mapped from their validated offsets and read a window at a time, so memory stays
bounded whatever the checkpoint's size; one `aminmax` a window gives the lot (a NaN or an
infinity shows in the min or max; all-zero is min == max == 0), so a 7B is checked at about the
speed its bytes can be read. Packed quantized weights (integer dtypes) are bytes, not values:
only their emptiness is looked at.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOATS = ("float16", "bfloat16", "float32", "float64")
WINDOW_ELEMENTS = 1 << 24  # 32-64 MiB of a half or single precision tensor at a time
FP16_MAX = 65504.0


@dataclass(frozen=True)
class ValueStats:
    numel: int
    nonfinite: bool
    all_zero: bool
    max_abs: float
    mean_abs: float | None  # only for small (norm-sized) tensors


def _window_stats(flat) -> tuple[float, float]:
    import torch

    low, high = torch.aminmax(flat)
    return float(low), float(high)


def tensor_stats(tensor) -> ValueStats:
    """Stats of one float tensor, a window at a time."""
    import math

    flat = tensor.reshape(-1)
    numel = flat.numel()
    low, high = math.inf, -math.inf
    nonfinite = False
    for start in range(0, numel, WINDOW_ELEMENTS):
        a, b = _window_stats(flat[start:start + WINDOW_ELEMENTS])
        if not (math.isfinite(a) and math.isfinite(b)):
            nonfinite = True
            break
        low, high = min(low, a), max(high, b)
    if numel == 0 or nonfinite:
        return ValueStats(numel, nonfinite, False, math.inf if nonfinite else 0.0, None)
    mean_abs = float(flat.abs().float().mean()) if numel <= 1 << 16 else None
    return ValueStats(numel, False, low == high == 0.0, max(abs(low), abs(high)), mean_abs)


def scan_values(sources: dict) -> dict[str, ValueStats]:
    """Stats of every tensor, key by key; integer tensors get their size only."""
    from ...checkpoint.reader import as_tensor

    out: dict[str, ValueStats] = {}
    maps: dict = {}
    for key, source in sources.items():
        if source.dtype not in FLOATS:
            out[key] = ValueStats(source.numel, False, False, 0.0, None)
            continue
        out[key] = tensor_stats(as_tensor(source, maps))
    return out
