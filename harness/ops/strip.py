"""Llama-2 backbone stripping, and the streaming shard rewriting it (and `convert`) stand on.

`strip`: a LLaVA checkpoint (original or llava-hf layout) -> a plain Llama/Mistral folder that
`LlamaForCausalLM` / `MistralForCausalLM.from_pretrained` loads. Which tensors go is decided by
one declarative key map (harness/keys.py): the projector, vision tower, resampler and
image_newline always, the legacy `rotary_emb.inv_freq` buffers unless asked to keep them.

Never holds a shard in memory, and never imports torch: tensors are located from headers (the
safetensors JSON header; for `.bin`, the zip directory and a restricted unpickling of `data.pkl`
that resolves nothing but tensor records), then copied file-to-file with `copy_file_range`.
A shard with nothing to drop or rename is hard-linked (copied where the filesystem can't link);
a `.bin` shard is rewritten as a new zip whose storage records are copied whole with their
known CRCs. The result is validated strictly (key set, shapes and dtypes against the target
class on the meta device) before the atomic output folder appears.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import pickle
import shutil
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import keys
from ..checkpoint.atomic import atomic_dir
from ..checkpoint.reader import (
    SAFETENSORS_NAMES,
    CheckpointError,
    CheckpointFolder,
    open_folder,
    safetensors_header,
)
from ..errors import HarnessError
from ..layout import DTYPE_BYTES, shape_numel
from ..plan import INDEX_NAMES, shard_name

SAFETENSORS_CODES = {v: k for k, v in SAFETENSORS_NAMES.items()}
# torch.save names a storage by its legacy typed class; these are the ones weights use.
STORAGE_DTYPES = {"HalfStorage": "float16", "BFloat16Storage": "bfloat16",
                  "FloatStorage": "float32", "DoubleStorage": "float64", "LongStorage": "int64",
                  "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
                  "ByteStorage": "uint8", "BoolStorage": "bool"}
STORAGE_CLASSES = {v: k for k, v in STORAGE_DTYPES.items()}
# Files beside the weights that a plain language-model folder keeps.
LM_AUX_FILES = ("generation_config.json", "tokenizer.model", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
_COPY_CHUNK = 1 << 30
_READ_CHUNK = 8 << 20


class StripError(HarnessError):
    """A checkpoint that cannot be stripped, or a stripped result that fails validation."""


# --- where a tensor's bytes are ----------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Part of an output tensor's bytes: a range of a file, or literal bytes."""

    path: Path | None
    offset: int
    nbytes: int
    data: bytes | None = None


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
class Source:
    """One tensor: its name, dtype, shape, and where its bytes are (contiguous pieces; for a
    `.bin` tensor also its storage record and its view into it)."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...] | None
    storage: BinStorage | None = None
    view: tuple[int, tuple[int, ...], tuple[int, ...]] | None = None

    @property
    def numel(self) -> int:
        return shape_numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    def renamed(self, key: str) -> Source:
        return dataclasses.replace(self, key=key)

    def byte_pieces(self, where: Path) -> tuple[Piece, ...]:
        if self.pieces is None:
            raise CheckpointError(f"{where}: {self.key} is a strided view of its storage; "
                                  "only contiguous tensors can be streamed to another format")
        return self.pieces


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    # Dimensions of size 1 may carry any stride.
    return all(s == c for d, s, c in zip(shape, stride, contiguous_strides(shape)) if d != 1)


# --- reading .bin (torch zip) without torch ---------------------------------------------------


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class _Refused(Exception):
    pass


_PICKLE_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
                   ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                   ("collections", "OrderedDict"): OrderedDict}


class _TensorRecords(pickle.Unpickler):
    """Unpickles a torch `data.pkl` into tensor records: resolves only the tensor rebuild
    functions, OrderedDict and storage types, and loads no storage."""

    def find_class(self, module, name):
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if (module, name) in _PICKLE_GLOBALS:
            return _PICKLE_GLOBALS[(module, name)]
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise _Refused(f"persistent id {pid!r}")
        return _StorageRef(str(pid[2]), pid[1].dtype, int(pid[4]))


def _tensor_records(path: Path, raw: bytes) -> dict[str, _TensorRef]:
    try:
        state = _TensorRecords(io.BytesIO(raw)).load()
    except _Refused as exc:
        raise CheckpointError(f"{path}: data.pkl holds {exc}, not plain weights; refusing to "
                              "unpickle it") from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: data.pkl is not a readable tensor pickle ({exc})") \
            from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensor names to tensors, got "
                              f"{type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, _TensorRef):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a "
                                  "tensor under a string name")
    return state


def _data_offset(fh, info: zipfile.ZipInfo, path: Path) -> int:
    fh.seek(info.header_offset)
    head = fh.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: record {info.filename} has no local header at "
                              f"{info.header_offset}; truncated or corrupt")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


def scan_bin(path: Path) -> dict[str, Source]:
    """Every tensor of a `.bin` shard with the location of its bytes, in pickle order."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a torch zip checkpoint, truncated or corrupt "
                              f"({exc})") from None
    with archive, open(path, "rb") as fh:
        infos = {info.filename: info for info in archive.infolist()}
        pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: expected one <archive>/data.pkl record, found "
                                  f"{len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        state = _tensor_records(path, archive.read(pickles[0]))
        size = os.fstat(fh.fileno()).st_size
        storages: dict[str, BinStorage] = {}
        out = {}
        for key, ref in state.items():
            storage = storages.get(ref.storage.key)
            if storage is None:
                storage = _bin_storage(path, fh, size, infos, prefix, ref.storage)
                storages[ref.storage.key] = storage
            out[key] = _bin_source(path, key, ref, storage)
        return out


