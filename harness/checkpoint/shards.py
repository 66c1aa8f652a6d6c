"""Writing a checkpoint's shards: each format's one writer, picked by format name (the builder,
strip, convert and the merge all write through `write_shard`), and rewriting a folder shard by
shard, the streaming layer strip, convert and merge stand on. Each source shard becomes an
output shard of the tensors a mapper keeps; a shard kept whole in the same format is
hard-linked, any other is rewritten from file ranges."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .files import DEFAULT_MODE, link_or_copy, mode_of
from .formats import INDEX_NAMES, Chunks, Progress, index_json, index_of, shard_name
from .reader import ScannedFolder
from .safetensors_format import safetensors_order, save_file_order, write_safetensors
from .tensors import Source
from .torch_zip import write_bin


@dataclass
class OutShard:
    name: str
    tensors: list[Source]
    link_from: Path | None = None
    metadata: dict | None = None
    mode: int = 0o644  # the source shard's permission bits


Mapper = Callable[[str, Source], Source | None]


def new_shard_order(fmt: str, tensors: list) -> list:
    """The order a new shard of `fmt` holds `tensors` in, as torch.save and safetensors'
    `save_file` lay them out; its writer writes them, and asks `chunks` for them, in it."""
    return list(tensors) if fmt == "bin" else save_file_order(tensors)


def write_shard(fmt: str, path: Path, tensors: list, chunks: Chunks | None = None, *,
                progress: Progress | None = None, metadata: dict | None = None,
                mode: int = DEFAULT_MODE) -> None:
    """One shard of `tensors`, in the order given, through `fmt`'s one writer: copied from
    their files, or made by `chunks` (see `write_bin`, `write_safetensors`). `metadata` is
    safetensors' `__metadata__`; a `.bin` file has none."""
    if fmt == "bin":
        write_bin(path, tensors, chunks, progress=progress, mode=mode)
    else:
        write_safetensors(path, tensors, chunks, metadata=metadata, progress=progress,
                          mode=mode)


def _rewrite(fmt: str, path: Path, shard: OutShard) -> None:
    # A rewritten shard keeps its source's tensor order (safetensors: within each dtype width).
    tensors = shard.tensors if fmt == "bin" else safetensors_order(shard.tensors)
    write_shard(fmt, path, tensors, metadata=shard.metadata, mode=shard.mode)


def plan_shards(scanned: ScannedFolder, mapper: Mapper, fmt: str) -> list[OutShard]:
    """Each source shard becomes an output shard of the tensors `mapper` keeps (renamed or
    rebuilt as it returns them); a shard it returns unchanged in full, in the same format, is
    linked. Shards left empty disappear, and names follow the new count and format."""
    shards = []
    for file, sources in scanned.files.items():
        kept = [t for t in (mapper(file, s) for s in sources.values()) if t is not None]
        same = (fmt == scanned.folder.format and len(kept) == len(sources)
                and all(t is s for t, s in zip(kept, sources.values())))
        path = scanned.folder.file_path(file)
        if kept:
            shards.append(OutShard(file, kept, path if same else None,
                                   scanned.metadata.get(file), mode_of([path])))
    renumber = fmt != scanned.folder.format or len(shards) != len(scanned.files)
    if renumber:
        for i, shard in enumerate(shards):
            shard.name = shard_name(fmt, i, len(shards))
    return shards


def write_shards(out: Path, shards: list[OutShard], fmt: str, indexed: bool) -> dict:
    """Write (or link) every shard and the index; returns {shard: 'linked'|'copied'|
    'rewritten'}."""
    done = {}
    for shard in shards:
        if shard.link_from is not None:
            done[shard.name] = link_or_copy(shard.link_from, out / shard.name)
        else:
            _rewrite(fmt, out / shard.name, shard)
            done[shard.name] = "rewritten"
    if indexed or len(shards) > 1:
        index = index_of((s.name, s.tensors) for s in shards)
        (out / INDEX_NAMES[fmt]).write_text(index_json(index))
    return done
