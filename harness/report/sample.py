"""Repeated measurements of one figure: the values as measured, and the statistics a reader and
a gate need (n, median, quartiles and IQR, MAD, min, max).

A timing measured once says nothing about its noise; every timing metric carries its sample,
so a comparison can say "same, within noise" and a gate can allow for the spread it measured.
The values are stored as measured (the JSON round trip is lossless) and every statistic is
derived from them, the same way everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

# A sample beyond this is not a repeat count but a dump; refused when read from a file.
MAX_VALUES = 100_000


class SampleError(ValueError):
    pass


def _quantile(ordered: tuple[float, ...], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, "type 7")."""
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Sample:
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        values = tuple(self.values)
        if not values or len(values) > MAX_VALUES:
            raise SampleError(f"a sample holds 1 to {MAX_VALUES:,} values, not {len(values):,}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SampleError(f"sample value {v!r}: expected a finite number")
        object.__setattr__(self, "values", values)

    @cached_property
    def ordered(self) -> tuple[float, ...]:
        return tuple(sorted(self.values))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def min(self) -> float:
        return self.ordered[0]

    @property
    def max(self) -> float:
        return self.ordered[-1]

    def quantile(self, q: float) -> float:
        return _quantile(self.ordered, q)

    @property
    def median(self) -> float:
        return self.quantile(0.5)

    @property
    def q1(self) -> float:
        return self.quantile(0.25)

    @property
    def q3(self) -> float:
        return self.quantile(0.75)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def mad(self) -> float:
        """Median absolute deviation from the median (unscaled)."""
        median = self.median
        return _quantile(tuple(sorted(abs(v - median) for v in self.values)), 0.5)

    @property
    def spread(self) -> float | None:
        """The noise a comparison allows for: the IQR, or with 2 or 3 values (no quartiles
        worth the name) half the range; None for one value (its noise is unknown)."""
        if self.n == 1:
            return None
        return self.iqr if self.n >= 4 else (self.max - self.min) / 2

    def summary(self) -> dict:
        return {"n": self.n, "median": self.median, "iqr": self.iqr, "mad": self.mad,
                "min": self.min, "max": self.max}