def _bin_storage(path: Path, fh, size: int, infos: dict, prefix: str,
                 ref: _StorageRef) -> BinStorage:
    info = infos.get(f"{prefix}data/{ref.key}")
    if info is None:
        raise CheckpointError(f"{path}: data.pkl names storage {ref.key}, which has no record")
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{path}: record {info.filename} is compressed; torch writes "
                              "storages uncompressed")
    nbytes = ref.numel * DTYPE_BYTES[ref.dtype]
    if info.file_size != nbytes:
        raise CheckpointError(f"{path}: record {info.filename} holds {info.file_size} bytes, "
                              f"its storage needs {nbytes}")
    offset = _data_offset(fh, info, path)
    if offset + nbytes > size:
        raise CheckpointError(f"{path}: truncated: record {info.filename} ends at byte "
                              f"{offset + nbytes}, the file has {size}")
    return BinStorage(path, ref.key, offset, nbytes, info.CRC, ref.dtype, ref.numel)


def _bin_source(path: Path, key: str, ref: _TensorRef, storage: BinStorage) -> Source:
    itemsize = DTYPE_BYTES[storage.dtype]
    numel = shape_numel(ref.shape)
    span = ref.offset + sum((d - 1) * s for d, s in zip(ref.shape, ref.stride)) + 1
    if numel and (ref.offset < 0 or span > storage.numel):
        raise CheckpointError(f"{path}: {key} reaches past the end of its storage "
                              f"{storage.name}")
    pieces = None
    if _is_contiguous(ref.shape, ref.stride):
        pieces = (Piece(path, storage.offset + ref.offset * itemsize, numel * itemsize),)
    return Source(key, storage.dtype, ref.shape, pieces, storage,
                  (ref.offset, ref.shape, ref.stride))


# --- reading safetensors --------------------------------------------------------------------


def scan_safetensors(path: Path) -> tuple[dict[str, Source], dict | None]:
    """Every tensor of a safetensors file with its byte range, in data order; and the
    header's `__metadata__`."""
    safetensors_header(path)  # the reader's checks: lengths, JSON, entries, truncation
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    metadata = header.pop("__metadata__", None)
    out = {}
    for key, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, stop = (int(x) for x in entry["data_offsets"])
        dtype = SAFETENSORS_NAMES.get(entry["dtype"])
        shape = tuple(int(d) for d in entry["shape"])
        if dtype is None:
            raise CheckpointError(f"{path}: {key} has dtype {entry['dtype']}, which this "
                                  "harness does not handle")
        source = Source(key, dtype, shape, (Piece(path, 8 + n + start, stop - start),))
        if source.nbytes != stop - start:
            raise CheckpointError(f"{path}: {key} spans {stop - start} bytes, its shape and "
                                  f"dtype need {source.nbytes}")
        out[key] = source
    return out, metadata


