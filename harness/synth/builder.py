"""Spec -> a checkpoint folder that looks like a published LLaVA checkpoint.

Shards and index from the plan, config.json and generation_config.json as LLaVA saves them,
and for specs that ask for them a local tokenizer and a local CLIP vision tower (pointed to
by `mm_vision_tower`), so the folder loads offline. Built in a temp folder beside the target
and renamed into place at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint.atomic import atomic_dir
from ..checkpoint.formats import index_json
from ..checkpoint.shards import new_shard_order, write_shard
from . import assets, configs
from .content import tensor_chunks
from .plan import CheckpointPlan, make_plan
from .quantize import quantization_config
from .specs import BuildSpec

VISION_TOWER_DIR = "vision_tower"
# Below this a progress bar would only flash by.
PROGRESS_MIN_BYTES = 256 * 2**20


def vision_tower_path(spec: BuildSpec, out: Path) -> str:
    """What config.json's `mm_vision_tower` names: the local tower folder, or the hub id."""
    if spec.with_vision_tower:
        return str(Path(out).resolve() / VISION_TOWER_DIR)
    return spec.model.vision.tower_name


def _progress_bar(total: int):
    # disable=None: silent when stderr is not a terminal (CI logs, pipes).
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="build",
                disable=None if total >= PROGRESS_MIN_BYTES else True, file=sys.stderr)


def write_tensors(spec: BuildSpec, plan: CheckpointPlan, folder: Path) -> None:
    seed, model = spec.checkpoint.seed, spec.model
    with _progress_bar(plan.total_size) as bar:
        for shard in plan.shards:
            write_shard(plan.format, folder / shard.name,
                        new_shard_order(plan.format, shard.tensors),
                        lambda info: tensor_chunks(seed, info, model), progress=bar.update)
    if plan.index_name:
        (folder / plan.index_name).write_text(index_json(plan.index()))


def config_files(spec: BuildSpec, vision_tower: str) -> dict[str, dict]:
    """config.json and generation_config.json as the builder writes them, by file name."""
    config = configs.llava_config_json(spec.model, vision_tower)
    quantization = quantization_config(spec.checkpoint, spec.model)
    if quantization is not None:
        config["quantization_config"] = quantization
    return {"config.json": config,
            "generation_config.json": configs.generation_config(spec.model)}


def write_configs(spec: BuildSpec, folder: Path, vision_tower: str) -> None:
    for name, config in config_files(spec, vision_tower).items():
        (folder / name).write_text(configs.dump(config))


def write_assets(spec: BuildSpec, folder: Path) -> None:
    model = spec.model
    if spec.with_tokenizer:
        assets.build_tokenizer(folder, vocab_size=model.vocab_size,
                               model_max_length=model.tokenizer_model_max_length)
    if spec.with_vision_tower:
        v = model.vision
        assets.build_clip_tower(folder / VISION_TOWER_DIR, hidden_size=v.hidden_size,
                                num_hidden_layers=v.num_hidden_layers,
                                num_attention_heads=v.num_attention_heads,
                                intermediate_size=v.intermediate_size,
                                image_size=v.image_size, patch_size=v.patch_size,
                                projection_dim=v.projection_dim, seed=spec.checkpoint.seed,
                                dtype=getattr(torch, model.dtype))


def build(spec: BuildSpec, out: Path, force: bool = False) -> CheckpointPlan:
    """Write the checkpoint for `spec` at `out` atomically; returns the plan it followed."""
    out = Path(out)
    plan = make_plan(spec)
    with atomic_dir(out, force) as tmp:
        write_tensors(spec, plan, tmp)
        write_configs(spec, tmp, vision_tower_path(spec, out))
        write_assets(spec, tmp)
    return plan
