"""A checkpoint folder: its files, index and validated tensor headers, then single tensors.

This is the one way every command reads a checkpoint. Headers come from the two format
readers (safetensors_format, torch_zip), which validate every record before anything trusts
it; files are resolved inside the folder (paths); tensors are then mapped from their validated
offsets, so torch never parses a file itself. Every problem is a `CheckpointError` whose
message is one line naming the file and what was wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .formats import INDEX_NAMES, SINGLE_NAMES
from .paths import inside, plain_name
from .problems import CheckpointError, shown
from .safetensors_format import scan_safetensors
from .tensors import Source
from .torch_zip import scan_bin

__all__ = ["CheckpointError", "CheckpointFolder", "ScannedFolder", "consistency_problems",
           "open_folder", "read_file", "scan_file", "scan_folder"]

MAX_JSON_BYTES = 64 << 20  # a 13B's index is ~40 KB


def read_json(path: Path, where: Path | None = None) -> dict:
    """A small JSON object file, size-capped, with one-line errors."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{shown(where or path)}: {size} bytes, over the "
                                  f"{MAX_JSON_BYTES} byte limit for a JSON file")
        data = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{shown(where or path)}: not readable JSON ({shown(exc)})") \
            from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{shown(where or path)}: expected a JSON object, got "
                              f"{type(data).__name__}")
    return data


def scan_file(path: Path, fmt: str, label: Path | None = None) -> tuple[dict[str, Source],
                                                                         dict | None]:
    """One shard's tensors (validated) and, for safetensors, its `__metadata__`; `label` is
    the name the folder gives the file where `path` is a link's target."""
    if fmt == "safetensors":
        return scan_safetensors(path, label)
    return scan_bin(path, label), None


@dataclass
class CheckpointFolder:
    """A checkpoint folder: format, index (if any), and lazily its tensor headers."""

    path: Path
    format: str
    index_file: str | None
    weight_map: dict[str, str] | None
    total_size: int | None
    # Headers read so far: consistency checks, key sets and reads all need them, once.
    _headers: dict[str, dict[str, Source]] = field(default_factory=dict, repr=False)
    _metadata: dict[str, dict | None] = field(default_factory=dict, repr=False)
    _maps: dict = field(default_factory=dict, repr=False)

    @property
    def files(self) -> list[str]:
        if self.weight_map is None:
            return [SINGLE_NAMES[self.format]]
        return sorted(set(self.weight_map.values()))

    def file_path(self, file: str) -> Path:
        """A shard named by the index, resolved inside the folder (a link out is refused)."""
        return inside(self.path, file, where=self.path / (self.index_file or file),
                      kind="shard ")

    def header(self, file: str) -> dict[str, Source]:
        if file not in self._headers:
            self._headers[file], self._metadata[file] = scan_file(
                self.file_path(file), self.format, self.path / file)
        return self._headers[file]

    def metadata(self, file: str) -> dict | None:
        self.header(file)
        return self._metadata[file]

    @cached_property
    def tensors(self) -> dict[str, Source]:
        """Every tensor in every file, from headers only."""
        out: dict[str, Source] = {}
        for file in self.files:
            out.update(self.header(file))
        return out

    def file_of(self, key: str) -> str:
        if self.weight_map is None:
            return self.files[0]
        if key not in self.weight_map:
            raise CheckpointError(f"{shown(self.path / self.index_file)}: does not list "
                                  f"{shown(key)}")
        return self.weight_map[key]

    def check(self, total_size: bool = True) -> None:
        """Every shard read and validated, and the index consistent with them (and with its
        total_size, unless a caller checks that later)."""
        problems = consistency_problems(self, total_size)
        if problems:
            raise CheckpointError(problems[0])

    def read(self, keys: list[str]) -> dict:
        """Only the named tensors, opening only the files that hold them."""
        out = {}
        for key in keys:
            file = self.file_of(key)
            source = self.header(file).get(key)
            if source is None:
                raise CheckpointError(f"{shown(self.file_path(file))}: index lists "
                                      f"{shown(key)} in this shard, but the shard does not "
                                      "hold it")
            out[key] = self.tensor(source)
        return out

    def tensor(self, source: Source):
        """One tensor, mapped from its validated offsets (copy-on-write: never written)."""
        return as_tensor(source, self._maps)


