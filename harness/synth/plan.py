"""Which tensor goes in which shard, under which file name: the index before any byte is written.

Language-model tensors are sharded first, either by transformers' greedy max-shard-size walk
or into N byte-balanced runs; the projector's tensors are then placed in the shard that the
placement names. Keeping the projector out of the sharding walk is what lets a test put it
first, in the middle, last, or split across two shards regardless of sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checkpoint.formats import INDEX_NAMES, index_of, shard_name
from .layout import TensorInfo, model_tensors
from .quantize import quantized_tensors
from .specs import BuildSpec, SpecError


@dataclass(frozen=True)
class Shard:
    name: str
    tensors: tuple[TensorInfo, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class CheckpointPlan:
    format: str
    shards: tuple[Shard, ...]

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def tensors(self) -> list[TensorInfo]:
        return [t for s in self.shards for t in s.tensors]

    @property
    def index_name(self) -> str | None:
        return INDEX_NAMES[self.format] if len(self.shards) > 1 else None

    def index(self) -> dict:
        """The index file's content, as transformers writes it (keys sorted)."""
        return index_of((s.name, s.tensors) for s in self.shards)

    def describe(self) -> dict:
        """The `--plan` output: the index plus each tensor's shape and dtype."""
        return {
            "format": self.format,
            "index_file": self.index_name,
            "shards": [{"name": s.name, "bytes": s.nbytes, "tensors": len(s.tensors)}
                       for s in self.shards],
            "tensor_count": len(self.tensors),
            **self.index(),
            "tensors": {t.key: {"shape": list(t.shape), "dtype": t.dtype}
                        for t in sorted(self.tensors, key=lambda t: t.key)},
        }


def _by_max_size(tensors: list[TensorInfo], max_size: int) -> list[list[TensorInfo]]:
    """transformers 4.31 `shard_checkpoint`: start a new shard when the next tensor would
    push the current one past max_size (a tensor larger than max_size gets its own shard)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _by_count(tensors: list[TensorInfo], n: int) -> list[list[TensorInfo]]:
    """n contiguous runs of roughly equal bytes, none empty."""
    if n > len(tensors):
        raise SpecError(f"CheckpointSpec.shards={n}: the model has only {len(tensors)} "
                        "non-projector tensors to spread")
    total = sum(t.nbytes for t in tensors)
    shards: list[list[TensorInfo]] = [[] for _ in range(n)]
    done, i = 0, 0
    for pos, t in enumerate(tensors):
        # Move on once this shard holds its share of the bytes, or when every tensor left
        # is needed to give each remaining shard at least one.
        must_move = len(tensors) - pos == n - 1 - i
        if shards[i] and i < n - 1 and (must_move or done >= total * (i + 1) / n):
            i += 1
        shards[i].append(t)
        done += t.nbytes
    return shards


def _place_projector(shards: list[list[TensorInfo]], projector: list[TensorInfo],
                     placement: str) -> None:
    n = len(shards)
    if not projector:
        return
    if placement == "last":
        # Where the state-dict order puts it: after model.norm, before lm_head.
        last = shards[-1]
        at = len(last) - 1 if last and last[-1].key == "lm_head.weight" else len(last)
        last[at:at] = projector
    elif placement == "first":
        shards[0][0:0] = projector
    elif placement == "middle":
        if n < 3:
            raise SpecError(f"CheckpointSpec.placement='middle' needs at least 3 shards, "
                            f"the plan has {n}")
        shards[n // 2][0:0] = projector
    elif placement == "split":
        if n < 2 or len(projector) < 2:
            raise SpecError("CheckpointSpec.placement='split' needs at least 2 shards and a "
                            f"projector with 2+ tensors (have {n} shards, {len(projector)} "
                            "projector tensors)")
        half = len(projector) // 2
        shards[n - 2].extend(projector[:half])
        shards[n - 1][0:0] = projector[half:]


def make_plan(spec: BuildSpec) -> CheckpointPlan:
    ck = spec.checkpoint
    tensors = quantized_tensors(model_tensors(spec.model, ck.legacy_buffers), ck, spec.model)
    projector = [t for t in tensors if t.group == "projector"]
    rest = [t for t in tensors if t.group != "projector"]
    groups = _by_count(rest, ck.shards) if ck.shards else _by_max_size(rest, ck.max_shard_size)
    _place_projector(groups, projector, ck.placement)
    n = len(groups)
    return CheckpointPlan(ck.format, tuple(Shard(shard_name(ck.format, i, n), tuple(g))
                                           for i, g in enumerate(groups)))
