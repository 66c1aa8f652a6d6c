"""The builder's shard writers: one tensor in memory at a time, never a whole shard.

`.bin` shards are written record by record through torch's own `PyTorchFileWriter` (the
writer `torch.save` uses): a synthetic checkpoint must be byte for byte what `torch.save` of
the same state dict produces, and only torch's writer is that (the checkpoint layer's
torch-free `.bin` writer, for copies, writes the same records with its own zip headers).
safetensors shards go through the checkpoint layer's one safetensors writer, fed with the fill
chunks: header first (every offset is known from the plan), then the bytes with no
intermediate copy.
"""

from __future__ import annotations

import io
import pickle
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch._utils

from .files import fsync_path
from .formats import Entry

Chunks = Callable[[Entry], Iterable[bytes | memoryview]]
Progress = Callable[[int], None]

_STORAGE_TYPES = {"float16": torch.HalfStorage, "bfloat16": torch.BFloat16Storage,
                  "float32": torch.FloatStorage,
                  # pre-quantized layouts: packed codes, LLM.int8 weights, GPTQ/AWQ integers
                  "uint8": torch.ByteStorage, "int8": torch.CharStorage,
                  "int32": torch.IntStorage}




class _Storage:
    """Stands for a tensor's storage while pickling; becomes torch's persistent id."""

    def __init__(self, key: str, info: Entry):
        self.key, self.info = key, info


class _Tensor:
    """Pickles exactly as torch.save pickles a contiguous CPU tensor."""

    def __init__(self, storage: _Storage):
        self.storage = storage

    def __reduce_ex__(self, protocol):
        shape = self.storage.info.shape
        stride = tuple(_contiguous_strides(shape))
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, shape, stride, False, OrderedDict()))


def _contiguous_strides(shape: tuple[int, ...]) -> list[int]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return list(reversed(strides))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", _STORAGE_TYPES[obj.info.dtype], obj.key, "cpu", obj.info.numel)
        return None


def _state_pickle(tensors: Sequence[Entry]) -> bytes:
    # A plain dict, as transformers' shard_checkpoint hands to torch.save; protocol 2 as torch.
    state = {t.key: _Tensor(_Storage(str(i), t)) for i, t in enumerate(tensors)}
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(state)
    return buf.getvalue()


def write_bin(path: Path, tensors: Sequence[Entry], chunks: Chunks,
              progress: Progress | None = None) -> None:
    """One `.bin` shard, written record by record in torch.save's record order."""
    largest = max((t.nbytes for t in tensors), default=0)
    # One reusable buffer the size of the largest tensor: the only tensor-sized allocation.
    buffer = torch.empty(largest, dtype=torch.uint8)
    view, storage = buffer.numpy(), buffer.untyped_storage()
    writer = torch._C.PyTorchFileWriter(str(path), True, 64)
    records = [("data.pkl", _state_pickle(tensors)), (".format_version", b"1"),
               (".storage_alignment", b"64"), ("byteorder", sys.byteorder.encode())]
    for name, data in records:
        writer.write_record(name, data, len(data))
    for i, info in enumerate(tensors):
        pos = 0
        for chunk in chunks(info):
            view[pos:pos + len(chunk)] = memoryview(chunk).cast("B")
            pos += len(chunk)
        if pos != info.nbytes:
            raise ValueError(f"{info.key}: produced {pos} bytes, expected {info.nbytes}")
        # The writer takes the first nbytes of the storage: this tensor's bytes.
        writer.write_record(f"data/{i}", storage, info.nbytes)
        if progress:
            progress(info.nbytes)
    writer.write_end_of_file()
    del writer  # closes the file, so the fsync below covers everything
    fsync_path(path)


def safetensors_order(tensors: Sequence[Entry]) -> list[Entry]:
    """safetensors' own layout order: wider dtypes first (keeps data aligned), then by name."""
    return sorted(tensors, key=lambda t: (-t.nbytes // max(t.numel, 1), t.key))


def write_safetensors(path: Path, tensors: Sequence[Entry], chunks: Chunks,
                      progress: Progress | None = None) -> None:
    from .safetensors_format import write_safetensors as write

    def emit(out, info: Entry) -> None:
        for chunk in chunks(info):
            out.write(chunk)
        if progress:
            progress(info.nbytes)

    write(path, safetensors_order(tensors), emit=emit)


WRITERS = {"bin": write_bin, "safetensors": write_safetensors}
# The order each writer asks its chunk source for the tensors in.
WRITE_ORDER = {"bin": list, "safetensors": safetensors_order}
