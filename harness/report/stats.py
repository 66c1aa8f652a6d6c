"""Is B different from A? A rank test and a ratio with its confidence interval.

Two designs, two tests, one answer (`Shift`):

- **Paired** (`paired_shift`, used by `ab`): A and B measured in alternating rounds on one
  machine, round i giving (a_i, b_i) a few seconds apart. On a VM the speed drifts in phases
  (measured: a 3 ms figure sat at 2.2 ms for a minute, then at 3.8 ms), and a pair shares its
  phase, so the test is on the per-round log ratios: Wilcoxon's signed-rank test, and the
  Hodges-Lehmann estimate (the median of the Walsh averages) with its interval.
- **Unpaired** (`shift`, used by `compare` and `gate`): two runs' samples with nothing in
  common but the figure. Mann-Whitney U, as asv and Google Benchmark's compare.py use, and the
  Hodges-Lehmann estimate of the shift (the median of every pairwise difference) with the
  interval that goes with the test.

Both work on logs, so the estimate is the ratio B/A, robust to the outliers a busy VM makes
(unlike a ratio of means). The p-values are two-sided: exact for small samples without ties,
else the normal approximation with tie and continuity corrections. The intervals are the
distribution-free ones built from order statistics (Hollander & Wolfe, ch. 3 and 4).
- The smallest change a comparison could have seen is the one it would detect with 80% power
  at its measured noise: (z(1-alpha/2) + z(0.8)) standard errors of the log ratio.

Everything is deterministic (no bootstrap, no random numbers): the same samples give the same
verdict on every machine. Pure Python, no scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

MANN_WHITNEY = "Mann-Whitney U"
SIGNED_RANK = "Wilcoxon signed-rank"
# Default significance level: at most 1 false alarm in 100 comparisons of unchanged code.
ALPHA = 0.01
POWER = 0.8
# Fewer values than this on a side: no test is attempted (the exact two-sided p-value of 4
# against 4 cannot go below 0.029).
MIN_N = 5
# Exact U distribution up to this many pairs (40 against 40: its table takes ~70 ms, once per
# pair of sizes). Beyond it the normal approximation, within 0.003 of the exact p-value at
# 41 against 40 (tested), though up to ~50% off it in relative terms below p = 0.05.
EXACT_PAIRS = 1600
# Pairwise differences beyond this are taken over evenly spaced order statistics of each
# sample (a sample may hold up to 100,000 values): the estimate stays O(1) in memory.
MAX_PAIRS = 250_000
# Exact signed-rank distribution up to this many pairs (2**n patterns, counted in ~n^3 / 4
# steps: 12 ms at 100).
EXACT_SIGNED = 100
# Walsh averages are n(n+1)/2: past this many differences, evenly spaced order statistics.
MAX_WALSH_SIDE = 700

_NORMAL = NormalDist()


@dataclass(frozen=True)
class Shift:
    """B against A: `ratio` = B/A with its (1 - alpha) interval [low, high], the rank test's
    two-sided `p`, and `detectable`, the smallest relative change this comparison would have
    caught with 80% power (0.05 for 5%)."""

    ratio: float
    low: float
    high: float
    p: float
    alpha: float
    n_a: int
    n_b: int
    detectable: float
    method: str = "Mann-Whitney U"

    @property
    def significant(self) -> bool:
        """p below alpha and an interval that excludes 1: both say B differs."""
        return self.p < self.alpha and not self.low <= 1.0 <= self.high

    def describe(self) -> str:
        """`x1.12 [1.08, 1.17], p=0.0003` — the figures behind a verdict."""
        n = f"{self.n_a} pairs" if self.paired else f"n={self.n_a}/{self.n_b}"
        return (f"x{self.ratio:.3f} [{self.low:.3f}, {self.high:.3f}], p={_p_text(self.p)}, "
                f"{n}, {self.method}")

    @property
    def paired(self) -> bool:
        return self.method == SIGNED_RANK


def _p_text(p: float) -> str:
    return f"{p:.2g}" if p >= 0.0001 else "<0.0001"


def shift(a, b, alpha: float = ALPHA) -> Shift | None:
    """B against A, or None where no such statement can be made: fewer than MIN_N values on
    a side, or a value that is not positive (the ratio is taken on logs)."""
    a, b = list(a), list(b)
    if len(a) < MIN_N or len(b) < MIN_N or min(a) <= 0 or min(b) <= 0:
        return None
    log_a, log_b = [math.log(v) for v in a], [math.log(v) for v in b]
    p = mann_whitney_p(log_a, log_b)
    low, mid, high = _hodges_lehmann(log_a, log_b, alpha)
    return _shift(low, mid, high, p, alpha, len(a), len(b), MANN_WHITNEY)


def paired_shift(a, b, alpha: float = ALPHA) -> Shift | None:
    """B against A where a[i] and b[i] were measured side by side (one round of `ab`); None
    with fewer than MIN_N pairs or a value that is not positive."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"paired samples of {len(a)} and {len(b)} values")
    if len(a) < MIN_N or min(a) <= 0 or min(b) <= 0:
        return None
    d = [math.log(y) - math.log(x) for x, y in zip(a, b)]
    low, mid, high = _walsh_interval(d, alpha)
    return _shift(low, mid, high, signed_rank_p(d), alpha, len(a), len(b), SIGNED_RANK)


