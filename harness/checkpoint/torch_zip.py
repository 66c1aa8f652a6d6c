"""`.bin` (torch zip) checkpoints: the one restricted reader, without torch, and the one writer.

Reading trusts nothing: the zip must be a torch archive with one stored (not compressed)
`data.pkl` of bounded size, little-endian; the pickle is run by a pure-Python unpickler that
accepts only the opcodes `torch.save` writes for a dict of tensors, bounded in count and
nesting, resolves only tensor-rebuild functions, OrderedDict and storage classes, checks every
dict key is a string before inserting it (a crafted key of nested shared tuples would take
exponential time to hash), and type-checks every rebuild argument. Each storage must be a
stored record of exactly the bytes its dtype and element count need, inside the file, and
each tensor's view must lie inside its storage.

Writing produces what `torch.load(weights_only=True, mmap=True)` reads as it reads
`torch.save`'s files. Tensors copied from checkpoints are written without torch: stored
records, data 64-byte aligned, zip64 where needed; `.bin` storages are copied whole (their CRC
is known, the copy stays in the kernel), any other tensor becomes a record of its own bytes.
New tensors (the builder's, the merge's) stream through torch's own record writer, so their
file is what `torch.save` writes of the same state dict.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .files import DEFAULT_MODE, Output, fsync_path
from .formats import DTYPE_BYTES, Chunks, Entry, Progress, shape_numel
from .crc import combined
from .problems import CheckpointError, shown
from .tensors import (STORAGE_CLASSES, STORAGE_DTYPES, BinStorage, Piece, Source,
                      contiguous_strides, is_contiguous)


MAX_PICKLE_BYTES = 64 << 20  # a 13B's data.pkl is ~60 KB
MAX_PICKLE_OPS = 5_000_000
MAX_MARK_DEPTH = 12  # torch's pickles nest 4 deep
MAX_RECORDS = 200_000
# What torch.save writes for a dict of tensors (protocol 2), and nothing else.
ALLOWED_OPCODES = {
    "PROTO", "STOP", "MARK", "EMPTY_DICT", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "SETITEM", "SETITEMS", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "GLOBAL",
    "STACK_GLOBAL", "BINPERSID", "REDUCE", "BUILD", "BININT", "BININT1", "BININT2", "LONG1",
    "NEWTRUE", "NEWFALSE", "NONE", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET", "MEMOIZE",
    "BINFLOAT", "EMPTY_LIST", "APPEND", "APPENDS"}


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


class _Refused(Exception):
    pass


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise _Refused(f"a tensor {what} that is not a tuple of non-negative integers")
    return value


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_rest):
    if not isinstance(storage, _StorageRef):
        raise _Refused("a tensor whose storage is not a storage record")
    if not isinstance(storage_offset, int) or isinstance(storage_offset, bool) \
            or storage_offset < 0:
        raise _Refused("a tensor with a negative or non-integer storage offset")
    shape, stride = _ints(size, "shape"), _ints(stride, "stride")
    if len(shape) != len(stride):
        raise _Refused("a tensor whose shape and stride differ in length")
    return _TensorRef(storage, storage_offset, shape, stride)


def _rebuild_parameter(data, *_rest):
    return data


_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("collections", "OrderedDict"): OrderedDict}


class _TensorRecords(pickle._Unpickler):
    """The pure-Python unpickler (so dict insertion can be checked) restricted to tensors."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[4], int) and not isinstance(pid[4], bool) and pid[4] >= 0):
            raise _Refused("a persistent id that is not a storage record")
        return _StorageRef(pid[2], pid[1].dtype, pid[4])

    def _check_keys(self, items) -> None:
        for key in items[::2]:
            if not isinstance(key, str):
                raise _Refused(f"a dict key that is a {type(key).__name__}, not a string")

    def load_setitems(self):
        items = self.pop_mark()
        self._check_keys(items)
        target = self.stack[-1]
        if not isinstance(target, dict):
            raise _Refused("items set on something that is not a dict")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._check_keys([key])
        if not isinstance(self.stack[-1], dict):
            raise _Refused("an item set on something that is not a dict")
        self.stack[-1][key] = value

    def load_build(self):
        state = self.stack.pop()
        target = self.stack[-1]
        # OrderedDict state dicts carry `_metadata` this way; nothing else is built.
        if not (isinstance(target, OrderedDict) and isinstance(state, dict)
                and set(state) <= {"_metadata"}):
            raise _Refused("object state other than a state dict's _metadata")
        target.__dict__.update(state)

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if func not in _GLOBALS.values() or not isinstance(args, tuple):
            raise _Refused("a call of something other than a tensor rebuild or OrderedDict")
        self.stack[-1] = func(*args)

    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.REDUCE[0]] = load_reduce


