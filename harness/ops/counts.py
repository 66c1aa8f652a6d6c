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
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.formats import shape_numel
from ..checkpoint.quantized import logical_shapes, quantized_linears, scheme_of, stored_keys
from ..checkpoint.reader import CheckpointError, open_folder
from ..synth.layout import IMAGE_NEWLINE, VISION_PREFIX, model_tensors
from ..synth.specs import SpecError, check_projector_type, mlp_depth

PROJECTOR_MARK = "mm_projector."
# Persistent buffers some checkpoints carry: counted as tensors, not as parameters.
BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
_LAYER = re.compile(r"^(\d+)\.(weight|bias)$")


def projector_params(projector_type: str, mm_hidden_size: int, hidden_size: int) -> int:
    """The formula: linear m*h + h; mlpNx_gelu adds N-1 layers of h*h + h; identity 0."""
    check_projector_type(projector_type)
    if projector_type == "identity":
        if mm_hidden_size != hidden_size:
            raise SpecError(f"projector 'identity' needs mm_hidden_size == hidden_size, got "
                            f"{mm_hidden_size} != {hidden_size}")
        return 0
    first = mm_hidden_size * hidden_size + hidden_size
    depth = 1 if projector_type == "linear" else mlp_depth(projector_type)
    return first + (depth - 1) * (hidden_size * hidden_size + hidden_size)


def param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def trainable_params(module) -> int:
    """Parameters with requires_grad: what stage 1 trains once only the projector is unfrozen."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def module_params(projector_type: str, mm_hidden_size: int, hidden_size: int) -> int:
    """The count of the module `build_projector` makes, built on the meta device."""
    import torch

    from ..model.projector import build_projector

    with torch.device("meta"):
        return param_count(build_projector(projector_type, mm_hidden_size, hidden_size))


@dataclass(frozen=True)
class ProjectorShape:
    """A projector as its tensors describe it (dims are None for identity: no tensors)."""

    type: str
    mm_hidden_size: int | None
    hidden_size: int | None


def projector_entries(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The projector's own names (`0.weight`, ...), reduced as stage 2's `get_w` reduces them."""
    return {key.split(PROJECTOR_MARK, 1)[1]: shape for key, shape in shapes.items()
            if PROJECTOR_MARK in key}


def infer_projector(shapes: dict[str, tuple[int, ...]], where: str) -> ProjectorShape:
    """The type and dims from keys and shapes: `weight`/`bias` is linear; `0.`, `2.`, ...
    `2(N-1).` is mlpNx_gelu; none is identity. Any other key or shape is an error."""
    own = projector_entries(shapes)
    if not own:
        return ProjectorShape("identity", None, None)
    if set(own) == {"weight", "bias"}:
        layers = {0: own}
        kind = "linear"
    else:
        layers = _mlp_layers(own, where)
        kind = f"mlp{len(layers)}x_gelu"
    first = layers[0].get("weight", ())
    if len(first) != 2:
        raise CheckpointError(f"{where}: the projector's first weight has shape {list(first)}, "
                              "expected [hidden_size, mm_hidden_size]")
    h, m = first
    for i, layer in layers.items():
        _check_layer(where, kind, i, layer, (h, m if i == 0 else h))
    return ProjectorShape(kind, m, h)


def _mlp_layers(own: dict, where: str) -> dict[int, dict[str, tuple[int, ...]]]:
    layers: dict[int, dict[str, tuple[int, ...]]] = {}
    for name, shape in own.items():
        match = _LAYER.match(name)
        if not match or int(match.group(1)) % 2:
            raise CheckpointError(f"{where}: projector tensor {name!r} fits no known projector "
                                  "(linear: weight/bias; mlpNx_gelu: 0., 2., 4., ...)")
        layers.setdefault(int(match.group(1)) // 2, {})[match.group(2)] = shape
    expected = set(range(len(layers)))
    if set(layers) != expected:
        missing = min(expected - set(layers))
        raise CheckpointError(f"{where}: projector layer {2 * missing} is missing (an "
                              f"mlp{len(layers)}x_gelu has Linear layers at 0, 2, ...)")
    return layers


def _check_layer(where: str, kind: str, i: int, layer: dict, weight: tuple[int, int]) -> None:
    prefix = "" if kind == "linear" else f"{2 * i}."
    for name, want in (("weight", weight), ("bias", weight[:1])):
        got = layer.get(name)
        if got != want:
            what = "is missing" if got is None else f"has shape {list(got)}"
            raise CheckpointError(f"{where}: {PROJECTOR_MARK}{prefix}{name} {what}; an {kind} "
                                  f"layer mapping {weight[1]} -> {weight[0]} needs {list(want)}")


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
    value = config.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{where}: {name} is {value!r}, not a positive integer (not a "
                              "LLaVA config?)")
    return value


def count(config: dict, shapes: dict[str, tuple[int, ...]], source: str, config_where: str,
          tensors_where: str, tensors_from: str) -> Counts:
    """Counts from a LLaVA config and every tensor's shape; a disagreement between the config
    and the tensors (type or dims) is a CheckpointError naming both."""
    inferred = infer_projector(shapes, tensors_where)
    config_type = config.get("mm_projector_type")
    built = config_type or "linear"  # what LLaVA's build_vision_projector falls back to
    if built != inferred.type:
        said = f"says {config_type!r}" if config_type else \
            "has no mm_projector_type, so LLaVA's builder silently builds 'linear'"
        raise CheckpointError(f"{config_where}: {said}, but the tensors in {tensors_where} are "
                              f"an {inferred.type!r} projector")
    m = _config_int(config, "mm_hidden_size", config_where)
    h = _config_int(config, "hidden_size", config_where)
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


def _read_config(path: Path) -> dict:
    from ..checkpoint.paths import inside
    from ..checkpoint.reader import read_json

    found = inside(path.parent, path.name, must_exist=False)
    if found is None:
        raise CheckpointError(f"{path}: not found; the projector type and dims come from it")
    return read_json(found, path)


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
    config_path = folder.path / "config.json"
    config = _read_config(config_path)
    sources = folder.tensors
    scheme = scheme_of(config, config_path)
    shapes = {key: meta.shape for key, meta in sources.items()}
    summary = None
    if scheme is not None:
        linears = quantized_linears(scheme, sources, folder.path)
        shapes = logical_shapes(sources, linears)
        summary = quantization_summary(scheme, linears, sources)
    where = str(folder.path / (folder.index_file or folder.files[0]))
    counts = count(config, shapes, str(folder.path), str(config_path), where, "file_headers")
    folder.check()
    return dataclasses.replace(counts, quantization=summary)


def count_preset(name: str) -> Counts:
    """Counts for a named preset: the config it writes and the tensors it plans."""
    from ..synth.configs import llava_config
    from ..synth.presets import preset

    spec = preset(name)
    shapes = {t.key: t.shape for t in model_tensors(spec.model, spec.checkpoint.legacy_buffers)}
    config = llava_config(spec.model, spec.model.vision.tower_name)
    return count(config, shapes, f"preset {name}", f"preset {name} config",
                 f"preset {name} layout", "planned_layout")