def min_pairs(alpha: float = ALPHA) -> int:
    """The fewest pairs with which the signed-rank test can reach p < alpha at all (every
    pair pointing one way gives the exact two-sided p of 2 / 2**n): 8 at 0.01, 11 at 0.001."""
    n = MIN_N
    while 2 / 2 ** n >= alpha:
        n += 1
    return n


def _shift(low: float, mid: float, high: float, p: float, alpha: float, n_a: int, n_b: int,
           method: str) -> Shift:
    """A Shift from an interval of the log ratio: the smallest change detectable with POWER
    is (z(1-alpha/2) + z(POWER)) standard errors, the standard error read off the interval."""
    z = _NORMAL.inv_cdf(1 - alpha / 2)
    se = (high - low) / (2 * z)
    detectable = math.expm1((z + _NORMAL.inv_cdf(POWER)) * se)
    return Shift(math.exp(mid), math.exp(low), math.exp(high), p, alpha, n_a, n_b, detectable,
                 method)


# -- the rank test ------------------------------------------------------------------------------

def _ranks(values: list[float]) -> tuple[list[float], list[int]]:
    """Mid-ranks (1-based) of `values`, and the sizes of its groups of ties."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks, ties = [0.0] * len(values), []
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        if j > i:
            ties.append(j - i + 1)
        i = j + 1
    return ranks, ties


def u_statistic(a: list[float], b: list[float]) -> tuple[float, list[int]]:
    """U of B: the pairs (a, b) with b > a, ties counted a half; and the tie groups."""
    ranks, ties = _ranks(a + b)
    rank_sum_b = sum(ranks[len(a):])
    return rank_sum_b - len(b) * (len(b) + 1) / 2, ties


def mann_whitney_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test of A against B."""
    u, ties = u_statistic(a, b)
    m, n = len(a), len(b)
    if not ties and m * n <= EXACT_PAIRS:
        return _exact_p(u, m, n)
    mean = m * n / 2
    tie_term = sum(t ** 3 - t for t in ties) / ((m + n) * (m + n - 1))
    variance = m * n / 12 * ((m + n + 1) - tie_term)
    if variance <= 0:  # every value equal: nothing differs
        return 1.0
    z = max(abs(u - mean) - 0.5, 0.0) / math.sqrt(variance)
    return min(1.0, 2 * (1 - _NORMAL.cdf(z)))


@lru_cache(maxsize=64)
def _u_counts(m: int, n: int) -> list[int]:
    """How many of the C(m+n, m) orderings give each U = 0..m*n: the coefficients of the
    Gaussian binomial [m+n choose m], built one element at a time."""
    # counts[j][u] for i elements of A placed so far among j of B; extend A one at a time.
    counts = [[1] for _ in range(n + 1)]  # i = 0: U = 0 for every j
    for _ in range(m):
        nxt = [[1]]  # j = 0: the new A element beats no B element
        for j in range(1, n + 1):
            # The last element is either B (from nxt[j-1], U unchanged) or A (from
            # counts[j], that A element is below all j B elements: U + j).
            left, up = nxt[j - 1], counts[j]
            row = [0] * max(len(left), len(up) + j)
            for u, c in enumerate(left):
                row[u] += c
            for u, c in enumerate(up):
                row[u + j] += c
            nxt.append(row)
        counts = nxt
    return counts[n]


