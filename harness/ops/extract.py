"""Projector extraction: copy the tensors whose names match out of a checkpoint, reading only them.

Like LLaVA's `scripts/extract_mm_projector.py` it selects keys by substring (`mm_projector`) and
finds their shards through the index; unlike it, it never loads a shard. It reads the index,
then in each shard that holds a match only the tensor directory (the safetensors header, or the
`.bin` zip's central directory and its `data.pkl`), then streams just the matching tensors'
bytes into the output. Shards without a match are never opened.

It works without torch: `import torch` alone costs 2.4 s and 220 MB, twenty times the whole
extraction of a 7B's projector. `.bin` shards are read through a restricted unpickler that
knows only what `torch.save` writes for a dict of tensors (it builds no objects, so it is
stricter than `weights_only=True`), and `.bin` output is written record for record in torch's
zip layout (64-byte aligned data, fixed timestamps), so `torch.load(..., weights_only=True)`
and `mmap=True` read it as they read `torch.save`'s own files. Every output tensor is
contiguous in its own storage.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..checkpoint.atomic import atomic_file, check_target
from ..checkpoint.reader import MAX_HEADER_BYTES, SAFETENSORS_NAMES, CheckpointError, open_folder
from ..layout import DTYPE_BYTES, shape_numel

DEFAULT_KEYS = ("mm_projector",)
DEFAULT_NAME = "mm_projector.bin"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
CHUNK_BYTES = 2**20
ALIGN = 64  # torch's record alignment: what lets a memory-mapped load map tensors in place

# torch's typed-storage class names, as `torch.save` pickles them, and their dtypes.
STORAGE_DTYPES = {"HalfStorage": "float16", "BFloat16Storage": "bfloat16",
                  "FloatStorage": "float32", "DoubleStorage": "float64", "LongStorage": "int64",
                  "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
                  "ByteStorage": "uint8", "BoolStorage": "bool"}
STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_NAMES.items()}


@dataclass(frozen=True)
class Stored:
    """Where one tensor's elements lie in its file (offset in bytes, stride in elements)."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        return shape_numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    @property
    def contiguous(self) -> bool:
        return all(n == 1 or s == c for n, s, c in
                   zip(self.shape, self.stride, contiguous_strides(self.shape)))

    @property
    def extent(self) -> int:
        """Elements from the first to one past the last that the tensor touches."""
        if self.numel == 0:
            return 0
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))


@dataclass(frozen=True)
class Extraction:
    output: Path
    keys: tuple[str, ...]
    files_read: tuple[str, ...]
    files_total: int
    numel: int
    nbytes: int
    seconds: float

    def summary(self) -> dict:
        return {"output": str(self.output), "keys": list(self.keys),
                "files_read": list(self.files_read), "files_total": self.files_total,
                "numel": self.numel, "nbytes": self.nbytes, "work_s": self.seconds}


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


# --- reading .bin (torch zip) shards without torch -------------------------------------------

class _StorageType:
    def __init__(self, dtype: str):
        self.dtype = dtype


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_ignored):
    return data


class _WeightsUnpickler(pickle.Unpickler):
    """Knows only the globals `torch.save` writes for tensors in a dict; refuses all others."""

    GLOBALS: ClassVar[dict] = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                               ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                               ("collections", "OrderedDict"): collections.OrderedDict}

    def find_class(self, module: str, name: str):
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if (module, name) not in self.GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return self.GLOBALS[(module, name)]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        return _StorageRef(str(pid[2]), pid[1].dtype)


def _unpickle_state(path: Path, data: bytes) -> dict[str, _TensorRef]:
    try:
        state = _WeightsUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001 - hostile bytes can raise anything; all are bad input
        raise CheckpointError(f"{path}: holds objects that are not plain weights; refusing to "
                              f"unpickle it ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensor names to tensors, got "
                              f"{type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, _TensorRef) \
                or not isinstance(value.storage, _StorageRef):
            raise CheckpointError(f"{path}: entry {key!r} is not a tensor under a string name")
    return state


def _record_offset(f, path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored record's bytes start: after its local header, whose extra field (torch's
    alignment padding) the central directory does not repeat."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{path}: record {info.filename} is compressed; torch writes "
                              "tensors stored")
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: record {info.filename} has no valid local header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


