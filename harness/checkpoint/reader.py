"""Reading a checkpoint folder lazily: its files, index and tensor headers, then single tensors.

Headers come without reading tensor data: safetensors' JSON header, or for `.bin` the pickle
of an mmap'd `torch.load(weights_only=True)`, which touches no storage until asked. Every
problem is a `CheckpointError` whose message is one line naming the file and what was wrong.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..errors import HarnessError
from ..layout import DTYPE_BYTES, shape_numel
from ..plan import INDEX_NAMES, SINGLE_NAMES

SAFETENSORS_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
                     "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                     "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


# safetensors itself refuses headers above 100 MB; a bigger claim is a corrupt file.
MAX_HEADER_BYTES = 100 * 10**6


class CheckpointError(HarnessError):
    """Bad checkpoint input; the message is one line naming the file and the fault."""


@dataclass(frozen=True)
class TensorMeta:
    key: str
    shape: tuple[int, ...]
    dtype: str
    file: str

    @property
    def numel(self) -> int:
        return shape_numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES.get(self.dtype, 0)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def safetensors_header(path: Path) -> dict[str, TensorMeta]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated: {size} bytes, too short for a "
                                  "safetensors header")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: not safetensors: header length {n} is over the "
                                  f"{MAX_HEADER_BYTES} byte limit")
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or not safetensors: header length {n} "
                                  f"exceeds the file's {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") \
                from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a {type(header).__name__}, "
                              "not an object")
    header.pop("__metadata__", None)
    metas, end = {}, 0
    for key, entry in header.items():
        try:
            shape, (_, stop) = tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
            dtype = SAFETENSORS_NAMES.get(entry["dtype"], str(entry["dtype"]).lower())
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: header entry for {key} lacks a valid dtype, shape "
                                  "or data_offsets") from None
        metas[key] = TensorMeta(key, shape, dtype, path.name)
        end = max(end, int(stop))
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: header describes {8 + n + end} bytes, the "
                              f"file has {size}")
    return metas


def load_bin(path: Path) -> dict:
    """`torch.load` of a `.bin` shard, mmap'd and weights-only, with one-line errors."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: holds objects that are not plain weights; refusing "
                              f"to unpickle it ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint, truncated or "
                              f"corrupt ({first})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensor names to tensors, got "
                              f"{type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a "
                                  "tensor under a string name")
    return obj


def bin_header(path: Path) -> dict[str, TensorMeta]:
    return {k: TensorMeta(k, tuple(v.shape), str(v.dtype).removeprefix("torch."), path.name)
            for k, v in load_bin(path).items()}