def _check_opcodes(raw: bytes) -> None:
    depth = count = 0
    for op, _arg, _pos in pickletools.genops(raw):
        count += 1
        if op.name not in ALLOWED_OPCODES:
            raise _Refused(f"pickle opcode {op.name}")
        if op.name == "MARK":
            depth += 1
            if depth > MAX_MARK_DEPTH:
                raise _Refused(f"nesting deeper than {MAX_MARK_DEPTH}")
        elif op.name in ("TUPLE", "SETITEMS", "APPENDS"):
            depth -= 1
        if count > MAX_PICKLE_OPS:
            raise _Refused(f"more than {MAX_PICKLE_OPS} pickle operations")


def tensor_records(path: Path, raw: bytes) -> dict[str, _TensorRef]:
    try:
        _check_opcodes(raw)
        state = _TensorRecords(io.BytesIO(raw)).load()
    except _Refused as exc:
        raise CheckpointError(f"{shown(path)}: data.pkl holds {shown(exc)}, not plain "
                              "weights; refusing to unpickle it") from None
    except Exception as exc:  # noqa: BLE001 - hostile bytes can raise anything: all bad input
        raise CheckpointError(f"{shown(path)}: data.pkl is not a readable tensor pickle "
                              f"({type(exc).__name__}: {shown(str(exc)[:200])})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{shown(path)}: expected a dict of tensor names to tensors, "
                              f"got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(value, _TensorRef):
            raise CheckpointError(f"{shown(path)}: entry {shown(key)} is a "
                                  f"{type(value).__name__}, not a tensor")
    return state


def _data_offset(fh, info: zipfile.ZipInfo, path: Path) -> int:
    fh.seek(info.header_offset)
    head = fh.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{shown(path)}: record {shown(info.filename)} has no local "
                              f"header at {info.header_offset}; truncated or corrupt")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _stored(path: Path, info: zipfile.ZipInfo) -> None:
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{shown(path)}: record {shown(info.filename)} is compressed; "
                              "torch writes every record stored")


def _pickle_of(path: Path, archive: zipfile.ZipFile, infos: dict) -> tuple[str, bytes]:
    pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointError(f"{shown(path)}: expected one <archive>/data.pkl record, found "
                              f"{len(pickles)}; not a torch checkpoint")
    info = infos[pickles[0]]
    _stored(path, info)
    if info.file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{shown(path)}: data.pkl is {info.file_size} bytes, over the "
                              f"{MAX_PICKLE_BYTES} byte limit for a tensor directory")
    prefix = pickles[0][: -len("data.pkl")]
    order = infos.get(f"{prefix}byteorder")
    if order is not None:
        _stored(path, order)
        if order.file_size > 16 or archive.read(order).strip() != b"little":
            raise CheckpointError(f"{shown(path)}: not little-endian; only little-endian "
                                  "checkpoints are read")
    return prefix, archive.read(info)


def scan_bin(path: Path, label: Path | None = None) -> dict[str, Source]:
    """Every tensor of a `.bin` shard with the location of its bytes, in pickle order.
    `label`: the name the folder gives the file (a link inside it), for messages."""
    real = Path(path)
    path = Path(label or path)
    try:
        archive = zipfile.ZipFile(real)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{shown(path)}: not a readable torch zip checkpoint, truncated "
                              f"or corrupt ({shown(exc)})") from None
    with archive, open(real, "rb") as fh:
        entries = archive.infolist()
        if len(entries) > MAX_RECORDS:
            raise CheckpointError(f"{shown(path)}: {len(entries)} zip records, over the "
                                  f"{MAX_RECORDS} limit")
        infos = {info.filename: info for info in entries}
        try:
            prefix, raw = _pickle_of(path, archive, infos)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise CheckpointError(f"{shown(path)}: corrupt record ({shown(exc)})") from None
        state = tensor_records(path, raw)
        size = os.fstat(fh.fileno()).st_size
        storages: dict[str, BinStorage] = {}
        out = {}
        for key, ref in state.items():
            storage = storages.get(ref.storage.key)
            if storage is None:
                storage = _bin_storage(path, fh, size, infos, prefix, ref.storage, real)
                storages[ref.storage.key] = storage
            elif (storage.dtype, storage.numel) != (ref.storage.dtype, ref.storage.numel):
                raise CheckpointError(f"{shown(path)}: storage {shown(storage.name)} is named "
                                      "with two different dtypes or sizes")
            out[key] = _bin_source(path, key, ref, storage)
        return out


