"""Projector extraction: copy the tensors whose names match out of a checkpoint, reading only them.

Like LLaVA's `scripts/extract_mm_projector.py` it selects keys by substring (`mm_projector`) and
finds their shards through the index; unlike it, it never loads a shard. It reads the index,
then in each shard that holds a match only the tensor directory (the safetensors header, or the
`.bin` zip's central directory and its `data.pkl`), validated by the checkpoint layer, then
streams just the matching tensors' bytes into the output. Shards without a match are never
opened.

It works without torch: `import torch` alone costs 2.4 s and 220 MB, twenty times the whole
extraction of a 7B's projector. `.bin` output is written record for record in torch's zip
layout, so `torch.load(..., weights_only=True)` and `mmap=True` read it as they read
`torch.save`'s own files. Every output tensor is contiguous in its own storage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.atomic import atomic_file, check_target
from ..checkpoint.files import mode_of
from ..checkpoint.paths import check_output
from ..checkpoint.reader import CheckpointError, open_folder, scan_file
from ..checkpoint.safetensors_format import save_file_order, write_safetensors
from ..checkpoint.tensors import Source
from ..checkpoint.torch_zip import write_bin

DEFAULT_KEYS = ("mm_projector",)
DEFAULT_NAME = "mm_projector.bin"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"


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


def tensors_in(path: Path, fmt: str) -> dict[str, Source]:
    """Every tensor of one shard, located (and validated) from its directory alone."""
    return scan_file(Path(path), fmt)[0]


def format_for(target: Path) -> str:
    suffix = target.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "bin"
    raise CheckpointError(f"{target}: unknown output type {suffix or '(no extension)'}; name "
                          f"it {' / '.join(TORCH_SUFFIXES)} (torch) or .safetensors")


def output_path(output: Path) -> Path:
    """An existing folder gets `mm_projector.bin` inside it, as LLaVA's training names it."""
    output = Path(output)
    return output / DEFAULT_NAME if output.is_dir() else output


def select(folder, patterns: tuple[str, ...]) -> dict[str, list[str]]:
    """Matching keys by the file that holds them: from the index, else the single file's own
    directory (the only file there is)."""
    if folder.weight_map is not None:
        keys = {k: f for k, f in folder.weight_map.items() if any(p in k for p in patterns)}
    else:
        file = folder.files[0]
        keys = {k: file for k in folder.header(file) if any(p in k for p in patterns)}
    if not keys:
        where = folder.path / (folder.index_file or folder.files[0])
        raise CheckpointError(f"{where}: no tensor name contains {' or '.join(patterns)} "
                              "(an identity projector has no weights)")
    by_file: dict[str, list[str]] = {}
    for key, file in keys.items():
        by_file.setdefault(file, []).append(key)
    return by_file


def _sources(folder, by_file: dict[str, list[str]]) -> list[Source]:
    out = []
    for file, keys in by_file.items():
        held = folder.header(file)
        for key in keys:
            source = held.get(key)
            if source is None:
                raise CheckpointError(f"{folder.path / file}: index lists {key} in this shard, "
                                      "but the shard does not hold it")
            if source.numel == 0:
                raise CheckpointError(f"{folder.path / file}: {key} has shape "
                                      f"{list(source.shape)}, no elements (a ZeRO-3 partition "
                                      "placeholder; save with the parameters gathered)")
            out.append(source.contiguous())
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
    fmt = format_for(target)
    check_output(target, [folder.path])
    check_target(target, force)
    by_file = select(folder, tuple(patterns))
    tensors = _sources(folder, by_file)
    mode = mode_of(folder.file_path(f) for f in by_file)
    with atomic_file(target, force, mode=mode) as tmp:
        if fmt == "bin":
            write_bin(tmp, tensors, archive=target.stem, mode=mode)
        else:
            write_safetensors(tmp, save_file_order(tensors), mode=mode)
    return Extraction(target, tuple(t.key for t in tensors), tuple(by_file),
                      len(folder.files), sum(t.numel for t in tensors),
                      sum(t.nbytes for t in tensors), time.perf_counter() - start)
