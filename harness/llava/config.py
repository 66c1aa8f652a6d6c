"""A LLaVA folder's config.json: read once, safely, and held to a schema before anything uses it.

The schema is every field the harness or LLaVA's loader reads: its type, its range or choices,
and what the loader does when it is absent (its default). `checked(config)` returns the config
when every present field is well formed and raises a `ConfigError` naming the first field that
is not, so a hostile or broken value is one line and exit 2 wherever it is met, never a
traceback from deep inside torch or transformers. Fields nobody reads are left alone.

The fields and their checks are in fields.py. This module holds the config rules more than one
operation needs: which fields are LLaVA's own (stripping drops them), the architecture a config
describes, which fields a full config needs and what the loaders assume when one is absent.
What a config claims against the bytes in its folder is claims.py.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.paths import inside
from ..checkpoint.reader import read_json
from .errors import ConfigError
from .fields import (DTYPES, LANGUAGE_MODEL, LLAVA, LLAVA_HF, TOWER, Field, field_problems,
                     parse_pinpoints)
from .projector import DEFAULT_TYPE

CONFIG = "config.json"
__all__ = ["CONFIG", "DTYPES", "Field", "parse_pinpoints"]


def tower_problems(data, where: str) -> list[str]:
    """A CLIP tower folder's config.json (a full CLIPModel's keeps the tower in
    vision_config)."""
    if not isinstance(data, dict):
        return [f"{where}: expected a JSON object, got {type(data).__name__}"]
    if isinstance(data.get("vision_config"), dict):
        return field_problems(data["vision_config"], TOWER, where, "vision_config.")
    return field_problems(data, TOWER, where)


def is_hf_layout(data: dict) -> bool:
    return "text_config" in data or any(
        isinstance(a, str) and a.startswith("Llava") and a.endswith("ForConditionalGeneration")
        for a in _list(data.get("architectures")))


def _list(value) -> list:
    return value if isinstance(value, list) else []


def config_problems(data, where: str) -> list[str]:
    """Every malformed field of a model folder's config.json (either layout), one line each,
    and the cross-field rules a loader would trip over."""
    if not isinstance(data, dict):
        return [f"{where}: expected a JSON object, got {type(data).__name__}"]
    if is_hf_layout(data):
        problems = field_problems(data, LLAVA_HF, where)
        for part, schema in (("text_config", LANGUAGE_MODEL), ("vision_config", TOWER)):
            if isinstance(data.get(part), dict):
                problems += field_problems(data[part], schema, where, f"{part}.")
        if isinstance(data.get("text_config"), dict) and not problems:
            problems += _shape_rules(data["text_config"], where, "text_config.")
        return problems
    problems = field_problems(data, LANGUAGE_MODEL, where) + \
        field_problems(data, LLAVA, where)
    return problems or _shape_rules(data, where) + _llava_rules(data, where)


def _shape_rules(lm: dict, where: str, prefix: str = "") -> list[str]:
    """Attention geometry every Llama/Mistral needs."""
    heads, hidden = lm.get("num_attention_heads"), lm.get("hidden_size")
    kv = lm.get("num_key_value_heads") or heads
    out = []
    if heads and hidden and lm.get("head_dim") is None and hidden % heads:
        out.append(f"{where}: {prefix}hidden_size {hidden} is not a multiple of "
                   f"{prefix}num_attention_heads {heads}")
    if heads and kv and heads % kv:
        out.append(f"{where}: {prefix}num_attention_heads {heads} is not a multiple of "
                   f"{prefix}num_key_value_heads {kv}")
    return out


def _llava_rules(data: dict, where: str) -> list[str]:
    out = []
    if data.get("mm_projector_type") == "identity" and "mm_hidden_size" in data and \
            data.get("mm_hidden_size") != data.get("hidden_size"):
        out.append(f"{where}: mm_projector_type 'identity' needs mm_hidden_size "
                   f"({data['mm_hidden_size']}) == hidden_size ({data.get('hidden_size')})")
    if data.get("image_aspect_ratio") == "anyres" and not data.get("image_grid_pinpoints"):
        out.append(f"{where}: image_aspect_ratio 'anyres' needs image_grid_pinpoints (LLaVA's "
                   "anyres preprocessing picks a grid from them)")
    return out


def checked(data, where: Path | str) -> dict:
    """`data` when well formed; else a ConfigError naming the first malformed field."""
    problems = config_problems(data, str(where))
    if problems:
        raise ConfigError(problems[0])
    return data


def read_config(folder: Path, name: str = CONFIG, check: bool = True) -> dict:
    """A model folder's config.json, resolved inside the folder (a link out is refused),
    size-capped, and (with `check`) held to the schema."""
    path = Path(folder) / name
    found = inside(Path(folder), name, must_exist=False)
    if found is None:
        raise ConfigError(f"{path}: missing (every model folder needs a {name})")
    data = read_json(found, path)
    return checked(data, path) if check else data


def read_tower_config(folder: Path) -> dict:
    """A CLIP tower folder's config.json, held to the tower's schema."""
    data = read_config(folder, check=False)
    problems = tower_problems(data, str(Path(folder) / CONFIG))
    if problems:
        raise ConfigError(problems[0])
    return data


def architectures(data: dict) -> list[str]:
    """`architectures` as a list of strings (the schema has refused anything else)."""
    return [a for a in _list(data.get("architectures")) if isinstance(a, str)]


def names_of(data: dict) -> str:
    """model_type and architectures, lower case, for matching names."""
    model_type = data.get("model_type") if isinstance(data.get("model_type"), str) else ""
    return " ".join([model_type, *architectures(data)]).lower()


def architecture_of(data: dict, where: Path | str = CONFIG) -> str:
    """'llama' or 'mistral'; MPT and anything else are a clear error."""
    names = names_of(data.get("text_config") if isinstance(data.get("text_config"), dict)
                     else data) if is_hf_layout(data) else names_of(data)
    if "mpt" in names:
        raise ConfigError(f"{where}: MPT-based LLaVA is not supported (its modelling code is "
                          "remote code that cannot be fetched offline)")
    if "mistral" in names:
        return "mistral"
    if "llama" in names or "llava" in names:
        return "llama"
    raise ConfigError(f"{where}: model_type {data.get('model_type')!r} is not a Llama or "
                      "Mistral (LLaVA) model")


def is_llava_config(data: dict) -> bool:
    """A config of a LLaVA model (either layout): a vision tower, or a LLaVA architecture."""
    return bool(data.get("mm_vision_tower")) or is_hf_layout(data) or "llava" in names_of(data)


# Fields of a LLaVA config that are LLaVA's own: every `mm_*` (and `tune_mm_*`, `use_mm_proj`,
# ...), vision and image field, llava-hf's multimodal fields, and LLaVA's training copies of the
# tokenizer settings. Stripping to a plain language model drops them, and a plain model's
# config must not carry them.
_LLAVA_ONLY_FIELDS = {"tokenizer_model_max_length", "tokenizer_padding_side", "text_config",
                      "projector_hidden_act", "multimodal_projector_bias"}


def is_llava_field(name: str) -> bool:
    return ("mm_" in name or "vision" in name or name.startswith("image_")
            or name in _LLAVA_ONLY_FIELDS)


def language_model_fields(data: dict) -> dict:
    """The plain language model's part of an original LLaVA config."""
    return {k: v for k, v in data.items() if not is_llava_field(k)}