@dataclass
class ScannedFolder:
    folder: CheckpointFolder
    files: dict[str, dict[str, Source]]
    metadata: dict[str, dict | None]

    @property
    def tensors(self) -> dict[str, Source]:
        return {k: s for sources in self.files.values() for k, s in sources.items()}


def scan_folder(path: Path) -> ScannedFolder:
    """Every tensor's location, file by file, checked against the index."""
    folder = open_folder(path)
    files, metadata = {}, {}
    for file in folder.files:
        shard = folder.path / file
        if not shard.is_file():
            raise CheckpointError(f"{folder.path / (folder.index_file or file)}: names shard "
                                  f"{file}, which does not exist")
        if folder.format == "safetensors":
            files[file], metadata[file] = scan_safetensors(shard)
        else:
            files[file], metadata[file] = scan_bin(shard), None
    _check_index(folder, files)
    return ScannedFolder(folder, files, metadata)


def _check_index(folder: CheckpointFolder, files: dict[str, dict[str, Source]]) -> None:
    if folder.weight_map is None:
        return
    index = folder.path / folder.index_file
    for file, sources in files.items():
        for key in sources:
            if folder.weight_map.get(key) != file:
                raise CheckpointError(f"{folder.path / file}: holds {key}, which {index.name} "
                                      f"maps to {folder.weight_map.get(key)}")
    for key, file in folder.weight_map.items():
        if key not in files[file]:
            raise CheckpointError(f"{index}: lists {key} in {file}, which does not hold it")


# --- writing -------------------------------------------------------------------------------


_NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM)


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