def _exact_p(u: float, m: int, n: int) -> float:
    counts = _u_counts(m, n)
    total = sum(counts)
    extreme = min(u, m * n - u)
    tail = sum(counts[: int(math.floor(extreme)) + 1])
    return min(1.0, 2 * tail / total)


# -- the paired test ----------------------------------------------------------------------------

def signed_rank_p(d: list[float]) -> float:
    """Two-sided p-value of Wilcoxon's signed-rank test that the differences `d` centre on 0.
    Zero differences are dropped (Wilcoxon's own convention)."""
    d = [x for x in d if x != 0]
    n = len(d)
    if n == 0:
        return 1.0
    ranks, ties = _ranks([abs(x) for x in d])
    w_plus = sum(r for r, x in zip(ranks, d) if x > 0)
    total = n * (n + 1) / 2
    if not ties and n <= EXACT_SIGNED:
        counts = _rank_sum_counts(n)
        tail = sum(counts[: int(math.floor(min(w_plus, total - w_plus))) + 1])
        return min(1.0, 2 * tail / 2 ** n)
    variance = n * (n + 1) * (2 * n + 1) / 24 - sum(t ** 3 - t for t in ties) / 48
    z = max(abs(w_plus - total / 2) - 0.5, 0.0) / math.sqrt(variance)
    return min(1.0, 2 * (1 - _NORMAL.cdf(z)))


@lru_cache(maxsize=64)
def _rank_sum_counts(n: int) -> list[int]:
    """How many of the 2**n sign patterns give each sum of positive ranks 0..n(n+1)/2."""
    counts = [1]
    for rank in range(1, n + 1):
        grown = counts + [0] * rank
        for s, c in enumerate(counts):
            grown[s + rank] += c
        counts = grown
    return counts


def _walsh_interval(d: list[float], alpha: float) -> tuple[float, float, float]:
    """(low, estimate, high) of the centre of `d`: the median of the Walsh averages
    (d_i + d_j) / 2, i <= j, and the order statistics that bound it at 1 - alpha."""
    d = _thinned(d, MAX_WALSH_SIDE)
    n = len(d)
    walsh = sorted((d[i] + d[j]) / 2 for i in range(n) for j in range(i, n))
    z = _NORMAL.inv_cdf(1 - alpha / 2)
    k = int(math.floor(n * (n + 1) / 4 - z * math.sqrt(n * (n + 1) * (2 * n + 1) / 24)))
    return _bounded(walsh, k)


def _bounded(ordered: list[float], k: int) -> tuple[float, float, float]:
    """(the k-th smallest, the median, the k-th largest) of `ordered`, k clipped to it."""
    count = len(ordered)
    k = min(max(k, 0), (count - 1) // 2)
    middle = count // 2
    median = ordered[middle] if count % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return ordered[k], median, ordered[count - 1 - k]


# -- the ratio and its interval -----------------------------------------------------------------

def _thinned(values: list[float], limit: int) -> list[float]:
    """At most `limit` evenly spaced order statistics of `values` (all of them if fewer)."""
    ordered = sorted(values)
    if len(ordered) <= limit:
        return ordered
    step = (len(ordered) - 1) / (limit - 1)
    return [ordered[round(i * step)] for i in range(limit)]


def _hodges_lehmann(a: list[float], b: list[float], alpha: float) -> tuple[float, float, float]:
    """(low, estimate, high) of the shift B - A: the median of all pairwise differences and
    the order statistics that bound it at 1 - alpha."""
    side = int(math.sqrt(MAX_PAIRS))
    a, b = _thinned(a, side), _thinned(b, side)
    diffs = sorted(y - x for x in a for y in b)
    m, n, pairs = len(a), len(b), len(diffs)
    z = _NORMAL.inv_cdf(1 - alpha / 2)
    k = int(math.floor(pairs / 2 - z * math.sqrt(m * n * (m + n + 1) / 12)))
    return _bounded(diffs, k)
