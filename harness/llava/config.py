"""A LLaVA folder's config.json: read once, safely, and held to a schema before anything uses it.

The schema is every field the harness or LLaVA's loader reads: its type, its range or choices,
and what the loader does when it is absent (its default). `checked(config)` returns the config
when every present field is well formed and raises a `ConfigError` naming the first field that
is not, so a hostile or broken value is one line and exit 2 wherever it is met, never a
traceback from deep inside torch or transformers. Fields nobody reads are left alone.

It also holds the config rules that more than one operation needs: which fields are LLaVA's own
(stripping drops them), the architecture a config describes, and how large a model a config
claims (work is bounded by the bytes in the folder, not by what a config says).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .projector import TYPES_TEXT, mlp_depth

CONFIG = "config.json"
DTYPES = ("float16", "bfloat16", "float32")


# --- field checks: each returns None when the value is fine, else what was expected ---------

def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def positive_int(value) -> str | None:
    return None if _int(value) and value > 0 else "a positive integer"


def non_negative_int(value) -> str | None:
    return None if _int(value) and value >= 0 else "a non-negative integer"


def any_int(value) -> str | None:
    return None if _int(value) else "an integer"


def positive_number(value) -> str | None:
    return None if _number(value) and value > 0 else "a positive finite number"


def probability(value) -> str | None:
    return None if _number(value) and 0 <= value <= 1 else "a number in [0, 1]"


def boolean(value) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def text(value) -> str | None:
    return None if isinstance(value, str) and value else "a non-empty string"


def string_list(value) -> str | None:
    ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    return None if ok else "a list of strings"


def one_of(*choices) -> Callable:
    def check(value) -> str | None:
        return None if value in choices else "one of " + ", ".join(map(repr, choices))
    return check


def nullable(check: Callable) -> Callable:
    def inner(value) -> str | None:
        if value is None:
            return None
        found = check(value)
        return None if found is None else f"{found} or null"
    return inner


def token_ids(value) -> str | None:
    """A token id, or a list of them (generation configs allow several eos ids)."""
    if isinstance(value, list) and value and all(_int(v) and v >= 0 for v in value):
        return None
    return non_negative_int(value) and "a non-negative integer or a list of them"


def projector_type(value) -> str | None:
    if value in ("linear", "identity"):
        return None
    depth = mlp_depth(value)
    return None if depth is not None and depth >= 1 else TYPES_TEXT


def merge_type(value) -> str | None:
    ok = isinstance(value, str) and (value == "flat" or value.startswith("spatial"))
    return None if ok else "'flat' or 'spatial', 'spatial_unpad', ... (LLaVA's choices)"


def select_layers(value) -> str | None:
    if _int(value) or (isinstance(value, list) and value and all(_int(v) for v in value)):
        return None
    return "an integer or a list of integers"


# transformers' activation functions (ACT2FN) a Llama / Mistral / CLIP config may name.
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh",
               "gelu_accurate", "gelu_python", "gelu_10", "quick_gelu", "relu", "relu2", "relu6",
               "leaky_relu", "tanh", "sigmoid", "mish", "linear", "laplace")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


def rope_scaling(value) -> str | None:
    if value is None:
        return None
    expected = (f"null or an object with a rope_type (or type) in {', '.join(ROPE_TYPES)} and "
                "a positive factor")
    if not isinstance(value, dict):
        return expected
    kind = value.get("rope_type", value.get("type", "default"))
    factor = value.get("factor", 1.0)
    if kind not in ROPE_TYPES or not _number(factor) or factor <= 0:
        return expected
    return None


def parse_pinpoints(raw) -> list[tuple[int, int]]:
    """`image_grid_pinpoints` as (width, height) pairs; LLaVA also accepts the list written as a
    string. ValueError saying what was expected otherwise."""
    if isinstance(raw, str):
        if len(raw) > 10_000:
            raise ValueError("a list of [width, height] pairs (this string is too long)")
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise ValueError("a list of [width, height] pairs (an unreadable string)") from None
    if not isinstance(raw, (list, tuple)) or not raw or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(_int(v) and v > 0 for v in p)
            for p in raw):
        raise ValueError("a non-empty list of [width, height] pairs of positive integers")
    return [(int(w), int(h)) for w, h in raw]


def pinpoints(value) -> str | None:
    if value is None:
        return None
    try:
        parse_pinpoints(value)
    except ValueError as exc:
        return f"{exc} or null"
    return None


def json_object(value) -> str | None:
    return None if isinstance(value, dict) else "an object"


@dataclass(frozen=True)
class Field:
    """One config field: its check, and what LLaVA's loader (or transformers) does when it is
    absent."""

    check: Callable
    default: object = None
    meaning: str = ""


# The language model's fields (Llama / Mistral), at the top level of an original config and in
# a llava-hf config's text_config.
LANGUAGE_MODEL = {
    "vocab_size": Field(positive_int, 32000, "rows of embed_tokens and lm_head"),
    "hidden_size": Field(positive_int, 4096),
    "intermediate_size": Field(positive_int, 11008),
    "num_hidden_layers": Field(positive_int, 32),
    "num_attention_heads": Field(positive_int, 32),
    "num_key_value_heads": Field(nullable(positive_int), None, "num_attention_heads if absent"),
    "head_dim": Field(nullable(positive_int), None, "hidden_size // num_attention_heads"),
    "max_position_embeddings": Field(positive_int, 2048),
    "rms_norm_eps": Field(positive_number, 1e-6),
    "rope_theta": Field(positive_number, 10000.0),
    "rope_scaling": Field(rope_scaling, None),
    "hidden_act": Field(one_of(*ACTIVATIONS), "silu"),
    "initializer_range": Field(positive_number, 0.02),
    "tie_word_embeddings": Field(boolean, False),
    "use_cache": Field(boolean, True),
    "pretraining_tp": Field(positive_int, 1),
    "attention_bias": Field(boolean, False),
    "attention_dropout": Field(probability, 0.0),
    "mlp_bias": Field(boolean, False),
    "sliding_window": Field(nullable(positive_int), None, "Mistral only"),
    "bos_token_id": Field(nullable(token_ids), 1),
    "eos_token_id": Field(nullable(token_ids), 2),
    "pad_token_id": Field(nullable(token_ids), None),
    "torch_dtype": Field(nullable(one_of(*DTYPES)), None, "the stored dtype"),
    "dtype": Field(nullable(one_of(*DTYPES)), None, "transformers 5's name for torch_dtype"),
    "model_type": Field(text, None),
    "architectures": Field(nullable(string_list), None),
}

# The original LLaVA layout's own fields (llava/model/llava_arch.py, mm_utils.py,
# builder.py), with what the original does when one is absent.
LLAVA = {
    "mm_vision_tower": Field(text, None, "no vision tower: a plain language model"),
    "mm_hidden_size": Field(positive_int, None, "the tower's hidden size"),
    "mm_projector_type": Field(projector_type, "linear", "builds a linear projector"),
    "mm_vision_select_layer": Field(any_int, None, "required by the tower (an error if absent)"),
    "mm_vision_select_feature": Field(one_of("patch", "cls_patch"), "patch"),
    "mm_patch_merge_type": Field(merge_type, "flat"),
    "image_aspect_ratio": Field(nullable(text), "square",
                                "'pad' pads, 'anyres' crops, anything else squashes"),
    "image_grid_pinpoints": Field(pinpoints, None, "required by anyres"),
    "mm_use_im_start_end": Field(boolean, False),
    "mm_use_im_patch_token": Field(boolean, False),
    "tune_mm_mlp_adapter": Field(boolean, False),
    "freeze_mm_mlp_adapter": Field(boolean, False),
    "unfreeze_mm_vision_tower": Field(boolean, False,
                                      "the stored tower is ignored unless this is true"),
    "use_mm_proj": Field(boolean, True),
    "mm_projector_lr": Field(nullable(positive_number), None),
    "mm_vision_tower_lr": Field(nullable(positive_number), None),
    "mm_resampler_type": Field(nullable(text), None),
    "tokenizer_model_max_length": Field(nullable(positive_int), None,
                                        "no truncation of the spliced sequence"),
    "tokenizer_padding_side": Field(one_of("right", "left"), "right"),
}

# llava-hf (LlavaForConditionalGeneration / LlavaNextForConditionalGeneration).
LLAVA_HF = {
    "text_config": Field(json_object, None),
    "vision_config": Field(json_object, None),
    "image_token_index": Field(non_negative_int, 32000),
    "image_token_id": Field(non_negative_int, None),
    "projector_hidden_act": Field(one_of(*ACTIVATIONS), "gelu"),
    "vision_feature_select_strategy": Field(one_of("default", "full"), "default"),
    "vision_feature_layer": Field(select_layers, -2),
    "image_seq_length": Field(positive_int, 576),
    "image_grid_pinpoints": Field(pinpoints, None),
    "multimodal_projector_bias": Field(boolean, True),
    "architectures": Field(nullable(string_list), None),
    "model_type": Field(text, None),
    "torch_dtype": Field(nullable(one_of(*DTYPES)), None),
    "dtype": Field(nullable(one_of(*DTYPES)), None),
}

# A CLIP vision tower's config.json (or a llava-hf vision_config).
TOWER = {
    "hidden_size": Field(positive_int, 768),
    "intermediate_size": Field(positive_int, 3072),
    "num_hidden_layers": Field(positive_int, 12),
    "num_attention_heads": Field(positive_int, 12),
    "image_size": Field(positive_int, 224),
    "patch_size": Field(positive_int, 32),
    "projection_dim": Field(positive_int, 512),
    "num_channels": Field(positive_int, 3),
    "layer_norm_eps": Field(positive_number, 1e-5),
    "hidden_act": Field(one_of(*ACTIVATIONS), "quick_gelu"),
    "model_type": Field(text, None),
}


def tower_problems(data, where: str) -> list[str]:
    """A CLIP tower folder's config.json (a full CLIPModel's keeps the tower in
    vision_config)."""
    if not isinstance(data, dict):
        return [f"{where}: expected a JSON object, got {type(data).__name__}"]
    if isinstance(data.get("vision_config"), dict):
        return field_problems(data["vision_config"], TOWER, where, "vision_config.")
    return field_problems(data, TOWER, where)


def field_problems(data: dict, schema: dict[str, Field], where: str,
                   prefix: str = "") -> list[str]:
    """One line per present field whose value the schema refuses."""
    problems = []
    for name, spec in schema.items():
        if name in data:
            expected = spec.check(data[name])
            if expected is not None:
                problems.append(f"{where}: {prefix}{name} is {_shown(data[name])}, expected "
                                f"{expected}")
    return problems


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
    from ..checkpoint.paths import inside
    from ..checkpoint.reader import read_json

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


def claimed_parameters(lm: dict) -> int:
    """How many language-model parameters a (checked) config claims: embeddings, every layer's
    attention and MLP, norms, lm_head."""
    h = lm.get("hidden_size", 4096)
    heads = lm.get("num_attention_heads", 32)
    kv = lm.get("num_key_value_heads") or heads
    head_dim = lm.get("head_dim") or h // max(heads, 1)
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2
    mlp = 3 * h * lm.get("intermediate_size", 11008)
    layer = attention + mlp + 2 * h
    return 2 * lm.get("vocab_size", 32000) * h + lm.get("num_hidden_layers", 32) * layer + h


def lm_fields(data: dict) -> dict:
    """The language model's fields of either layout."""
    if is_hf_layout(data) and isinstance(data.get("text_config"), dict):
        return data["text_config"]
    return data