class _Output:
    """A new file written through its descriptor; file ranges are copied in the kernel
    (`copy_file_range`), falling back to read/write where the kernel or filesystem refuses."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.pos = 0
        self._sources: dict[Path, int] = {}
        self._in_kernel = True

    def write(self, data) -> None:
        _write_all(self.fd, data)
        self.pos += len(data)

    def put(self, piece: Piece) -> None:
        if piece.data is not None:
            self.write(piece.data)
            return
        src, done = self._source(piece.path), 0
        while done < piece.nbytes:
            n = self._copy_some(src, piece.offset + done, min(piece.nbytes - done, _COPY_CHUNK))
            if n == 0:
                raise CheckpointError(f"{piece.path}: ends before byte {piece.offset + done}; "
                                      "truncated while being read?")
            done += n
        self.pos += piece.nbytes

    def _source(self, path: Path) -> int:
        if path not in self._sources:
            self._sources[path] = os.open(path, os.O_RDONLY)
        return self._sources[path]

    def _copy_some(self, src: int, offset: int, count: int) -> int:
        """Copy up to `count` bytes from `src` at `offset` to the end of this file."""
        if self._in_kernel:
            try:
                return os.copy_file_range(src, self.fd, count, offset)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                self._in_kernel = False
        data = os.pread(src, min(count, _READ_CHUNK), offset)
        _write_all(self.fd, data)
        return len(data)

    def put_with_crc(self, pieces: Iterable[Piece]) -> int:
        """Write pieces through user space, returning their CRC-32 (for new zip records)."""
        crc = 0
        for piece in pieces:
            for chunk in piece_chunks(piece):
                crc = zlib.crc32(chunk, crc)
                self.write(chunk)
        return crc

    def patch(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)

    def close(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
            for fd in self._sources.values():
                os.close(fd)


def piece_chunks(piece: Piece):
    if piece.data is not None:
        yield piece.data
        return
    with open(piece.path, "rb") as fh:
        fh.seek(piece.offset)
        left = piece.nbytes
        while left:
            chunk = fh.read(min(left, _READ_CHUNK))
            if not chunk:
                raise CheckpointError(f"{piece.path}: ends early; truncated while being read?")
            left -= len(chunk)
            yield chunk


def _safetensors_order(tensors: list[Source]) -> list[Source]:
    """Wider dtypes first, so every tensor stays aligned to its element size (safetensors'
    own rule); within a width, source order, so reads stay sequential."""
    return sorted(tensors, key=lambda t: -DTYPE_BYTES[t.dtype])


def write_safetensors(path: Path, tensors: list[Source], metadata: dict | None) -> None:
    ordered = _safetensors_order(tensors)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in ordered:
        header[t.key] = {"dtype": SAFETENSORS_CODES[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    out = _Output(path)
    try:
        out.write(len(raw).to_bytes(8, "little") + raw)
        for t in ordered:
            for piece in t.byte_pieces(path):
                out.put(piece)
    finally:
        out.close()


# A torch zip: stored records, data 64-byte aligned (torch's default), zip64 where needed.
_ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets from here on need zip64 fields
_SENTINEL = 0xFFFFFFFF  # what a 32-bit field says when the zip64 field holds the value
_ALIGN = 64
_PAGE = 4096


@dataclass
class _ZipEntry:
    name: bytes
    offset: int
    size: int
    crc: int


class _TorchZip:
    def __init__(self, out: _Output):
        self.out = out
        self.entries: list[_ZipEntry] = []

    def _local_header(self, name: bytes, size: int, crc: int, like: int | None) -> bytes:
        """`like`: the source offset of data copied whole. Its copy then starts at the same
        offset within a page (the kernel copies whole pages instead of splitting each one,
        ~10% faster measured here); any other data is 64-byte aligned, as torch writes it."""
        zip64 = size >= _ZIP64_LIMIT
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        base = self.out.pos + 30 + len(name) + len(extra) + 4
        pad = -base % _ALIGN if like is None or like % _ALIGN else (like - base) % _PAGE
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # 'FB' padding, as torch writes
        small = _SENTINEL if zip64 else size
        return struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, 0, 0, 0, 0, crc,
                           small, small, len(name), len(extra)) + name + extra

    def add(self, name: str, data: bytes) -> None:
        self._record(name, len(data), zlib.crc32(data), lambda: self.out.write(data))

    def add_copy(self, name: str, storage: BinStorage) -> None:
        piece = Piece(storage.path, storage.offset, storage.nbytes)
        self._record(name, storage.nbytes, storage.crc, lambda: self.out.put(piece),
                     like=storage.offset)

    def add_pieces(self, name: str, pieces: tuple[Piece, ...], size: int) -> None:
        """A new record whose CRC is computed while writing, then patched into its header."""
        start = self.out.pos
        self._record(name, size, 0, lambda: None)
        crc = self.out.put_with_crc(pieces)
        self.out.patch(start + 14, struct.pack("<I", crc))
        self.entries[-1].crc = crc

    def _record(self, name: str, size: int, crc: int, write: Callable[[], None],
                like: int | None = None) -> None:
        raw = name.encode()
        offset = self.out.pos
        self.out.write(self._local_header(raw, size, crc, like))
        write()
        self.entries.append(_ZipEntry(raw, offset, size, crc))

    def close(self) -> None:
        start = self.out.pos
        for e in self.entries:
            self.out.write(self._central_header(e))
        size = self.out.pos - start
        end = self.out.pos
        n = len(self.entries)
        self.out.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, size,
                                   start))
        self.out.write(struct.pack("<IIQI", 0x07064B50, 0, end, 1))
        self.out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(n, 0xFFFF),
                                   min(n, 0xFFFF), min(size, _SENTINEL),
                                   _SENTINEL if start >= _ZIP64_LIMIT else start, 0))

    @staticmethod
    def _central_header(e: _ZipEntry) -> bytes:
        big_size, big_offset = e.size >= _ZIP64_LIMIT, e.offset >= _ZIP64_LIMIT
        fields = ([e.size, e.size] if big_size else []) + ([e.offset] if big_offset else [])
        extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
        version = 45 if fields else 20
        size = _SENTINEL if big_size else e.size
        return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, version, version, 0, 0, 0, 0,
                           e.crc, size, size, len(e.name), len(extra), 0, 0, 0, 0,
                           _SENTINEL if big_offset else e.offset) + e.name + extra


# Pickle protocol 2, written opcode by opcode: the dict torch.save writes for a state dict,
# without importing torch to name its rebuild function and storage classes.
def _p_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + n.to_bytes(2, "little")
    if -(2**31) <= n < 2**31:
        return b"J" + n.to_bytes(4, "little", signed=True)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _p_str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def _p_tuple(items: Iterable[int]) -> bytes:
    return b"(" + b"".join(_p_int(i) for i in items) + b"t"


def state_pickle(entries: list[tuple[str, str, str, int, int, tuple, tuple]]) -> bytes:
    """`entries`: (key, storage name, dtype, storage numel, offset, shape, stride)."""
    out = bytearray(b"\x80\x02}(")
    for key, storage, dtype, numel, offset, shape, stride in entries:
        out += _p_str(key) + b"ctorch._utils\n_rebuild_tensor_v2\n("
        out += (b"(" + _p_str("storage") + f"ctorch\n{STORAGE_CLASSES[dtype]}\n".encode()
                + _p_str(storage) + _p_str("cpu") + _p_int(numel) + b"tQ")
        out += _p_int(offset) + _p_tuple(shape) + _p_tuple(stride) + b"\x89"
        out += b"ccollections\nOrderedDict\n)RtR"
    return bytes(out + b"u.")


def write_bin(path: Path, tensors: list[Source]) -> None:
    """A torch zip checkpoint: `.bin` storages copied whole (known CRC, in the kernel), any
    other tensor as a new record of its own bytes."""
    archive = path.name.rsplit(".", 1)[0]
    names: dict[tuple, str] = {}
    records: list[tuple[str, Source]] = []
    entries = []
    for t in tensors:
        ident = (t.storage.path, t.storage.name) if t.storage else ("new", t.key)
        if ident not in names:
            names[ident] = str(len(names))
            records.append((names[ident], t))
        if t.storage is not None:
            offset, shape, stride = t.view
            entries.append((t.key, names[ident], t.dtype, t.storage.numel, offset, shape,
                            stride))
        else:
            entries.append((t.key, names[ident], t.dtype, t.numel, 0, t.shape,
                            contiguous_strides(t.shape)))
    out = _Output(path)
    try:
        zf = _TorchZip(out)
        zf.add(f"{archive}/data.pkl", state_pickle(entries))
        for name, data in ((".format_version", b"1"), (".storage_alignment", b"64"),
                           ("byteorder", b"little")):
            zf.add(f"{archive}/{name}", data)
        crc = 0
        for name, t in records:
            if t.storage is not None:
                zf.add_copy(f"{archive}/data/{name}", t.storage)
            else:
                zf.add_pieces(f"{archive}/data/{name}", t.byte_pieces(path), t.nbytes)
            crc = zlib.crc32(zf.entries[-1].crc.to_bytes(4, "little"), crc)
        zf.add(f"{archive}/version", b"3\n")
        # torch writes a 40-digit id; here derived from the records, so output is reproducible.
        zf.add(f"{archive}/.data/serialization_id", f"{crc:020d}{out.pos:020d}".encode())
        zf.close()
    finally:
        out.close()


WRITERS = {"bin": lambda path, tensors, metadata: write_bin(path, tensors),
           "safetensors": write_safetensors}


# --- rewriting a folder's shards --------------------------------------------------------------


@dataclass
class OutShard:
    name: str
    tensors: list[Source]
    link_from: Path | None = None
    metadata: dict | None = None


Mapper = Callable[[str, Source], Source | None]


def plan_shards(scanned: ScannedFolder, mapper: Mapper, fmt: str) -> list[OutShard]:
    """Each source shard becomes an output shard of the tensors `mapper` keeps (renamed or
    rebuilt as it returns them); a shard it returns unchanged in full, in the same format, is
    linked. Shards left empty disappear, and names follow the new count and format."""
    shards = []
    for file, sources in scanned.files.items():
        kept = [t for t in (mapper(file, s) for s in sources.values()) if t is not None]
        same = (fmt == scanned.folder.format and len(kept) == len(sources)
                and all(t is s for t, s in zip(kept, sources.values())))
        if kept:
            shards.append(OutShard(file, kept, scanned.folder.path / file if same else None,
                                   scanned.metadata.get(file)))
    renumber = fmt != scanned.folder.format or len(shards) != len(scanned.files)
    if renumber:
        for i, shard in enumerate(shards):
            shard.name = shard_name(fmt, i, len(shards))
    return shards


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link `src` at `dst`; copy where the filesystem refuses. Returns what it did."""
    try:
        os.link(src, dst)
        return "linked"
    except OSError:
        shutil.copyfile(src, dst)
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return "copied"