# What a save writes besides the constructor arguments: the class names, and the stamps.
_NOT_ARGUMENTS = {"model_type", "architectures", "transformers_version", "_name_or_path",
                  "_commit_hash"}


def constructor_fields(data: dict) -> dict:
    """The fields a transformers config class takes as arguments. A null `rope_scaling` (the
    published v1.5 configs have one) is left out: it means no scaling, and transformers 5 warns
    about the key itself."""
    fields = {k: v for k, v in data.items() if k not in _NOT_ARGUMENTS}
    if "rope_scaling" in fields and fields["rope_scaling"] is None:
        del fields["rope_scaling"]
    return fields


# What a full LLaVA config of each layout must state (the loaders build nothing without it).
REQUIRED = {"original": ("mm_vision_tower", "mm_hidden_size", "hidden_size", "num_hidden_layers",
                         "num_attention_heads", "intermediate_size", "vocab_size"),
            "hf": ("text_config", "vision_config")}
REQUIRED_HF_PARTS = {"text_config": ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "intermediate_size", "vocab_size"),
                     "vision_config": ("hidden_size",)}


def uses_image_newline(merge_type) -> bool:
    """Whether a mm_patch_merge_type has LLaVA build (and the checkpoint store) image_newline:
    the `*unpad*` merges of LLaVA-1.6."""
    return "unpad" in (merge_type or "")


def missing_fields(data: dict) -> list[str]:
    """The required fields a full LLaVA config of its layout lacks (dotted for hf parts)."""
    if not is_hf_layout(data):
        return [f for f in REQUIRED["original"] if f not in data]
    out = [f for f in REQUIRED["hf"] if not isinstance(data.get(f), dict)]
    for part, fields in REQUIRED_HF_PARTS.items():
        if isinstance(data.get(part), dict):
            out += [f"{part}.{f}" for f in fields if f not in data[part]]
    return out


def projector_type_of(data: dict) -> str:
    """The projector the loaders build: llava-hf's is always LLaVA's mlp2x_gelu; the original
    builds `mm_projector_type`, linear when absent."""
    if is_hf_layout(data):
        return "mlp2x_gelu"
    return data.get("mm_projector_type") or DEFAULT_TYPE


def mm_hidden_size_of(data: dict) -> int | None:
    """The projector's input width: the tower's hidden size."""
    if is_hf_layout(data):
        return (data.get("vision_config") or {}).get("hidden_size")
    return data.get("mm_hidden_size")


def lm_fields(data: dict) -> dict:
    """The language model's fields of either layout."""
    if is_hf_layout(data) and isinstance(data.get("text_config"), dict):
        return data["text_config"]
    return data




def rope_4x(fields: dict) -> dict:
    """`fields` with transformers 5's `rope_parameters` spelled as the 4.x `rope_theta` (and
    `rope_scaling` for a non-default type), which LLaVA's code and older configs use: the same
    model either way."""
    rope = fields.get("rope_parameters")
    if not isinstance(rope, dict):
        return dict(fields)
    out = {k: v for k, v in fields.items() if k != "rope_parameters"}
    out["rope_theta"] = rope.get("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out