# The most tensors a LLaVA model of a config can store: every language-model layer's, a legacy
# buffer each, a projector of up to 8 Linear layers, image_newline, a stored CLIP tower of up to
# 64 layers, and each linear split into up to 6 tensors by a pre-quantized layout.
_LAYER_TENSORS, _TOWER_LAYERS, _TOWER_LAYER_TENSORS, _QUANT_SPLIT = 10, 64, 16, 6


def tensor_bound(data: dict) -> int:
    layers = lm_fields(data).get("num_hidden_layers", 32)
    plain = layers * _LAYER_TENSORS + 3 + 16 + 1 + _TOWER_LAYERS * _TOWER_LAYER_TENSORS + 16
    return _QUANT_SPLIT * plain + 256


def check_folder_claims(folder, data: dict, where: Path | str) -> None:
    """Before any module is built or any header scanned past the index: the index of
    `folder` (a CheckpointFolder) lists no more tensors than a model of the config `data` can
    have, and the config claims no model far larger than the bytes the folder holds."""
    tensor_count = len(folder.weight_map) if folder.weight_map is not None else None
    stored_bytes = folder.total_size if folder.total_size is not None else sum(
        folder.file_path(f).stat().st_size for f in folder.files)
    bound = tensor_bound(data)
    if tensor_count is not None and tensor_count > bound:
        raise ConfigError(f"{where}: the checkpoint lists {tensor_count:,} tensors; a LLaVA "
                          f"model of this config has at most {bound:,}")
    check_claim(lm_fields(data), stored_bytes, where)


# A quantized folder stores 4 bits a parameter at the least; anything claimed beyond this many
# times what the folder holds is a config that lies about its model.
_SLACK = 4


def check_claim(lm: dict, stored_bytes: int, where: Path | str) -> None:
    """Refuse a config that claims a model far larger than the bytes in the folder, before any
    module is built from it: work stays bounded by the files, not by what a config says."""
    claimed = claimed_parameters(lm)
    if claimed / 2 > _SLACK * max(stored_bytes, 1):
        raise ConfigError(f"{where}: claims a {claimed:,}-parameter language model "
                          f"({claimed / 2e9:.1f} GB even at 4 bits), but the folder holds "
                          f"{stored_bytes:,} bytes of tensors")