def write_shards(out: Path, shards: list[OutShard], fmt: str, indexed: bool) -> dict:
    """Write (or link) every shard and the index; returns {shard: 'linked'|'copied'|
    'rewritten'}."""
    done = {}
    for shard in shards:
        if shard.link_from is not None:
            done[shard.name] = link_or_copy(shard.link_from, out / shard.name)
        else:
            WRITERS[fmt](out / shard.name, shard.tensors, shard.metadata)
            done[shard.name] = "rewritten"
    if indexed or len(shards) > 1:
        weight_map = {t.key: s.name for s in shards for t in s.tensors}
        total = sum(t.nbytes for s in shards for t in s.tensors)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_NAMES[fmt]).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return done


def copy_files(src: Path, out: Path, names: Iterable[str]) -> list[str]:
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied


# --- the strip operation ------------------------------------------------------------------------

# config.json fields that exist only for LLaVA: every `mm_*` (and `tune_mm_*`, `use_mm_proj`,
# ...), vision and image field, and LLaVA's training copies of the tokenizer settings.
_LLAVA_ONLY_FIELDS = {"tokenizer_model_max_length", "tokenizer_padding_side"}


def is_llava_config_field(name: str) -> bool:
    return ("mm_" in name or "vision" in name or name.startswith("image_")
            or name in _LLAVA_ONLY_FIELDS)