def _bin_storage(path: Path, fh, size: int, infos: dict, prefix: str, ref: _StorageRef,
                 real: Path) -> BinStorage:
    info = infos.get(f"{prefix}data/{ref.key}")
    if info is None:
        raise CheckpointError(f"{shown(path)}: data.pkl names storage {shown(ref.key)}, which "
                              "has no record")
    _stored(path, info)
    nbytes = ref.numel * DTYPE_BYTES[ref.dtype]
    if info.file_size != nbytes:
        raise CheckpointError(f"{shown(path)}: record {shown(info.filename)} holds "
                              f"{info.file_size} bytes, its storage needs {nbytes}")
    offset = _data_offset(fh, info, path)
    if offset + nbytes > size:
        raise CheckpointError(f"{shown(path)}: truncated: record {shown(info.filename)} ends "
                              f"at byte {offset + nbytes}, the file has {size}")
    return BinStorage(real, ref.key, offset, nbytes, info.CRC, ref.dtype, ref.numel)


def _bin_source(path: Path, key: str, ref: _TensorRef, storage: BinStorage) -> Source:
    itemsize = DTYPE_BYTES[storage.dtype]
    numel = shape_numel(ref.shape)
    span = ref.offset + sum((d - 1) * s for d, s in zip(ref.shape, ref.stride)) + 1
    if numel and span > storage.numel:
        raise CheckpointError(f"{shown(path)}: {shown(key)} reaches past the end of its "
                              f"storage {shown(storage.name)}")
    pieces = None
    if is_contiguous(ref.shape, ref.stride):
        pieces = (Piece(storage.path, storage.offset + ref.offset * itemsize,
                        numel * itemsize),)
    return Source(key, storage.dtype, ref.shape, pieces, storage,
                  (ref.offset, ref.shape, ref.stride), file=path.name)


# --- writing ----------------------------------------------------------------------------

_ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets from here on need zip64 fields
_SENTINEL = 0xFFFFFFFF  # what a 32-bit field says when the zip64 field holds the value
_ALIGN = 64
_PAGE = 4096
# The records torch.save writes between data.pkl and the storages (only little-endian is read).
_HEAD_RECORDS = ((".format_version", b"1"), (".storage_alignment", str(_ALIGN).encode()),
                 ("byteorder", b"little"))


@dataclass
class _ZipEntry:
    name: bytes
    offset: int
    size: int
    crc: int


class _TorchZip:
    def __init__(self, out: Output):
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

    def add_known(self, name: str, pieces: tuple[Piece, ...], size: int) -> None:
        """A new record of pieces whose CRCs are all known (whole stored records): its CRC
        combined from theirs, its bytes copied in the kernel."""
        crc = combined([(p.crc, p.nbytes) for p in pieces])
        self._record(name, size, crc, lambda: [self.out.put(p) for p in pieces])

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


def _storage_class(key: str, dtype: str) -> str:
    """The legacy storage class torch.save names a `dtype` tensor's storage by."""
    if dtype not in STORAGE_CLASSES:
        raise CheckpointError(f"{shown(key)} is {dtype}, which a .bin file cannot hold; "
                              "write .safetensors instead")
    return STORAGE_CLASSES[dtype]


def state_pickle(entries: list[tuple[str, str, str, int, int, tuple, tuple]]) -> bytes:
    """`entries`: (key, storage name, dtype, storage numel, offset, shape, stride)."""
    out = bytearray(b"\x80\x02}(")
    for key, storage, dtype, numel, offset, shape, stride in entries:
        out += _p_str(key) + b"ctorch._utils\n_rebuild_tensor_v2\n("
        out += (b"(" + _p_str("storage") + f"ctorch\n{_storage_class(key, dtype)}\n".encode()
                + _p_str(storage) + _p_str("cpu") + _p_int(numel) + b"tQ")
        out += _p_int(offset) + _p_tuple(shape) + _p_tuple(stride) + b"\x89"
        out += b"ccollections\nOrderedDict\n)RtR"
    return bytes(out + b"u.")


def write_bin(path: Path, tensors: list, chunks: Chunks | None = None, *,
              progress: Progress | None = None, archive: str | None = None,
              mode: int = DEFAULT_MODE) -> None:
    """The one `.bin` writer: a torch zip checkpoint of `tensors` in the order given.

    Tensors read from checkpoints (`Source`s; `chunks` None) are copied without torch: `.bin`
    storages whole (known CRC, in the kernel), any other tensor as a new record of its own
    bytes, under the record folder `archive` (torch.save uses the file's stem, the default).
    New tensors, whose bytes `chunks(tensor)` yields (the builder's fill, the merge's results),
    go through torch's own record writer, so the file is what torch.save writes of the same
    dict; `progress(nbytes)` follows each."""
    if chunks is None:
        _write_copies(path, tensors, archive or path.name.rsplit(".", 1)[0], mode)
    elif archive not in (None, path.name.rsplit(".", 1)[0]):
        raise ValueError("new tensors are written by torch's writer, which names the record "
                         "folder after the file")
    else:
        _write_new(path, tensors, chunks, progress, mode)


