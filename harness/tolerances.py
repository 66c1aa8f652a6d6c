"""Tolerances for arithmetic comparisons, read from `fixtures/tolerances.toml` (one data file,
shipped in the wheel as `harness.fixtures`).

Each entry names its reason; a test that compares within a tolerance gets it from here by a
dotted name, so every bound in the project is reviewable in one place.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache

from .data import fixtures_dir
from .errors import HarnessError

TOLERANCES_FILE = fixtures_dir() / "tolerances.toml"


class ToleranceError(HarnessError):
    pass


@dataclass(frozen=True)
class Tolerance:
    name: str
    reason: str
    atol: float = 0.0
    rtol: float = 0.0
    top1: float | None = None
    ulps: float | None = None  # a bound in units in the last place (see the entry's reason)

    def close_kwargs(self) -> dict:
        """Keyword arguments for `torch.testing.assert_close`."""
        return {"atol": self.atol, "rtol": self.rtol}


@lru_cache(maxsize=1)
def _table() -> dict:
    try:
        with open(TOLERANCES_FILE, "rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ToleranceError(f"{TOLERANCES_FILE}: cannot read tolerances: {exc}") from None


def tolerance(name: str) -> Tolerance:
    """`tolerance("lora_merge.float32")` -> the entry `[lora_merge.float32]`."""
    node = _table()
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ToleranceError(f"{TOLERANCES_FILE}: no tolerance named {name!r}")
        node = node[part]
    if "reason" not in node:
        raise ToleranceError(f"{TOLERANCES_FILE}: [{name}] has no reason")
    fields = {k: node[k] for k in ("atol", "rtol", "top1", "ulps") if k in node}
    return Tolerance(name=name, reason=node["reason"], **fields)


# --- the yardsticks the bounds are stated in ---------------------------------------------------

def ulp_at_scale(expected, dtype):
    """The spacing of `dtype` at the largest |value| of `expected`: the scale its sums were
    accumulated at. (A value's own ulp is no yardstick for logits near zero, which come from
    cancellation between terms hundreds of times larger.)"""
    import torch  # heavy: torch

    top = expected.detach().abs().max().to(dtype)
    return (torch.nextafter(top, torch.tensor(float("inf"), dtype=dtype)) - top).float()


def ulps_apart(ours, expected, dtype) -> float:
    """max |ours - expected| in units of `ulp_at_scale(expected, dtype)`."""
    diff = (ours.float() - expected.float()).abs().max()
    return float(diff / ulp_at_scale(expected, dtype))


@dataclass(frozen=True)
class Apart:
    """How far apart two tensors of one shape are."""

    max_abs: float          # inf where a NaN stands on one side only
    index: list[int]        # where the largest difference is
    count: int              # elements that differ
    numel: int

    def __str__(self) -> str:
        return (f"max |difference| {self.max_abs:.6g} at {self.index}, {self.count} of "
                f"{self.numel} elements differ")


def apart(a, b) -> Apart:
    """max |a - b| (equal infinities and NaN in both places count as equal), where, how many."""
    import torch  # heavy: torch

    x, y = a.double(), b.double()
    diff = (x - y).abs()
    diff[(x == y) | (x.isnan() & y.isnan())] = 0
    diff[x.isnan() ^ y.isnan()] = float("inf")
    if not diff.numel():
        return Apart(0.0, [], 0, 0)
    worst = torch.unravel_index(diff.argmax(), diff.shape)
    return Apart(float(diff.max()), [int(i) for i in worst], int((diff != 0).sum()),
                 diff.numel())