def as_tensor(source: Source, maps: dict):
    import numpy as np  # heavy: numpy
    import torch  # heavy: torch

    dtype = getattr(torch, source.dtype)
    if source.storage is not None:
        path, offset, nbytes = source.storage.path, source.storage.offset, source.storage.nbytes
    else:
        (piece,) = source.pieces
        path, offset, nbytes = piece.path, piece.offset, piece.nbytes
    if path not in maps:
        maps[path] = np.memmap(path, dtype=np.uint8, mode="c")
    raw = torch.from_numpy(maps[path][offset:offset + nbytes]).view(dtype)
    if source.storage is None:
        return raw.reshape(source.shape)
    view_offset, shape, stride = source.view
    return raw.as_strided(shape, stride, view_offset)


def read_file(path: Path, fmt: str | None = None) -> dict:
    """Every tensor of one file (`mm_projector.bin`, `non_lora_trainables.bin`, an adapter),
    validated first; the format from the extension unless given."""
    path = Path(path)
    fmt = fmt or ("safetensors" if path.suffix == ".safetensors" else "bin")
    sources, _ = scan_file(path, fmt)
    maps: dict = {}
    return {key: as_tensor(s, maps) for key, s in sources.items()}


def _weight_map(index: Path, data: dict) -> dict[str, str]:
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{shown(index)}: has no weight_map")
    for key, file in weight_map.items():
        # A shard is a plain file name in this folder; a path could read outside it.
        if not isinstance(file, str):
            raise CheckpointError(f"{shown(index)}: weight_map maps {shown(key)} to "
                                  f"{shown(repr(file))}, not a file name")
        plain_name(file, index)
    return dict(weight_map)


def _total_size(index: Path, data: dict) -> int | None:
    metadata = data.get("metadata") or {}
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    if total is not None and (not isinstance(total, int) or isinstance(total, bool)
                              or total < 0):
        raise CheckpointError(f"{shown(index)}: metadata.total_size is {shown(repr(total))}, "
                              "not a non-negative integer")
    return total


def open_folder(path: Path) -> CheckpointFolder:
    """Find a checkpoint's format and index; safetensors wins when both are present."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{shown(path)}: not a folder")
    for fmt in ("safetensors", "bin"):
        index = inside(path, INDEX_NAMES[fmt], must_exist=False)
        if index is not None:
            data = read_json(index, path / INDEX_NAMES[fmt])
            where = path / INDEX_NAMES[fmt]
            return CheckpointFolder(path, fmt, INDEX_NAMES[fmt], _weight_map(where, data),
                                    _total_size(where, data))
        if inside(path, SINGLE_NAMES[fmt], must_exist=False) is not None:
            return CheckpointFolder(path, fmt, None, None, None)
    raise CheckpointError(f"{shown(path)}: no checkpoint found (expected an index file or "
                          f"{' / '.join(SINGLE_NAMES.values())})")


def consistency_problems(folder: CheckpointFolder, total_size: bool = True) -> list[str]:
    """Every way the index and the files disagree, one line each (empty when consistent)."""
    problems = []
    headers: dict[str, dict[str, Source]] = {}
    for file in folder.files:
        try:
            headers[file] = folder.header(file)
        except CheckpointError as exc:
            problems.append(str(exc))
    if folder.weight_map is not None:
        for key, file in sorted(folder.weight_map.items()):
            if file in headers and key not in headers[file]:
                problems.append(f"{shown(folder.path / file)}: index lists {shown(key)} in "
                                "this shard, but the shard does not hold it")
        for file, metas in headers.items():
            for key in sorted(metas):
                listed = folder.weight_map.get(key)
                if listed != file:
                    where = f"maps to {shown(listed)}" if listed else "does not list"
                    problems.append(f"{shown(folder.path / file)}: holds {shown(key)}, which "
                                    f"the index {where}")
    if total_size and folder.total_size is not None and not problems:
        actual = sum(m.nbytes for metas in headers.values() for m in metas.values())
        if actual != folder.total_size:
            problems.append(f"{shown(folder.path / folder.index_file)}: total_size "
                            f"{folder.total_size} != {actual}, the sum of tensor bytes")
    return problems


@dataclass
class ScannedFolder:
    folder: CheckpointFolder
    files: dict[str, dict[str, Source]]
    metadata: dict[str, dict | None]

    @property
    def tensors(self) -> dict[str, Source]:
        return {k: s for sources in self.files.values() for k, s in sources.items()}


def scan_folder(path: Path, total_size: bool = True) -> ScannedFolder:
    """Every tensor's location, file by file, validated and checked against the index."""
    folder = open_folder(path)
    folder.check(total_size)
    return ScannedFolder(folder, {f: folder.header(f) for f in folder.files},
                         {f: folder.metadata(f) for f in folder.files})
