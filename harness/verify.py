"""Check a folder against the spec that built it: layout cheaply, tensor bytes on request."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint.reader import CheckpointError, consistency_problems, open_folder
from .fill import tensor_bytes
from .plan import make_plan
from .specs import BuildSpec


def layout_problems(spec: BuildSpec, folder_path: Path) -> list[str]:
    """Index vs files, and files vs plan: key set, shard of each key, shapes and dtypes."""
    plan = make_plan(spec)
    try:
        folder = open_folder(folder_path)
    except CheckpointError as exc:
        return [str(exc)]
    problems = consistency_problems(folder)
    if problems:
        return problems
    if folder.format != plan.format:
        return [f"{folder_path}: format {folder.format}, the spec says {plan.format}"]
    expected = {t.key: (s.name, t) for s in plan.shards for t in s.tensors}
    found = folder.tensors
    for key in sorted(expected.keys() - found.keys()):
        problems.append(f"{folder_path / expected[key][0]}: missing {key}")
    for key in sorted(found.keys() - expected.keys()):
        problems.append(f"{folder_path / found[key].file}: unexpected tensor {key}")
    for key in sorted(expected.keys() & found.keys()):
        file, info = expected[key]
        meta = found[key]
        if (meta.file, meta.shape, meta.dtype) != (file, info.shape, info.dtype):
            problems.append(f"{folder_path / meta.file}: {key} is {meta.dtype}{list(meta.shape)}"
                            f" in {meta.file}, the spec says {info.dtype}{list(info.shape)} in "
                            f"{file}")
    return problems


def data_problems(spec: BuildSpec, folder_path: Path) -> list[str]:
    """Regenerate every tensor from (seed, key) and compare bytes, one shard at a time."""
    plan = make_plan(spec)
    folder = open_folder(folder_path)
    problems = []
    for shard in plan.shards:
        loaded = folder.read([t.key for t in shard.tensors])
        for info in shard.tensors:
            tensor = loaded.pop(info.key)
            raw = tensor.contiguous().view(-1).view(torch.uint8).numpy()
            if raw.tobytes() != tensor_bytes(spec.checkpoint.seed, info, spec.model):
                problems.append(f"{folder_path / shard.name}: {info.key} differs from the "
                                "bytes its seed and key generate")
        del loaded
    return problems


def verify(spec: BuildSpec, folder_path: Path, data: bool = True) -> list[str]:
    problems = layout_problems(spec, folder_path)
    if not problems and data:
        problems = data_problems(spec, folder_path)
    return problems
