"""Facts of the two checkpoint formats every module shares: dtype sizes and transformers' file names."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

# Bytes per element of every dtype a checkpoint may hold (the reader meets more than we write).
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int64": 8, "int32": 4,
               "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1,
               "float8_e5m2": 1}


def shape_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class Entry(Protocol):
    """What the writers need of a tensor they write: the builder's TensorInfo, for one."""

    key: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int: ...


# A new tensor's bytes, produced in pieces (the builder's fill, the merge's tensors), and the
# callback a writer reports each written tensor's size to: both formats' writers take them.
Chunks = Callable[[Entry], Iterable[bytes | memoryview]]
Progress = Callable[[int], None]


class Shaped:
    """`numel` and `nbytes` of anything with a `shape` and a `dtype` name."""

    @property
    def numel(self) -> int:
        return shape_numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class Tensor(Shaped):
    """A tensor an output will hold: its name, shape and dtype (what a writer's Entry needs)."""

    key: str
    shape: tuple[int, ...]
    dtype: str


def index_of(files) -> dict:
    """A sharded checkpoint's index from (file name, its tensors) pairs: every tensor's file and
    the total of their bytes. The one place an index is made (builder, strip/convert, merge)."""
    weight_map, total = {}, 0
    for name, tensors in files:
        for t in tensors:
            weight_map[t.key] = name
            total += t.nbytes
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


def index_json(index: dict) -> str:
    """An index file's text as transformers writes it: sorted keys, two-space indent."""
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


INDEX_NAMES = {"bin": "pytorch_model.bin.index.json", "safetensors": "model.safetensors.index.json"}
SINGLE_NAMES = {"bin": "pytorch_model.bin", "safetensors": "model.safetensors"}


def shard_name(fmt: str, i: int, n: int) -> str:
    """transformers' names: pytorch_model-00001-of-00002.bin, model-00001-of-00004.safetensors."""
    if n == 1:
        return SINGLE_NAMES[fmt]
    stem = "pytorch_model" if fmt == "bin" else "model"
    ext = "bin" if fmt == "bin" else "safetensors"
    return f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}"