def torch_zip_tensors(path: Path) -> dict[str, Stored]:
    """Every tensor of a `torch.save` zip file, located without reading tensor data."""
    path = Path(path)
    # Unbuffered: each local header is a 30-byte read, not a buffer's worth of tensor data.
    with open(path, "rb", buffering=0) as f:
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a zip-format torch checkpoint, truncated or "
                                  f"corrupt ({exc})") from None
        with zf:
            pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pkl:
                raise CheckpointError(f"{path}: zip file without a data.pkl record; not a "
                                      "torch checkpoint")
            prefix = pkl[0][: -len("data.pkl")]
            if f"{prefix}byteorder" in zf.namelist() \
                    and zf.read(f"{prefix}byteorder").strip() != b"little":
                raise CheckpointError(f"{path}: big-endian checkpoint; only little-endian "
                                      "files are supported")
            try:
                state = _unpickle_state(path, zf.read(pkl[0]))
            except zipfile.BadZipFile as exc:
                raise CheckpointError(f"{path}: corrupt data.pkl record ({exc})") from None
            return _locate(f, zf, path, prefix, state)


def _locate(f, zf: zipfile.ZipFile, path: Path, prefix: str,
            state: dict[str, _TensorRef]) -> dict[str, Stored]:
    records: dict[str, tuple[int, int]] = {}
    out = {}
    for key, ref in state.items():
        skey = ref.storage.key
        if skey not in records:
            try:
                info = zf.getinfo(f"{prefix}data/{skey}")
            except KeyError:
                raise CheckpointError(f"{path}: {key} refers to storage {skey}, which has no "
                                      "record in the file") from None
            records[skey] = (_record_offset(f, path, info), info.file_size)
        start, size = records[skey]
        itemsize = DTYPE_BYTES[ref.storage.dtype]
        stored = Stored(key, ref.storage.dtype, ref.shape, path, start + ref.offset * itemsize,
                        ref.stride)
        if len(ref.stride) != len(ref.shape) or min((ref.offset, *ref.shape, *ref.stride)) < 0 \
                or (ref.offset + stored.extent) * itemsize > size:
            raise CheckpointError(f"{path}: {key} reaches past its storage record "
                                  "(truncated or corrupt)")
        out[key] = stored
    return out


# --- reading safetensors shards --------------------------------------------------------------

def safetensors_tensors(path: Path) -> dict[str, Stored]:
    """Every tensor of a safetensors file with its byte offset, from the header alone."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: truncated or not safetensors ({size} bytes, header "
                                  f"length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") \
                from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return {key: _safetensors_entry(path, key, entry, 8 + n, size)
            for key, entry in header.items()}


def _safetensors_entry(path: Path, key: str, entry, base: int, size: int) -> Stored:
    try:
        dtype = SAFETENSORS_NAMES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        start, stop = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: header entry for {key} lacks a known dtype, a shape or "
                              "data_offsets") from None
    stored = Stored(key, dtype, shape, path, base + start, contiguous_strides(shape))
    if min((start, *shape), default=0) < 0 or stop - start != stored.nbytes \
            or base + stop > size:
        raise CheckpointError(f"{path}: {key} spans bytes {start}..{stop}, which does not fit "
                              f"its shape {list(shape)} {dtype} and the file's {size} bytes")
    return stored


def tensors_in(path: Path, fmt: str) -> dict[str, Stored]:
    return safetensors_tensors(path) if fmt == "safetensors" else torch_zip_tensors(path)


# --- streaming tensor bytes ------------------------------------------------------------------

def tensor_chunks(t: Stored) -> Iterator[memoryview]:
    """The tensor's bytes in row-major element order, a few MiB at a time."""
    if not t.contiguous:
        yield from _gathered(t)
        return
    buf = memoryview(bytearray(min(CHUNK_BYTES, t.nbytes)))
    with open(t.path, "rb", buffering=0) as f:
        f.seek(t.offset)
        left = t.nbytes
        while left:
            n = f.readinto(buf[:min(left, len(buf))])
            if not n:
                raise CheckpointError(f"{t.path}: truncated inside {t.key}")
            yield buf[:n]
            left -= n


