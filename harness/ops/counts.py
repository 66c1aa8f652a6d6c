"""Projector parameter counts three ways, and the model's totals around them.

The three ways: the formula (per type), the module built by `build_projector` on the meta
device (no memory), and the tensors themselves (shapes from file headers, no data read; for a
preset, the planned layout). The projector type is taken from config.json and also inferred
from the tensor keys and shapes; they must agree, because LLaVA's builder silently builds a
`linear` projector when the config has no `mm_projector_type` (LLaVA issues #550, #465), and a
checkpoint whose tensors say otherwise then loads with the wrong module.

Stage 1 (`tune_mm_mlp_adapter`) freezes everything, then unfreezes the projector: its
trainable parameter count is the projector's. `trainable_params(module)` counts what a live
model has unfrozen, for comparing against `projector_params(...)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.formats import shape_numel
from ..checkpoint.quantized import logical_shapes, quantized_linears, scheme_of, stored_keys
from ..checkpoint.reader import CheckpointError, open_folder
from ..llava.config import (CONFIG, checked, is_hf_layout, lm_fields, mm_hidden_size_of,
                            projector_type_of, read_config)
from ..llava.errors import ConfigError
from ..llava.keys import IMAGE_NEWLINE, PROJECTOR_MARK, VISION_PREFIX
from ..llava.projector import infer_projector, projector_params
from ..llava.tensors import canonical_shapes

# Persistent buffers some checkpoints carry: counted as tensors, not as parameters.
BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


def param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def trainable_params(module) -> int:
    """Parameters with requires_grad: what stage 1 trains once only the projector is unfrozen."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def module_params(projector_type: str, mm_hidden_size: int, hidden_size: int) -> int:
    """The count of the module `build_projector` makes, built on the meta device."""
    import torch  # heavy: torch

    from ..model.projector import build_projector  # heavy: torch

    with torch.device("meta"):
        return param_count(build_projector(projector_type, mm_hidden_size, hidden_size))


@dataclass(frozen=True)
class Counts:
    source: str
    projector_type: str
    config_type: str | None
    inferred_type: str
    mm_hidden_size: int
    hidden_size: int
    formula: int
    module: int
    tensors: int
    tensors_from: str
    params: dict[str, int] = field(default_factory=dict)
    buffer_elements: int = 0
    # A pre-quantized checkpoint: its scheme and stored bytes (params above are logical).
    quantization: dict | None = None

    @property
    def agree(self) -> bool:
        return self.formula == self.module == self.tensors

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def trainable_stage1(self) -> int:
        return self.formula

    def to_dict(self) -> dict:
        return {"source": self.source,
                "projector_type": {"config": self.config_type, "inferred": self.inferred_type},
                "mm_hidden_size": self.mm_hidden_size, "hidden_size": self.hidden_size,
                "projector_params": {"formula": self.formula, "module": self.module,
                                     self.tensors_from: self.tensors},
                "params": {**self.params, "total": self.total_params},
                "buffer_elements": self.buffer_elements,
                "trainable_stage1": self.trainable_stage1,
                "quantization": self.quantization,
                "agree": self.agree}


def _group(key: str) -> str:
    if PROJECTOR_MARK in key:
        return "projector"
    if key.startswith(VISION_PREFIX):
        return "vision_tower"
    if key == IMAGE_NEWLINE:
        return "image_newline"
    return "language_model"


def _config_int(config: dict, name: str, where: str) -> int:
    """A dimension the counts need (the schema has checked any value that is present)."""
    if name not in config:
        raise ConfigError(f"{where}: has no {name} (not a LLaVA config?)")
    return config[name]


def count(config: dict, shapes: dict[str, tuple[int, ...]], source: str, config_where: str,
          tensors_where: str, tensors_from: str) -> Counts:
    """Counts from a LLaVA config (either layout) and every tensor's shape under its
    original-layout name; a disagreement between the config and the tensors (type or dims) is
    a CheckpointError naming both."""
    checked(config, config_where)
    inferred = infer_projector(shapes, tensors_where)
    config_type = None if is_hf_layout(config) else config.get("mm_projector_type")
    built = projector_type_of(config)  # LLaVA's builder falls back to linear
    if built != inferred.type:
        said = f"says {config_type!r}" if config_type else \
            "has no mm_projector_type, so LLaVA's builder silently builds 'linear'"
        raise CheckpointError(f"{config_where}: {said}, but the tensors in {tensors_where} are "
                              f"an {inferred.type!r} projector")
    m = _config_int({"mm_hidden_size": mm_hidden_size_of(config)} if mm_hidden_size_of(config)
                    is not None else {}, "mm_hidden_size", config_where)
    h = _config_int(lm_fields(config), "hidden_size", config_where)
    if inferred.hidden_size is not None and (m, h) != (inferred.mm_hidden_size,
                                                       inferred.hidden_size):
        raise CheckpointError(f"{config_where}: mm_hidden_size {m} -> hidden_size {h}, but the "
                              f"projector tensors map {inferred.mm_hidden_size} -> "
                              f"{inferred.hidden_size}")
    params: dict[str, int] = {}
    buffers = 0
    for key, shape in shapes.items():
        if key.endswith(BUFFER_SUFFIXES):
            buffers += shape_numel(shape)
        else:
            params[_group(key)] = params.get(_group(key), 0) + shape_numel(shape)
    return Counts(source, built, config_type, inferred.type, m, h,
                  projector_params(built, m, h), module_params(built, m, h),
                  params.get("projector", 0), tensors_from, params, buffers)


def quantization_summary(scheme, linears: dict, sources: dict) -> dict:
    """Stored bytes of a pre-quantized checkpoint by what they are, and its logical size."""
    stored = stored_keys(linears)
    packed = sum(q.packed_bytes for q in linears.values())
    state = sum(q.stored_bytes for q in linears.values()) - packed
    plain = sum(s.nbytes for k, s in sources.items() if k not in stored)
    return {"scheme": scheme.name, "quantized_linears": len(linears),
            "quantized_params": sum(shape_numel(q.shape) for q in linears.values()),
            "stored_bytes": {"packed_weights": packed, "quant_state": state,
                             "unquantized": plain, "total": packed + state + plain}}


def count_checkpoint(path: Path) -> Counts:
    """Counts for a checkpoint folder: tensor shapes from the file headers, no data read
    (a bitsandbytes 4-bit checkpoint's small quant-state JSON tensors excepted: they hold the
    logical shapes). A pre-quantized checkpoint counts its logical parameters, those of the
    unquantized model, and reports its stored bytes per kind."""
    folder = open_folder(path)
    # An index that lies about its shards is bad input, not a count; its total_size is
    # checked last, so that a tensor of the wrong shape is named for what it is.
    folder.check(total_size=False)
    config_path = folder.path / CONFIG
    config = read_config(folder.path)
    sources = folder.tensors
    scheme = scheme_of(config, config_path)
    shapes = {key: meta.shape for key, meta in sources.items()}
    summary = None
    if scheme is not None:
        linears = quantized_linears(scheme, sources, folder.path)
        shapes = logical_shapes(sources, linears)
        summary = quantization_summary(scheme, linears, sources)
    shapes = canonical_shapes(shapes, config)
    where = str(folder.path / (folder.index_file or folder.files[0]))
    counts = count(config, shapes, str(folder.path), str(config_path), where, "file_headers")
    folder.check()
    return dataclasses.replace(counts, quantization=summary)
