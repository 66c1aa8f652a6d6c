"""safetensors: the one header parser (every field validated before a byte is trusted) and
the one streaming writer.

A header is trusted only when: its length is within 100 MB (safetensors' own limit) and the
file; it is a JSON object without duplicate keys; `__metadata__`, if present, maps strings to
strings; each entry has exactly a known dtype, a shape of non-negative integers and two integer
offsets whose span is exactly shape x dtype; and the spans lie inside the data section without
overlapping. Anything else is one `CheckpointError` line naming the file and the entry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .files import DEFAULT_MODE, Output
from .formats import DTYPE_BYTES, Chunks, Progress
from .problems import CheckpointError, shown
from .tensors import SAFETENSORS_CODES, SAFETENSORS_NAMES, Piece, Source

MAX_HEADER_BYTES = 100 * 10**6
_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(path: Path, label: Path | None = None) -> tuple[dict, int, int]:
    """(the parsed header object, where the data starts, the file's size); messages name
    `label` (the name the folder gives the file), else `path`."""
    real, path = path, label or path
    with open(real, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{shown(path)}: truncated: {size} bytes, too short for a "
                                  "safetensors header")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{shown(path)}: not safetensors: header length {n} is over "
                                  f"the {MAX_HEADER_BYTES} byte limit")
        if n > size - 8:
            raise CheckpointError(f"{shown(path)}: truncated or not safetensors: header "
                                  f"length {n} exceeds the file's {size} bytes")
        raw = fh.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{shown(path)}: safetensors header is not valid JSON "
                              f"({shown(exc)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{shown(path)}: safetensors header is a "
                              f"{type(header).__name__}, not an object")
    return header, 8 + n, size


def _metadata(path: Path, header: dict) -> dict | None:
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise CheckpointError(f"{shown(path)}: __metadata__ must map strings to strings")
    return metadata


def _entry(path: Path, key: str, entry, base: int, size: int, real: Path) -> Source:
    where = f"{shown(path)}: header entry {shown(key)}"
    if not key:
        raise CheckpointError(f"{shown(path)}: header has an entry with an empty name")
    if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
        raise CheckpointError(f"{where} lacks a valid dtype, shape or data_offsets (expected "
                              "exactly those three fields)")
    dtype = SAFETENSORS_NAMES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(f"{where}: unknown dtype {shown(entry['dtype'])}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shown(shape)} is not a list of non-negative "
                              "integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise CheckpointError(f"{where}: data_offsets {shown(offsets)} are not two integers")
    start, stop = offsets
    source = Source(key, dtype, tuple(shape), (Piece(real, base + start, stop - start),),
                    file=path.name)
    if start < 0 or stop - start != source.nbytes:
        raise CheckpointError(f"{where}: data_offsets {start}..{stop} do not hold its shape "
                              f"{list(shape)} {dtype} ({source.nbytes} bytes)")
    if base + stop > size:
        raise CheckpointError(f"{shown(path)}: truncated: {shown(key)} ends at byte "
                              f"{base + stop}, the file has {size}")
    return source


def scan_safetensors(path: Path, label: Path | None = None) -> tuple[dict[str, Source],
                                                                    dict | None]:
    """Every tensor of a safetensors file with its byte range, in data order; and the
    header's `__metadata__`. `label`: the name the folder gives the file (a link inside it)."""
    real = Path(path)
    path = Path(label or path)
    header, base, size = read_header(real, path)
    metadata = _metadata(path, header)
    sources = [_entry(path, key, entry, base, size, real) for key, entry in header.items()]
    sources.sort(key=lambda s: s.pieces[0].offset)
    end = base
    for s in sources:
        piece = s.pieces[0]
        if piece.offset < end and piece.nbytes:
            raise CheckpointError(f"{shown(path)}: {shown(s.key)} overlaps the tensor before "
                                  f"it (bytes {piece.offset - base}.. start before "
                                  f"{end - base})")
        end = max(end, piece.offset + piece.nbytes)
    return {s.key: s for s in sources}, metadata


def safetensors_order(tensors: list) -> list:
    """Wider dtypes first, so every tensor stays aligned to its element size (safetensors'
    own rule); within a width, the order given (a rewritten shard keeps its source's order)."""
    return sorted(tensors, key=lambda t: -DTYPE_BYTES[t.dtype])


def save_file_order(tensors: list) -> list:
    """The order new files (the builder's, the merge's, an extraction) are written in: wider
    dtypes first, then by name. It is safetensors' own `save_file` order wherever no two dtypes
    of one width share a file; `save_file` ranks those by dtype too (I8 before U8, say)."""
    return safetensors_order(sorted(tensors, key=lambda t: t.key))


def header_bytes(tensors: list, metadata: dict | None) -> bytes:
    """The length prefix and JSON header for `tensors` in this order, padded to 8 bytes."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.key] = {"dtype": SAFETENSORS_CODES[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _write_bytes(out: Output, t, chunks: Chunks | None) -> None:
    if chunks is not None:
        for chunk in chunks(t):
            out.write(chunk)
    else:
        for piece in t.byte_pieces(out.path):
            out.put(piece)


def write_safetensors(path: Path, tensors: list, chunks: Chunks | None = None, *,
                      metadata: dict | None = None, progress: Progress | None = None,
                      mode: int = DEFAULT_MODE) -> None:
    """The one safetensors writer: `tensors` in the order given (callers order them:
    `safetensors_order`, `save_file_order`), header first (every offset is known up front),
    then each tensor's bytes. Those are its file pieces, copied in the kernel, or, for new
    tensors (the builder's fill, the merge's results), whatever `chunks(tensor)` yields,
    written as it comes with no intermediate copy. `progress(nbytes)` follows each tensor."""
    out = Output(path, mode)
    try:
        out.write(header_bytes(tensors, metadata))
        for t in tensors:
            start = out.pos
            _write_bytes(out, t, chunks)
            if out.pos - start != t.nbytes:
                raise CheckpointError(f"{shown(path)}: {shown(t.key)} produced "
                                      f"{out.pos - start} bytes, expected {t.nbytes}")
            if progress:
                progress(t.nbytes)
    finally:
        out.close()
