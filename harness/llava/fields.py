"""The schema of a LLaVA folder's config files: one check per field (None when the value is
fine, else what was expected), and the fields of each part with what a loader does when one is
absent. Read through harness/llava/config.py."""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass

from .projector import TYPES_TEXT, mlp_depth

DTYPES = ("float16", "bfloat16", "float32")


# --- field checks: each returns None when the value is fine, else what was expected ---------

def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) < 2**1023 if isinstance(value, int) else math.isfinite(value)


# No dimension or id of any model reaches it; past it, sizes overflow torch's int64 products.
INT_LIMIT = 2**31


def positive_int(value) -> str | None:
    ok = _int(value) and 0 < value < INT_LIMIT
    return None if ok else "a positive integer below 2**31"


def non_negative_int(value) -> str | None:
    return None if _int(value) and 0 <= value < INT_LIMIT else \
        "a non-negative integer below 2**31"


def any_int(value) -> str | None:
    return None if _int(value) and abs(value) < INT_LIMIT else "an integer of size below 2**31"


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


