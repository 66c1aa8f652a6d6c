"""What the checkpoint layer knows about one stored tensor, whatever its file format.

A `Source` names a tensor (key, dtype, shape), the file it came from, and where its bytes are:
contiguous `Piece`s (file ranges or literal bytes), and for a `.bin` tensor also its storage
record and its view into it (a tensor may be a strided view of a larger storage). Readers fill
these in from validated headers only; writers stream from them without holding a shard.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .formats import DTYPE_BYTES, Shaped
from .problems import CheckpointError

SAFETENSORS_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
                     "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                     "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
SAFETENSORS_CODES = {v: k for k, v in SAFETENSORS_NAMES.items()}
# torch.save names a storage by its legacy typed class; these are the ones weights use.
STORAGE_DTYPES = {"HalfStorage": "float16", "BFloat16Storage": "bfloat16",
                  "FloatStorage": "float32", "DoubleStorage": "float64", "LongStorage": "int64",
                  "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
                  "ByteStorage": "uint8", "BoolStorage": "bool"}
STORAGE_CLASSES = {v: k for k, v in STORAGE_DTYPES.items()}
# Reads through user space (CRCs of new zip records, gathers): 1 MiB at a time keeps a
# 7B projector's extraction at interpreter-sized memory; throughput is the same from 1 MiB up.
READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Piece:
    """Part of a tensor's bytes: a range of a file, or literal bytes."""

    path: Path | None
    offset: int
    nbytes: int
    data: bytes | None = None
    crc: int | None = None  # CRC-32 of these bytes, when a stored record already states it


@dataclass(frozen=True)
class BinStorage:
    """A `.bin` storage record, copyable whole: its data offset, size and CRC are known."""

    path: Path
    name: str
    offset: int
    nbytes: int
    crc: int
    dtype: str
    numel: int


@dataclass(frozen=True)
class Source(Shaped):
    """One tensor: its name, dtype, shape, the file it is in, and where its bytes are."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...] | None
    storage: BinStorage | None = None
    view: tuple[int, tuple[int, ...], tuple[int, ...]] | None = None  # offset, shape, stride
    file: str | None = None

    def renamed(self, key: str) -> Source:
        return dataclasses.replace(self, key=key)

    def byte_pieces(self, where: Path) -> tuple[Piece, ...]:
        if self.pieces is None:
            raise CheckpointError(f"{where}: {self.key} is a strided view of its storage; "
                                  "only contiguous tensors can be streamed to another format")
        return self.pieces

    @property
    def owns_storage(self) -> bool:
        """A `.bin` tensor that is its whole storage: copied as the record it is, CRC known."""
        return (self.storage is not None and self.view == (0, self.shape,
                                                            contiguous_strides(self.shape))
                and self.storage.numel == self.numel)

    def contiguous(self) -> Source:
        """The same tensor as contiguous bytes of its own (a strided view is gathered: only
        small tensors, such as a projector saved as a view, ever are)."""
        if self.pieces is not None and (self.storage is None or self.owns_storage):
            return self
        pieces = self.pieces or (Piece(None, 0, self.nbytes, gathered_bytes(self)),)
        return dataclasses.replace(self, pieces=pieces, storage=None, view=None)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    # Dimensions of size 1 may carry any stride.
    return all(s == c for d, s, c in zip(shape, stride, contiguous_strides(shape)) if d != 1)


def piece_chunks(piece: Piece) -> Iterator[bytes]:
    if piece.data is not None:
        yield piece.data
        return
    with open(piece.path, "rb") as fh:
        fh.seek(piece.offset)
        left = piece.nbytes
        while left:
            chunk = fh.read(min(left, READ_CHUNK))
            if not chunk:
                raise CheckpointError(f"{piece.path}: ends early; truncated while being read?")
            left -= len(chunk)
            yield chunk


def prefetch(source: Source, buffer: bytearray | None = None) -> None:
    """Bring a tensor's bytes into the page cache now, read into `buffer` and dropped (run in
    a thread: a reader that works tensor by tensor reads the next one while it computes this
    one, its arithmetic and the disk overlapping). Faults are left to the real read."""
    ranges = [(p.path, p.offset, p.nbytes) for p in source.pieces or () if p.path is not None]
    if source.storage is not None and not ranges:
        ranges = [(source.storage.path, source.storage.offset, source.storage.nbytes)]
    view = memoryview(buffer if buffer is not None else bytearray(READ_CHUNK * 16))
    for path, offset, nbytes in ranges:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            end = offset + nbytes
            while offset < end:
                got = os.preadv(fd, [view[:min(len(view), end - offset)]], offset)
                if not got:
                    break
                offset += got
        finally:
            os.close(fd)


def gathered_bytes(source: Source) -> bytes:
    """A strided `.bin` view's elements in row-major order."""
    import numpy as np  # heavy: numpy

    storage, (offset, shape, stride) = source.storage, source.view
    itemsize = DTYPE_BYTES[source.dtype]
    raw = np.memmap(storage.path, dtype=f"u{itemsize}", mode="r", offset=storage.offset,
                    shape=(storage.numel,))
    view = np.lib.stride_tricks.as_strided(raw[offset:], shape=shape,
                                           strides=[s * itemsize for s in stride])
    return np.ascontiguousarray(view).tobytes()