def _write_copies(path: Path, tensors: list[Source], archive: str, mode: int) -> None:
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
    pickled = state_pickle(entries)
    out = Output(path, mode)
    try:
        zf = _TorchZip(out)
        zf.add(f"{archive}/data.pkl", pickled)
        for name, data in _HEAD_RECORDS:
            zf.add(f"{archive}/{name}", data)
        crc = 0
        for name, t in records:
            if t.storage is not None:
                zf.add_copy(f"{archive}/data/{name}", t.storage)
            elif all(p.crc is not None for p in t.byte_pieces(path)):
                zf.add_known(f"{archive}/data/{name}", t.byte_pieces(path), t.nbytes)
            else:
                zf.add_pieces(f"{archive}/data/{name}", t.byte_pieces(path), t.nbytes)
            crc = zlib.crc32(zf.entries[-1].crc.to_bytes(4, "little"), crc)
        zf.add(f"{archive}/version", b"3\n")
        # torch writes a 40-digit id; here derived from the records, so output is reproducible.
        zf.add(f"{archive}/.data/serialization_id", f"{crc:020d}{out.pos:020d}".encode())
        zf.close()
    finally:
        out.close()


# --- new tensors, through torch's own writer -------------------------------------------------
# torch.save's zip records (data descriptors, miniz's headers, its serialization id) are only
# ever exactly torch's when torch writes them: a synthetic checkpoint must be byte for byte what
# torch.save of the same state dict writes. Only the builder and the merge come here, and both
# hold torch already; the copies above never import it.


class _NewStorage:
    """Stands for a new tensor's storage while pickling; becomes torch's persistent id."""

    def __init__(self, name: str, tensor: Entry):
        self.name, self.tensor = name, tensor


class _NewTensor:
    """Pickles exactly as torch.save pickles a contiguous CPU tensor."""

    def __init__(self, storage: _NewStorage):
        self.storage = storage

    def __reduce_ex__(self, protocol):
        import torch._utils  # heavy: torch, loaded already: only _write_new pickles it

        shape = self.storage.tensor.shape
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, shape, contiguous_strides(shape), False, OrderedDict()))


class _NewPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if not isinstance(obj, _NewStorage):
            return None
        import torch  # heavy: torch, loaded already: only _write_new pickles it

        t = obj.tensor
        return ("storage", getattr(torch, _storage_class(t.key, t.dtype)), obj.name, "cpu",
                t.numel)


def _new_pickle(tensors: list) -> bytes:
    # A plain dict, as transformers' shard_checkpoint hands to torch.save; protocol 2 as torch.
    state = {t.key: _NewTensor(_NewStorage(str(i), t)) for i, t in enumerate(tensors)}
    buf = io.BytesIO()
    _NewPickler(buf, protocol=2).dump(state)
    return buf.getvalue()


def _write_new(path: Path, tensors: list, chunks: Chunks, progress: Progress | None,
               mode: int) -> None:
    # heavy: torch: the builder and the merge hold torch already; copies never come here
    import torch

    # One reusable buffer the size of the largest tensor: the only tensor-sized allocation.
    buffer = torch.empty(max((t.nbytes for t in tensors), default=0), dtype=torch.uint8)
    view, storage = buffer.numpy(), buffer.untyped_storage()
    writer = torch._C.PyTorchFileWriter(str(path), True, _ALIGN)
    for name, data in (("data.pkl", _new_pickle(tensors)), *_HEAD_RECORDS):
        writer.write_record(name, data, len(data))
    for i, t in enumerate(tensors):
        _fill(view, t, chunks, path)
        # The writer takes the first nbytes of the storage: this tensor's bytes.
        writer.write_record(f"data/{i}", storage, t.nbytes)
        if progress:
            progress(t.nbytes)
    writer.write_end_of_file()
    del writer  # closes the file, so the fsync below covers everything
    os.chmod(path, mode)  # exactly `mode`, whatever the umask, as the copies get it
    fsync_path(path)


def _fill(view, t, chunks: Chunks, path: Path) -> None:
    """`t`'s bytes, as `chunks` yields them, into the front of the reusable buffer."""
    pos = 0
    for chunk in chunks(t):
        view[pos:pos + len(chunk)] = memoryview(chunk).cast("B")
        pos += len(chunk)
    if pos != t.nbytes:
        raise CheckpointError(f"{shown(path)}: {shown(t.key)} produced {pos} bytes, expected "
                              f"{t.nbytes}")