@dataclass
class CheckpointFolder:
    """A checkpoint folder: format, index (if any), and lazily its tensor headers."""

    path: Path
    format: str
    index_file: str | None
    weight_map: dict[str, str] | None
    total_size: int | None
    # Headers read so far: consistency checks, key sets and reads all need them, once.
    _headers: dict[str, dict[str, TensorMeta]] = field(default_factory=dict, repr=False)

    @property
    def files(self) -> list[str]:
        if self.weight_map is None:
            return [SINGLE_NAMES[self.format]]
        return sorted(set(self.weight_map.values()))

    def header(self, file: str) -> dict[str, TensorMeta]:
        if file not in self._headers:
            self._headers[file] = self._read_header(file)
        return self._headers[file]

    def _read_header(self, file: str) -> dict[str, TensorMeta]:
        path = self.path / file
        if not path.is_file():
            source = self.index_file or "checkpoint folder"
            raise CheckpointError(f"{self.path / source}: names shard {file}, which does not "
                                  "exist")
        return safetensors_header(path) if self.format == "safetensors" else bin_header(path)

    @cached_property
    def tensors(self) -> dict[str, TensorMeta]:
        """Every tensor in every file, from headers only."""
        out: dict[str, TensorMeta] = {}
        for file in self.files:
            out.update(self.header(file))
        return out

    def file_of(self, key: str) -> str:
        if self.weight_map is None:
            return self.files[0]
        if key not in self.weight_map:
            raise CheckpointError(f"{self.path / self.index_file}: does not list {key}")
        return self.weight_map[key]

    def read(self, keys: list[str]) -> dict:
        """Only the named tensors, opening only the files that hold them."""
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.file_of(key), []).append(key)
        out = {}
        for file, names in by_file.items():
            out.update(self._read_file(file, names))
        return out

    def _read_file(self, file: str, names: list[str]) -> dict:
        path = self.path / file
        if not path.is_file():
            raise CheckpointError(f"{self.path / (self.index_file or file)}: names shard "
                                  f"{file}, which does not exist")
        if self.format == "safetensors":
            from safetensors import safe_open

            self.header(file)  # validates truncation before safe_open maps it
            with safe_open(path, framework="pt") as f:
                missing = [n for n in names if n not in f.keys()]  # noqa: SIM118 (safe_open is not a container)
                if missing:
                    raise CheckpointError(f"{path}: index lists {missing[0]} in this shard, "
                                          "but the shard does not hold it")
                return {n: f.get_tensor(n) for n in names}
        state = load_bin(path)
        missing = [n for n in names if n not in state]
        if missing:
            raise CheckpointError(f"{path}: index lists {missing[0]} in this shard, but the "
                                  "shard does not hold it")
        return {n: state[n] for n in names}


def _weight_map(index: Path, data: dict) -> dict[str, str]:
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: has no weight_map")
    for key, file in weight_map.items():
        # A shard is a plain file name in this folder; a path could read outside it.
        if not isinstance(file, str) or not file or "/" in file or "\\" in file \
                or file in (".", ".."):
            raise CheckpointError(f"{index}: weight_map maps {key} to {file!r}, not a file "
                                  "name in this folder")
    return dict(weight_map)


def _total_size(index: Path, data: dict) -> int | None:
    metadata = data.get("metadata") or {}
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    if total is not None and not isinstance(total, int):
        raise CheckpointError(f"{index}: metadata.total_size is {total!r}, not an integer")
    return total


def open_folder(path: Path) -> CheckpointFolder:
    """Find a checkpoint's format and index; safetensors wins when both are present."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder")
    for fmt in ("safetensors", "bin"):
        index = path / INDEX_NAMES[fmt]
        if index.is_file():
            data = _read_json(index)
            return CheckpointFolder(path, fmt, index.name, _weight_map(index, data),
                                    _total_size(index, data))
        if (path / SINGLE_NAMES[fmt]).is_file():
            return CheckpointFolder(path, fmt, None, None, None)
    raise CheckpointError(f"{path}: no checkpoint found (expected an index file or "
                          f"{' / '.join(SINGLE_NAMES.values())})")


def consistency_problems(folder: CheckpointFolder) -> list[str]:
    """Every way the index and the files disagree, one line each (empty when consistent)."""
    problems = []
    headers: dict[str, dict[str, TensorMeta]] = {}
    for file in folder.files:
        try:
            headers[file] = folder.header(file)
        except CheckpointError as exc:
            problems.append(str(exc))
    if folder.weight_map is not None:
        for key, file in sorted(folder.weight_map.items()):
            if file in headers and key not in headers[file]:
                problems.append(f"{folder.path / file}: index lists {key} in this shard, but "
                                "the shard does not hold it")
        for file, metas in headers.items():
            for key in sorted(metas):
                listed = folder.weight_map.get(key)
                if listed != file:
                    where = f"maps to {listed}" if listed else "does not list"
                    problems.append(f"{folder.path / file}: holds {key}, which the index {where}")
    if folder.total_size is not None and not problems:
        actual = sum(m.nbytes for metas in headers.values() for m in metas.values())
        if actual != folder.total_size:
            problems.append(f"{folder.path / folder.index_file}: total_size "
                            f"{folder.total_size} != {actual}, the sum of tensor bytes")
    return problems
