"""Deterministic tensor values at disk speed.

Seeded normal sampling runs at ~0.3 GB/s here, too slow for 13.5 GB. Instead one block of
normal samples is drawn per seed and every tensor is a window onto it, starting at an offset
hashed from its key and wrapping around. The block's length is a prime (2^22 - 3 elements), so
no row width divides it: no two rows of any real-size tensor are equal, and no row or tensor
is constant. Each tensor's bytes depend only on (seed, key, shape, dtype, kind), never on the
format, sharding or placement, so any single tensor can be regenerated to verify a file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from functools import lru_cache

import torch

from ..checkpoint.formats import DTYPE_BYTES
from .layout import TensorInfo, inv_freq_values

BLOCK_ELEMENTS = 4_194_301  # the largest prime below 2**22

# (mean, std) per kind: weights like a 0.02 init; norms near 1 but not constant.
KIND_STATS = {"weight": (0.0, 0.02), "bias": (0.0, 0.02), "norm": (1.0, 0.05),
              "scale": (0.01, 0.001)}
# Integer tensors of key-level quantized layouts (GPTQ / AWQ qweight, qzeros) take the block's
# raw bits: every bit pattern is a valid integer, and no two rows repeat.
RAW_BITS = "bits"


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


@lru_cache(maxsize=2)
def _normal_block(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BLOCK_ELEMENTS, generator=gen, dtype=torch.float32)


@lru_cache(maxsize=8)
def _block_bytes(seed: int, kind: str, dtype: str) -> memoryview:
    """The block scaled for a kind and cast to a dtype, as raw bytes, made once per build."""
    if kind == RAW_BITS:
        return memoryview(_normal_block(seed).view(torch.uint8).numpy())
    mean, std = KIND_STATS[kind]
    values = (_normal_block(seed) * std + mean).to(_torch_dtype(dtype))
    return memoryview(values.view(torch.uint8).numpy())


def key_offset(seed: int, key: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % BLOCK_ELEMENTS


def _computed_bytes(info: TensorInfo, model) -> bytes:
    """Buffers whose values are a formula, not a draw (the legacy rotary inv_freq)."""
    values = inv_freq_values(model).to(_torch_dtype(info.dtype))
    if tuple(values.shape) != info.shape:
        raise ValueError(f"{info.key}: computed shape {tuple(values.shape)} != {info.shape}")
    return values.view(torch.uint8).numpy().tobytes()


def tensor_chunks(seed: int, info: TensorInfo, model, max_chunk: int = 1 << 24
                  ) -> Iterator[memoryview | bytes]:
    """The tensor's bytes as a sequence of chunks (views onto the cached block, no copies).
    The fill's own kinds; a quantized linear's stored state is quantize.py's (content.py
    asks whichever makes a planned tensor)."""
    if info.kind == "quant":
        raise ValueError(f"{info.key}: a quantized tensor is made by synth/quantize.py")
    if info.kind == "inv_freq":
        yield _computed_bytes(info, model)
        return
    block = _block_bytes(seed, info.kind, info.dtype)
    item = len(block) // BLOCK_ELEMENTS if info.kind != RAW_BITS else DTYPE_BYTES[info.dtype]
    start = key_offset(seed, info.key) * item
    left = info.nbytes
    while left:
        take = min(left, len(block) - start, max_chunk)
        yield block[start:start + take]
        left -= take
        start = (start + take) % len(block)


def tensor_bytes(seed: int, info: TensorInfo, model) -> bytes:
    """The whole tensor's bytes (for verifying one tensor; builds stream the chunks)."""
    return b"".join(tensor_chunks(seed, info, model))


def make_tensor(seed: int, info: TensorInfo, model):
    """The tensor itself, for tests and in-memory references."""
    return as_tensor(tensor_bytes(seed, info, model), info)


def as_tensor(raw: bytes, info: TensorInfo):
    """A tensor's bytes as the tensor its plan describes (a copy: the bytes may be shared)."""
    return torch.frombuffer(bytearray(raw), dtype=_torch_dtype(info.dtype)).reshape(info.shape)