def _gathered(t: Stored) -> Iterator[memoryview]:
    """A strided tensor (a view saved with its base storage) gathered into element order."""
    import numpy as np

    itemsize = DTYPE_BYTES[t.dtype]
    raw = np.memmap(t.path, dtype=f"u{itemsize}", mode="r", offset=t.offset,
                    shape=(t.extent,))
    view = np.lib.stride_tricks.as_strided(raw, shape=t.shape,
                                           strides=[s * itemsize for s in t.stride])
    yield memoryview(np.ascontiguousarray(view)).cast("B")


# --- writing -----------------------------------------------------------------------------

def _pickle_str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _pickle_int(n: int) -> bytes:
    if 0 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def _pickle_tuple(items: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(_pickle_int(i) for i in items) + b"t"


def state_pickle(tensors: list[Stored]) -> bytes:
    """The `data.pkl` torch.save writes for a plain dict of contiguous tensors, storage i
    holding tensor i (protocol 2, the same opcodes torch.load's weights-only unpickler takes)."""
    out = bytearray(b"\x80\x02}(")
    for i, t in enumerate(tensors):
        storage = STORAGE_NAMES.get(t.dtype)
        if storage is None:
            raise CheckpointError(f"{t.path}: {t.key} is {t.dtype}, which a .bin output cannot "
                                  "hold; write .safetensors instead")
        out += _pickle_str(t.key) + b"ctorch._utils\n_rebuild_tensor_v2\n("
        out += (b"(" + _pickle_str("storage") + f"ctorch\n{storage}\n".encode()
                + _pickle_str(str(i)) + _pickle_str("cpu") + _pickle_int(t.numel) + b"tQ")
        out += _pickle_int(0) + _pickle_tuple(t.shape) + _pickle_tuple(contiguous_strides(t.shape))
        out += b"\x89ccollections\nOrderedDict\n)RtR"
    return bytes(out + b"u.")


def _zip_record(zf: zipfile.ZipFile, raw, name: str, size: int,
                chunks: Iterator[bytes | memoryview]) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.file_size = size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule; it appends 20 bytes then
    # Pad the local header's extra field (id 'FB', as torch does) so the data starts aligned.
    pad = -(raw.tell() + 30 + len(name.encode()) + 4 + (20 if zip64 else 0)) % ALIGN
    info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
    with zf.open(info, "w", force_zip64=zip64) as w:
        for chunk in chunks:
            w.write(chunk)


def write_torch_zip(path: Path, tensors: list[Stored], archive: str) -> None:
    """A `.bin` that torch.load reads as it reads torch.save's files; `archive` is the record
    folder name (torch.save uses the file's stem)."""
    small = [("data.pkl", state_pickle(tensors)), (".format_version", b"1"),
             (".storage_alignment", str(ALIGN).encode()), ("byteorder", b"little")]
    with open(path, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as zf:
        for name, data in small:
            _zip_record(zf, raw, f"{archive}/{name}", len(data), iter([data]))
        for i, t in enumerate(tensors):
            _zip_record(zf, raw, f"{archive}/data/{i}", t.nbytes, tensor_chunks(t))
        _zip_record(zf, raw, f"{archive}/version", 2, iter([b"3\n"]))
        raw.flush()
        os.fsync(raw.fileno())


def write_safetensors(path: Path, tensors: list[Stored], archive: str = "") -> None:
    """safetensors' own layout: wider dtypes first, then by name; header padded to 8 bytes."""
    order = sorted(tensors, key=lambda t: (-DTYPE_BYTES[t.dtype], t.key))
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in order:
        header[t.key] = {"dtype": SAFETENSORS_CODES[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for t in order:
            f.writelines(tensor_chunks(t))
        f.flush()
        os.fsync(f.fileno())


Writer = Callable[[Path, list, str], None]


def writer_for(target: Path) -> Writer:
    suffix = target.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return write_safetensors
    if suffix in TORCH_SUFFIXES:
        return write_torch_zip
    raise CheckpointError(f"{target}: unknown output type {suffix or '(no extension)'}; name "
                          f"it {' / '.join(TORCH_SUFFIXES)} (torch) or .safetensors")


# --- the operation -----------------------------------------------------------------------

def output_path(output: Path) -> Path:
    """An existing folder gets `mm_projector.bin` inside it, as LLaVA's training names it."""
    output = Path(output)
    return output / DEFAULT_NAME if output.is_dir() else output


def _refuse_input_target(folder, target: Path) -> None:
    own = {*folder.files, folder.index_file, "config.json"}
    if target.parent.resolve() == folder.path.resolve() and target.name in own:
        raise CheckpointError(f"{target}: is one of the checkpoint's own files; refusing to "
                              "write over an input")


def select(folder, patterns: tuple[str, ...], held: dict) -> dict[str, list[str]]:
    """Matching keys by the file that holds them: from the index, else the single file's own
    directory (the only file there is; kept in `held` for the read)."""
    if folder.weight_map is not None:
        keys = {k: f for k, f in folder.weight_map.items() if any(p in k for p in patterns)}
    else:
        file = folder.files[0]
        held[file] = tensors_in(folder.path / file, folder.format)
        keys = {k: file for k in held[file] if any(p in k for p in patterns)}
    if not keys:
        where = folder.path / (folder.index_file or folder.files[0])
        raise CheckpointError(f"{where}: no tensor name contains {' or '.join(patterns)} "
                              "(an identity projector has no weights)")
    by_file: dict[str, list[str]] = {}
    for key, file in keys.items():
        by_file.setdefault(file, []).append(key)
    return by_file


def _stored(folder, by_file: dict[str, list[str]], held: dict) -> list[Stored]:
    out = []
    for file, keys in by_file.items():
        path = folder.path / file
        if file not in held:
            if not path.is_file():
                raise CheckpointError(f"{folder.path / folder.index_file}: names shard {file}, "
                                      "which does not exist")
            held[file] = tensors_in(path, folder.format)
        for key in keys:
            stored = held[file].get(key)
            if stored is None:
                raise CheckpointError(f"{path}: index lists {key} in this shard, but the shard "
                                      "does not hold it")
            if stored.numel == 0:
                raise CheckpointError(f"{path}: {key} has shape {list(stored.shape)}, no "
                                      "elements (a ZeRO-3 partition placeholder; save with the "
                                      "parameters gathered)")
            out.append(stored)
    return out


def extract(checkpoint: Path, output: Path, patterns: tuple[str, ...] = DEFAULT_KEYS,
            force: bool = False) -> Extraction:
    """Copy every tensor whose name contains one of `patterns` into `output` (.bin or
    .safetensors by extension), bit for bit, reading only the files and bytes that hold them."""
    start = time.perf_counter()
    if not patterns or not all(patterns):
        raise CheckpointError(f"{checkpoint}: --keys needs at least one non-empty name")
    folder = open_folder(checkpoint)
    target = output_path(output)
    write = writer_for(target)
    _refuse_input_target(folder, target)
    check_target(target, force)
    held: dict[str, dict[str, Stored]] = {}
    by_file = select(folder, tuple(patterns), held)
    tensors = _stored(folder, by_file, held)
    with atomic_file(target, force) as tmp:
        write(tmp, tensors, target.stem)
    return Extraction(target, tuple(t.key for t in tensors), tuple(by_file),
                      len(folder.files), sum(t.numel for t in tensors),
                      sum(t.nbytes for t in tensors), time.perf_counter() - start)
