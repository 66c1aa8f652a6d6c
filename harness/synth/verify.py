"""Check a folder against the spec that built it: layout cheaply, tensor bytes on request."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.identity import differences, file_identity, json_identity
from ..checkpoint.paths import inside
from ..checkpoint.quantized import quantized_linears, scheme_of
from ..checkpoint.reader import (CheckpointError, CheckpointFolder, consistency_problems,
                                 open_folder, read_json)
from .builder import config_files, vision_tower_path
from .content import tensor_bytes
from .layout import TensorInfo
from .plan import make_plan
from .specs import BuildSpec


def matches_generated(spec: BuildSpec, info: TensorInfo, tensor: torch.Tensor) -> bool:
    """True when a loaded tensor holds exactly the bytes (seed, key) generate."""
    raw = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return raw == tensor_bytes(spec.checkpoint.seed, info, spec.model)


def layout_problems(spec: BuildSpec, folder: CheckpointFolder) -> list[str]:
    """Index vs files, and files vs plan: key set, shard of each key, shapes and dtypes."""
    plan = make_plan(spec)
    problems = consistency_problems(folder)
    if problems:
        return problems
    if folder.format != plan.format:
        return [f"{folder.path}: format {folder.format}, the spec says {plan.format}"]
    expected = {t.key: (s.name, t) for s in plan.shards for t in s.tensors}
    found = folder.tensors
    for key in sorted(expected.keys() - found.keys()):
        problems.append(f"{folder.path / expected[key][0]}: missing {key}")
    for key in sorted(found.keys() - expected.keys()):
        problems.append(f"{folder.path / found[key].file}: unexpected tensor {key}")
    for key in sorted(expected.keys() & found.keys()):
        file, info = expected[key]
        meta = found[key]
        if (meta.file, meta.shape, meta.dtype) != (file, info.shape, info.dtype):
            problems.append(f"{folder.path / meta.file}: {key} is {meta.dtype}{list(meta.shape)}"
                            f" in {meta.file}, the spec says {info.dtype}{list(info.shape)} in "
                            f"{file}")
    return problems


def config_problems(spec: BuildSpec, folder: Path) -> list[str]:
    """config.json and generation_config.json mean what the spec's build writes (what a save
    stamps, and the absolute path of the folder's own tower, are not part of that)."""
    problems = []
    for name, expected in config_files(spec, vision_tower_path(spec, folder)).items():
        try:
            found = {name: file_identity(folder, name)}
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        problems += [f"{folder}/{d} (the spec's build)" for d in
                     differences({name: json_identity(expected)}, found)]
    return problems


def data_problems(spec: BuildSpec, folder: CheckpointFolder) -> list[str]:
    """Regenerate every tensor from (seed, key) and compare bytes, one shard at a time."""
    problems = []
    for shard in make_plan(spec).shards:
        loaded = folder.read([t.key for t in shard.tensors])
        for info in shard.tensors:
            if not matches_generated(spec, info, loaded.pop(info.key)):
                problems.append(f"{folder.path / shard.name}: {info.key} differs from the "
                                "bytes its seed and key generate")
    return problems


def check_quantized(folder: CheckpointFolder) -> None:
    """A pre-quantized folder's linears all whole (CheckpointError otherwise), whatever the
    spec says: its config's quantization_config is read as transformers would read it."""
    config_path = folder.path / "config.json"
    found = inside(folder.path, "config.json", must_exist=False)  # a link out is refused
    if found is None:
        return
    scheme = scheme_of(read_json(found, config_path), config_path)
    if scheme is not None:
        quantized_linears(scheme, folder.tensors, folder.path)


def verify(spec: BuildSpec, folder_path: Path, data: bool = True) -> list[str]:
    """Every problem found, one line each; the folder's headers are read once."""
    try:
        folder = open_folder(folder_path)
        check_quantized(folder)
    except CheckpointError as exc:
        return [str(exc)]
    problems = layout_problems(spec, folder)
    if not problems and data:
        problems = data_problems(spec, folder)
    return problems + config_problems(spec, folder.path)