PLAIN_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


def arch_of(config: dict, layout: str, where: Path) -> str:
    if layout == "hf":
        arch = (config.get("text_config") or {}).get("model_type")
        if arch not in PLAIN_CLASSES:
            raise StripError(f"{where}: text_config.model_type {arch!r} is not llama or mistral")
        return arch
    from ..model.config import architecture_of

    return architecture_of(config, where)


def plain_config(config: dict, layout: str, arch: str) -> dict:
    """The language model's config.json: LLaVA fields out, Llama/Mistral identity in."""
    if layout == "hf":
        fields = dict(config["text_config"])
        for name in ("torch_dtype", "dtype", "transformers_version"):
            if name in config and name not in fields:
                fields[name] = config[name]
    else:
        # `_name_or_path` names the LLaVA model, which this no longer is.
        fields = {k: v for k, v in config.items()
                  if not is_llava_config_field(k) and k != "_name_or_path"}
    fields.update(model_type=arch, architectures=[PLAIN_CLASSES[arch]])
    return dict(sorted(fields.items()))


@dataclass
class StripResult:
    out: Path
    layout: str
    arch: str
    format: str
    kept: int
    dropped: list[str]
    shards: dict[str, str]
    files: list[str]
    total_size: int
    verified: bool


def strip_mapper(layout: str, keep_legacy_buffers: bool, folder: Path,
                 dropped: list[str]) -> Mapper:
    """layout -> canonical -> plain; appends every dropped source key to `dropped`."""
    to_canonical = keys.LAYOUT_MAPS[layout]

    def mapper(file: str, source: Source) -> Source | None:
        canonical = to_canonical(source.key, where=str(folder / file))
        target = keys.PLAIN(canonical, where=str(folder / file))
        if target is None or (keys.is_legacy_buffer(target) and not keep_legacy_buffers):
            dropped.append(source.key)
            return None
        return source if target == source.key else source.renamed(target)

    return mapper


