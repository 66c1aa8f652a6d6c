"""What every planned tensor holds, whatever made it: the seeded fill (fill.py) for weights,
norms and buffers, a quantization of the fill (quantize.py) for a pre-quantized linear's stored
state. The builder and verify ask here; fill.py and quantize.py sit below and never import each
other's way up (quantize quantizes the fill's float weights).
"""

from __future__ import annotations

from collections.abc import Iterator

from . import fill
from .layout import TensorInfo
from .quantize import stored_bytes


def tensor_chunks(seed: int, info: TensorInfo, model) -> Iterator[memoryview | bytes]:
    """The tensor's bytes in chunks, as the writers take them."""
    if info.kind == "quant":
        yield stored_bytes(seed, info, model)
    else:
        yield from fill.tensor_chunks(seed, info, model)


def tensor_bytes(seed: int, info: TensorInfo, model) -> bytes:
    """The whole tensor's bytes (for verifying one tensor; builds stream the chunks)."""
    return b"".join(tensor_chunks(seed, info, model))


def make_tensor(seed: int, info: TensorInfo, model):
    """The tensor itself, for tests and in-memory references."""
    return fill.as_tensor(tensor_bytes(seed, info, model), info)
