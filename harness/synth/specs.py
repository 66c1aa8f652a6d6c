"""What a synthetic LLaVA checkpoint is: frozen, validated specs and the named presets.

A `ModelSpec` says what the model is (language model dims, vision tower dims, projector);
a `CheckpointSpec` says how it is laid out on disk (format, sharding, projector placement,
legacy buffers, seed). Both validate on construction and name the field, the value and what
is allowed, so a bad preset override fails before any byte is written.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ..llava.config import uses_image_newline
from ..llava.errors import ContractError
from ..llava.projector import check_projector_type as _check_type

DTYPES = ("float16", "bfloat16", "float32")
ARCHS = ("llama", "mistral")
FORMATS = ("bin", "safetensors")
PLACEMENTS = ("last", "first", "middle", "split")
ASPECT_RATIOS = ("pad", "square", "anyres")
# Pre-quantized checkpoints: bitsandbytes as transformers saves it, and key-level GPTQ / AWQ.
QUANTIZATIONS = ("nf4", "nf4-dq", "fp4", "int8", "gptq", "awq")


class SpecError(ContractError):
    """A spec field has a value outside what is allowed."""


def _fail(owner: str, name: str, value, allowed: str) -> None:
    raise SpecError(f"{owner}.{name}={value!r}: {allowed}")


def _positive(owner: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            _fail(owner, name, value, "must be a positive integer")


def _one_of(owner: str, name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        _fail(owner, name, value, f"must be one of {', '.join(allowed)}")


def check_projector_type(projector_type: str) -> None:
    """The contract's projector types, as a SpecError naming the spec field."""
    try:
        _check_type(projector_type, "ModelSpec.projector_type")
    except ContractError as exc:
        raise SpecError(str(exc)) from None