def strip(ckpt: Path, out: Path, *, keep_legacy_buffers: bool = False,
          to_format: str | None = None, force: bool = False, verify: bool = True) -> StripResult:
    """Write the plain language model of the LLaVA checkpoint at `ckpt` to `out`."""
    scanned = scan_folder(Path(ckpt))
    folder = scanned.folder
    config = _read_config(folder.path)
    layout = keys.layout_of(config, scanned.tensors, where=str(folder.path))
    arch = arch_of(config, layout, folder.path / "config.json")
    fmt = to_format or folder.format
    dropped: list[str] = []
    shards = plan_shards(scanned, strip_mapper(layout, keep_legacy_buffers, folder.path,
                                               dropped), fmt)
    if not shards:
        raise StripError(f"{folder.path}: no language-model tensor left after stripping")
    with atomic_dir(Path(out), force) as tmp:
        done = write_shards(tmp, shards, fmt, indexed=folder.index_file is not None)
        (tmp / "config.json").write_text(json.dumps(plain_config(config, layout, arch),
                                                    indent=2, sort_keys=True) + "\n")
        files = copy_files(folder.path, tmp, LM_AUX_FILES)
        if verify:
            problems = strict_problems(tmp, allow_legacy=keep_legacy_buffers)
            if problems:
                raise StripError(f"stripped result fails validation ({len(problems)} "
                                 f"problem(s)); first: {problems[0]}")
    return StripResult(Path(out), layout, arch, fmt, sum(len(s.tensors) for s in shards),
                       sorted(dropped), done, files,
                       sum(t.nbytes for s in shards for t in s.tensors), verify)


def _read_config(folder: Path) -> dict:
    from ..model.config import read_config_json

    return read_config_json(folder)


# --- strict validation ----------------------------------------------------------------------


def config_problems(folder: Path, config: dict) -> list[str]:
    where = folder / "config.json"
    problems = [f"{where}: LLaVA-only field {name!r} is still present"
                for name in sorted(config) if is_llava_config_field(name)]
    arch = config.get("model_type")
    if arch not in PLAIN_CLASSES:
        problems.append(f"{where}: model_type {arch!r}, expected llama or mistral")
    elif config.get("architectures") != [PLAIN_CLASSES[arch]]:
        problems.append(f"{where}: architectures {config.get('architectures')!r}, expected "
                        f"[{PLAIN_CLASSES[arch]!r}]")
    return problems


def expected_state(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) of the config's own class, instantiated on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in model.state_dict().items()}


def _legacy_problems(folder: Path, found: dict[str, Source], config: dict) -> list[str]:
    layers = config.get("num_hidden_layers", 0)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    problems = []
    for key, source in sorted(found.items()):
        layer = int(key.split(".")[2])
        if layer >= layers or source.shape != (head_dim // 2,) or source.dtype != "float32":
            problems.append(f"{folder}: legacy buffer {key} is {source.dtype}"
                            f"{list(source.shape)}, expected float32[{head_dim // 2}] for one "
                            f"of {layers} layers")
    return problems


def strict_problems(folder: Path, allow_legacy: bool = False) -> list[str]:
    """Everything that keeps `folder` from being exactly the plain language model: LLaVA
    config fields, and any key missing, unexpected, or of the wrong shape or dtype against
    the target class's state dict on the meta device. Legacy inv_freq buffers pass only when
    allowed (transformers ignores them; the check does not)."""
    folder = Path(folder)
    try:
        found = scan_folder(folder).tensors
    except CheckpointError as exc:
        return [str(exc)]
    config = json.loads((folder / "config.json").read_text())
    problems = config_problems(folder, config)
    if problems:
        return problems
    expected = expected_state(folder)
    legacy = {k: s for k, s in found.items() if keys.is_legacy_buffer(k)} if allow_legacy else {}
    problems += _legacy_problems(folder, legacy, config)
    for key in sorted(expected.keys() - found.keys()):
        problems.append(f"{folder}: missing {key}")
    for key in sorted(found.keys() - expected.keys() - legacy.keys()):
        problems.append(f"{folder}: unexpected {key}")
    for key in sorted(expected.keys() & found.keys()):
        shape, dtype = expected[key]
        got = found[key]
        if (got.shape, got.dtype) != (shape, dtype):
            problems.append(f"{folder}: {key} is {got.dtype}{list(got.shape)}, the model "
                            f"expects {dtype}{list(shape)}")
    return problems


def parameter_count(folder: Path) -> int:
    """Parameters from headers alone (legacy buffers are not parameters)."""
    return sum(s.numel for k, s in scan_folder(Path(folder)).tensors.items()
               if not keys.is_legacy_buffer(k))