@dataclass(frozen=True)
class VisionSpec:
    """The CLIP vision tower whose features feed the projector."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 336
    patch_size: int = 14
    projection_dim: int = 768
    # What `mm_vision_tower` names when the harness does not build a tower folder itself.
    tower_name: str = "openai/clip-vit-large-patch14-336"

    def __post_init__(self) -> None:
        _positive("VisionSpec", self, "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "image_size", "patch_size", "projection_dim")
        if self.hidden_size % self.num_attention_heads:
            _fail("VisionSpec", "hidden_size", self.hidden_size,
                  f"must be divisible by num_attention_heads={self.num_attention_heads}")
        if self.image_size % self.patch_size:
            _fail("VisionSpec", "image_size", self.image_size,
                  f"must be divisible by patch_size={self.patch_size}")

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (CLS excluded): 576 for ViT-L/14 at 336 px."""
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ModelSpec:
    """A LLaVA model: language model, vision tower and the projector between them."""

    name: str
    arch: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    projector_type: str = "mlp2x_gelu"
    dtype: str = "float16"
    vision: VisionSpec = field(default_factory=VisionSpec)
    image_aspect_ratio: str = "pad"
    # LLaVA-NeXT ('spatial_unpad') adds a learned `model.image_newline` vector.
    mm_patch_merge_type: str = "flat"
    # LLaVA-NeXT checkpoints carry their fine-tuned vision tower inside the checkpoint.
    vision_in_checkpoint: bool = False
    tokenizer_model_max_length: int = 2048

    def __post_init__(self) -> None:
        _positive("ModelSpec", self, "vocab_size", "hidden_size", "intermediate_size",
                  "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "max_position_embeddings", "tokenizer_model_max_length")
        _one_of("ModelSpec", "arch", self.arch, ARCHS)
        _one_of("ModelSpec", "dtype", self.dtype, DTYPES)
        _one_of("ModelSpec", "image_aspect_ratio", self.image_aspect_ratio, ASPECT_RATIOS)
        _one_of("ModelSpec", "mm_patch_merge_type", self.mm_patch_merge_type,
                ("flat", "spatial", "spatial_unpad"))
        check_projector_type(self.projector_type)
        if self.hidden_size % self.num_attention_heads:
            _fail("ModelSpec", "hidden_size", self.hidden_size,
                  f"must be divisible by num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            _fail("ModelSpec", "num_key_value_heads", self.num_key_value_heads,
                  f"must divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            _fail("ModelSpec", "hidden_size", self.hidden_size,
                  "must give an even head_dim (rotary embeddings rotate pairs)")
        if self.rope_theta <= 0:
            _fail("ModelSpec", "rope_theta", self.rope_theta, "must be positive")
        if self.projector_type == "identity" and self.mm_hidden_size != self.hidden_size:
            _fail("ModelSpec", "projector_type", "identity",
                  f"needs mm_hidden_size == hidden_size, got {self.mm_hidden_size} != "
                  f"{self.hidden_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mm_hidden_size(self) -> int:
        """LLaVA sets mm_hidden_size from the vision tower; one source of truth here."""
        return self.vision.hidden_size

    @property
    def has_image_newline(self) -> bool:
        return uses_image_newline(self.mm_patch_merge_type)

    def replace(self, **overrides) -> ModelSpec:
        """A copy with fields replaced; `vision_<field>` and `mm_hidden_size` reach the tower."""
        vision_fields = {}
        for key in list(overrides):
            if key == "mm_hidden_size":
                vision_fields["hidden_size"] = overrides.pop(key)
            elif key.startswith("vision_"):
                vision_fields[key[len("vision_"):]] = overrides.pop(key)
        _check_fields(ModelSpec, overrides)
        _check_fields(VisionSpec, vision_fields)
        if vision_fields:
            overrides["vision"] = dataclasses.replace(self.vision, **vision_fields)
        return dataclasses.replace(self, **overrides)


@dataclass(frozen=True)
class CheckpointSpec:
    """How a checkpoint lies on disk. `shards` and `max_shard_size` are exclusive."""

    format: str = "bin"
    shards: int | None = None
    max_shard_size: int | None = 10 * 10**9  # transformers 4.31 default, "10GB"
    placement: str = "last"
    legacy_buffers: bool = True
    seed: int = 0
    # None: float weights. Otherwise the language model's decoder linears are stored
    # quantized (harness/checkpoint/quantized.py); embeddings, norms, lm_head and the
    # projector stay float, as bitsandbytes, GPTQ and AWQ leave them.
    quantization: str | None = None
    # GPTQ / AWQ only: bits per value and input features per scale group.
    quant_bits: int = 4
    quant_group_size: int = 128

    def __post_init__(self) -> None:
        _one_of("CheckpointSpec", "format", self.format, FORMATS)
        if self.quantization is not None:
            _one_of("CheckpointSpec", "quantization", self.quantization, QUANTIZATIONS)
        _positive("CheckpointSpec", self, "quant_group_size")
        if self.quant_bits not in (2, 4, 8):
            _fail("CheckpointSpec", "quant_bits", self.quant_bits,
                  "must be 2, 4 or 8 (values that pack evenly into int32)")
        _one_of("CheckpointSpec", "placement", self.placement, PLACEMENTS)
        if (self.shards is None) == (self.max_shard_size is None):
            _fail("CheckpointSpec", "shards", self.shards,
                  "give exactly one of shards and max_shard_size")
        if self.shards is not None:
            _positive("CheckpointSpec", self, "shards")
        if self.max_shard_size is not None:
            _positive("CheckpointSpec", self, "max_shard_size")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            _fail("CheckpointSpec", "seed", self.seed, "must be an integer in [0, 2**63)")

    def replace(self, **overrides) -> CheckpointSpec:
        _check_fields(CheckpointSpec, overrides)
        if "shards" in overrides and overrides["shards"] is not None:
            overrides.setdefault("max_shard_size", None)
        if "max_shard_size" in overrides and overrides["max_shard_size"] is not None:
            overrides.setdefault("shards", None)
        return dataclasses.replace(self, **overrides)


@dataclass(frozen=True)
class BuildSpec:
    """Everything that determines a synthetic checkpoint's bytes."""

    model: ModelSpec
    checkpoint: CheckpointSpec
    # Build a local CLIP tower folder and point mm_vision_tower at it (always for tiny).
    with_vision_tower: bool = False
    with_tokenizer: bool = False


def _check_fields(cls, overrides: dict) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in overrides:
        if key not in names:
            raise SpecError(f"{cls.__name__} has no field {key!r}; fields: "
                            f"{', '.join(sorted(names))}")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5*10**9, '5GiB' -> 5*2**30, as transformers' `max_shard_size` reads them."""
    if isinstance(text, int):
        return text
    if text.strip().isdigit():
        return int(text)
    match = _SIZE.match(text)
    if not match or match.group(2).upper() not in _UNITS:
        raise SpecError(f"size {text!r}: expected a number with a unit such as 500MB, 5GB, 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def spec_from_dict(data: dict) -> BuildSpec:
    """Inverse of `dataclasses.asdict(BuildSpec)`, validating as construction does."""
    model = dict(data["model"])
    model["vision"] = VisionSpec(**model["vision"])
    return BuildSpec(model=ModelSpec(**model), checkpoint=CheckpointSpec(**data["checkpoint"]),
                     with_vision_tower=data.get("with_vision_tower", False),
                     with_tokenizer=data.get("with_tokenizer", False))
